"""Tests for fdiv_jax.run.metrics: exact values on hand-made inputs."""

import math

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from fdiv_jax.run import metrics


class TestDistinctN:

  def test_exact_values_on_token_lists(self):
    batch = [[1, 2, 3, 1], [1, 2, 4]]
    # unigrams: 1 2 3 1 1 2 4 -> 7 total, {1, 2, 3, 4} distinct.
    assert metrics.distinct_n(batch, 1) == 4 / 7
    # bigrams: (1,2) (2,3) (3,1) (1,2) (2,4) -> 5 total, 4 distinct.
    assert metrics.distinct_n(batch, 2) == 4 / 5
    # trigrams: (1,2,3) (2,3,1) | (1,2,4) -> 3 total, 3 distinct.
    assert metrics.distinct_n(batch, 3) == 1.0

  def test_strings_are_split_into_words(self):
    batch = ["the cat the dog", "the  cat\n"]
    # words: the cat the dog the cat -> 6 total, 3 distinct.
    assert metrics.distinct_n(batch, 1) == 3 / 6
    # bigrams: (the cat) (cat the) (the dog) (the cat) -> 4 total, 3 distinct.
    assert metrics.distinct_n(batch, 2) == 3 / 4

  def test_numpy_rows_and_counted_across_the_batch(self):
    row = np.array([5, 6, 7], dtype=np.int32)
    assert metrics.distinct_n([row, row], 1) == 3 / 6
    assert metrics.distinct_n([row], 2) == 1.0

  def test_degenerate_inputs_are_zero(self):
    assert metrics.distinct_n([], 1) == 0.0
    assert metrics.distinct_n([[1, 2]], 3) == 0.0
    assert metrics.distinct_n(["", "a"], 2) == 0.0
    # Only the sequences long enough contribute.
    assert metrics.distinct_n([[1], [2, 2]], 2) == 1.0

  def test_rejects_bad_order(self):
    with pytest.raises(ValueError):
      metrics.distinct_n([[1]], 0)


class TestSelfBleu:

  def test_identical_texts_score_one(self):
    texts = ["the quick brown fox jumps over it"] * 3
    assert metrics.self_bleu(texts) == pytest.approx(1.0)

  def test_disjoint_texts_score_zero(self):
    texts = ["alpha beta gamma delta", "one two three four", "red green blue"]
    assert metrics.self_bleu(texts) == 0.0

  def test_matches_sacrebleu_multi_reference_mean(self):
    texts = ["a cat sat on the mat", "the cat sat on a hat",
             "dogs run in the park", "a cat ran in the park"]
    scorer = BLEU(tokenize="13a", smooth_method="exp", effective_order=True)
    expected = np.mean([
        scorer.sentence_score(t, texts[:i] + texts[i + 1:]).score
        for i, t in enumerate(texts)
    ]) / 100
    assert metrics.self_bleu(texts) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < metrics.self_bleu(texts) < 1.0
    first_two = np.mean([
        scorer.sentence_score(t, texts[:i] + texts[i + 1:]).score
        for i, t in enumerate(texts[:2])
    ]) / 100
    assert metrics.self_bleu(texts, max_hypotheses=2) == pytest.approx(
        first_two, abs=1e-12)

  def test_degenerate_inputs_are_zero(self):
    assert metrics.self_bleu([]) == 0.0
    assert metrics.self_bleu(["only one"]) == 0.0
    value = metrics.self_bleu(["", "", "x"])
    assert math.isfinite(value) and 0.0 <= value <= 1.0


class TestBleuRouge:

  def test_bleu_perfect_and_disjoint(self):
    hyps = ["the cat sat on the mat today", "it is a fine day"]
    assert metrics.bleu(hyps, hyps) == pytest.approx(1.0)
    assert metrics.bleu(hyps, ["x y z", "u v w"]) == 0.0

  def test_bleu_multiple_and_variable_references(self):
    hyps = ["the cat sat on the mat", "a dog ran in the big park"]
    refs = [["the cat sat on a mat", "the cat sat on the mat"],
            "a dog ran in the park"]
    expected = BLEU().corpus_score(
        hyps, [["the cat sat on a mat", "a dog ran in the park"],
               ["the cat sat on the mat", None]]).score / 100
    assert metrics.bleu(hyps, refs) == pytest.approx(expected, abs=1e-12)

  def test_bleu_degenerate(self):
    assert metrics.bleu([], []) == 0.0
    assert metrics.bleu(["a b"], [[]]) == 0.0
    with pytest.raises(ValueError):
      metrics.bleu(["a"], ["a", "b"])

  def test_rouge_exact_values(self):
    # Hypothesis "the cat sat", reference "the cat sat down":
    # ROUGE-1: P = 3/3, R = 3/4 -> F = 6/7; ROUGE-2: 2/2, 2/3 -> F = 4/5;
    # ROUGE-L: LCS 3 -> same as ROUGE-1.
    out = metrics.rouge(["the cat sat"], ["the cat sat down"])
    assert out["rouge1"] == pytest.approx(6 / 7)
    assert out["rouge2"] == pytest.approx(4 / 5)
    assert out["rougeL"] == pytest.approx(6 / 7)
    # Averaged over hypotheses; best reference taken.
    out = metrics.rouge(["the cat sat", "xyz"],
                        [["dogs bark", "the cat sat"], "abc"])
    assert out == pytest.approx({"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5})

  def test_rouge_degenerate(self):
    assert metrics.rouge([], []) == {"rouge1": 0.0, "rouge2": 0.0,
                                     "rougeL": 0.0}
    assert metrics.rouge(["a"], [[]])["rouge1"] == 0.0


def test_diversity_report():
  texts = ["a b a", "a b c"]
  report = metrics.diversity_report(texts)
  names = {"distinct_1", "distinct_2", "distinct_3", "self_bleu"}
  assert set(report) == names | {n + "_se" for n in names}
  assert report["distinct_1"] == 3 / 6
  assert report["distinct_2"] == 3 / 4
  assert report["distinct_3"] == 1.0
  tokens = [[1, 1, 1], [1, 1]]
  report = metrics.diversity_report(texts, tokens)
  assert report["distinct_1"] == 1 / 5
  assert report["distinct_2"] == 1 / 3
  assert report["distinct_3"] == 1.0
  assert all(isinstance(v, float) for v in report.values())
  assert metrics.diversity_report([]) == {
      "distinct_1": 0.0, "distinct_2": 0.0, "distinct_3": 0.0,
      "self_bleu": 0.0, "distinct_1_se": 0.0, "distinct_2_se": 0.0,
      "distinct_3_se": 0.0, "self_bleu_se": 0.0}


def test_diversity_standard_errors_match_the_spread_over_batches():
  """The bootstrap error of Distinct-n and the error of Self-BLEU from one batch
  are close to the spread of the figures over independent batches."""
  rng = np.random.default_rng(3)
  vocab = [f"w{i}" for i in range(30)]
  p = 1.0 / np.arange(1, 31)
  p /= p.sum()

  def batch():
    return [" ".join(rng.choice(vocab, size=8, p=p)) for _ in range(64)]

  reports = [metrics.diversity_report(batch()) for _ in range(40)]
  for key in ("distinct_1", "distinct_2", "self_bleu"):
    spread = np.std([r[key] for r in reports], ddof=1)
    reported = np.mean([r[key + "_se"] for r in reports])
    assert 0.5 * spread < reported < 2.0 * spread, (key, spread, reported)
