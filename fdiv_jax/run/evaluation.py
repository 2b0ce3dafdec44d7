"""Evaluation on the host, around the jitted evaluation step's output.

The evaluation step (`fdiv_jax.train.eval_step`) draws one batch of fresh
samples x ~ π and returns its importance-sampled metrics together with the
samples. `Evaluator` adds what needs the host: the samples decoded, their
diversity (Distinct-n, Self-BLEU), exact metrics by enumeration on toy spaces,
and the samples per prompt that samples.md shows. Every figure of one
evaluation comes from the same samples.

The step-0 evaluation is the base model's (π = a): its metrics and samples are
kept in the workdir (`base_eval.json`, `base_samples.json`) so that a resumed
run still has them for the summary and samples.md.

Coverage before confidence: an evaluation whose samples do not cover the target
is flagged (`coverage_flags`), in the eval line and in summary.json, rather
than reported as a plain number:

  * an effective sample size of the weights p/q below `MIN_EFFECTIVE_SAMPLES`;
  * a context where no sample satisfies the target (Ẑ_c = 0);
  * a distributional feature whose target moment lies outside the range of
    its values over the samples (the target weights what no sample shows);
  * a divergence estimate below 0 by more than two standard errors.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from fdiv_jax.core import divergences
from fdiv_jax.run import metrics as metrics_lib
from fdiv_jax.run import reporting
from fdiv_jax.train import state as state_lib

BASE_EVAL_FILE = "base_eval.json"
BASE_SAMPLES_FILE = "base_samples.json"
MAX_DIVERSITY_SAMPLES = 128   # Self-BLEU is quadratic in the number of samples
MIN_EFFECTIVE_SAMPLES = 50    # of the weights p/q, for the divergences to be read
# A divergence estimate below 0 by less than this (nats) is float32 rounding of
# the log-ratios (about 1e-7 of |log π| ≈ 10² for a sequence), not missing
# coverage: e.g. KL(a‖a) of the base-model row reads −5e-7 ± 2.6e-7.
ROUNDING_TOLERANCE = 1e-5


def coverage_flags(metrics: dict[str, float], num_samples: int,
                   moment_targets: dict[str, float],
                   divergence_keys: Sequence[str]) -> list[str]:
  """Why an evaluation's figures should not be read as plain numbers ([] = none).

  Args:
    metrics: the evaluation's metrics (`rollout.sample_metrics`).
    num_samples: N, the samples behind them.
    moment_targets: the target moment of each distributional feature by name.
    divergence_keys: the divergence estimates to check for a negative value
      (below −(2 SE + `ROUNDING_TOLERANCE`)).
  """
  flags = []
  ess = metrics.get("ess_target", float("nan")) * num_samples
  if not ess >= MIN_EFFECTIVE_SAMPLES:
    flags.append(f"low coverage: effective sample size {ess:.0f} of {num_samples} "
                 f"samples (< {MIN_EFFECTIVE_SAMPLES}) for the weights p/q")
  if metrics.get("zero_z_contexts", 0) > 0:
    flags.append(f"no sample satisfies the target in "
                 f"{metrics['zero_z_contexts']:.0f} context(s): Ẑ = 0 there")
  for name, goal in moment_targets.items():
    lo = metrics.get(f"feature_min/{name}")
    hi = metrics.get(f"feature_max/{name}")
    if lo is not None and not lo < goal < hi:
      flags.append(f"feature {name!r}: the target moment {goal:g} is outside the "
                   f"sampled range [{lo:g}, {hi:g}]: no sample shows what the "
                   f"target weights")
  for key in divergence_keys:
    value, se = metrics.get(key), metrics.get(key + "_se", 0.0)
    if value is not None and value < -(2.0 * se + ROUNDING_TOLERANCE):
      flags.append(f"{key} = {value:.3g} ± {se:.2g} is below 0 beyond its error: "
                   f"the samples miss part of the target")
  return flags


def decode(tokenizer, tokens: np.ndarray, mask: np.ndarray
           ) -> tuple[list[str], list[list[int]]]:
  """Texts and token lists (EOS and padding removed) of sampled continuations."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  keep = mask & (tokens != tokenizer.eos_id)
  return tokenizer.batch_decode(tokens, keep), [
      row[m].tolist() for row, m in zip(tokens, keep)]


def by_prompt(texts: Sequence[str], context_ids: Sequence[int], num_prompts: int,
              per_prompt: int) -> list[list[str]]:
  """The first `per_prompt` texts of each prompt, in sample order."""
  grouped: list[list[str]] = [[] for _ in range(num_prompts)]
  for ctx, text in zip(context_ids, texts):
    if len(grouped[int(ctx)]) < per_prompt:
      grouped[int(ctx)].append(text)
  return grouped


class Evaluator:
  """Completes each evaluation (`on_eval` of `train.loop.train`).

  Args:
    task: the run's task (tokenizer, prompts, and the support when exact
      metrics are on).
    workdir: where the base model's evaluation is kept.
    divergence: the trained divergence, whose exact value is reported beside
      the standard four.
    num_samples_md: samples per prompt kept for samples.md.
    num_samples: N, the samples of one evaluation (π's and a's).
    moment_targets: the target moment of each distributional feature.
  """

  def __init__(self, task, workdir: str, *, divergence,
               num_samples_md: int, num_samples: int,
               moment_targets: dict[str, float] | None = None):
    self.task = task
    self.workdir = workdir
    self.divergence = divergence
    self.per_prompt = max(int(num_samples_md), 1)
    self.num_samples = num_samples
    self.moment_targets = dict(moment_targets or {})
    self.divergence_keys = tuple(dict.fromkeys(
        (*divergences.STANDARD, divergence.metric_name, "kl_from_base")))
    self.last: dict[str, float] = {}
    self.last_flags: list[str] = []
    self.last_samples: list[list[str]] = []

  def __call__(self, step: int, metrics: dict[str, float], samples,
               state) -> dict[str, float]:
    """Metrics of one evaluation: the step's, diversity, exact (toy spaces)."""
    texts, token_lists = decode(self.task.tokenizer, samples.tokens, samples.mask)
    n = MAX_DIVERSITY_SAMPLES
    result = dict(metrics)
    result.update(metrics_lib.diversity_report(texts[:n], token_lists[:n]))
    if self.task.support is not None:
      params = state_lib.evaluated_params(state)
      exact = self.task.exact(params, base_params=state.base_params,
                              extra=(self.divergence,))
      result.update({f"exact/{k}": v for k, v in exact.divergences.items()})
      result.update({"exact/kl_from_base": exact.kl_from_base,
                     "exact/alignment": exact.alignment,
                     "exact/log_z": exact.log_z})
    self.last_flags = coverage_flags(result, self.num_samples,
                                     self.moment_targets, self.divergence_keys)
    result["flagged"] = float(bool(self.last_flags))
    self.last = result
    self.last_samples = by_prompt(texts, samples.context_ids,
                                  self.task.num_contexts, self.per_prompt)
    if step == 0:  # π = a: the base model's figures, kept for the summary
      self._write(BASE_EVAL_FILE, {**{k: reporting.to_float(v)
                                      for k, v in result.items()},
                                   "flags": self.last_flags})
      self._write(BASE_SAMPLES_FILE, self.last_samples)
    return result

  def _write(self, name: str, value: Any):
    with open(os.path.join(self.workdir, name), "w", encoding="utf-8") as f:
      json.dump(value, f, indent=2)

  def _read(self, name: str, default: Any) -> Any:
    path = os.path.join(self.workdir, name)
    if not os.path.exists(path):
      return default
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  def base(self) -> dict[str, float]:
    """The base model's evaluation (step 0), {} if it was never run here."""
    return self._read(BASE_EVAL_FILE, {})

  def write_samples_md(self, path: str, header: str) -> str:
    """samples.md: the base model's and the last evaluation's samples per prompt."""
    prompts = list(self.task.prompts.texts) or [""]
    base = self._read(BASE_SAMPLES_FILE, [[] for _ in prompts])
    return reporting.write_samples_md(path, prompts, base, self.last_samples,
                                      header=header)
