"""Targets and λ fitting, checked against exact answers on an enumerable space.

The space: every sequence of N = 4 tokens over a vocabulary of V = 3 (81
sequences, all tokens generated), a base a and a proposal q with exact
probabilities drawn from a Dirichlet.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from fdiv_jax import targets
from fdiv_jax.core import estimators
from fdiv_jax.targets import features

V, N = 3, 4


def enumerate_space():
  tokens = np.array(list(itertools.product(range(V), repeat=N)), np.int32)
  mask = np.ones(tokens.shape, bool)
  return tokens, mask


def random_log_dist(seed, size, concentration=1.0):
  rng = np.random.default_rng(seed)
  return np.log(rng.dirichlet(np.full(size, concentration)))


TOKENS, MASK = enumerate_space()
M = TOKENS.shape[0]
LOG_A = random_log_dist(0, M, 2.0)
LOG_Q = random_log_dist(1, M, 2.0)
# Independent numpy definitions of the features used below.
HAS2 = np.any(TOKENS == 2, axis=1).astype(np.float64)
COUNT1 = np.sum(TOKENS == 1, axis=1).astype(np.float64)
STARTS0 = (TOKENS[:, 0] == 0).astype(np.float64)
F_HAS2 = features.contains_tokens(2, name="has2")
F_COUNT1 = features.count_tokens(1, name="count1", max_count=N)
F_FRAC1 = features.Feature(  # Fraction of tokens equal to 1, in [0, 1].
    "frac1", lambda t, m, c=None: jnp.sum((t == 1) & m, -1) / N, False,
    (0.0, 1.0))
F_STARTS0 = features.Feature(
    "starts0", lambda t, m, c=None: (t[:, 0] == 0) & m[:, 0], True, (0.0, 1.0))


def sample(seed, log_probs, n):
  rng = np.random.default_rng(seed)
  return rng.choice(log_probs.shape[0], size=n, p=np.exp(log_probs))


def exact_moments(log_a, phi, lambdas):
  log_p = log_a + phi @ lambdas
  p = np.exp(log_p - scipy.special.logsumexp(log_p))
  return p @ phi


def exact_lambdas(log_a, phi, mu):
  """λ* = argmin log Σ a e^{λ·φ} − λ·μ̄ on the enumeration (scipy, float64)."""

  def dual(lam):
    return scipy.special.logsumexp(log_a + phi @ lam) - lam @ mu

  def grad(lam):
    return exact_moments(log_a, phi, lam) - mu

  res = scipy.optimize.minimize(dual, np.zeros(phi.shape[1]), jac=grad,
                                method="BFGS", options={"gtol": 1e-12})
  assert np.max(np.abs(grad(res.x))) < 1e-9
  return res.x


# --------------------------------------------------------------------------
# Definitions.
# --------------------------------------------------------------------------


def test_pointwise_equals_definition():
  target = targets.PointwiseTarget((F_HAS2, F_STARTS0))
  log_p = np.asarray(target.log_prob(TOKENS, MASK, LOG_A.astype(np.float32)))
  b = HAS2 * STARTS0
  np.testing.assert_array_equal(np.isneginf(log_p), b == 0)
  np.testing.assert_array_equal(log_p[b > 0],
                                LOG_A.astype(np.float32)[b > 0])
  assert not np.any(np.isnan(log_p))
  np.testing.assert_array_equal(target.alignment(TOKENS, MASK), b)
  np.testing.assert_array_equal(target.feature_values(TOKENS, MASK),
                                np.stack([HAS2, STARTS0], -1))
  assert target.feature_names == ("has2", "starts0")


@np.errstate(divide="ignore")
def test_building_blocks_equal_definitions():
  log_a = jnp.asarray(LOG_A, jnp.float32)
  b = np.stack([HAS2, STARTS0], -1)
  np.testing.assert_allclose(
      targets.pointwise_log_prob(log_a, b),
      np.log(np.exp(LOG_A) * b[:, 0] * b[:, 1]), rtol=1e-6)
  np.testing.assert_allclose(
      targets.pointwise_log_prob(log_a, HAS2.astype(bool)),
      np.log(np.exp(LOG_A) * HAS2), rtol=1e-6)
  phi = np.stack([COUNT1, HAS2], -1)
  lam = np.array([0.3, -1.2])
  with jax.enable_x64(True):
    np.testing.assert_allclose(
        targets.distributional_log_prob(LOG_A, phi, lam),
        np.log(np.exp(LOG_A) * np.exp(phi @ lam)), rtol=1e-12)
    np.testing.assert_allclose(
        targets.reward_log_prob(LOG_A, COUNT1, 0.25),
        np.log(np.exp(LOG_A) * np.exp(COUNT1 / 0.25)), rtol=1e-12)


def test_reward_equals_definition():
  target = targets.RewardTarget(F_COUNT1, beta=0.5)
  with jax.enable_x64(True):
    log_p = target.log_prob(TOKENS, MASK, LOG_A)
    assert log_p.dtype == jnp.float64
  np.testing.assert_allclose(log_p, LOG_A + COUNT1 / 0.5, rtol=1e-12)
  log_p32 = target.log_prob(TOKENS, MASK, LOG_A.astype(np.float32))
  assert log_p32.dtype == jnp.float32
  np.testing.assert_allclose(log_p32, LOG_A + COUNT1 / 0.5, atol=1e-6)
  np.testing.assert_array_equal(target.alignment(TOKENS, MASK), COUNT1)
  np.testing.assert_array_equal(target.feature_values(TOKENS, MASK),
                                COUNT1[:, None])


def test_distributional_and_product_equal_definition():
  dist = targets.DistributionalTarget((F_COUNT1, F_HAS2), (1.0, 0.5),
                                      lambdas=(0.3, -1.2))
  energy = 0.3 * COUNT1 - 1.2 * HAS2
  with jax.enable_x64(True):
    np.testing.assert_allclose(dist.log_prob(TOKENS, MASK, LOG_A),
                               LOG_A + energy, rtol=1e-12)
  np.testing.assert_allclose(dist.alignment(TOKENS, MASK), energy, atol=1e-6)
  prod = targets.ProductTarget(
      (targets.PointwiseTarget(F_STARTS0), dist,
       targets.RewardTarget(F_COUNT1, 2.0)), alignment_index=2)
  with jax.enable_x64(True):
    log_p = np.asarray(prod.log_prob(TOKENS, MASK, LOG_A))
  with np.errstate(divide="ignore"):
    expected = np.log(np.exp(LOG_A) * STARTS0 * np.exp(energy + COUNT1 / 2.0))
  np.testing.assert_array_equal(np.isneginf(log_p), STARTS0 == 0)
  ok = STARTS0 > 0
  np.testing.assert_allclose(log_p[ok], expected[ok], rtol=1e-12)
  assert prod.feature_names == ("starts0", "count1", "has2", "count1")
  assert prod.feature_values(TOKENS, MASK).shape == (M, 4)
  np.testing.assert_array_equal(prod.alignment(TOKENS, MASK), COUNT1)


def test_targets_jit_and_are_hashable():
  target = targets.ProductTarget(
      (targets.PointwiseTarget(F_HAS2), targets.RewardTarget(F_COUNT1, 0.5)))
  hash(target)

  @jax.jit
  def closed(tokens, mask, log_a):
    return target.log_prob(tokens, mask, log_a)

  static = jax.jit(lambda t, tok, m, la: t.log_prob(tok, m, la),
                   static_argnums=0)
  eager = target.log_prob(TOKENS, MASK, LOG_A.astype(np.float32))
  np.testing.assert_array_equal(closed(TOKENS, MASK, LOG_A.astype(np.float32)),
                                eager)
  np.testing.assert_array_equal(
      static(target, TOKENS, MASK, LOG_A.astype(np.float32)), eager)
  assert eager.dtype == jnp.float32


def _z_error_in_standard_errors(log_p_enum, n=20000, seed=3):
  """|log Ẑ − log Z| / SE, Ẑ from estimators.log_partition with x ~ q."""
  idx = sample(seed, LOG_Q, n)
  log_w = log_p_enum[idx] - LOG_Q[idx]
  with jax.enable_x64(True):
    log_z_hat = float(estimators.log_partition(jnp.asarray(log_p_enum[idx]),
                                               jnp.asarray(LOG_Q[idx])))
  log_z = scipy.special.logsumexp(log_p_enum)
  w = np.exp(log_w - log_z)
  se = np.std(w) / np.sqrt(n)  # SE of Ẑ/Z, i.e. of log Ẑ to first order.
  assert se < 0.05
  return abs(log_z_hat - log_z) / se


def test_exact_z_matched_by_log_partition():
  pointwise = targets.PointwiseTarget((F_HAS2, F_STARTS0))
  reward = targets.RewardTarget(F_COUNT1, beta=1.0)
  with jax.enable_x64(True):
    log_p_pw = np.asarray(pointwise.log_prob(TOKENS, MASK, LOG_A))
    log_p_rw = np.asarray(reward.log_prob(TOKENS, MASK, LOG_A))
  z_errors = [_z_error_in_standard_errors(log_p_pw),
              _z_error_in_standard_errors(log_p_rw)]
  print(f"Z errors in standard errors (pointwise, reward): {z_errors}")
  assert max(z_errors) < 4.0


def test_conditional_target_one_z_per_context():
  # The constraint depends on the context: the continuation must contain the
  # first prompt token. Two contexts with their own base a(x|c).
  def fn(tokens, mask, context):
    first = context["prompts"][:, :1]
    return jnp.any((tokens == first) & mask, axis=-1)

  copies = features.Feature("copies_prompt", fn, True, (0.0, 1.0))
  target = targets.ConditionalTarget(targets.PointwiseTarget(copies))
  assert target.is_conditional
  log_a = np.stack([LOG_A, random_log_dist(5, M, 2.0)])  # [C, M]
  prompt_of = np.array([[0, 1], [2, 2]], np.int32)        # first tokens 0, 2
  b = np.stack([np.any(TOKENS == 0, 1), np.any(TOKENS == 2, 1)])
  exact_log_z = np.log(np.sum(np.exp(log_a) * b, axis=1))
  n = 20000
  ctx_ids = np.repeat(np.arange(2), n // 2)
  idx = sample(7, LOG_Q, n)
  context = {"prompts": prompt_of[ctx_ids],
             "prompt_lengths": np.full((n,), 2, np.int32)}
  with jax.enable_x64(True):
    log_p = np.asarray(target.log_prob(TOKENS[idx], MASK[idx],
                                       log_a[ctx_ids, idx], context))
    log_z_hat = np.asarray(targets.log_partition_per_context(
        log_p, LOG_Q[idx], ctx_ids, 2))
  np.testing.assert_array_equal(np.isneginf(log_p), ~b[ctx_ids, idx])
  for c in range(2):
    w = np.exp(log_p[ctx_ids == c] - LOG_Q[idx][ctx_ids == c] - exact_log_z[c])
    se = np.std(w) / np.sqrt(n // 2)
    assert abs(log_z_hat[c] - exact_log_z[c]) < 4 * se
  with pytest.raises(ValueError, match="context is required"):
    target.log_prob(TOKENS, MASK, LOG_A)
  with pytest.raises(ValueError, match="prompt_lengths"):
    target.log_prob(TOKENS[:2], MASK[:2], LOG_A[:2],
                    {"prompts": prompt_of, "prompt_lengths": np.ones(3)})


# --------------------------------------------------------------------------
# λ fitting.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("feats,mu", [
    ((F_HAS2,), (0.5,)),
    ((F_FRAC1, F_HAS2), (0.45, 0.5)),
])
def test_fitted_lambdas_match_exact(feats, mu):
  target = targets.DistributionalTarget(feats, mu)
  phi = np.asarray(target.feature_values(TOKENS, MASK), np.float64)
  mu = np.asarray(mu)
  lam_star = exact_lambdas(LOG_A, phi, mu)
  # Fitting on the whole enumeration with q uniform is exact SNIS.
  exact_fit = targets.fit_lambdas(phi, LOG_A, np.zeros(M), mu, tol=1e-10)
  np.testing.assert_allclose(exact_fit.lambdas, lam_star, atol=1e-7)
  # Monte Carlo: 4e6 samples from a (SE of the moments ≈ 3e-4).
  n = 4_000_000
  idx = sample(11, LOG_A, n)
  fitted, fit = target.fit(TOKENS[idx], MASK[idx], LOG_A[idx], LOG_A[idx])
  assert fit.converged and fit.num_samples == n
  assert fit.max_abs_error <= 1e-6
  np.testing.assert_allclose(fit.moments, mu, atol=1e-6)
  assert 0.1 * n < fit.effective_sample_size <= n
  moment_err = np.max(np.abs(exact_moments(LOG_A, phi, fit.lambdas) - mu))
  lambda_err = np.max(np.abs(fit.lambdas - lam_star))
  print(f"K={len(mu)}: λ*={lam_star}, λ̂={fit.lambdas}, |λ̂−λ*|={lambda_err:.2e}"
        f", exact moment error={moment_err:.2e}, iterations="
        f"{fit.num_iterations}, ESS={fit.effective_sample_size:.0f}")
  assert moment_err <= 1e-3
  assert lambda_err <= 1e-2
  assert fitted.lambdas == tuple(fit.lambdas)
  with jax.enable_x64(True):
    np.testing.assert_allclose(
        fitted.log_prob(TOKENS, MASK, LOG_A), LOG_A + phi @ fit.lambdas,
        rtol=1e-6)


def test_fit_from_other_proposal():
  # SNIS with q ≠ a reaches the same λ* within Monte-Carlo error.
  target = targets.DistributionalTarget((F_FRAC1,), (0.25,))
  phi = COUNT1[:, None] / N
  lam_star = exact_lambdas(LOG_A, phi, np.array([0.25]))
  idx = sample(12, LOG_Q, 2_000_000)
  _, fit = target.fit(TOKENS[idx], MASK[idx], LOG_A[idx], LOG_Q[idx])
  assert fit.converged
  moment_err = abs(exact_moments(LOG_A, phi, fit.lambdas)[0] - 0.25)
  print(f"q ≠ a: |λ̂−λ*|={abs(fit.lambdas[0] - lam_star[0]):.2e}, exact moment"
        f" error={moment_err:.2e}, ESS={fit.effective_sample_size:.0f}")
  assert abs(fit.lambdas[0] - lam_star[0]) <= 1e-2
  assert moment_err <= 1e-3


def test_moment_out_of_reach_is_refused():
  target = targets.DistributionalTarget((F_HAS2,), (0.5,))
  never = np.flatnonzero(HAS2 == 0)
  always = np.flatnonzero(HAS2 == 1)
  for idx, word in ((never, "constant"), (always, "constant")):
    with pytest.raises(ValueError, match=f"'has2'.*{word}"):
      target.fit(TOKENS[idx], MASK[idx], LOG_A[idx], LOG_A[idx])
  counts_low = np.flatnonzero(COUNT1 <= 1)
  low = (TOKENS[counts_low], MASK[counts_low], LOG_A[counts_low],
         LOG_A[counts_low])
  # Inside the feature's range, but on the boundary of what the samples reach.
  with pytest.raises(ValueError, match="'count1'.*boundary"):
    targets.DistributionalTarget((F_COUNT1,), (1.0,)).fit(*low)
  with pytest.raises(ValueError, match="'count1'.*outside the range"):
    targets.DistributionalTarget((F_COUNT1,), (3.0,)).fit(*low)
  # On or outside the feature's own value range: refused at construction.
  for feat, moment in ((F_HAS2, 1.0), (F_HAS2, 0.0), (F_HAS2, 1.5),
                       (F_COUNT1, -0.1), (F_COUNT1, 4.0)):
    with pytest.raises(ValueError, match=(
        rf"^moments: moment .* of feature '{feat.name}' must lie strictly "
        r"inside its range .*pointwise constraint")):
      targets.DistributionalTarget((feat,), (moment,))


def test_non_convergence_warns():
  target = targets.DistributionalTarget((F_COUNT1, F_HAS2), (0.2, 0.97))
  with pytest.warns(targets.LambdaFitWarning, match="did not converge"):
    _, fit = target.fit(TOKENS, MASK, LOG_A, np.zeros(M), max_iter=1)
  assert not fit.converged and fit.num_iterations == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, fit = target.fit(TOKENS, MASK, LOG_A, np.zeros(M))
  assert fit.converged


def test_unfitted_lambdas_refused():
  target = targets.DistributionalTarget((F_HAS2,), (0.5,))
  with pytest.raises(ValueError, match="lambdas is not fitted"):
    target.log_prob(TOKENS, MASK, LOG_A)


# --------------------------------------------------------------------------
# Bad input and configs.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf"),
                                  "1.0", None, True])
def test_bad_beta(beta):
  with pytest.raises(ValueError, match=r"^beta: must be a finite number > 0"):
    targets.RewardTarget(F_COUNT1, beta)
  if not isinstance(beta, (str, type(None), bool)):
    with pytest.raises(ValueError, match="beta"):
      targets.reward_log_prob(LOG_A, COUNT1, beta)


def test_bad_feature_shape_names_the_feature():
  bad = features.Feature("bad_shape", lambda t, m, c=None: jnp.sum(t, -1)[:, None])
  with pytest.raises(ValueError, match="feature 'bad_shape' returned shape"):
    targets.RewardTarget(bad, 1.0).log_prob(TOKENS, MASK, LOG_A)
  with pytest.raises(ValueError, match="^constraints: needs at least one"):
    targets.PointwiseTarget(())
  with pytest.raises(ValueError,
                     match=r"^constraints\[1\]: feature 'bad_shape' is not "
                     "boolean"):
    targets.PointwiseTarget((F_HAS2, bad))


def test_constructor_errors_start_with_the_parameter():
  cases = [
      (lambda: targets.PointwiseTarget((F_HAS2, "has2")), TypeError,
       r"^constraints\[1\]: expected a features.Feature"),
      (lambda: targets.RewardTarget("length", 1.0), TypeError, "^reward: "),
      (lambda: targets.DistributionalTarget((), ()), ValueError,
       "^features: needs at least one feature, e.g. one of: .*length"),
      (lambda: targets.DistributionalTarget((F_HAS2,), (0.5, 0.5)), ValueError,
       r"^moments: one target moment per feature \(1\), got 2\.$"),
      (lambda: targets.DistributionalTarget((F_HAS2,), (None,)), ValueError,
       "^moments: entry 0 must be a finite number, got None"),
      (lambda: targets.DistributionalTarget((F_HAS2,), (0.5,), (1.0, 2.0)),
       ValueError, "^lambdas: must be empty .* or 1 finite numbers"),
      (lambda: targets.DistributionalTarget((F_HAS2,), (0.5,), (np.nan,)),
       ValueError, "^lambdas: "),
      (lambda: targets.ProductTarget(()), ValueError, "^factors: "),
      (lambda: targets.ProductTarget((F_HAS2,)), TypeError,
       r"^factors\[0\]: "),
      (lambda: targets.ProductTarget((targets.PointwiseTarget(F_HAS2),), 1),
       ValueError, "^alignment_index: "),
      (lambda: targets.ConditionalTarget(F_HAS2), TypeError, "^target: "),
  ]
  for make, error, pattern in cases:
    with pytest.raises(error, match=pattern):
      make()


def test_distributional_lambdas_normalised():
  empty = targets.DistributionalTarget((F_HAS2,), np.array([0.5]), ())
  assert empty.lambdas is None and empty.moments == (0.5,)
  fixed = targets.DistributionalTarget((F_HAS2,), [0.5], np.array([2]))
  assert fixed.lambdas == (2.0,) and isinstance(fixed.lambdas[0], float)


def test_from_config():
  cfg = {"kind": "product", "alignment_index": 1, "factors": [
      {"kind": "pointwise",
       "features": [{"name": "contains_tokens", "token_ids": [2],
                     "label": "has2"}]},
      {"kind": "reward", "beta": 0.5,
       "feature": {"name": "count_tokens", "token_ids": [1]}},
  ]}
  target = targets.from_config(cfg)
  log_p = np.asarray(target.log_prob(TOKENS, MASK, LOG_A))
  ok = HAS2 > 0
  np.testing.assert_allclose(log_p[ok], (LOG_A + COUNT1 / 0.5)[ok], rtol=1e-6)
  assert np.all(np.isneginf(log_p[~ok]))
  assert target.feature_names[0] == "has2"
  cond = targets.from_config({"kind": "conditional", "target": {
      "kind": "distributional", "features": ["length"], "moments": [3.0]}})
  assert isinstance(cond.target, targets.DistributionalTarget)
  assert cond.target.lambdas is None
  fixed = targets.from_config({"kind": "distributional", "features": "length",
                               "moments": [3.0], "lambdas": [0.5]})
  assert fixed.lambdas == (0.5,)
  with pytest.raises(ValueError, match="^kind: must be one of .*product"):
    targets.from_config({"kind": "pointwize"})
  with pytest.raises(ValueError, match="^beta: missing"):
    targets.from_config({"kind": "reward", "feature": "length"})
  with pytest.raises(ValueError, match="^beta: must be"):
    targets.from_config({"kind": "reward", "feature": "length", "beta": -2})
  with pytest.raises(ValueError,
                     match=r"^features\[0\]: unknown feature 'nope'.*length"):
    targets.from_config({"kind": "pointwise", "features": ["nope"]})
  with pytest.raises(ValueError, match="^moments: missing"):
    targets.from_config({"kind": "distributional", "features": ["length"]})
  # The same checks as TargetSpec, with the path inside nested targets.
  with pytest.raises(ValueError, match="^moments: is only used by a "
                     "distributional target"):
    targets.from_config({"kind": "pointwise", "features": ["length"],
                         "moments": [1.0]})
  with pytest.raises(ValueError, match=r"^factors\[1\]\.beta: must be"):
    targets.from_config({"kind": "product", "factors": [
        {"kind": "reward", "feature": "length", "beta": 1.0},
        {"kind": "reward", "feature": "length", "beta": 0.0}]})
  with pytest.raises(ValueError, match=r"^target\.features\[0\]: .*boolean"):
    targets.from_config({"kind": "conditional", "target": {
        "kind": "pointwise", "features": ["length"]}})
