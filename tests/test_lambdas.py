"""fit_lambdas with several contexts, and its feasibility check, against exact
answers.

One λ is shared by the C contexts and every context is normalised by its own
Z_c, so λ must solve mean_c E_{p_c}[φ] = μ̄ (not the pooled equation
Σ_c Z_c m_c / Σ_c Z_c = μ̄). The samples are built so that the self-normalised
estimates are exact: each point x of a small per-context support appears
exactly N_c·q(x|c) times, so (1/N_c) Σ_{i∈c} a_i e^{λ·φ_i} / q_i = Z_c(λ)
exactly and the per-context SNIS moments are the exact moments of
p_c ∝ a(·|c) e^{λ·φ}.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from fdiv_jax import targets
from fdiv_jax.lm import sampling
from fdiv_jax.run import config as config_lib
from fdiv_jax.run import prompts as prompts_lib
from fdiv_jax.run import tasks
from fdiv_jax.targets import features

# --------------------------------------------------------------------------
# Exact answers.
# --------------------------------------------------------------------------


def bernoulli_moment(lam, rate):
  """E_p[φ] for p ∝ a e^{λφ}, φ boolean with a-frequency `rate`."""
  e = np.exp(lam)
  return rate * e / (1 - rate + rate * e)


def exact_context_moments(log_a, phi, lam):
  """[C, K] moments of p_c ∝ a_c e^{λ·φ} over the supports (lists per c)."""
  out = []
  for la, ph in zip(log_a, phi):
    log_p = la + ph @ lam
    out.append(np.exp(log_p - scipy.special.logsumexp(log_p)) @ ph)
  return np.array(out)


def exact_log_z(log_a, phi, lam):
  return np.array([scipy.special.logsumexp(la + ph @ lam)
                   for la, ph in zip(log_a, phi)])


def exact_samples(log_a, phi, counts, seed=0):
  """Samples in which point j of context c appears counts[c][j] times, with
  q(j|c) = counts[c][j] / N_c, shuffled (contexts interleaved)."""
  rows = [(c, j) for c, cs in enumerate(counts) for j, n in enumerate(cs)
          for _ in range(n)]
  order = np.random.default_rng(seed).permutation(len(rows))
  ctx = np.array([rows[i][0] for i in order])
  idx = np.array([rows[i][1] for i in order])
  samples_phi = np.stack([phi[c][j] for c, j in zip(ctx, idx)])
  log_base = np.array([log_a[c][j] for c, j in zip(ctx, idx)])
  log_q = np.array([np.log(counts[c][j] / np.sum(counts[c]))
                    for c, j in zip(ctx, idx)])
  return samples_phi, log_base, log_q, ctx


def issue_samples():
  """The issue's example: 10,000 samples per context, exactly 5,000 and 100
  of them with φ = 1 (base rates 0.5 and 0.01), q = a."""
  phi = np.zeros(20_000)
  phi[:5_000] = 1.0
  phi[10_000:10_100] = 1.0
  ctx = np.repeat([0, 1], 10_000)
  order = np.random.default_rng(3).permutation(20_000)
  return phi[order], ctx[order]


RATES = (0.5, 0.01)


def issue_root():
  return scipy.optimize.brentq(
      lambda lam: np.mean([bernoulli_moment(lam, r) for r in RATES]) - 0.5,
      0.0, 10.0, xtol=1e-14, rtol=1e-15)


# --------------------------------------------------------------------------
# The issue's two-context example.
# --------------------------------------------------------------------------


def test_two_contexts_fit_the_mean_of_the_per_context_moments():
  phi, ctx = issue_samples()
  zeros = np.zeros_like(phi)
  root = issue_root()
  fit = targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx,
                            tol=1e-10)
  print(f"two contexts: λ̂ = {fit.lambdas[0]:.10f}, exact root = {root:.10f}, "
        f"|λ̂ − λ*| = {abs(fit.lambdas[0] - root):.2e}")
  assert fit.converged
  assert abs(fit.lambdas[0] - root) <= 1e-6
  assert abs(root - 2.30) < 0.005                 # the issue's figure
  np.testing.assert_allclose(fit.moments, [0.5], atol=1e-9)
  exact = [bernoulli_moment(root, r) for r in RATES]
  np.testing.assert_allclose(fit.context_moments, np.array(exact)[:, None],
                             atol=1e-8)
  np.testing.assert_array_equal(fit.context_counts, [10_000, 10_000])
  assert fit.num_samples == 20_000 and fit.context_moments.shape == (2, 1)
  # Ẑ_c(λ) = 1 − r_c + r_c e^λ exactly.
  np.testing.assert_allclose(
      fit.log_partition, [np.log(1 - r + r * np.exp(fit.lambdas[0]))
                          for r in RATES], rtol=1e-12)
  # The smallest per-context ESS, (Σw)²/Σw² with w = e^{λφ}.
  e = np.exp(fit.lambdas[0])
  ess = [(n1 * e + n0) ** 2 / (n1 * e * e + n0)
         for n1, n0 in ((5_000, 5_000), (100, 9_900))]
  assert fit.effective_sample_size == pytest.approx(min(ess), rel=1e-10)


def test_the_pooled_fit_is_the_old_answer():
  # Without context_ids the samples form one context: the pooled equation
  # 0.51 e^λ / (1.49 + 0.51 e^λ) = 0.5, λ = log(1.49 / 0.51) ≈ 1.07, whose
  # per-context moments 0.745 and 0.029 average 0.387, not 0.5.
  phi, _ = issue_samples()
  zeros = np.zeros_like(phi)
  pooled = targets.fit_lambdas(phi, zeros, zeros, [0.5], tol=1e-10)
  lam = pooled.lambdas[0]
  print(f"pooled: λ = {lam:.10f} (log(1.49/0.51) = {np.log(1.49 / 0.51):.10f})")
  assert lam == pytest.approx(np.log(1.49 / 0.51), abs=1e-9)
  assert lam == pytest.approx(1.07, abs=0.005)
  per_context = [bernoulli_moment(lam, r) for r in RATES]
  np.testing.assert_allclose(per_context, [0.745, 0.029], atol=1e-3)
  assert np.mean(per_context) == pytest.approx(0.387, abs=1e-3)
  assert pooled.context_moments.shape == (1, 1)
  assert pooled.context_counts.tolist() == [20_000]
  np.testing.assert_array_equal(pooled.context_moments[0], pooled.moments)


def test_distributional_target_fit_passes_context_ids():
  phi, ctx = issue_samples()
  tokens = jnp.asarray(np.stack([phi, np.zeros_like(phi)], -1).astype(np.int32))
  mask = jnp.ones(tokens.shape, bool)
  target = targets.DistributionalTarget(
      (features.contains_tokens(1, name="has1"),), (0.5,))
  zeros = np.zeros(phi.shape[0])
  fitted, fit = target.fit(tokens, mask, zeros, zeros, context_ids=ctx,
                           tol=1e-10)
  assert abs(fit.lambdas[0] - issue_root()) <= 1e-6
  assert fitted.lambdas == tuple(fit.lambdas)
  assert fit.feature_names == ("has1",)
  _, fit_pooled = target.fit(tokens, mask, zeros, zeros, tol=1e-10)
  assert fit_pooled.lambdas[0] == pytest.approx(np.log(1.49 / 0.51), abs=1e-9)


def test_fit_distributional_fits_per_prompt(monkeypatch):
  """run.tasks.fit_distributional gives each sample its prompt as context."""
  seen = {5: 0, 6: 0}                        # samples drawn per prompt
  every = {5: 2, 6: 100}                     # φ = 1 on every k-th sample

  def fake_sampler(model, config):
    def draw(params, rng, prompt_tokens, prompt_lengths):
      tokens = np.zeros((prompt_tokens.shape[0], 2), np.int32)
      for row, last in enumerate(np.asarray(prompt_tokens)[:, -1]):
        tokens[row, 0] = int(seen[int(last)] % every[int(last)] == 0)
        seen[int(last)] += 1
      return sampling.SampleOutput(
          tokens=jnp.asarray(tokens), mask=jnp.ones(tokens.shape, bool),
          token_log_q=jnp.zeros(tokens.shape), log_q=jnp.zeros(tokens.shape[0]),
          lengths=jnp.full(tokens.shape[:1], 2, jnp.int32))
    return draw

  monkeypatch.setattr(sampling, "make_sampler", fake_sampler)
  prompts = prompts_lib.Prompts(("a", "b"), np.array([[0, 5], [0, 6]], np.int32),
                                np.array([2, 2], np.int32))
  target = targets.DistributionalTarget(
      (features.contains_tokens(1, name="has1"),), (0.5,))
  config = sampling.SamplerConfig(max_new_tokens=2)
  _, fit, partition = tasks.fit_distributional(
      target, None, None, prompts, config, 20_000, 1_000, jax.random.PRNGKey(0))
  assert seen == {5: 10_000, 6: 10_000}
  # The fit's samples seed the trainer's running log Ẑ_c: the same estimate.
  np.testing.assert_array_equal(partition.count, [10_000, 10_000])
  # (float32 sums of 10,000 weights against the fit's float64.)
  np.testing.assert_allclose(partition.log_z, fit.log_partition, atol=1e-4)
  np.testing.assert_array_equal(fit.context_counts, [10_000, 10_000])
  np.testing.assert_allclose(fit.context_moments[:, 0],
                             [bernoulli_moment(fit.lambdas[0], r) for r in RATES],
                             atol=1e-6)
  assert abs(fit.lambdas[0] - issue_root()) <= 1e-4
  # Fewer samples than prompts: a prompt without samples is a config error.
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.target\.moments: .*context 1 .*has no "
                           r"samples.*fit_samples"):
    tasks.fit_distributional(target, None, None, prompts, config, 1, 1,
                             jax.random.PRNGKey(0))


# --------------------------------------------------------------------------
# Unequal context sizes, proposals q ≠ a, several features.
# --------------------------------------------------------------------------

SUPPORT_1D = np.arange(4.0)[:, None]                       # φ = 0, 1, 2, 3
COUNTS_1D = ([100, 200, 50, 50], [1000, 500, 1500, 1000],
             [10000, 20000, 5000, 5000])


def dirichlet_log_a(seed, num_contexts, size):
  rng = np.random.default_rng(seed)
  return [np.log(rng.dirichlet(np.ones(size))) for _ in range(num_contexts)]


def test_unequal_contexts_and_proposals():
  log_a = dirichlet_log_a(1, 3, 4)
  phi_c = [SUPPORT_1D] * 3
  phi, log_base, log_q, ctx = exact_samples(log_a, phi_c, COUNTS_1D)
  assert not np.allclose(log_base, log_q)
  mu = 1.7
  root = scipy.optimize.brentq(
      lambda lam: exact_context_moments(log_a, phi_c, np.array([lam])).mean() - mu,
      -20.0, 20.0, xtol=1e-14, rtol=1e-15)
  fit = targets.fit_lambdas(phi, log_base, log_q, [mu], context_ids=ctx,
                            num_contexts=3, feature_names=("count",), tol=1e-10)
  print(f"unequal contexts, q ≠ a: λ̂ = {fit.lambdas[0]:.10f}, exact = "
        f"{root:.10f}, |λ̂ − λ*| = {abs(fit.lambdas[0] - root):.2e}")
  assert fit.converged and abs(fit.lambdas[0] - root) <= 1e-6
  np.testing.assert_array_equal(fit.context_counts, [400, 4000, 40000])
  np.testing.assert_allclose(
      fit.context_moments, exact_context_moments(log_a, phi_c, fit.lambdas),
      atol=1e-10)
  np.testing.assert_allclose(fit.moments, [mu], atol=1e-9)
  # log Ẑ_c(λ̂) is log Z_c(λ̂) exactly (the counts are proportional to q).
  np.testing.assert_allclose(fit.log_partition,
                             exact_log_z(log_a, phi_c, fit.lambdas), rtol=1e-12)
  # The pooled fit weights each context by Z_c and misses μ̄ on average.
  pooled = targets.fit_lambdas(phi, log_base, log_q, [mu], tol=1e-10)
  pooled_mean = exact_context_moments(log_a, phi_c, pooled.lambdas).mean()
  assert abs(pooled.lambdas[0] - root) > 1e-2 and abs(pooled_mean - mu) > 1e-2


def test_two_features_several_contexts():
  support = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 1]], np.float64)
  counts = ([30, 40, 50, 60, 20], [40, 10, 20, 20, 10], [300, 500, 100, 50, 50],
            [70, 70, 70, 70, 70])
  log_a = dirichlet_log_a(2, 4, 5)
  phi_c = [support] * 4
  lam_true = np.array([0.7, -0.4])
  mu = exact_context_moments(log_a, phi_c, lam_true).mean(0)
  sol = scipy.optimize.root(
      lambda lam: exact_context_moments(log_a, phi_c, lam).mean(0) - mu,
      np.zeros(2), method="hybr", options={"xtol": 1e-13})
  assert np.max(np.abs(sol.fun)) < 1e-13
  np.testing.assert_allclose(sol.x, lam_true, atol=1e-9)
  phi, log_base, log_q, ctx = exact_samples(log_a, phi_c, counts, seed=4)
  fit = targets.fit_lambdas(phi, log_base, log_q, mu, context_ids=ctx,
                            feature_names=("x", "y"), tol=1e-10)
  err = np.max(np.abs(fit.lambdas - sol.x))
  print(f"K = 2, C = 4: λ̂ = {fit.lambdas}, exact = {sol.x}, max error = "
        f"{err:.2e}, iterations = {fit.num_iterations}")
  assert fit.converged and err <= 1e-6
  assert fit.context_moments.shape == (4, 2) and fit.log_partition.shape == (4,)
  np.testing.assert_allclose(
      fit.context_moments, exact_context_moments(log_a, phi_c, fit.lambdas),
      atol=1e-10)
  np.testing.assert_allclose(fit.log_partition,
                             exact_log_z(log_a, phi_c, fit.lambdas), rtol=1e-12)


def test_log_partition_is_the_sample_estimate():
  # Random samples (not exact proportions), q ≠ a, and two samples with
  # a = 0: they count in N_c and add 0 to Ẑ_c.
  rng = np.random.default_rng(5)
  n = 3000
  ctx = rng.integers(0, 3, n)
  phi = rng.normal(size=(n, 2))
  log_base = rng.normal(size=n) - 3.0
  log_q = rng.normal(size=n) - 3.0
  log_base[:2] = -np.inf
  mu = [0.1, -0.2]
  fit = targets.fit_lambdas(phi, log_base, log_q, mu, context_ids=ctx,
                            tol=1e-10)
  assert fit.converged
  counts = np.bincount(ctx, minlength=3)
  np.testing.assert_array_equal(fit.context_counts, counts)
  log_w = log_base - log_q + phi @ fit.lambdas
  expected = [scipy.special.logsumexp(log_w[ctx == c]) - np.log(counts[c])
              for c in range(3)]
  np.testing.assert_allclose(fit.log_partition, expected, rtol=1e-12)
  w = [np.exp(log_w[ctx == c] - scipy.special.logsumexp(log_w[ctx == c]))
       for c in range(3)]
  moments = np.array([wc @ phi[ctx == c] for c, wc in enumerate(w)])
  np.testing.assert_allclose(fit.context_moments, moments, atol=1e-12)
  np.testing.assert_allclose(moments.mean(0), mu, atol=1e-10)
  assert fit.effective_sample_size == pytest.approx(
      min(1 / np.sum(wc ** 2) for wc in w), rel=1e-10)


# --------------------------------------------------------------------------
# Feasibility: μ̄ strictly inside the (mean over contexts of the) hulls.
# --------------------------------------------------------------------------

# Two exclusive boolean features: (0, 0), (1, 0), (0, 1), 50/30/20 times.
EXCLUSIVE = np.repeat(np.array([[0, 0], [1, 0], [0, 1]], np.float64),
                      [50, 30, 20], axis=0)


def fit_exclusive(mu, **kwargs):
  zeros = np.zeros(EXCLUSIVE.shape[0])
  return targets.fit_lambdas(EXCLUSIVE, zeros, zeros, mu,
                             feature_names=("x1", "x2"), **kwargs)


def test_exclusive_features_beyond_the_hull_are_refused():
  # Each moment is inside (0, 1), the range its feature reaches, so the old
  # per-feature check passed and Newton diverged; jointly they need
  # μ̄_1 + μ̄_2 < 1.
  with pytest.raises(ValueError, match=re.escape(
      "'x1' = 0.6, 'x2' = 0.6 cannot be reached together")) as e:
    fit_exclusive([0.6, 0.6])
  assert "outside the convex hull of the sampled feature vectors" in str(e.value)
  assert "no finite λ" in str(e.value)
  # On the boundary (μ̄_1 + μ̄_2 = 1, weight 0 on (0, 0)): λ would be infinite.
  with pytest.raises(ValueError, match=r"'x1' = 0.5, 'x2' = 0.5 .*on the "
                                       r"boundary of the convex hull"):
    fit_exclusive([0.5, 0.5])
  with pytest.raises(ValueError, match="on the boundary"):
    fit_exclusive([0.0, 0.5])


def test_exclusive_features_inside_the_hull_fit_exactly():
  # p ∝ (50, 30 e^λ1, 20 e^λ2) = (0.4, 0.3, 0.3): e^λ1 = 1.25, e^λ2 = 1.875.
  fit = fit_exclusive([0.3, 0.3], tol=1e-12)
  assert fit.converged
  np.testing.assert_allclose(fit.lambdas, np.log([1.25, 1.875]), atol=1e-9)


# Two contexts: in context 0 both features hold or neither, in context 1
# exactly one holds. The pooled hull is the unit square, but the mean of the
# two contexts' hulls is {(x, y): ½ ≤ x + y ≤ 3/2, |x − y| ≤ ½}: every context
# has φ_1 + φ_2 = 1 half of the time on average at least.
DIAGONALS = np.repeat(np.array([[0, 0], [1, 1], [1, 0], [0, 1]], np.float64),
                      [30, 20, 10, 40], axis=0)
DIAGONALS_CTX = np.repeat([0, 0, 1, 1], [30, 20, 10, 40])


def fit_diagonals(mu, context_ids=DIAGONALS_CTX, **kwargs):
  zeros = np.zeros(DIAGONALS.shape[0])
  return targets.fit_lambdas(DIAGONALS, zeros, zeros, mu,
                             context_ids=context_ids,
                             feature_names=("x1", "x2"), **kwargs)


def test_pooled_hull_is_not_the_mean_of_the_context_hulls():
  mu = [0.2, 0.2]
  # Per feature, (0.2, 0.2) is strictly inside the range every context's
  # mean reaches, (0, 1): only the joint check sees that it is unreachable.
  assert fit_diagonals(mu, context_ids=None).converged     # pooled: inside
  with pytest.raises(ValueError, match=(
      r"'x1' = 0.2, 'x2' = 0.2 cannot be reached together.*outside the mean "
      r"over the 2 contexts of the convex hulls")):
    fit_diagonals(mu)
  with pytest.raises(ValueError, match=r"'x1' = 0.25, 'x2' = 0.25 .*on the "
                                       r"boundary of the mean over the 2"):
    fit_diagonals([0.25, 0.25])


def test_mean_of_context_hulls_reaches_what_no_context_reaches_alone():
  # (0.45, 0.35) is on neither context's hull (the diagonal x = y, the
  # anti-diagonal x + y = 1) but strictly inside their mean. (If every
  # context's own hull contained μ̄, so would their mean: that case is easy.)
  mu = np.array([0.45, 0.35])
  fit = fit_diagonals(mu, tol=1e-12)
  assert fit.converged
  log_a = [np.log([0.6, 0.4]), np.log([0.2, 0.8])]
  phi_c = [np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])]
  sol = scipy.optimize.root(
      lambda lam: exact_context_moments(log_a, phi_c, lam).mean(0) - mu,
      np.zeros(2), method="hybr", options={"xtol": 1e-13})
  assert np.max(np.abs(sol.fun)) < 1e-13
  np.testing.assert_allclose(fit.lambdas, sol.x, atol=1e-8)
  np.testing.assert_allclose(fit.moments, mu, atol=1e-12)


def test_one_feature_range_is_the_mean_of_the_context_ranges():
  # Context 0 never has the feature, context 1 sometimes: the mean over
  # contexts reaches (0, ½) only, although the pooled samples reach (0, 1).
  phi = np.array([0.0] * 100 + [0.0, 1.0] * 50)
  ctx = np.repeat([0, 1], 100)
  zeros = np.zeros(200)
  assert targets.fit_lambdas(phi, zeros, zeros, [0.6]).converged
  with pytest.raises(ValueError, match=r"moment 0.6 of feature 'f' is outside "
                                       r"the range \(0, 0.5\) .*2 contexts"):
    targets.fit_lambdas(phi, zeros, zeros, [0.6], context_ids=ctx,
                        feature_names=("f",))
  fit = targets.fit_lambdas(phi, zeros, zeros, [0.3], context_ids=ctx,
                            tol=1e-12)
  # Context 0's moment is 0, so context 1's must be 0.6: e^λ / (1 + e^λ).
  np.testing.assert_allclose(fit.lambdas, [np.log(1.5)], atol=1e-9)
  np.testing.assert_allclose(fit.context_moments[:, 0], [0.0, 0.6], atol=1e-12)


def test_constant_feature_message():
  zeros = np.zeros(20)
  with pytest.raises(ValueError, match=r"'f' .*constant .*never or always"):
    targets.fit_lambdas(np.zeros(20), zeros, zeros, [0.5],
                        context_ids=np.repeat([0, 1], 10), feature_names=("f",))
  with pytest.raises(ValueError, match=r"'f' .*constant \(1\) on the 20 "
                                       r"samples \(never or always present\)"):
    targets.fit_lambdas(np.ones(20), zeros, zeros, [0.5], feature_names=("f",))


# --------------------------------------------------------------------------
# Contexts: errors and warnings.
# --------------------------------------------------------------------------


def test_context_without_samples_is_named():
  phi = np.array([0.0, 1.0] * 10)
  zeros = np.zeros(20)
  ctx = np.repeat([0, 2], 10)
  with pytest.raises(ValueError, match=r"^context 1 of the 3 contexts has no "
                                       r"samples"):
    targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx,
                        num_contexts=3)
  with pytest.raises(ValueError, match=r"^contexts 1, 3 of the 4 contexts"):
    targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx,
                        num_contexts=4)
  # Samples, but none with a > 0.
  log_base = np.where(ctx == 2, -np.inf, 0.0)
  with pytest.raises(ValueError, match=r"^context 1: every sample has zero "
                                       r"base probability"):
    targets.fit_lambdas(phi, log_base, zeros, [0.5], context_ids=ctx // 2)
  with pytest.raises(ValueError, match=r"^context_ids: must lie in \[0, 2\)"):
    targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx,
                        num_contexts=2)
  with pytest.raises(ValueError, match=r"^context_ids: must be integers"):
    targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx * 1.0)
  with pytest.raises(ValueError, match=r"^num_contexts: 3 contexts need "
                                       r"context_ids"):
    targets.fit_lambdas(phi, zeros, zeros, [0.5], num_contexts=3)


def test_small_effective_sample_size_names_the_context():
  # Context 0: 100 samples, 10 with φ = 1; context 1: 10,000, half with φ = 1.
  phi = np.concatenate([np.repeat([1.0, 0.0], [10, 90]),
                        np.repeat([1.0, 0.0], 5_000)])
  ctx = np.repeat([0, 1], [100, 10_000])
  zeros = np.zeros_like(phi)
  lam = targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx).lambdas
  e = np.exp(lam[0])
  ess = [(n1 * e + n0) ** 2 / (n1 * e * e + n0)
         for n1, n0 in ((10, 90), (5_000, 5_000))]
  assert ess[0] < 90 < ess[1]
  with pytest.warns(targets.LambdaFitWarning,
                    match=(rf"effective sample size {ess[0]:.1f} of 100 in "
                           r"context 0 \(the smallest of the 2 contexts\) is "
                           r"below 90")):
    fit = targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx,
                              min_ess=90)
  assert fit.converged
  assert fit.effective_sample_size == pytest.approx(ess[0], rel=1e-10)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    targets.fit_lambdas(phi, zeros, zeros, [0.5], context_ids=ctx)
