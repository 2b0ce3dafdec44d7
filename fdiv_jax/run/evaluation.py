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
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from fdiv_jax.run import metrics as metrics_lib
from fdiv_jax.run import reporting

BASE_EVAL_FILE = "base_eval.json"
BASE_SAMPLES_FILE = "base_samples.json"
MAX_DIVERSITY_SAMPLES = 128   # Self-BLEU is quadratic in the number of samples


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
    use_ema: the evaluated policy is the Polyak average (exact metrics too).
    num_samples_md: samples per prompt kept for samples.md.
  """

  def __init__(self, task, workdir: str, *, divergence, use_ema: bool,
               num_samples_md: int):
    self.task = task
    self.workdir = workdir
    self.divergence = divergence
    self.use_ema = use_ema
    self.per_prompt = max(int(num_samples_md), 1)
    self.last: dict[str, float] = {}
    self.last_samples: list[list[str]] = []

  def __call__(self, step: int, metrics: dict[str, float], samples,
               state) -> dict[str, float]:
    """Metrics of one evaluation: the step's, diversity, exact (toy spaces)."""
    texts, token_lists = decode(self.task.tokenizer, samples.tokens, samples.mask)
    n = MAX_DIVERSITY_SAMPLES
    result = dict(metrics)
    result.update(metrics_lib.diversity_report(texts[:n], token_lists[:n]))
    if self.task.support is not None:
      params = state.ema_params if self.use_ema else state.params
      exact = self.task.exact(params, base_params=state.base_params,
                              extra=(self.divergence,))
      result.update({f"exact/{k}": v for k, v in exact.divergences.items()})
      result.update({"exact/kl_from_base": exact.kl_from_base,
                     "exact/alignment": exact.alignment,
                     "exact/log_z": exact.log_z})
    self.last = result
    self.last_samples = by_prompt(texts, samples.context_ids,
                                  self.task.num_contexts, self.per_prompt)
    if step == 0:  # π = a: the base model's figures, kept for the summary
      self._write(BASE_EVAL_FILE, {k: reporting.to_float(v)
                                   for k, v in result.items()})
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
