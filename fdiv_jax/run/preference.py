r"""Offline preference optimisation (f-DPO, f-PO): what the main job does when
``config.preference.objective`` is set.

  python -m fdiv_jax.main --config=configs/preference_pairs.py --workdir=DIR \
      [--config.divergence=reverse_kl --config.preference.beta=0.1 ...]

`run(config, workdir)` is `experiment.run` for fixed preference data instead
of sampling (`experiment.run` hands over to it):

  1. `tasks.describe(config)`: the typed run, with `config.preference` read
     and checked (`preference_spec.describe`: a bad row is a `ConfigError`
     naming the file and line) before anything is written;
  2. `tasks.build(spec)`: the base model a = π_ref (the policy starts from
     it), the target, the prompts of the evaluation. The target is the
     *ground truth* (e.g. the rule the pairs were labelled by): training never
     sees it, the evaluation reports π's alignment with it;
  3. the data tokenised (`preference_data.encode_pairs` / `encode_lists`) and
     log π_ref of every training response computed once and cached
     (`preference_step.reference_log_probs`; the step's docstring says why;
     the held-out step scores π_ref beside π instead);
  4. `train` (`run.preference_loop`, the host loop): the jitted step
     (`train.preference_step`, compiled once with
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

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from fdiv_jax.run import tasks
from fdiv_jax.run.config import ConfigError
# The host loop, re-exported (`preference.train`, `preference.encode`, ...).
from fdiv_jax.run.preference_loop import (  # noqa: F401
    Arrays, Result, encode, identity, train)


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


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
