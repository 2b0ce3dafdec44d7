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

LoRA states (`FDPGState.frozen_base` set) leave the frozen base weights out:
a checkpoint holds the adapters, optimiser and f-DPG state, and records which
base weights they belong to (`frozen_base`: path and fingerprint, in the
step's custom metadata). `abstract_like` keeps the base weights as they are,
`restore` puts them back after checking the fingerprint: a checkpoint of other
base weights, or a full-fine-tuning checkpoint under LoRA (and vice versa), is
a `CheckpointError` naming both.

Crashes, full disks and other runs' checkpoints:

  - Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to
    `<step>` once every file is written (an atomic rename on a POSIX file
    system). A process killed mid-save leaves only that temporary directory:
    it is never taken for a checkpoint (`is_temporary`), it is removed when
    the directory is next opened, and the steps saved before are intact.
  - A save that fails (a full disk, an unwritable directory) raises
    `CheckpointError` naming the directory, the step and the cause; its
    partial files are removed and the earlier checkpoints are left untouched.
  - `identity`, a small JSON-able dict (the trained divergence, the model's
    size, ...: `train.loop.run_identity`), is recorded with every step;
    restoring a step recorded under another identity raises `CheckpointError`
    naming the fields that differ, and deletes nothing.

`PreemptionGuard` turns SIGTERM/SIGINT into a flag that the host loop checks
after each step, so the last completed step is saved before the process exits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint cannot be restored (corrupt, another run's) or saved (a full
  disk, an unwritable directory); the message names the directory."""


# Orbax (0.11, 0.12) writes step N into "N.orbax-checkpoint-tmp" (some versions
# add "-<timestamp>") and renames it to "N" when complete.
TMP_MARKER = ".orbax-checkpoint-tmp"
_IDENTITY_KEY = "fdiv_jax_run"


def is_temporary(name: str) -> bool:
  """True for the name of an unfinished (in-progress or crashed) Orbax save."""
  return TMP_MARKER in name


_BASE_KEY = "frozen_base"


def _frozen_base(state: Any):
  return getattr(state, "frozen_base", None)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`, for restoring; a
  LoRA state's frozen base weights stay as they are (not in checkpoints)."""
  if _frozen_base(state) is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          state.replace(base_params=None))
  return abstract.replace(base_params=state.base_params)


class Checkpointer:
  """Saves and restores `FDPGState`s under `directory` (see module docstring)."""

  def __init__(self, directory: str, save_every: int = 1, keep: int = 3,
               identity: Mapping[str, Any] | None = None):
    self.directory = os.path.abspath(directory)
    self.save_every = int(save_every)
    # Through JSON once, so that it compares equal to what a checkpoint records.
    self.identity = (json.loads(json.dumps(dict(identity), sort_keys=True))
                     if identity else None)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    try:
      self._remove_unfinished()  # what a killed save left
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # noqa: BLE001 - any failure is reported with the path
      raise CheckpointError(f"Cannot open the checkpoint directory {self.directory}: "
                            f"{e}") from e

  def _remove_unfinished(self, step: int | None = None) -> None:
    """Removes unfinished saves (of `step`, or all), on the first process only.

    Synchronous, unlike Orbax's `cleanup_tmp_directories` (a background
    thread that two managers opened in turn on one directory would race)."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if is_temporary(name) and (step is None or name.split(".", 1)[0] == str(step)):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def latest_step(self) -> int | None:
    """The newest saved step, or None when nothing was saved here."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def has_foreign_content(self) -> bool:
    """True when the directory holds entries but no step Orbax recognises
    (hidden files and unfinished saves, `is_temporary`, do not count)."""
    if self.latest_step() is not None or not os.path.isdir(self.directory):
      return False
    return any(not name.startswith(".") and not is_temporary(name)
               for name in os.listdir(self.directory))

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves `state` as `step` if due (`step % save_every == 0`) or forced.

    Raises:
      CheckpointError: the step cannot be written (a full disk, an unwritable
        directory); its partial files are removed, earlier steps are kept.
    """
    if not force and step % self.save_every:
      return False
    if step in self.all_steps():
      return False
    metadata = None
    frozen = _frozen_base(state)
    if frozen is not None:  # LoRA: the base weights are named, not saved
      metadata = {_BASE_KEY: {"path": frozen.path,
                              "fingerprint": frozen.fingerprint}}
      state = state.replace(base_params=None)
    if self.identity:
      metadata = {**(metadata or {}), _IDENTITY_KEY: self.identity}
    try:
      saved = self._manager.save(step, args=ocp.args.StandardSave(state),
                                 force=True, custom_metadata=metadata)
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - reported with the path and step
      raise self._save_failed(step, e) from e
    return bool(saved)

  def _save_failed(self, step: int, error: Exception) -> CheckpointError:
    """Removes what the failed save of `step` wrote; the error to raise."""
    try:
      self._remove_unfinished(step)
      self._manager.reload()  # forget the step that was not written
      kept = self.latest_step()
    except Exception:  # noqa: BLE001 - the directory may be unreadable too
      kept = None
    return CheckpointError(
        f"Cannot save checkpoint step {step} in {self.directory} "
        f"({type(error).__name__}: {error}). "
        + (f"The last good checkpoint, step {kept}, is intact. "
           if kept is not None else "No earlier checkpoint was saved here. ")
        + "Free some disk space or make the directory writable, then run the "
        "same command again to resume.")

  def recorded_identity(self, step: int) -> dict | None:
    """The `identity` recorded with `step` (None: none was)."""
    try:
      custom = self._manager.metadata(step).custom_metadata or {}
    except Exception:  # noqa: BLE001 - unreadable metadata: restore reports it
      return None
    return custom.get(_IDENTITY_KEY)

  def _check_identity(self, step: int) -> None:
    """Raises `CheckpointError` when `step` was recorded by another run (the
    fields both record and that differ)."""
    saved = self.recorded_identity(step)
    if not saved or not self.identity:
      return
    differ = [f"{key} {saved[key]!r} there, {self.identity[key]!r} here"
              for key in sorted(set(saved) & set(self.identity))
              if saved[key] != self.identity[key]]
    if differ:
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} was written by a "
          f"different run: {'; '.join(differ)}. Nothing was deleted. Resume "
          f"with the settings it was written with, or use a new --workdir to "
          f"start fresh.")

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: the latest) with the structure, dtypes and
    shardings of `abstract_state`.

    Raises:
      CheckpointError: there is no checkpoint, it is corrupt / incompatible, or
        it records another `identity`.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(
          f"No checkpoint to restore in {self.directory}"
          + (" (the directory holds files that are not Orbax checkpoints)"
             if self.has_foreign_content() else "") + ".")
    self._check_identity(step)
    frozen = _frozen_base(abstract_state)
    base_params = None
    self._check_base(step, frozen)
    if frozen is not None:
      base_params = abstract_state.base_params
      if any(not isinstance(x, jax.Array) for x in jax.tree.leaves(base_params)):
        raise CheckpointError(
            "restore: a LoRA state's base weights are not in the checkpoint; "
            "pass them as arrays (checkpoint.abstract_like keeps them).")
      abstract_state = abstract_state.replace(base_params=None)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract_state))
      return (restored if frozen is None
              else restored.replace(base_params=base_params))
    except Exception as e:  # noqa: BLE001 - reported with the path and step
      raise CheckpointError(
          f"Checkpoint step {step} in {self.directory} cannot be restored ("
          f"{type(e).__name__}: {e}). It is corrupt or from an incompatible "
          f"config; nothing was deleted. Move it away, or use a new --workdir to "
          f"start fresh.") from e

  def _check_base(self, step: int, frozen) -> None:
    """The checkpoint's recorded base weights (if any) are `frozen`'s."""
    try:
      custom = self._manager.metadata(step).custom_metadata or {}
    except Exception:  # noqa: BLE001 - no readable metadata: nothing recorded
      custom = {}
    saved = custom.get(_BASE_KEY)
    where = f"Checkpoint step {step} in {self.directory}"
    if saved is None and frozen is None:
      return
    if saved is None:
      raise CheckpointError(
          f"{where} holds a full fine-tuning state, but this run trains LoRA "
          f"adapters on {frozen.path or 'its base weights'} (config.lora.rank "
          f"> 0). Resume without LoRA, or use a new --workdir.")
    if frozen is None:
      raise CheckpointError(
          f"{where} holds LoRA adapters of the base weights {saved['path']!r} "
          f"({saved['fingerprint']}), but this run fine-tunes the whole model "
          f"(config.lora.rank = 0). Resume with the same LoRA settings, or use a "
          f"new --workdir.")
    if saved["fingerprint"] != frozen.fingerprint:
      raise CheckpointError(
          f"{where} holds LoRA adapters of other base weights: "
          f"{saved['path']!r} ({saved['fingerprint']}), not "
          f"{frozen.path!r} ({frozen.fingerprint}) as loaded for this run "
          f"(another checkpoint, or another model.param_dtype). Point "
          f"config.model.path at the weights it was trained on, or use a new "
          f"--workdir.")

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
