r"""The main job: train a policy by f-DPG toward a preference-defined target.

  python -m fdiv_jax.main --config=configs/quickstart.py --workdir=/tmp/quick \
      [--config.divergence=forward_kl --config.num_steps=500 ...]

Every config field is validated before anything is written; a bad value stops
the run at once with a message naming the field and the allowed values, and an
existing workdir is left untouched. Re-running with the same workdir resumes
from its last checkpoint (Ctrl-C or SIGTERM saves one before exiting).

The workdir receives:
  config.json        the config of the latest invocation
  checkpoints/       Orbax checkpoints of the whole f-DPG state
  metrics.jsonl      train/* metrics every `log_every` steps, eval/* every
                     `eval_every` steps (fresh samples from π), also as
  tensorboard/       TensorBoard event files
  plots/*.png        alignment, divergences to the target, KL(π‖a), diversity
  samples.md         base-model vs trained samples for the same prompts
  summary.json       the final evaluation metrics by name (alignment,
                     kl_from_base, the divergences, distinct_1/2/3, self_bleu,
                     and exact/* on enumerable tasks), the base model's values
                     under "base", and the config under "config"
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/<task>.py) with get_config().",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (created; an "
                               "existing one is resumed).")
flags.mark_flags_as_required(["config", "workdir"])

# Metrics shown in the final table and the progress bar, in this order.
SUMMARY_KEYS = ("alignment", "forward_kl", "reverse_kl", "tv", "js", "kl_from_base",
                "distinct_1", "distinct_2", "distinct_3", "self_bleu", "mean_length",
                "ess_target")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


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


def _decode(task, tokens, mask) -> tuple[list[str], list[list[int]]]:
  """Texts and token lists (EOS and padding removed) of sampled continuations."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  keep = mask & (tokens != task.tokenizer.eos_id)
  return task.tokenizer.batch_decode(tokens, keep), [
      row[m].tolist() for row, m in zip(tokens, keep)]


class Evaluator:
  """Extra evaluation on the host: diversity, exact metrics, samples."""

  def __init__(self, config, task):
    import jax  # pylint: disable=g-import-not-at-top
    from fdiv_jax.lm import sampling  # pylint: disable=g-import-not-at-top
    self.config, self.task = config, task
    self.plain = sampling.SamplerConfig(
        max_new_tokens=task.sampler.max_new_tokens, eos_id=task.sampler.eos_id,
        pad_id=task.sampler.pad_id)
    self._sample = jax.jit(lambda params, rng, prompts, lengths: sampling.sample(
        task.model, params, rng, prompts, lengths, self.plain))
    self.num_diversity = min(int(config.eval_batch_size), 128)

  def samples(self, params, step: int, n: int, seed_offset: int = 0):
    import jax  # pylint: disable=g-import-not-at-top
    batch = self.task.batch(step, n)
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 7 + seed_offset),
                             step)
    out = self._sample(params, rng, batch.prompts, batch.prompt_lengths)
    return batch, _decode(self.task, out.tokens, out.mask)

  def extra_metrics(self, params, base_params, step: int) -> dict[str, float]:
    from fdiv_jax.run import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    _, (texts, token_lists) = self.samples(params, step, self.num_diversity)
    result = metrics_lib.diversity_report(texts, token_lists)
    if getattr(self.task, "support", None) is not None:
      exact = self.task.exact(params, base_params=base_params)
      result.update({f"exact/{k}": v for k, v in exact.divergences.items()})
      result.update({"exact/kl_from_base": exact.kl_from_base,
                     "exact/alignment": exact.alignment,
                     "exact/log_z": exact.log_z})
    return result


def evaluated_params(config, state):
  """The policy that evaluation reports: the Polyak average when enabled."""
  return state.ema_params if config.ema_decay > 0 else state.params


def _prompt_texts(task) -> list[str]:
  return list(task.prompt_texts) if task.prompt_texts else [""]


def write_samples(path: str, config, task, evaluator, state) -> str:
  from fdiv_jax.run import reporting  # pylint: disable=g-import-not-at-top
  prompts = _prompt_texts(task)
  per_prompt = max(int(config.num_samples_md), 1)
  n = per_prompt * len(prompts)
  columns = []
  for params in (state.base_params, evaluated_params(config, state)):
    batch, (texts, _) = evaluator.samples(params, 0, n, seed_offset=1)
    by_prompt = [[] for _ in prompts]
    for ctx, text in zip(batch.context_ids.tolist(), texts):
      by_prompt[int(ctx)].append(text)
    columns.append(by_prompt)
  header = (f"Task `{config.target.kind}` target, divergence `{config.divergence}`, "
            f"{int(state.step)} steps. Fresh ancestral samples (temperature 1).")
  return reporting.write_samples_md(path, prompts, columns[0], columns[1],
                                    header=header)


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


def run(config, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`; returns the summary (see module doc).

  Raises:
    config.ConfigError: a bad config value (nothing has been written yet).
    train.CheckpointError: the workdir's checkpoint cannot be restored.
  """
  from fdiv_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  enable_compilation_cache()
  from fdiv_jax.run import reporting, tasks  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import checkpoint, loop  # pylint: disable=g-import-not-at-top
  task = tasks.build(config)  # may raise ConfigError; still nothing written

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  peek = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  start = peek.latest_step() or 0
  peek.close()

  writer = reporting.MetricWriter(workdir)
  if start:
    writer.truncate_after(start)
  evaluator = Evaluator(config, task)
  base_path = os.path.join(workdir, "base_eval.json")
  progress = reporting.ProgressBar(total=config.num_steps, initial=start,
                                   samples_per_step=config.batch_size,
                                   divergence_key=config.divergence)
  if start:
    progress.write(f"Resuming from the checkpoint at step {start} in {workdir}.")

  def on_metrics(step, metrics):
    writer.write(step, _prefixed("train", metrics))
    progress.update(step, metrics)

  last_eval: dict[str, float] = {}

  def on_eval(step, metrics, state):
    metrics = dict(metrics)
    metrics.update(evaluator.extra_metrics(evaluated_params(config, state),
                                           state.base_params, step))
    last_eval.clear()
    last_eval.update(metrics)
    writer.write(step, _prefixed("eval", metrics))
    if step == 0:  # π = a: the base model's values, kept for the summary
      with open(base_path, "w", encoding="utf-8") as f:
        json.dump({k: reporting.to_float(v) for k, v in metrics.items()}, f, indent=2)
    shown = {k: metrics[k] for k in SUMMARY_KEYS[:6] if k in metrics}
    progress.write(f"eval @ {step}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in shown.items()))

  t0 = time.time()
  try:
    result = loop.train(config, task, workdir, on_metrics=on_metrics, on_eval=on_eval,
                        on_step=progress.update)
  finally:
    progress.close()
  if result.preempted:
    writer.close()
    print(f"\nStopped by {result.stop_signal} at step {result.step}; the checkpoint is "
          f"saved. Run the same command again to resume.", file=sys.stderr)
    return {"preempted": True, "step": result.step, "signal": result.stop_signal}

  final = dict(last_eval)
  writer.close()
  plots = reporting.plot_metrics(writer.path, os.path.join(workdir, "plots"))
  samples_path = write_samples(os.path.join(workdir, "samples.md"), config, task,
                               evaluator, result.state)
  base = {}
  if os.path.exists(base_path):
    with open(base_path, encoding="utf-8") as f:
      base = json.load(f)
  summary = {**final, "step": result.step, "samples_per_second":
             result.samples_per_second, "compile_seconds": result.compile_seconds,
             "wall_seconds": time.time() - t0, "base": base,
             "config": json.loads(config.to_json_best_effort())}
  if getattr(task, "lambda_fit", None) is not None:
    fit = task.lambda_fit
    summary["lambda_fit"] = {"lambdas": list(map(float, fit.lambdas)),
                             "moments": list(map(float, fit.moments)),
                             "converged": bool(fit.converged)}
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(json.loads(json.dumps(summary, default=reporting.to_float)), f,
              indent=2, allow_nan=True)
  keys = [k for k in (*SUMMARY_KEYS, *sorted(k for k in final if k.startswith(
      ("exact/", "moment/")))) if k in final]
  table = reporting.summary_table({
      "base model": {k: base.get(k) for k in keys},
      "trained": {k: final[k] for k in keys}})
  print(f"\nf-DPG ({config.divergence}) finished {result.step} steps in "
        f"{summary['wall_seconds']:.0f} s ({result.samples_per_second:.1f} samples/s "
        f"after a {result.compile_seconds:.1f} s first step).\n{table}\n\n"
        f"Wrote {os.path.join(workdir, 'summary.json')}, {samples_path}, "
        f"{len(plots)} plots in {os.path.join(workdir, 'plots')}, metrics.jsonl and "
        f"tensorboard/.")
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  try:
    summary = run(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"fdiv_jax: invalid configuration: {e}", file=sys.stderr)
    sys.exit(2)
  except checkpoint.CheckpointError as e:
    print(f"fdiv_jax: {e}", file=sys.stderr)
    sys.exit(3)
  if summary.get("preempted"):
    sys.exit(EXIT_CODES.get(summary["signal"], 1))


if __name__ == "__main__":
  app.run(main)
