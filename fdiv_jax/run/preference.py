r"""Offline preference optimisation (f-DPO, f-PO): what the main job does when
``config.preference.objective`` is set.

  python -m fdiv_jax.main --config=configs/preference_pairs.py --workdir=DIR \
      [--config.divergence=reverse_kl --config.preference.beta=0.1 ...]

`run(config, workdir)` is `experiment.run` for fixed preference data instead
of sampling (`experiment.run` hands over to it):

  1. `tasks.describe(config)`: the typed run, with `config.preference` read
     and checked (`preference_data.describe`: a bad row is a `ConfigError`
     naming the file and line) before anything is written;
  2. `tasks.build(spec)`: the base model a = π_ref (the policy starts from
     it), the target, the prompts of the evaluation. The target is the
     *ground truth* (e.g. the rule the pairs were labelled by): training never
     sees it, the evaluation reports π's alignment with it;
  3. the data tokenised (`preference_data.encode_pairs` / `encode_lists`) and
     log π_ref of every training response computed once and cached
     (`preference_step.reference_log_probs`; the step's docstring says why;
     the held-out step scores π_ref beside π instead);
  4. `train`: the jitted step (`train.preference_step`, compiled once with
     the mesh's shardings, the batch split over the devices), Orbax
     checkpoints of the whole state with exact resume, SIGINT/SIGTERM saving
     the last step, a progress bar (loss, accuracy, pairs/s), metrics to
     metrics.jsonl and TensorBoard, and every `eval_every` steps (and at 0 and
     the end) two evaluations:
       * held-out preferences (``heldout/*``): the loss, the preference
         accuracy (± its binomial standard error; a tie counts ½, so π = π_ref
         scores exactly 0.5), the fraction tied and the margins of the
         held-out pairs (lists: ordered pairs within lists);
       * fresh samples (``eval/*``), exactly as f-DPG's: each row drawn once
         from π and once from a (`train.eval_step`, the defensive mixture),
         giving the ground-truth alignment, KL(π‖a) = KL(π‖π_ref), the
         divergences to the ground-truth target, each ± its standard error,
         and Distinct-n / Self-BLEU (`evaluation.Evaluator`);
  5. plots (plots/*.png, plots/preference.png for the held-out figures),
     samples.md and summary.json: the final evaluation (``alignment``,
     ``kl_from_base``, ``forward_kl``, ``reverse_kl``, ``tv``, ``js``, the
     trained f under ``divergence``, ``distinct_1/2/3``, ``self_bleu``, each
     with ``_se``), ``heldout/*``, ``base`` (the base model's evaluation),
     ``data`` and ``config``: what `fdiv_jax.study` tabulates.

The batches depend only on (seed, step) (`preference_data.batch_indices`), so
a resumed run (the same command again) continues bit for bit
(`tests/test_preference_train.py`: 4 steps straight and 2 + 2 give the same
checkpoint, every array equal).

`python -m fdiv_jax.study` runs such a config over divergences and seeds as it
does f-DPG configs (this `run` is what `experiment.run` calls).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from fdiv_jax.run import preference_data, tasks
from fdiv_jax.run.config import ConfigError


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


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


def heldout_line(step: int, figures: dict[str, float]) -> str:
  """``heldout @ step: accuracy=0.91 ± 0.02, loss=..., margin=...``."""
  from fdiv_jax.run import reporting  # pylint: disable=g-import-not-at-top
  shown = reporting.with_errors(figures, ("accuracy", "loss", "margin",
                                          "chosen_reward", "rejected_reward"))
  return (f"heldout @ {step}: " + ", ".join(f"{k}={v}" for k, v in shown.items())
          + f" ({figures.get('num_pairs', 0):.0f} pairs)")


def _progress_bar(**kwargs):
  """The run's progress bar: `progress.ProgressBar` with the batch's loss and
  preference accuracy in its postfix."""
  from fdiv_jax.run import progress, reporting  # pylint: disable=g-import-not-at-top

  class PreferenceBar(progress.ProgressBar):

    def postfix(self, metrics):
      fields = {}
      values = reporting.scalars(metrics)
      for key, label in (("loss", "loss"), ("accuracy", "acc"), ("margin", "margin")):
        for name in (key, f"train/{key}"):
          if name in values:
            fields[label] = f"{values[name]:.4g}"
            break
      fields.update(super().postfix(metrics))
      return fields

  return PreferenceBar(**kwargs)


def plot_heldout(jsonl_path: str, path: str) -> str | None:
  """plots/preference.png: the held-out accuracy (± its error), loss and
  margin over steps, with the training batches' faint behind."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import reporting  # pylint: disable=g-import-not-at-top
  rows = reporting.read_metrics(jsonl_path)
  names = [n for n in ("accuracy", "loss", "margin")
           if any(f"heldout/{n}" in r or f"train/{n}" in r for r in rows)]
  if not names:
    return None
  fig = Figure(figsize=(5.0 * len(names), 3.4), dpi=100)
  FigureCanvasAgg(fig)
  for i, name in enumerate(names):
    ax = fig.add_subplot(1, len(names), i + 1)
    for prefix, style in (("train", dict(lw=0.8, alpha=0.5)),
                          ("heldout", dict(marker="o", ms=3))):
      key = f"{prefix}/{name}"
      pts = [(r["step"], r[key], r.get(key + "_se", 0.0)) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
      if not pts:
        continue
      steps, values, errors = (np.asarray(x, float) for x in zip(*pts))
      line, = ax.plot(steps, values, label=prefix, **style)
      if prefix == "heldout":
        ax.fill_between(steps, values - errors, values + errors, alpha=0.25,
                        color=line.get_color(), lw=0)
    ax.set_title(name, fontsize="medium")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
  fig.suptitle("Preferences: held-out pairs and training batches")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path)
  return path


def run(config, workdir: str) -> dict[str, Any]:
  """Trains per ``config`` (``preference.objective`` set) in ``workdir``;
  returns the summary (module docstring).

  Raises:
    config.ConfigError: a bad config value or data row (nothing written yet).
    train.CheckpointError: the workdir's checkpoint cannot be restored.
  """
  spec = tasks.describe(config)
  if spec.preference is None:
    raise ConfigError("config.preference.objective: empty: this is an f-DPG "
                      "config; run it with fdiv_jax.run.experiment.run.")
  # pylint: disable=g-import-not-at-top
  import jax
  from fdiv_jax.run import evaluation, experiment, plots, reporting
  from fdiv_jax.train import checkpoint
  # pylint: enable=g-import-not-at-top
  experiment.enable_compilation_cache()
  pref = spec.preference
  task = tasks.build(spec)

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(spec.config_json)
  peek = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  start = peek.latest_step() or 0
  peek.close()

  t_ref = time.time()
  from fdiv_jax.train import preference_step  # pylint: disable=g-import-not-at-top
  score = preference_step.make_reference_scorer(task.model)
  train_data = encode(spec, pref.train, task.model, task.base_params, task.tokenizer,
                      score)
  heldout = (None if pref.heldout is None else encode(
      spec, pref.heldout, task.model, task.base_params, task.tokenizer, score,
      cache_reference=False))
  ref_seconds = time.time() - t_ref

  d = pref.config.divergence
  divergence_key = d.metric_name
  keys = experiment.summary_keys(divergence_key)
  writer = reporting.MetricWriter(workdir)
  if start:
    writer.truncate_after(start)
  evaluator = evaluation.Evaluator(task, workdir, divergence=d,
                                   num_samples_md=spec.num_samples_md,
                                   num_samples=spec.loop.eval_batch_size)
  unit = "pairs" if pref.config.objective == "fdpo" else "lists"
  bar = _progress_bar(total=spec.loop.num_steps, initial=start,
                      samples_per_step=spec.loop.batch_size,
                      divergence_key=divergence_key)
  bar.write(f"{pref.config.objective} ({d}, β = {pref.config.beta:g}): "
            f"{train_data.num_rows} training {unit} ({pref.train.path})"
            + (f", {heldout.num_rows} held out ({pref.heldout.path})" if heldout
               else ", none held out")
            + f"; log π_ref of every training response cached in "
            f"{ref_seconds:.1f} s.")
  cut = train_data.num_cut + (heldout.num_cut if heldout else 0)
  if cut:  # as the sampler cuts its samples (`preference_data` docstring)
    bar.write(f"{cut} responses have more than max_new_tokens = "
              f"{spec.sampler.max_new_tokens} tokens (EOS included): π and π_ref "
              f"score their first {spec.sampler.max_new_tokens} (summary.json: "
              f"data/*/responses_cut).")
  if start:
    bar.write(f"Resuming from the checkpoint at step {start} in {workdir}.")

  def on_metrics(step, metrics):
    writer.write(step, _prefixed("train", metrics))
    bar.update(step, metrics)

  def on_eval(step, metrics, samples, state):
    metrics = evaluator(step, metrics, samples, state)
    writer.write(step, _prefixed("eval", metrics))
    bar.write(experiment.eval_line(step, metrics, keys, {}, evaluator.last_flags))

  def on_heldout(step, figures):
    writer.write(step, _prefixed("heldout", figures))
    bar.write(heldout_line(step, figures))
    if step == 0:
      with open(os.path.join(workdir, "base_heldout.json"), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)

  t0 = time.time()
  try:
    result = train(task, workdir, spec, train_data, heldout, on_metrics=on_metrics,
                   on_eval=on_eval, on_heldout=on_heldout, on_step=bar.update)
  finally:
    bar.close()
  if result.preempted:
    writer.close()
    print(f"\nStopped by {result.stop_signal} at step {result.step}; the checkpoint is "
          f"saved. Run the same command again to resume.", file=sys.stderr)
    return {"preempted": True, "step": result.step, "signal": result.stop_signal}

  final = dict(evaluator.last)
  writer.close()
  written = plots.plot_metrics(writer.path, os.path.join(workdir, "plots"))
  extra = plot_heldout(writer.path, os.path.join(workdir, "plots", "preference.png"))
  written += [extra] if extra else []
  samples_path = evaluator.write_samples_md(
      os.path.join(workdir, "samples.md"),
      header=(f"Offline preference optimisation, `{pref.config.objective}` with "
              f"divergence `{d}`, β = {pref.config.beta:g}, {result.step} steps. "
              f"Fresh ancestral samples (temperature 1) of the last evaluation."))
  base = evaluator.base()
  base_path = os.path.join(workdir, "base_heldout.json")
  if os.path.exists(base_path):
    with open(base_path, encoding="utf-8") as f:
      base.update(_prefixed("heldout", json.load(f)))
  data_info = {"train": {"path": os.path.abspath(pref.train.path),
                         "rows": train_data.num_rows, "digest": pref.train_digest,
                         "responses_cut": train_data.num_cut}}
  if heldout is not None:
    data_info["heldout"] = {"path": os.path.abspath(pref.heldout.path),
                            "rows": heldout.num_rows, "responses_cut": heldout.num_cut}
  summary = {**final, **_prefixed("heldout", result.last_heldout),
             "step": result.step, "samples_per_second": result.rows_per_second,
             "compile_seconds": result.compile_seconds,
             "reference_seconds": ref_seconds,
             "wall_seconds": time.time() - t0, "divergence": divergence_key,
             "objective": pref.config.objective, "beta": pref.config.beta,
             "flags": evaluator.last_flags, "base": base, "data": data_info,
             "config": json.loads(spec.config_json)}
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(json.loads(json.dumps(summary, default=reporting.to_float)), f,
              indent=2, allow_nan=True)
  shown = [k for k in (*keys, "heldout/accuracy", "heldout/loss", "heldout/margin")
           if k in summary]
  table = reporting.summary_table({
      "base model": reporting.with_errors(base, shown),
      "trained": reporting.with_errors(summary, shown)})
  for label, flags in (("base model", base.get("flags", [])),
                       ("trained", evaluator.last_flags)):
    if flags:
      table += f"\nFLAGGED ({label}): " + "; ".join(flags)
  print(f"\n{pref.config.objective} ({d}, β = {pref.config.beta:g}) finished "
        f"{result.step} steps in {summary['wall_seconds']:.0f} s "
        f"({result.rows_per_second:.1f} {unit}/s after a "
        f"{result.compile_seconds:.1f} s first step).\n{table}\n\n"
        f"Wrote {os.path.join(workdir, 'summary.json')}, {samples_path}, "
        f"{len(written)} plots in {os.path.join(workdir, 'plots')}, metrics.jsonl and "
        f"tensorboard/. The policy is the Orbax checkpoint in "
        f"{os.path.join(workdir, 'checkpoints')}.")
  return summary
