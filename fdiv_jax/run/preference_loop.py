"""The host loop of offline preference training (f-DPO, f-PO).

`encode` tokenises a data file and caches log π_ref of its responses
(`preference_step.reference_log_probs`); `train` runs the jitted
`train.preference_step` over the batches of `preference_data.batch_indices`
(compiled once with the mesh's shardings, the batch split over the devices),
with Orbax checkpoints of the whole state (exact resume: the batches depend
only on (seed, step), the reference cache is recomputed bit for bit),
SIGINT/SIGTERM saving the last step, and every `eval_every` steps (and at 0
and the end) the two evaluations: the held-out preferences
(`preference_step.make_heldout_step`) and fresh samples (`train.eval_step`).
What the run reports and writes is `run.preference`'s, through the
callbacks of `train`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np

from fdiv_jax.run import preference_data


@dataclasses.dataclass
class Arrays:
  """The tokenised data of one file, on the host, with π_ref's log-probs."""
  fields: dict[str, np.ndarray]
  num_rows: int
  num_cut: int

  def batch(self, objective: str, idx: np.ndarray, weights: np.ndarray):
    """The `PairBatch` / `ListBatch` of rows ``idx``."""
    from fdiv_jax.train import preference_step  # pylint: disable=g-import-not-at-top
    f = {k: v[idx] for k, v in self.fields.items()}
    cls = (preference_step.PairBatch if objective == "fdpo"
           else preference_step.ListBatch)
    return cls(weights=weights.astype(np.float32), **f)


def encode(spec, data, model, base_params, tokenizer, score=None, *,
           cache_reference: bool = True) -> Arrays:
  """Tokenises ``data`` and caches log π_ref of every response (with
  ``cache_reference=False`` zeros instead: the held-out data, whose step
  scores π_ref itself, `preference_step.make_heldout_step`)."""
  from fdiv_jax.train import preference_step  # pylint: disable=g-import-not-at-top
  n = spec.loop.batch_size
  max_new = spec.sampler.max_new_tokens
  score = score or preference_step.make_reference_scorer(model)

  def ref(p, l, t, m):
    if not cache_reference:
      return np.zeros((t.shape[0],), np.float32)
    return preference_step.reference_log_probs(
        model, base_params, p, l, t, m, chunk_size=max(n, 64), score=score)

  if isinstance(data, preference_data.PairData):
    x = preference_data.encode_pairs(data, tokenizer, max_new)
    fields = {k: x[k] for k in ("prompts", "prompt_lengths", "chosen_tokens",
                                "chosen_mask", "rejected_tokens", "rejected_mask")}
    fields["ref_chosen"] = ref(x["prompts"], x["prompt_lengths"],
                               x["chosen_tokens"], x["chosen_mask"])
    fields["ref_rejected"] = ref(x["prompts"], x["prompt_lengths"],
                                 x["rejected_tokens"], x["rejected_mask"])
  else:
    x = preference_data.encode_lists(data, tokenizer, max_new)
    rows, k, width = x["tokens"].shape
    fields = {key: x[key] for key in ("prompts", "prompt_lengths", "tokens", "mask",
                                      "response_mask", "rewards")}
    flat = ref(np.repeat(x["prompts"], k, axis=0),
               np.repeat(x["prompt_lengths"], k, axis=0),
               x["tokens"].reshape(rows * k, width), x["mask"].reshape(rows * k, width))
    fields["ref"] = np.where(x["response_mask"], flat.reshape(rows, k), 0.0).astype(
        np.float32)
  return Arrays(fields, len(data), int(x["num_cut"]))


def identity(task, state, spec) -> dict[str, Any]:
  """What a preference checkpoint records and a resumed run must match."""
  import jax  # pylint: disable=g-import-not-at-top
  pref = spec.preference
  leaves = jax.tree.leaves(state.params)
  out = {"objective": pref.config.objective,
         "divergence": pref.config.divergence.metric_name,
         "beta": pref.config.beta,
         "data": pref.train_digest,
         "params": f"{sum(int(x.size) for x in leaves):,} values in {len(leaves)} arrays"}
  if pref.config.objective == "fpo":
    out["reward_temperature"] = pref.config.reward_temperature
  out.update(getattr(task, "checkpoint_identity", None) or {})
  return out


@dataclasses.dataclass
class Result:
  """What `train` leaves behind."""
  state: Any
  step: int
  resumed_from: int | None
  preempted: bool
  stop_signal: str
  last_heldout: dict[str, float]
  rows_per_second: float
  compile_seconds: float


def train(task, workdir: str, spec, train_data: Arrays, heldout: Arrays | None, *,
          on_metrics: Callable | None = None, on_eval: Callable | None = None,
          on_heldout: Callable | None = None, on_step: Callable | None = None,
          num_steps: int | None = None) -> Result:
  """The host loop of offline preference training (module docstring).

  Args:
    task: the `tasks.Task` (model, params, base_params = π_ref, target,
      sampler and prompts of the evaluation).
    workdir: checkpoints go to ``workdir/checkpoints``.
    spec: the `tasks.RunSpec` (its ``preference``, ``loop``, ``optimizer``).
    train_data: the training rows (`encode`).
    heldout: the held-out rows, or None.
    on_metrics: ``(step, host metrics)`` every ``log_every`` steps.
    on_eval: ``(step, metrics, samples, state)`` after each evaluation on fresh
      samples (the `evaluation.Evaluator`).
    on_heldout: ``(step, held-out figures)`` after each held-out evaluation.
    on_step: ``(step)`` after every step.
    num_steps: stop after this global step (default ``loop.num_steps``).

  Raises:
    train.CheckpointError: a checkpoint that cannot be restored or saved.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import eval_step as eval_step_lib  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import loop as loop_lib  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import preference_step, sharding  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  loop, pref = spec.loop, spec.preference.config
  num_steps = loop.num_steps if num_steps is None else int(num_steps)
  mesh = sharding.make_mesh(loop.mesh_data, loop.mesh_fsdp)
  step_config = pref.step_config()
  state = state_lib.create_state(
      task.model, task.params, step_config=step_config, optimizer=spec.optimizer,
      base_params=task.base_params, num_contexts=task.num_contexts, seed=loop.seed)
  state = sharding.shard_state(state, mesh)
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=loop.checkpoint_every,
      keep=loop.keep_checkpoints, identity=identity(task, state, spec))
  try:
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
      state = checkpointer.restore(checkpoint_lib.abstract_like(state))
    elif checkpointer.has_foreign_content():
      raise checkpoint_lib.CheckpointError(
          f"{checkpointer.directory} holds files that are not Orbax checkpoints; "
          f"refusing to start fresh over them. Move them away or pick a new --workdir.")
    start = int(jax.device_get(state.step))
    step_fn = sharding.jit_train_step(
        preference_step.make_preference_step(pref, task.model), state, mesh)
    eval_fn = sharding.jit_eval_step(eval_step_lib.make_eval_step(
        step_config, task.model, task.target, task.sampler.untempered()), state, mesh)
    heldout_fn = jax.jit(preference_step.make_heldout_step(pref, task.model),
                         in_shardings=(sharding.state_shardings(state, mesh),
                                       sharding.batch_sharding(mesh)),
                         out_shardings=NamedSharding(mesh, PartitionSpec()))
    batch_size = loop.batch_size
    # Held-out chunks: a multiple of the batch (it divides over the devices).
    heldout_rows = batch_size * max(1, 64 // batch_size)

    def batch_at(step: int):
      idx = preference_data.batch_indices(train_data.num_rows, batch_size, step,
                                          loop.seed)
      return sharding.shard_batch(train_data.batch(
          pref.objective, idx, np.ones((batch_size,), np.float32)), mesh)

    def evaluate(at: int, state) -> dict[str, float]:
      figures = {}
      if heldout is not None:
        sums: dict[str, float] = {}
        for idx, weights in preference_data.chunks(heldout.num_rows, heldout_rows):
          out = jax.device_get(heldout_fn(state, sharding.shard_batch(
              heldout.batch(pref.objective, idx, weights), mesh)))
          for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        figures = preference_step.heldout_summary(pref.objective, sums)
        if on_heldout is not None:
          on_heldout(at, figures)
      if on_eval is not None:
        rows = task.eval_batch(at, loop.eval_batch_size // 2)
        metrics, samples = jax.device_get(eval_fn(
            state, sharding.shard_batch(rows, mesh), loop_lib.eval_rng(loop.seed, at)))
        on_eval(at, {k: float(v) for k, v in metrics.items()}, samples, state)
      return figures

    last_heldout: dict[str, float] = {}
    preempted, current = False, start
    compile_seconds, timed_steps, timed_seconds = 0.0, 0, 0.0
    evaluated_at = None
    with checkpoint_lib.PreemptionGuard() as guard:
      if start == 0:
        last_heldout = evaluate(0, state)
        evaluated_at = 0
      while current < num_steps:
        batch = batch_at(current)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        current += 1
        if current == start + 1:
          compile_seconds = time.perf_counter() - t0
        else:
          timed_steps += 1
          timed_seconds += time.perf_counter() - t0
        if current % loop.log_every == 0 or current == num_steps:
          if on_metrics is not None:
            on_metrics(current, loop_lib.to_host(metrics))
        if current % loop.eval_every == 0 or current == num_steps:
          last_heldout = evaluate(current, state)
          evaluated_at = current
        checkpointer.save(current, state)
        if on_step is not None:
          on_step(current)
        if guard.requested:
          preempted = True
          break
      if evaluated_at is None and not preempted:
        last_heldout = evaluate(current, state)  # a finished run re-run
      checkpointer.save(current, state, force=True)
    checkpointer.close()
  except BaseException:
    try:
      checkpointer.close()
    except Exception:  # noqa: BLE001 - the first error is the one to report
      pass
    raise
  rate = timed_steps * batch_size / timed_seconds if timed_seconds else 0.0
  return Result(state, current, resumed_from, preempted, guard.signal_name,
                last_heldout, rate, compile_seconds)
