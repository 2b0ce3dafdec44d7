"""Train and evaluate one run in a workdir: what `python -m fdiv_jax.main` does.

`run(config, workdir)`:

  1. `tasks.describe(config)`: the config becomes typed objects; a bad value is a
     `ConfigError` and nothing has been written;
  2. `tasks.build(spec)`: the model, target (λ fitted) and prompts;
  3. `train.loop.train`: the jitted step with checkpoints and resume, a progress
     bar, metrics to metrics.jsonl and TensorBoard, and an evaluation on fresh
     samples every `eval_every` steps (`evaluation.Evaluator`);
  4. plots, samples.md and summary.json;
  5. with `export_hf`, the evaluated policy (the EMA when on, LoRA adapters
     merged into the weights) as a Hugging Face checkpoint in `export/`.

The workdir receives:
  config.json        the config of the latest invocation
  checkpoints/       Orbax checkpoints of the whole f-DPG state
  metrics.jsonl      train/* metrics every `log_every` steps, eval/* every
                     `eval_every` steps (fresh samples from π), also as
  tensorboard/       TensorBoard event files
  plots/*.png        alignment, divergences to the target, KL(π‖a), diversity
  samples.md         base-model vs trained samples for the same prompts
  export/            (export_hf) config.json, model.safetensors and the
                     tokenizer / generation files of model.path: loadable
                     by transformers' AutoModelForCausalLM.from_pretrained
  summary.json       the final evaluation metrics by name (alignment,
                     kl_from_base, the divergences, distinct_1/2/3, self_bleu,
                     each with <name>_se, its standard error; exact/* on
                     enumerable tasks; qrs/* with qrs_samples > 0), the
                     coverage flags, the base model's values under "base",
                     and the config under "config"
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from fdiv_jax.core import divergences
from fdiv_jax.run import tasks

# Metrics shown in the final table (and the eval lines: the first seven), in
# this order; the trained divergence is added after the four standard ones.
SUMMARY_KEYS = ("alignment", *divergences.STANDARD, "kl_from_base",
                "distinct_1", "distinct_2", "distinct_3", "self_bleu", "mean_length",
                "ess_target")


def enable_compilation_cache():
  """A persistent XLA cache: a re-run (or a resumed run) skips compilation."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("FDIV_JAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fdiv_jax",
      "xla")
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError:
    return
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


def summary_keys(divergence_key: str) -> tuple[str, ...]:
  """`SUMMARY_KEYS` with the trained divergence after the standard four."""
  if divergence_key in SUMMARY_KEYS:
    return SUMMARY_KEYS
  i = SUMMARY_KEYS.index("js") + 1
  return (*SUMMARY_KEYS[:i], divergence_key, *SUMMARY_KEYS[i:])


def eval_line(step: int, metrics: dict[str, float], keys: tuple[str, ...],
              moment_targets: dict[str, float], flags: list[str]) -> str:
  """`eval @ step: alignment=0.78 ± 0.01, js=...` (moments beside their targets
  for a distributional target), then the coverage flags, if any."""
  from fdiv_jax.run import reporting  # pylint: disable=g-import-not-at-top
  shown = reporting.with_errors(
      metrics, [k for k in keys[:7] if not (moment_targets and k == "alignment")])
  for name, goal in moment_targets.items():
    key = f"moment/{name}"
    shown[name] = (f"{reporting.format_estimate(metrics.get(key), metrics.get(key + '_se'))}"
                   f" / {goal:g}")
  line = f"eval @ {step}: " + ", ".join(f"{k}={v}" for k, v in shown.items())
  if flags:
    line += "\n  FLAGGED: " + "; ".join(flags)
  return line


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written (`run` stops before training);
  the message names it."""


def run(config, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`; returns the summary (module docstring).

  Raises:
    config.ConfigError: a bad config value (nothing has been written yet).
    train.CheckpointError: the workdir's checkpoint cannot be restored.
    WorkdirError: the workdir cannot be created or written.
  """
  if config.get("preference", {}).get("objective"):  # offline f-DPO / f-PO
    from fdiv_jax.run import preference  # pylint: disable=g-import-not-at-top
    return preference.run(config, workdir)
  spec = tasks.describe(config)
  # Imported only once the config is known good: a bad value fails in about a
  # second instead of after loading plotting, TensorBoard and text metrics.
  # pylint: disable=g-import-not-at-top
  import jax
  from fdiv_jax.run import evaluation, plots, progress, qrs_report, reporting
  from fdiv_jax.train import loop
  from fdiv_jax.train import state as state_lib
  # pylint: enable=g-import-not-at-top
  enable_compilation_cache()
  task = tasks.build(spec)  # may raise ConfigError; still nothing written

  try:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(spec.config_json)
  except OSError as e:  # read-only file system, no permission, a full disk
    raise WorkdirError(f"Cannot write the workdir {workdir!r} ({e}). Nothing "
                       "in it was changed; choose another --workdir or make "
                       "this one writable.") from e
  from fdiv_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  peek = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  start = peek.latest_step() or 0
  peek.close()

  divergence_key = spec.step.divergence.metric_name
  keys = summary_keys(divergence_key)
  writer = reporting.MetricWriter(workdir)
  if start:
    writer.truncate_after(start)
  moment_targets = ({name: float(m) for name, m in zip(task.target.feature_names,
                                                       spec.target.moments)}
                    if spec.target.kind == "distributional" else {})
  evaluator = evaluation.Evaluator(task, workdir, divergence=spec.step.divergence,
                                   num_samples_md=spec.num_samples_md,
                                   num_samples=spec.loop.eval_batch_size,
                                   moment_targets=moment_targets)
  bar = progress.ProgressBar(total=spec.loop.num_steps, initial=start,
                             samples_per_step=spec.loop.batch_size,
                             divergence_key=divergence_key,
                             moment_targets=moment_targets)
  if start:
    bar.write(f"Resuming from the checkpoint at step {start} in {workdir}.")

  def on_metrics(step, metrics):
    writer.write(step, _prefixed("train", metrics))
    bar.update(step, metrics)

  def on_eval(step, metrics, samples, state):
    metrics = evaluator(step, metrics, samples, state)
    writer.write(step, _prefixed("eval", metrics))
    bar.write(eval_line(step, metrics, keys, moment_targets, evaluator.last_flags))

  t0 = time.time()
  try:
    result = loop.train(task, workdir, loop=spec.loop, step=spec.step,
                        optimizer=spec.optimizer, on_metrics=on_metrics,
                        on_eval=on_eval, on_step=bar.update)
  finally:
    bar.close()
  if result.preempted:
    writer.close()
    print(f"\nStopped by {result.stop_signal} at step {result.step}; the checkpoint is "
          f"saved. Run the same command again to resume.", file=sys.stderr)
    return {"preempted": True, "step": result.step, "signal": result.stop_signal}

  final = dict(evaluator.last)
  writer.close()
  written_plots = plots.plot_metrics(writer.path, os.path.join(workdir, "plots"))
  d = spec.step.divergence
  samples_path = evaluator.write_samples_md(
      os.path.join(workdir, "samples.md"),
      header=(f"Task `{spec.target.kind}` target, divergence `{d}`, {result.step} "
              f"steps. Fresh ancestral samples (temperature 1) of the last "
              f"evaluation."))
  base = evaluator.base()
  summary = {**final, "step": result.step, "samples_per_second":
             result.samples_per_second, "compile_seconds": result.compile_seconds,
             "wall_seconds": time.time() - t0, "divergence": divergence_key,
             "flags": evaluator.last_flags, "moment_targets": moment_targets,
             "base": base,
             "config": json.loads(spec.config_json)}
  if spec.qrs_samples:  # QRS for p with the trained π as proposal: qrs/*
    summary.update(qrs_report.qrs_report(
        task, state_lib.evaluated_params(result.state),
        jax.random.fold_in(jax.random.PRNGKey(spec.loop.seed), 3),
        num_samples=spec.qrs_samples, batch_size=spec.loop.eval_batch_size // 2,
        base_params=result.state.base_params))
  if spec.export_hf:
    summary["export"] = tasks.export_hf(task, spec, result.state,
                                        os.path.join(workdir, "export"))
  if task.lambda_fit is not None:
    fit = task.lambda_fit
    summary["lambda_fit"] = {"lambdas": list(map(float, fit.lambdas)),
                             "moments": list(map(float, fit.moments)),
                             "converged": bool(fit.converged)}
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(json.loads(json.dumps(summary, default=reporting.to_float)), f,
              indent=2, allow_nan=True)
  shown = [k for k in (*keys, *sorted(k for k in final if k.startswith(
      ("exact/", "moment/")) and not k.endswith("_se"))) if k in final]
  table = reporting.summary_table({
      "base model": reporting.with_errors(base, shown),
      "trained": reporting.with_errors(final, shown)})
  if moment_targets:
    table += "\n" + "\n".join(f"target moment/{k}: {v:g}"
                              for k, v in moment_targets.items())
  for label, flags in (("base model", base.get("flags", [])),
                       ("trained", evaluator.last_flags)):
    if flags:
      table += f"\nFLAGGED ({label}): " + "; ".join(flags)
  print(f"\nf-DPG ({d}) finished {result.step} steps in "
        f"{summary['wall_seconds']:.0f} s ({result.samples_per_second:.1f} samples/s "
        f"after a {result.compile_seconds:.1f} s first step).\n{table}\n\n"
        f"Wrote {os.path.join(workdir, 'summary.json')}, {samples_path}, "
        f"{len(written_plots)} plots in {os.path.join(workdir, 'plots')}, metrics.jsonl and "
        f"tensorboard/." + (f" Exported the policy to {summary['export']}."
                            if spec.export_hf else ""))
  return summary
