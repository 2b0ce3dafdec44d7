"""Evaluation on the host: every figure of one evaluation from the same samples."""

import json
import os

import numpy as np

from fdiv_jax.core import divergences
from fdiv_jax.lm import tokenization
from fdiv_jax.run import evaluation
from fdiv_jax.run import metrics as metrics_lib
from fdiv_jax.run.prompts import Prompts
from fdiv_jax.train.eval_step import EvalSamples


class _Task:
  """What the evaluator reads of a task: tokenizer, prompts, no support."""

  def __init__(self, texts):
    self.tokenizer = tokenization.ByteTokenizer()
    self.prompts = Prompts.encode(texts, self.tokenizer)
    self.num_contexts = self.prompts.num_contexts
    self.support = None


def _samples(texts, context_ids, eos):
  width = max(len(t) for t in texts) + 1
  tokens = np.full((len(texts), width), eos, np.int32)
  mask = np.zeros((len(texts), width), bool)
  for i, t in enumerate(texts):
    ids = list(t.encode())
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids) + 1] = True       # the text and its EOS
  return EvalSamples(tokens, mask, np.asarray(context_ids, np.int32))


def test_diversity_and_samples_come_from_the_evaluation_samples(tmp_path):
  task = _Task(("A", "B"))
  texts = ["love is all", "work all day", "love is all", "time flies", "x"]
  samples = _samples(texts, [0, 1, 0, 1, 0], task.tokenizer.eos_id)
  ev = evaluation.Evaluator(task, str(tmp_path), divergence=divergences.get("js"),
                            num_samples_md=2, num_samples=10)
  out = ev(0, {"js": 0.25}, samples, state=None)
  assert out["js"] == 0.25
  want = metrics_lib.diversity_report(
      texts, [list(t.encode()) for t in texts])
  for key, value in want.items():
    assert out[key] == value, key
  # Too few samples to read the divergences: flagged, in the metrics too.
  assert out["flagged"] == 1.0 and "effective sample size" in ev.last_flags[0]
  # Per prompt, the first two samples in order; the third of prompt 0 is cut.
  assert ev.last_samples == [["love is all", "love is all"],
                             ["work all day", "time flies"]]
  # Step 0 is the base model's: its figures and samples are kept for later.
  with open(tmp_path / evaluation.BASE_EVAL_FILE, encoding="utf-8") as f:
    assert json.load(f)["distinct_1"] == want["distinct_1"]
  assert ev.base()["js"] == 0.25
  later = _samples(["good day", "bad day"], [1, 0], task.tokenizer.eos_id)
  ev(5, {"js": 0.125}, later, state=None)
  assert ev.base()["js"] == 0.25                 # not overwritten
  path = ev.write_samples_md(os.path.join(tmp_path, "samples.md"), "header")
  text = open(path, encoding="utf-8").read()
  assert "work all day" in text and "bad day" in text and "good day" in text
  base_part, trained_part = text.split("**Trained**", 1)
  assert "love is all" in base_part and "love is all" not in trained_part.split(
      "## 2.")[0]


def test_a_negative_divergence_is_flagged_beyond_its_error_not_for_rounding():
  ok = {"ess_target": 1.0, "zero_z_contexts": 0.0}
  flags = lambda **m: evaluation.coverage_flags(  # noqa: E731
      {**ok, **m}, 1024, {}, ["kl_from_base", "js"])
  # KL(a‖a) of a base-model row: float32 rounding of log π − log a, seen as
  # −5.3e-7 ± 2.6e-7 on the quickstart (seed 2): not a coverage problem.
  assert flags(kl_from_base=-5.3e-7, kl_from_base_se=2.6e-7) == []
  assert flags(js=0.01, js_se=0.02) == []
  assert flags(js=-0.01, js_se=0.02) == []           # within 2 SE
  (flag,) = flags(js=-0.05, js_se=0.01)              # 5 SE below 0
  assert flag.startswith("js = -0.05 ± 0.01 is below 0 beyond its error")
  (flag,) = flags(kl_from_base=-3e-5, kl_from_base_se=1e-6)
  assert flag.startswith("kl_from_base = -3e-05")
