"""The host loop around the jitted f-DPG step.

`train(task, workdir, loop=..., step=..., optimizer=...)`:

  1. builds the mesh, the initial `FDPGState` and its shardings;
  2. resumes from the latest checkpoint in `workdir/checkpoints` when there is
     one (exactly: the RNG, log Ẑ, baseline and optimiser come back too), starts
     fresh when the directory is new, and raises `CheckpointError` when it holds
     something that cannot be restored;
  3. runs the step (compiled once) for the remaining steps, feeding batches from
     `task.batch(step, batch_size)`, evaluating on fresh samples every
     `eval_every` steps and handing metrics to `on_metrics` / `on_eval`
     callbacks every `log_every` steps;
  4. checkpoints every `checkpoint_every` steps, at the end, and on SIGTERM /
     SIGINT (the last completed step), then stops. Each checkpoint records the
     run's `run_identity`; resuming from one recorded under another (another
     divergence, another model size) raises `CheckpointError`, and so does a
     save that fails (a full disk), after which the earlier checkpoints are
     intact. A process killed at any moment (even mid-save) resumes, when
     re-run, from its last complete checkpoint and ends bit-identical to an
     uninterrupted run.

`task` is any object with `model`, `params`, `base_params`, `target`,
`sampler`, `num_contexts`, `batch(step, batch_size) -> Batch` (and
optionally `eval_batch`, the same for evaluations, and
`initial_log_partition`; see `fdiv_jax.run.tasks.Task`). Everything here takes typed objects; nothing reads a
config file.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax

from fdiv_jax.core import _values
from fdiv_jax.train import checkpoint as checkpoint_lib
from fdiv_jax.train import eval_step as eval_step_lib
from fdiv_jax.train import optimizer as optimizer_lib
from fdiv_jax.train import sharding
from fdiv_jax.train import state as state_lib
from fdiv_jax.train import step as step_lib

MetricsCallback = Callable[[int, dict[str, float]], None]
EvalCallback = Callable[[int, dict[str, float], eval_step_lib.EvalSamples, Any],
                        None]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train, how big the batches, and how often to report.

  Attributes:
    num_steps: train steps in all (a resumed run continues to this step).
    batch_size: samples per step, B.
    seed: seeds the training RNG (`jax.random.PRNGKey(seed)`) and evaluation.
    eval_every: steps between evaluations on fresh samples.
    eval_batch_size: samples per evaluation, even: half from π, half from the
      base model a (`train.eval_step`).
    log_every: steps between training-metric reports.
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: checkpoints kept on disk.
    mesh_data: devices on the "data" axis; -1 = every device not used by fsdp.
    mesh_fsdp: devices on the "fsdp" axis (parameters split along it).
  """
  num_steps: int
  batch_size: int
  seed: int = 0
  eval_every: int = 50
  eval_batch_size: int = 128
  log_every: int = 10
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  mesh_data: int = -1
  mesh_fsdp: int = 1

  def __post_init__(self):
    for name in ("num_steps", "batch_size", "eval_every", "eval_batch_size",
                 "log_every", "checkpoint_every", "keep_checkpoints"):
      _values.integer(name, getattr(self, name), minimum=1)
    _values.integer("seed", self.seed, minimum=0)
    if self.eval_batch_size % 2:
      raise ValueError(f"eval_batch_size: must be even (half the evaluation "
                       f"samples come from π, half from the base model), got "
                       f"{self.eval_batch_size}.")
    # The sizes alone (the device count is checked when the mesh is built).
    fsdp = _values.integer("mesh_fsdp", self.mesh_fsdp, minimum=1)
    data = _values.integer("mesh_data", self.mesh_data)
    sharding.mesh_shape(data, fsdp, max(data, 1) * fsdp)


@dataclasses.dataclass
class TrainResult:
  """What `train` leaves behind."""
  state: Any                      # the final FDPGState (on the mesh)
  step: int                       # the last completed step
  resumed_from: int | None        # the step restored at start, if any
  preempted: bool                 # stopped by SIGTERM/SIGINT
  stop_signal: str                # "SIGTERM" / "SIGINT" when preempted, else ""
  last_metrics: dict[str, float]  # the last logged training metrics
  last_eval: dict[str, float]     # the last evaluation metrics
  samples_per_second: float       # over the steps run in this process
  compile_seconds: float          # first step (compilation + one step)


def to_host(metrics: dict[str, Any]) -> dict[str, float]:
  """One device→host transfer for the whole metrics dict."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def eval_rng(seed: int, step: int) -> jax.Array:
  """The evaluation key at `step`, independent of the training RNG stream."""
  return jax.random.fold_in(jax.random.PRNGKey(seed + 1_000_003), step)


def run_identity(task, state, step: step_lib.StepConfig) -> dict[str, Any]:
  """What a checkpoint records of the run that wrote it, and what a resumed run
  must match (`checkpoint.Checkpointer(identity=...)`): the trained divergence,
  the mode, the baseline and the size of the trained parameters, plus the
  task's own `checkpoint_identity` (a dict) when it has one.

  Settings that a run may change when resumed are left out: the number of
  steps, the report and checkpoint intervals, the mesh.
  """
  leaves = jax.tree.leaves(state.params)
  identity = {
      "divergence": step.divergence.metric_name,
      "mode": step.mode,
      "baseline": repr(step.baseline),
      "params": f"{sum(int(x.size) for x in leaves):,} values in {len(leaves)} arrays",
  }
  identity.update(getattr(task, "checkpoint_identity", None) or {})
  return identity


def initial_state(task, mesh, *, loop: LoopConfig, step: step_lib.StepConfig,
                  optimizer: optimizer_lib.OptimizerConfig) -> state_lib.FDPGState:
  """The step-0 state of `task` on `mesh` (policy = the task's initial params)."""
  state = state_lib.create_state(
      task.model, task.params, step_config=step, optimizer=optimizer,
      base_params=task.base_params, num_contexts=task.num_contexts, seed=loop.seed,
      log_partition=getattr(task, "initial_log_partition", None))
  return sharding.shard_state(state, mesh)


def train(task, workdir: str, *, loop: LoopConfig, step: step_lib.StepConfig,
          optimizer: optimizer_lib.OptimizerConfig,
          on_metrics: MetricsCallback | None = None,
          on_eval: EvalCallback | None = None,
          on_step: Callable[[int], None] | None = None,
          num_steps: int | None = None) -> TrainResult:
  """Trains `task`, checkpointing under `workdir` (see the module docstring).

  Args:
    task: the run's pieces (model, params, target, sampler, batches).
    workdir: the run directory; checkpoints go to `workdir/checkpoints`.
    loop: steps, batch sizes, report intervals, seed, mesh.
    step: the update rule.
    optimizer: the optimiser's settings.
    on_metrics: called with (step, host metrics) every `log_every` steps.
    on_eval: called with (step, host eval metrics, samples, state) at step 0 of
      a fresh run, every `eval_every` steps and at the end; `samples` are the
      evaluation's own samples (`EvalSamples`, on the host).
    on_step: called with the completed step number after every step (cheap; for
      progress bars).
    num_steps: stop after this global step (default `loop.num_steps`).
  """
  num_steps = loop.num_steps if num_steps is None else int(num_steps)
  mesh = sharding.make_mesh(loop.mesh_data, loop.mesh_fsdp)
  state = initial_state(task, mesh, loop=loop, step=step, optimizer=optimizer)
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=loop.checkpoint_every,
      keep=loop.keep_checkpoints, identity=run_identity(task, state, step))
  try:
    return _train(task, checkpointer, mesh, state, loop=loop, step=step,
                  num_steps=num_steps, on_metrics=on_metrics, on_eval=on_eval,
                  on_step=on_step)
  except BaseException:
    # A failed save or restore (CheckpointError), or any other error: release
    # Orbax's threads and files without hiding the error.
    try:
      checkpointer.close()
    except Exception:  # noqa: BLE001 - the first error is the one to report
      pass
    raise


def _train(task, checkpointer: checkpoint_lib.Checkpointer, mesh, state, *,
           loop: LoopConfig, step: step_lib.StepConfig, num_steps: int,
           on_metrics: MetricsCallback | None, on_eval: EvalCallback | None,
           on_step: Callable[[int], None] | None) -> TrainResult:
  """`train` once the checkpointer is open (closed here on success)."""
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    state = checkpointer.restore(checkpoint_lib.abstract_like(state))
  elif checkpointer.has_foreign_content():
    raise checkpoint_lib.CheckpointError(
        f"{checkpointer.directory} holds files that are not Orbax checkpoints; "
        f"refusing to start fresh over them. Move them away or pick a new --workdir.")
  start = int(jax.device_get(state.step))

  step_fn = sharding.jit_train_step(
      step_lib.make_train_step(step, task.model, task.target, task.sampler),
      state, mesh)
  eval_fn = sharding.jit_eval_step(
      eval_step_lib.make_eval_step(step, task.model, task.target,
                                   task.sampler.untempered()), state, mesh)

  def evaluate(at: int, state) -> dict[str, float]:
    rows = getattr(task, "eval_batch", task.batch)(at, loop.eval_batch_size // 2)
    batch = sharding.shard_batch(rows, mesh)
    metrics, samples = jax.device_get(eval_fn(state, batch, eval_rng(loop.seed, at)))
    metrics = {k: float(v) for k, v in metrics.items()}
    if on_eval is not None:
      on_eval(at, metrics, samples, state)
    return metrics

  last_metrics: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  preempted = False
  current = start
  compile_seconds = 0.0
  timed_steps, timed_seconds = 0, 0.0
  with checkpoint_lib.PreemptionGuard() as guard:
    if start == 0 and on_eval is not None:
      last_eval = evaluate(0, state)
    while current < num_steps:
      batch = sharding.shard_batch(task.batch(current, loop.batch_size), mesh)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch)
      current += 1
      if current == start + 1:
        jax.block_until_ready((state, metrics))
        compile_seconds = time.perf_counter() - t0
      else:
        timed_steps += 1
        timed_seconds += time.perf_counter() - t0
      if current > start + 1:
        # Dispatch is asynchronous: wait for the whole step (all of its outputs:
        # a small one such as the step counter can be ready long before the
        # rest) so that its time, not that of later work, is what gets counted.
        t1 = time.perf_counter()
        jax.block_until_ready((state, metrics))
        timed_seconds += time.perf_counter() - t1
      if current % loop.log_every == 0 or current == num_steps:
        last_metrics = to_host(metrics)
        if on_metrics is not None:
          on_metrics(current, last_metrics)
      if current % loop.eval_every == 0 or current == num_steps:
        last_eval = evaluate(current, state)
      checkpointer.save(current, state)
      if on_step is not None:
        on_step(current)
      if guard.requested:
        preempted = True
        break
    if not last_eval and not preempted and on_eval is not None:
      # Nothing was evaluated in this process (a finished run re-run): the
      # final evaluation, so that the run still reports its result.
      last_eval = evaluate(current, state)
    checkpointer.save(current, state, force=True)
  checkpointer.close()
  rate = (timed_steps * loop.batch_size / timed_seconds) if timed_seconds else 0.0
  return TrainResult(state, current, resumed_from, preempted, guard.signal_name,
                     last_metrics, last_eval, rate, compile_seconds)
