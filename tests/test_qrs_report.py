"""QRS with π as proposal (`run.qrs_report`) against enumeration.

The toy task of tests/toy_task.py (vocabulary 4, 3 new tokens: 40
continuations) gives the exact π, a and P of every continuation, hence, for the
β a report used, the exact acceptance rate Σ_x min(P, βπ)/β, the exact bound
1 − Z_β/Z on TV(p_β, p) and the exact E_{p_β}[alignment]. π is a random init
(seed 7, weights ×3) unlike a, so the weights P/π spread over e^-1.4 .. e^5
(reward target) and the quantiles give different β.
"""

import json
import math
import sys
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import toy_task  # pylint: disable=g-import-not-at-top,wrong-import-position

from fdiv_jax import targets
from fdiv_jax.core import qrs
from fdiv_jax.lm import enumeration
from fdiv_jax.run import qrs_report
from fdiv_jax.run.prompts import Prompts
from fdiv_jax.targets import features
from fdiv_jax.train import rollout

NUM_SAMPLES = 20_000
BATCH = 5_000
QUANTILES = (0.5, 0.9, 0.99, 1.0)
NUM_SE = 4.0


def policy_params(model):
  """π: a random init unlike a's (seed 7 vs 1), its weights ×3 (more peaked)."""
  params = model.init(jax.random.PRNGKey(7), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: 3.0 * x, params)


def toy(kind):
  return toy_task.ToyTask(toy_task.toy_config(), toy_task.toy_target(kind))


def enumerated(task, params, prompt):
  """float64 [S] log π, log P and the alignment of every continuation."""
  support = task.support
  log_pi = enumeration.log_probs(task.model, params, prompt, support)
  log_a = enumeration.log_probs(task.model, task.base_params, prompt, support)
  ctx = enumeration.context(prompt, support)
  tokens, mask = jnp.asarray(support.tokens), jnp.asarray(support.mask)
  log_p = task.target.log_prob(tokens, mask, log_a, ctx)
  align = task.target.alignment(tokens, mask, ctx)
  return tuple(np.asarray(x, np.float64) for x in (log_pi, log_p, align))


def exact_at(log_beta, log_pi, log_p, align):
  """Exact (acceptance Z_β/β, TV bound 1 − Z_β/Z, E_{p_β}[alignment])."""
  capped = np.exp(np.minimum(log_p, log_beta + log_pi))       # min(P, βπ)
  z, z_beta = np.exp(log_p).sum(), capped.sum()
  return {"acceptance": z_beta / math.exp(log_beta), "tv_bound": 1.0 - z_beta / z,
          "alignment": float(np.sum(capped * align) / z_beta)}


def assert_within_errors(report, prefix, exact, *, slack=0.0):
  for name, want in exact.items():
    got, se = report[f"{prefix}/{name}"], report[f"{prefix}/{name}_se"]
    assert abs(got - want) <= NUM_SE * se + slack, (
        f"{prefix}/{name}: {got:.5f} ± {se:.5f}, exact {want:.5f}")


# ---------------------------------------------------------------------------
# Fixtures: one report per target (20,000 proposals each).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward():
  task = toy("reward")
  params = policy_params(task.model)
  report = qrs_report.qrs_report(task, params, jax.random.PRNGKey(0),
                                 num_samples=NUM_SAMPLES, quantiles=QUANTILES,
                                 batch_size=BATCH)
  return task, params, report


@pytest.fixture(scope="module")
def pointwise():
  task = toy("pointwise")
  params = policy_params(task.model)
  draw_rng, accept_rng = jax.random.split(jax.random.PRNGKey(3))
  proposals = qrs_report.draw_proposals(task, params, draw_rng,
                                        num_samples=NUM_SAMPLES, batch_size=BATCH)
  report = qrs_report.report_from_proposals(proposals, accept_rng, num_contexts=1,
                                            quantiles=QUANTILES)
  return task, params, proposals, report


# ---------------------------------------------------------------------------
# Against enumeration.
# ---------------------------------------------------------------------------


def test_reward_target_estimates_match_enumeration(reward):
  task, params, report = reward
  exact = enumerated(task, params, task.prompt)
  betas = [report[f"{qrs_report.quantile_key(q)}/log_beta"] for q in QUANTILES]
  assert betas == sorted(betas) and betas[0] < betas[-2] - 1.0   # distinct β
  for q in QUANTILES:
    prefix = qrs_report.quantile_key(q)
    want = exact_at(report[f"{prefix}/log_beta"], *exact)
    # float32 log-probabilities (sampler vs batched scoring) differ by ~1e-6.
    assert_within_errors(report, prefix, want, slack=1e-5)
  # β at the median truncates much of p: a loose bound, well away from 0.
  assert report["qrs/q0.5/tv_bound"] > 0.5
  assert report["qrs/q1.0/tv_bound"] == 0.0 and report["qrs/q1.0/tv_bound_se"] == 0.0
  # log Ẑ against log Z, within 4 of its delta-method errors: Var(w)/(N Z²).
  log_pi, log_p, _ = exact
  z = np.exp(log_p).sum()
  se_log_z = math.sqrt((np.sum(np.exp(2 * log_p - log_pi)) - z**2) / NUM_SAMPLES) / z
  assert abs(report["qrs/log_z"] - math.log(z)) <= NUM_SE * se_log_z


def test_keys_are_flat_json_floats(reward):
  _, _, report = reward
  expected = {"qrs/num_samples", "qrs/num_contexts", "qrs/zero_z_contexts",
              "qrs/log_z", "qrs/seconds"}
  for q in QUANTILES:
    expected |= {f"{qrs_report.quantile_key(q)}/{k}" for k in qrs_report.FIGURES}
  assert set(report) == expected
  assert "qrs/q0.9/acceptance_se" in report and "qrs/q1.0/log_beta" in report
  assert all(type(v) is float for v in report.values())   # pylint: disable=unidiomatic-typecheck
  json.dumps(report, allow_nan=False)
  assert report["qrs/num_samples"] == NUM_SAMPLES
  assert report["qrs/num_contexts"] == 1 and report["qrs/zero_z_contexts"] == 0


def test_standard_errors_match_the_spread_of_repeated_draws(reward):
  """32 independent sets of 625 proposals at the report's β (q = 0.5, 0.9).

  With K estimates, (K−1)·s²/σ² ~ χ²_{K−1} (s their sample standard
  deviation) and Σ_k z_k² ~ χ²_K for z_k = (estimate_k − exact)/se_k, if the
  standard errors are right; both are checked at the 0.1% and 99.9% points.
  """
  task, params, report = reward
  k, n = 32, 625
  proposals = qrs_report.draw_proposals(task, params, jax.random.PRNGKey(11),
                                        num_samples=k * n, batch_size=BATCH)
  exact = enumerated(task, params, task.prompt)
  s_low, s_high = (math.sqrt(scipy.stats.chi2.ppf(p, k - 1) / (k - 1))
                   for p in (0.001, 0.999))
  z_low, z_high = (scipy.stats.chi2.ppf(p, k) / k for p in (0.001, 0.999))
  for q in (0.5, 0.9):
    log_beta = report[f"{qrs_report.quantile_key(q)}/log_beta"]
    want = exact_at(log_beta, *exact)
    chunks = [qrs_report.figures(
        qrs_report.Proposals(*(x[i * n:(i + 1) * n] for x in proposals)),
        log_beta, num_contexts=1) for i in range(k)]
    for name in ("acceptance", "tv_bound", "alignment"):
      values = np.array([c[name] for c in chunks])
      errors = np.array([c[name + "_se"] for c in chunks])
      ratio = np.std(values, ddof=1) / np.sqrt(np.mean(errors**2))
      mean_z2 = np.mean(((values - want[name]) / errors)**2)
      assert s_low < ratio < s_high, (q, name, ratio)
      assert z_low < mean_z2 < z_high, (q, name, mean_z2)


def test_single_context_figures_are_the_qrs_diagnostics(pointwise):
  _, _, proposals, report = pointwise
  for q in QUANTILES:
    prefix = qrs_report.quantile_key(q)
    diag = qrs.diagnostics(jnp.asarray(proposals.log_target),
                           jnp.asarray(proposals.log_proposal),
                           report[f"{prefix}/log_beta"])
    np.testing.assert_allclose(report[f"{prefix}/acceptance"],
                               float(diag.acceptance_rate), rtol=1e-5)
    np.testing.assert_allclose(report[f"{prefix}/tv_bound"], float(diag.tv_bound),
                               atol=1e-5)


def test_pointwise_target(pointwise):
  """P = 0 off the constraint: β from the positive weights only, accepted
  samples all satisfy it, and the estimates match enumeration."""
  task, params, proposals, report = pointwise
  exact = enumerated(task, params, task.prompt)
  log_w = (proposals.log_target.astype(np.float64)
           - proposals.log_proposal.astype(np.float64))
  positive = np.isfinite(log_w)
  assert 0.1 < positive.mean() < 0.9                   # some samples have P = 0
  counts = []
  for q in QUANTILES:
    prefix = qrs_report.quantile_key(q)
    log_beta = report[f"{prefix}/log_beta"]
    np.testing.assert_allclose(log_beta, np.quantile(log_w[positive], q),
                               rtol=1e-5, atol=1e-5)
    want = exact_at(log_beta, *exact)
    assert want["alignment"] == 1.0
    assert report[f"{prefix}/alignment"] == 1.0 and report[f"{prefix}/alignment_se"] == 0.0
    assert_within_errors(report, prefix, want, slack=1e-5)
    # The realised count: a sum of independent Bernoulli(min(1, w/β)).
    accept_p = np.where(positive, np.exp(np.minimum(log_w - log_beta, 0.0)), 0.0)
    expected, sd = accept_p.sum(), math.sqrt(np.sum(accept_p * (1 - accept_p)))
    assert abs(report[f"{prefix}/num_accepted"] - expected) <= NUM_SE * sd
    counts.append(report[f"{prefix}/num_accepted"])
  assert counts == sorted(counts, reverse=True)        # nested as β grows


def test_beta_at_quantile_one_accepts_with_probability_w_over_beta(pointwise):
  """β = the largest sampled weight: min(1, P/(βπ)) = P/(βπ) for every sample
  with P > 0, so the acceptance is mean(w)/β, the estimated TV bound 0 and,
  every continuation with P > 0 having been drawn, β ≥ max_x P(x)/π(x): the
  exact Z_β is Z."""
  task, params, proposals, report = pointwise
  log_w = (proposals.log_target.astype(np.float64)
           - proposals.log_proposal.astype(np.float64))
  positive = np.isfinite(log_w)
  log_beta = report["qrs/q1.0/log_beta"]
  np.testing.assert_allclose(log_beta, log_w[positive].max(), rtol=1e-6)
  assert np.all(log_w[positive] <= log_beta + 1e-6)
  np.testing.assert_allclose(report["qrs/q1.0/acceptance"],
                             np.sum(np.exp(log_w[positive] - log_beta)) / log_w.size,
                             rtol=1e-5)
  assert report["qrs/q1.0/tv_bound"] == 0.0
  log_pi, log_p, align = enumerated(task, params, task.prompt)
  on_support = np.isfinite(log_p)
  assert np.all(log_p[on_support] - log_pi[on_support] <= log_beta + 1e-5)
  want = exact_at(log_beta, log_pi, log_p, align)
  assert abs(want["tv_bound"]) < 1e-5
  np.testing.assert_allclose(want["acceptance"], np.exp(log_p).sum() / math.exp(log_beta),
                             rtol=1e-5)


# ---------------------------------------------------------------------------
# Several prompts: one β, figures normalised per context.
# ---------------------------------------------------------------------------


class ScaledPerPrompt:
  """log energy 3·[x has a 1] + 1.5·(prompt length − 1): P(x|c) differs by
  e^1.5 between the two prompts, so one β means different things per prompt."""

  feature_names = ("has_1",)

  def log_energy(self, tokens, mask, context=None):
    has_one = features.contains_tokens(1)(tokens, mask).astype(jnp.float32)
    return 3.0 * has_one + 1.5 * (context["prompt_lengths"] - 1).astype(jnp.float32)

  def alignment(self, tokens, mask, context=None):
    return features.contains_tokens(1)(tokens, mask).astype(jnp.float32)


class TwoPromptTask:
  """The toy model with prompts [BOS] and [BOS, 2] ("cycle"), one Z_c each."""

  def __init__(self):
    base = toy("reward")
    self.model, self.base_params = base.model, base.base_params
    self.sampler, self.support = base.sampler, base.support
    self.target = targets.ConditionalTarget(ScaledPerPrompt())
    self.prompts = Prompts(texts=("a", "b"),
                           tokens=np.array([[0, 0], [0, 2]], np.int32),
                           lengths=np.array([1, 2], np.int32))
    self.num_contexts = 2
    self.unpadded = (np.array([0]), np.array([0, 2]))

  def batch(self, step, batch_size):
    return self.prompts.batch(step, batch_size)


def test_conditional_target_is_normalised_per_context():
  task = TwoPromptTask()
  params = policy_params(task.model)
  report = qrs_report.qrs_report(task, params, jax.random.PRNGKey(5),
                                 num_samples=NUM_SAMPLES, quantiles=(0.5, 0.9, 1.0),
                                 batch_size=BATCH)
  assert report["qrs/num_contexts"] == 2 and report["qrs/zero_z_contexts"] == 0
  contexts = [enumerated(task, params, prompt) for prompt in task.unpadded]
  z = [np.exp(c[1]).sum() for c in contexts]
  assert max(z) / min(z) > 3                           # the Z_c differ
  np.testing.assert_allclose(report["qrs/log_z"], np.mean(np.log(z)), atol=0.02)
  for q in (0.5, 0.9, 1.0):
    prefix = qrs_report.quantile_key(q)
    log_beta = report[f"{prefix}/log_beta"]
    each = [exact_at(log_beta, *c) for c in contexts]
    want = {k: float(np.mean([e[k] for e in each])) for k in each[0]}
    assert_within_errors(report, prefix, want, slack=1e-5)
  # Pooling the contexts' samples into one Z would give another TV bound.
  log_beta = report["qrs/q0.5/log_beta"]
  capped = [np.exp(np.minimum(c[1], log_beta + c[0])).sum() for c in contexts]
  pooled = 1 - sum(capped) / sum(z)
  per_context = np.mean([1 - b / zc for b, zc in zip(capped, z)])
  assert abs(report["qrs/q0.5/tv_bound"] - per_context) < abs(
      report["qrs/q0.5/tv_bound"] - pooled)


def test_sampler_compiled_once_and_every_prompt_covered(monkeypatch):
  task = TwoPromptTask()
  traces = []
  original = rollout.draw_and_score

  def counting(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(rollout, "draw_and_score", counting)
  proposals = qrs_report.draw_proposals(task, task.base_params, jax.random.PRNGKey(0),
                                        num_samples=19, batch_size=8)
  assert len(traces) == 1                              # 3 batches, one trace
  assert proposals.log_target.shape == (19,)
  np.testing.assert_array_equal(np.bincount(proposals.context_ids), [10, 9])
  np.testing.assert_array_equal(proposals.context_ids, np.arange(19) % 2)


# ---------------------------------------------------------------------------
# Edge cases on given proposals, and bad arguments.
# ---------------------------------------------------------------------------


def test_context_without_any_satisfying_sample():
  log_q = np.log(np.full(8, 0.25, np.float32))
  log_p = np.array([-1.0, -2.0, -1.5, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf],
                   np.float32)
  proposals = qrs_report.Proposals(log_p, log_q, np.ones(8, np.float32),
                                   np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32))
  report = qrs_report.report_from_proposals(proposals, jax.random.PRNGKey(0),
                                            num_contexts=2, quantiles=(1.0,))
  assert report["qrs/zero_z_contexts"] == 1.0
  # Context 1 has the trivial bound 1; context 0's is 0 at β = max w.
  assert report["qrs/q1.0/tv_bound"] == 0.5
  assert report["qrs/q1.0/alignment"] == 1.0           # context 0 only
  w = np.exp(log_p[:3].astype(np.float64) - log_q[:3])
  np.testing.assert_allclose(report["qrs/q1.0/acceptance"],
                             0.5 * (w.sum() / w.max() / 4 + 0.0), rtol=1e-5)

  nothing = proposals._replace(log_target=np.full(8, -np.inf, np.float32))
  report = qrs_report.report_from_proposals(nothing, jax.random.PRNGKey(0),
                                            num_contexts=2, quantiles=(0.5,))
  assert report["qrs/q0.5/acceptance"] == 0.0 and report["qrs/q0.5/tv_bound"] == 1.0
  assert math.isnan(report["qrs/q0.5/log_beta"]) and report["qrs/log_z"] == -math.inf


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_samples=0), "num_samples: "),
    (dict(batch_size=0), "batch_size: "),
    (dict(quantiles=(0.5, 1.5)), "quantiles[1]: "),
    (dict(quantiles=(0.9, 0.9)), "quantiles: "),
    (dict(quantiles=()), "quantiles: "),
])
def test_bad_arguments(kwargs, message):
  task = toy("reward")
  args = {"num_samples": 8, "batch_size": 8, **kwargs}
  with pytest.raises(ValueError) as e:
    qrs_report.qrs_report(task, task.params, jax.random.PRNGKey(0), **args)
  assert str(e.value).startswith(message), e.value
