"""Host-side text metrics: diversity (Distinct-n, Self-BLEU) and reference
overlap (BLEU, ROUGE).

These run in Python/NumPy on decoded samples, outside ``jit``, at evaluation
time (Go et al. 2023, §9.5; Zhu et al. 2018, "Texygen", for Self-BLEU; Li et al.
2016, "A Diversity-Promoting Objective Function for Neural Conversation Models",
for Distinct-n). BLEU uses ``sacrebleu`` and ROUGE uses ``rouge-score``: the
well-kept reference implementations, not hand-written versions.

Every score is a Python ``float`` in [0, 1] (sacrebleu's 0–100 BLEU is divided
by 100). Degenerate inputs (an empty batch, sequences shorter than n, a single
text for Self-BLEU) give a documented finite value, never an exception or NaN.
"""

from collections.abc import Sequence
import functools
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

# Tokens of one sequence: a string (split on whitespace into words) or a
# sequence of hashable tokens (token ids, bytes, words).
Tokens = str | Sequence[Any] | np.ndarray

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _as_tokens(sequence: Tokens) -> tuple[Any, ...]:
  if isinstance(sequence, str):
    return tuple(sequence.split())
  if isinstance(sequence, np.ndarray):
    return tuple(sequence.tolist())
  return tuple(sequence)


def ngrams(sequence: Tokens, n: int) -> list[tuple[Any, ...]]:
  """The ``len - n + 1`` contiguous n-grams of one sequence (none if shorter)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  tokens = _as_tokens(sequence)
  return [tokens[i:i + n] for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Tokens], n: int) -> float:
  """Distinct-n of a batch: distinct n-grams / total n-grams, over the batch.

    distinct_n = |∪_i set(ngrams(x_i, n))| / Σ_i max(len(x_i) − n + 1, 0)

  Counted over the whole batch (corpus level, as in Li et al. 2016), not
  averaged per sequence, so that repeating one sample across the batch lowers
  it. 1.0 means no n-gram occurs twice.

  Args:
    sequences: a batch of B sequences; each is a list/array of tokens (ids,
      bytes, words) or a string, which is split on whitespace into words. To
      count characters of a string, pass ``list(text)``.
    n: n-gram order, >= 1.

  Returns:
    A float in [0, 1]; 0.0 when the batch has no n-gram at all (empty batch, or
    every sequence shorter than n).
  """
  total, distinct = 0, set()
  for sequence in sequences:
    grams = ngrams(sequence, n)
    total += len(grams)
    distinct.update(grams)
  return len(distinct) / total if total else 0.0


@functools.lru_cache(maxsize=None)
def _sentence_bleu() -> BLEU:
  # Sentence-level settings (sacrebleu's recommended ones for single segments):
  # 13a tokenisation, case-sensitive, BLEU-4 with effective order and
  # exponential smoothing.
  return BLEU(tokenize="13a", smooth_method="exp", max_ngram_order=4,
              effective_order=True)


def self_bleu(texts: Sequence[str], max_hypotheses: int | None = None) -> float:
  """Self-BLEU (Zhu et al. 2018): mean BLEU of each text against all the others.

    self_bleu = (1/K) Σ_{i<K} BLEU(x_i ; {x_j : j ≠ i}) / 100

  Each text is scored as the hypothesis with every other text of the batch as
  its references (multi-reference BLEU: clipped n-gram counts use the maximum
  count over the references, the brevity penalty uses the closest reference
  length). BLEU settings: ``sacrebleu.metrics.BLEU(tokenize="13a",
  smooth_method="exp", max_ngram_order=4, effective_order=True)``,
  case-sensitive, scored with ``sentence_score``. Higher means less diverse:
  1.0 when all texts are equal.

  Cost is O(K · B) sentence extractions; ~1.5 s for K = B = 256 short texts.

  Args:
    texts: a batch of B strings (decoded samples).
    max_hypotheses: if set, only the first K = min(max_hypotheses, B) texts are
      scored as hypotheses (each still against all B − 1 others), to bound
      the cost; by default K = B.

  Returns:
    A float in [0, 1]; 0.0 when B < 2 (no references).
  """
  scores = self_bleu_scores(texts, max_hypotheses)
  return float(np.mean(scores)) if scores.size else 0.0


def self_bleu_scores(texts: Sequence[str],
                     max_hypotheses: int | None = None) -> np.ndarray:
  """The per-hypothesis BLEU / 100 whose mean is `self_bleu` ([K]; empty if
  B < 2). Their spread gives Self-BLEU's standard error."""
  texts = list(texts)
  if len(texts) < 2:
    return np.zeros((0,))
  k = len(texts) if max_hypotheses is None else min(max_hypotheses, len(texts))
  scorer = _sentence_bleu()
  return np.array([
      scorer.sentence_score(texts[i], texts[:i] + texts[i + 1:]).score / 100.0
      for i in range(k)
  ])


def _reference_streams(references: Sequence[str | Sequence[str]],
                       num_hypotheses: int) -> list[list[str | None]]:
  """Per-hypothesis references -> sacrebleu's reference streams (transposed)."""
  if len(references) != num_hypotheses:
    raise ValueError(f"{num_hypotheses} hypotheses but {len(references)} "
                     "reference entries")
  per_hyp = [[r] if isinstance(r, str) else list(r) for r in references]
  width = max((len(r) for r in per_hyp), default=0)
  # sacrebleu accepts None for a missing reference (variable count per line).
  return [[r[k] if k < len(r) else None for r in per_hyp] for k in range(width)]


def bleu(hypotheses: Sequence[str],
         references: Sequence[str | Sequence[str]]) -> float:
  """Corpus BLEU-4 of the hypotheses against their references, in [0, 1].

  ``sacrebleu.metrics.BLEU()`` defaults (13a tokenisation, case-sensitive,
  BLEU-4, exponential smoothing, no effective order): the standard, comparable
  corpus-level score, divided by 100.

  Args:
    hypotheses: B strings.
    references: B entries, each one reference string or a sequence of
      reference strings (the count may differ between hypotheses).

  Returns:
    A float in [0, 1]; 0.0 for an empty batch or when no hypothesis has a
    reference.
  """
  streams = _reference_streams(references, len(hypotheses))
  if not hypotheses or not streams:
    return 0.0
  if all(r is None for stream in streams for r in stream):
    return 0.0
  return BLEU().corpus_score(list(hypotheses), streams).score / 100.0


@functools.lru_cache(maxsize=None)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(hypotheses: Sequence[str],
          references: Sequence[str | Sequence[str]]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measure of each hypothesis against its references.

  ``rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"],
  use_stemmer=True)`` (Porter stemming, its default lower-casing tokenizer);
  with several references a hypothesis gets the best F-measure over them
  (``score_multi``). Averaged over the B hypotheses.

  Args:
    hypotheses: B strings.
    references: B entries, each one reference string or a sequence of them.

  Returns:
    ``{"rouge1": f, "rouge2": f, "rougeL": f}``, floats in [0, 1]; all 0.0 for
    an empty batch (a hypothesis with no reference scores 0).
  """
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} "
                     "reference entries")
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  scorer = _rouge_scorer()
  for hyp, refs in zip(hypotheses, references):
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
      continue
    scores = scorer.score_multi(refs, hyp)
    for key in ROUGE_TYPES:
      totals[key] += scores[key].fmeasure
  count = max(len(hypotheses), 1)
  return {key: value / count for key, value in totals.items()}


def diversity_report(texts: Sequence[str],
                     token_lists: Sequence[Tokens] | None = None,
                     max_hypotheses: int | None = None,
                     num_bootstrap: int = 100) -> dict[str, float]:
  """Diversity of a batch of samples: Distinct-1/2/3 and Self-BLEU.

  Args:
    texts: B decoded samples, for Self-BLEU.
    token_lists: the same B samples as token sequences (e.g. the sampled ids
      with padding removed), for Distinct-n over model tokens. If ``None``,
      Distinct-n is over the whitespace-separated words of ``texts``.
    max_hypotheses: passed to ``self_bleu``.
    num_bootstrap: resamples for the standard errors of Distinct-n.

  Returns:
    ``{"distinct_1", "distinct_2", "distinct_3", "self_bleu"}``, floats in
    [0, 1] (see ``distinct_n`` and ``self_bleu`` for the degenerate values),
    each with ``<name>_se``, its standard error: for Distinct-n the spread of
    ``num_bootstrap`` bootstrap resamples of the batch (seeded, so repeatable),
    for Self-BLEU that of the per-hypothesis scores over √K.
  """
  sequences = list(texts if token_lists is None else token_lists)
  report = {}
  rng = np.random.default_rng(0)
  resamples = [rng.integers(0, len(sequences), len(sequences))
               for _ in range(num_bootstrap)] if len(sequences) > 1 else []
  for n in (1, 2, 3):
    report[f"distinct_{n}"] = distinct_n(sequences, n)
    boot = [distinct_n([sequences[i] for i in idx], n) for idx in resamples]
    report[f"distinct_{n}_se"] = float(np.std(boot, ddof=1)) if boot else 0.0
  scores = self_bleu_scores(texts, max_hypotheses)
  report["self_bleu"] = float(np.mean(scores)) if scores.size else 0.0
  report["self_bleu_se"] = (float(np.std(scores, ddof=1) / np.sqrt(scores.size))
                            if scores.size > 1 else 0.0)
  return report
