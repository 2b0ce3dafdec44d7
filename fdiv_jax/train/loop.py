"""The host loop around the jitted f-DPG step.

`train(config, task, workdir)`:

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
     SIGINT (the last completed step), then stops.

`task` is any object with `model`, `params`, `base_params`, `target`,
`sampler`, `num_contexts` and `batch(step, batch_size) -> Batch` (see
`fdiv_jax.run.tasks.Task`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from fdiv_jax.train import checkpoint as checkpoint_lib
from fdiv_jax.train import sharding
from fdiv_jax.train import state as state_lib
from fdiv_jax.train import step as step_lib

MetricsCallback = Callable[[int, dict[str, float]], None]
EvalCallback = Callable[[int, dict[str, float], Any], None]


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


def initial_state(config, task, mesh) -> state_lib.FDPGState:
  state = state_lib.create_state(config, task.model, task.params, task.base_params,
                                 num_contexts=task.num_contexts)
  return sharding.shard_state(state, mesh)


def train(config, task, workdir: str, *, on_metrics: MetricsCallback | None = None,
          on_eval: EvalCallback | None = None,
          on_step: Callable[[int], None] | None = None,
          num_steps: int | None = None) -> TrainResult:
  """Trains `task` per `config`, checkpointing under `workdir` (see module doc).

  Args:
    config: the validated run config.
    task: the run's pieces (model, params, target, sampler, batches).
    workdir: the run directory; checkpoints go to `workdir/checkpoints`.
    on_metrics: called with (step, host metrics) every `log_every` steps.
    on_eval: called with (step, host eval metrics, state) at step 0 of a fresh
      run, every `eval_every` steps and at the end (the state lets it draw
      extra samples, e.g. for diversity metrics).
    on_step: called with the completed step number after every step (cheap; for
      progress bars).
    num_steps: stop after this global step (default `config.num_steps`).
  """
  num_steps = int(config.num_steps if num_steps is None else num_steps)
  mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp)
  state = initial_state(config, task, mesh)
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=config.checkpoint_every,
      keep=config.keep_checkpoints)
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    state = checkpointer.restore(checkpoint_lib.abstract_like(state))
  elif checkpointer.has_foreign_content():
    raise checkpoint_lib.CheckpointError(
        f"{checkpointer.directory} holds files that are not Orbax checkpoints; "
        f"refusing to start fresh over them. Move them away or pick a new --workdir.")
  start = int(jax.device_get(state.step))

  step_fn = sharding.jit_train_step(
      step_lib.make_train_step(config, task.model, task.target, task.sampler),
      state, mesh)
  eval_fn = sharding.jit_eval_step(
      step_lib.make_eval_step(config, task.model, task.target, task.sampler,
                              use_ema=config.ema_decay > 0), state, mesh)

  def evaluate(step: int, state) -> dict[str, float]:
    batch = sharding.shard_batch(task.batch(step, config.eval_batch_size), mesh)
    metrics = to_host(eval_fn(state, batch, eval_rng(config.seed, step)))
    if on_eval is not None:
      on_eval(step, metrics, state)
    return metrics

  last_metrics: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  preempted = False
  step = start
  compile_seconds = 0.0
  timed_steps, timed_seconds = 0, 0.0
  with checkpoint_lib.PreemptionGuard() as guard:
    if start == 0 and on_eval is not None:
      last_eval = evaluate(0, state)
    while step < num_steps:
      batch = sharding.shard_batch(task.batch(step, config.batch_size), mesh)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch)
      step += 1
      if step == start + 1:
        jax.block_until_ready(state.step)
        compile_seconds = time.perf_counter() - t0
      else:
        timed_steps += 1
        timed_seconds += time.perf_counter() - t0
      if step > start + 1:
        # Dispatch is asynchronous: wait for the step so that its time, and not
        # that of the evaluation or checkpoint below, is what gets counted.
        t1 = time.perf_counter()
        jax.block_until_ready(state.step)
        timed_seconds += time.perf_counter() - t1
      if step % config.log_every == 0 or step == num_steps:
        last_metrics = to_host(metrics)
        if on_metrics is not None:
          on_metrics(step, last_metrics)
      if step % config.eval_every == 0 or step == num_steps:
        last_eval = evaluate(step, state)
      checkpointer.save(step, state)
      if on_step is not None:
        on_step(step)
      if guard.requested:
        preempted = True
        break
    checkpointer.save(step, state, force=True)
  checkpointer.close()
  rate = (timed_steps * config.batch_size / timed_seconds) if timed_seconds else 0.0
  return TrainResult(state, step, resumed_from, preempted, guard.signal_name,
                     last_metrics, last_eval, rate, compile_seconds)
