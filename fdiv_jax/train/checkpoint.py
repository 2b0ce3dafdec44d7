"""Checkpoints of the whole f-DPG state with Orbax, and preemption handling.

`Checkpointer(directory)` wraps an `orbax.checkpoint.CheckpointManager`:

  - `save(step, state)` writes every array of the `FDPGState` (policy, optimiser,
    base model, proposal, log Ẑ, baseline, RNG, EMA, counters) every
    `save_every` steps or when forced, keeping the latest `keep` checkpoints;
  - `restore(abstract_state)` restores the latest step onto the shardings of
    `abstract_state` (e.g. the current mesh's), so a run resumes exactly;
  - a missing checkpoint is reported by `latest_step() is None`: starting
    fresh is the caller's explicit decision. A directory that holds something
    that cannot be restored raises `CheckpointError` naming the path — never a
    silent fresh start, and nothing already saved is deleted.

`PreemptionGuard` turns SIGTERM/SIGINT into a flag that the host loop checks
after each step, so the last completed step is saved before the process exits.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint directory exists but cannot be restored."""


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`, for restoring."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class Checkpointer:
  """Saves and restores `FDPGState`s under `directory` (see module docstring)."""

  def __init__(self, directory: str, save_every: int = 1, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # noqa: BLE001 - any failure is reported with the path
      raise CheckpointError(f"Cannot open the checkpoint directory {self.directory}: "
                            f"{e}") from e

  def latest_step(self) -> int | None:
    """The newest saved step, or None when nothing was saved here."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def has_foreign_content(self) -> bool:
    """True when the directory holds entries but no step Orbax recognises."""
    if self.latest_step() is not None or not os.path.isdir(self.directory):
      return False
    return any(not name.startswith(".") for name in os.listdir(self.directory))

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves `state` as `step` if due (`step % save_every == 0`) or forced."""
    if not force and step % self.save_every:
      return False
    if step in self.all_steps():
      return False
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()
    return bool(saved)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: the latest) with the structure, dtypes and
    shardings of `abstract_state`.

    Raises:
      CheckpointError: there is no checkpoint, or it is corrupt / incompatible.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(
          f"No checkpoint to restore in {self.directory}"
          + (" (the directory holds files that are not Orbax checkpoints)"
             if self.has_foreign_content() else "") + ".")
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # noqa: BLE001 - reported with the path and step
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} cannot be restored ("
          f"{type(e).__name__}: {e}). It is corrupt or from an incompatible "
          f"config; nothing was deleted. Move it away, or use a new --workdir to "
          f"start fresh.") from e

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Records SIGTERM / SIGINT instead of dying mid-step (context manager).

  Inside the `with` block, the first signal sets `requested`; the loop then
  saves the last completed step and stops. A second SIGINT restores the
  default behaviour (Ctrl-C twice kills at once).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
