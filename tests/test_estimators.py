"""Importance-sampling estimators against exact values on an enumerable space.

The sample space is {0..K-1}; π, q and P are explicit vectors, so Z, every
divergence, KL(π‖a) and every moment has an exact value, and so does the variance
of each single-sample estimator: Monte-Carlo estimates are checked to lie within
a few *exact* standard errors of the exact value as N grows.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.core import divergences, estimators

K = 12
ALL = [divergences.get(n) for n in divergences.NAMES if n != "alpha"] + [
    divergences.get("alpha", alpha=0.5), divergences.get("alpha", alpha=1.5)]
IDS = [str(d) for d in ALL]


def problem(seed=0, zeros_in_target=0):
  """log π, log q, log a, log P (unnormalised, Z ≈ 3.7) over K points."""
  rng = np.random.default_rng(seed)
  log_pi = np.log(rng.dirichlet(2 * np.ones(K)))
  log_q = np.log(rng.dirichlet(2 * np.ones(K)))
  log_a = np.log(rng.dirichlet(2 * np.ones(K)))
  log_target = np.log(rng.dirichlet(2 * np.ones(K))) + math.log(3.7)
  if zeros_in_target:
    log_target[rng.choice(K, zeros_in_target, replace=False)] = -np.inf
  return log_pi, log_q, log_a, log_target


def exact_log_z(log_target):
  return float(jax.scipy.special.logsumexp(log_target))


def per_sample_divergence_terms(d, log_pi, log_target, log_q, log_z):
  """The single-sample estimator g(x) of `estimators.divergence`, at every x."""
  return np.array([float(estimators.divergence(d, log_pi[i:i + 1], log_target[i:i + 1],
                                               log_q[i:i + 1], log_z)) for i in range(K)])


def within_standard_errors(estimate, exact, values, probs, n, k=4.0):
  """|estimate − exact| ≤ k·sqrt(Var_q[g]/n) with the exact variance."""
  variance = float(np.sum(probs * values**2) - np.sum(probs * values)**2)
  se = math.sqrt(max(variance, 0.0) / n)
  return abs(estimate - exact) <= k * se + 1e-12, (estimate, exact, se)


def test_log_partition_is_exact_on_the_whole_support():
  with jax.enable_x64(True):
    _, _, _, log_target = problem()
    uniform = np.full(K, -math.log(K))
    got = float(estimators.log_partition(log_target, uniform))
    assert got == pytest.approx(exact_log_z(log_target), rel=1e-14)


@pytest.mark.parametrize("n", [1_000, 10_000, 100_000])
@pytest.mark.parametrize("on_policy", [True, False])
def test_log_partition_converges_within_standard_errors(n, on_policy):
  with jax.enable_x64(True):
    log_pi, log_q, _, log_target = problem(1)
    log_prop = log_pi if on_policy else log_q
    x = jax.random.categorical(jax.random.key(n), jnp.asarray(log_prop), shape=(n,))
    z_hat = math.exp(float(estimators.log_partition(log_target[x], log_prop[x])))
    weights = np.exp(log_target - log_prop)
    ok, info = within_standard_errors(z_hat, math.exp(exact_log_z(log_target)),
                                      weights, np.exp(log_prop), n)
    assert ok, info


def test_streaming_partition_equals_the_batch_estimate_per_context():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    log_target = rng.normal(size=300) - 2.0
    log_target[::17] = -np.inf
    log_prop = rng.normal(size=300) - 3.0
    contexts = rng.integers(0, 3, size=300)
    state = estimators.init_partition(3, jnp.float64)
    for chunk in np.array_split(np.arange(300), 7):
      state = estimators.update_partition(state, log_target[chunk], log_prop[chunk],
                                          jnp.asarray(contexts[chunk]))
    for c in range(3):
      sel = contexts == c
      want = float(estimators.log_partition(log_target[sel], log_prop[sel]))
      assert float(state.log_z[c]) == pytest.approx(want, rel=1e-12)
      assert float(state.count[c]) == sel.sum()
    # Unconditional, with a mask that hides padding rows.
    mask = np.arange(300) < 250
    single = estimators.update_partition(estimators.init_partition(1, jnp.float64),
                                         log_target, log_prop, mask=jnp.asarray(mask))
    want = float(estimators.log_partition(log_target[:250], log_prop[:250]))
    assert float(single.log_z[0]) == pytest.approx(want, rel=1e-12)
    assert float(estimators.init_partition(2).log_z[0]) == -math.inf


@pytest.mark.parametrize("d", ALL, ids=IDS)
@pytest.mark.parametrize("zeros", [0, 3])
def test_divergence_is_exact_on_the_whole_support(d, zeros):
  with jax.enable_x64(True):
    log_pi, _, _, log_target = problem(2, zeros_in_target=zeros)
    log_z = exact_log_z(log_target)
    uniform = np.full(K, -math.log(K))
    got = float(estimators.divergence(d, log_pi, log_target, uniform, log_z))
    want = float(divergences.exact(d, log_pi, log_target - log_z))
    if math.isinf(want):
      assert got == want
    else:
      assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("d", ALL, ids=IDS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_divergence_converges_within_standard_errors(d, on_policy):
  with jax.enable_x64(True):
    log_pi, log_q, _, log_target = problem(3)
    log_prop = log_pi if on_policy else log_q
    log_z = exact_log_z(log_target)
    exact = float(divergences.exact(d, log_pi, log_target - log_z))
    terms = per_sample_divergence_terms(d, log_pi, log_target, log_prop, log_z)
    for n in (1_000, 10_000, 100_000):
      x = jax.random.categorical(jax.random.key(n + 7), jnp.asarray(log_prop),
                                 shape=(n,))
      estimate = float(estimators.divergence(d, log_pi[x], log_target[x], log_prop[x],
                                             log_z))
      ok, info = within_standard_errors(estimate, exact, terms, np.exp(log_prop), n)
      assert ok, (n, info)


def test_plug_in_log_z_estimate_converges():
  with jax.enable_x64(True):
    log_pi, log_q, _, log_target = problem(4)
    exact = float(divergences.exact("js", log_pi, log_target - exact_log_z(log_target)))
    errors = []
    for n in (1_000, 100_000):
      x = jax.random.categorical(jax.random.key(n), jnp.asarray(log_q), shape=(n,))
      log_z_hat = estimators.log_partition(log_target[x], log_q[x])
      errors.append(abs(float(estimators.jensen_shannon(
          log_pi[x], log_target[x], log_q[x], log_z_hat)) - exact))
    assert errors[1] < 0.02 and errors[1] < errors[0]


def test_violated_constraints_give_limits_not_nan():
  log_pi, log_q, _, log_target = problem(5, zeros_in_target=4)
  for d in ALL:
    value = float(estimators.divergence(d, log_pi, log_target, log_q, 1.0))
    assert not math.isnan(value), str(d)
    if d.is_bounded:
      assert math.isfinite(value), str(d)
    elif d.f_prime_at_inf == math.inf:
      assert value == math.inf, str(d)
  metrics = estimators.divergences_to_target(log_pi, log_target, log_q, 1.0)
  assert set(metrics) == {"forward_kl", "reverse_kl", "tv", "js"}
  assert float(metrics["reverse_kl"]) == math.inf
  assert 0.0 <= float(metrics["js"])


@pytest.mark.parametrize("on_policy", [True, False])
def test_kl_from_base_exact_and_converges(on_policy):
  with jax.enable_x64(True):
    log_pi, log_q, log_a, _ = problem(6)
    exact = float(divergences.exact("reverse_kl", log_pi, log_a))
    uniform = np.full(K, -math.log(K))
    assert float(estimators.kl_from_base(log_pi, log_a, uniform)) == pytest.approx(
        exact, rel=1e-12)
    log_prop = log_pi if on_policy else log_q
    n = 50_000
    x = jax.random.categorical(jax.random.key(9), jnp.asarray(log_prop), shape=(n,))
    estimate = float(estimators.kl_from_base(log_pi[x], log_a[x], log_prop[x]))
    terms = np.exp(log_pi - log_prop) * (log_pi - log_a)
    ok, info = within_standard_errors(estimate, exact, terms, np.exp(log_prop), n)
    assert ok, info


def test_self_normalized_moments():
  with jax.enable_x64(True):
    log_pi, log_q, _, log_target = problem(7, zeros_in_target=2)
    phi = np.stack([np.arange(K) % 2, np.arange(K) / K], axis=1).astype(np.float64)
    uniform = np.full(K, -math.log(K))
    p = np.exp(log_target - exact_log_z(log_target))
    got = estimators.self_normalized_moments(phi, log_target - uniform)
    np.testing.assert_allclose(got, p @ phi, rtol=1e-12)
    got_1d = estimators.self_normalized_moments(phi[:, 0], log_pi - uniform)
    assert float(got_1d) == pytest.approx(float(np.exp(log_pi) @ phi[:, 0]), rel=1e-12)
    n = 100_000
    x = jax.random.categorical(jax.random.key(1), jnp.asarray(log_q), shape=(n,))
    est = estimators.self_normalized_moments(phi[x], log_target[x] - log_q[x])
    np.testing.assert_allclose(est, p @ phi, atol=0.01)
    mask = np.arange(K) < 5
    masked = estimators.self_normalized_moments(phi[:, 1], log_pi - uniform,
                                                jnp.asarray(mask))
    w = np.exp(log_pi[:5])
    assert float(masked) == pytest.approx(float(w @ phi[:5, 1] / w.sum()), rel=1e-12)


def test_effective_sample_size():
  assert float(estimators.effective_sample_size(jnp.zeros(10))) == pytest.approx(10.0)
  one_hot = jnp.array([0.0] + [-jnp.inf] * 9)
  assert float(estimators.effective_sample_size(one_hot)) == pytest.approx(1.0)
  assert float(estimators.effective_sample_size(jnp.full(4, -jnp.inf))) == 0.0
  w = np.array([1.0, 2.0, 3.0, 0.5])
  want = w.sum()**2 / (w**2).sum()
  got = estimators.effective_sample_size(jnp.log(jnp.asarray(w)) + 500.0)
  assert float(got) == pytest.approx(want, rel=1e-5)  # shift-invariant, no overflow
  masked = estimators.effective_sample_size(jnp.log(jnp.asarray(w)),
                                            jnp.array([True, True, False, False]))
  assert float(masked) == pytest.approx(9.0 / 5.0, rel=1e-6)


def test_estimators_work_under_jit_and_vmap():
  log_pi, log_q, log_a, log_target = (jnp.asarray(a, jnp.float32) for a in problem(8))
  fn = jax.jit(lambda a, b, c: estimators.divergences_to_target(a, b, c, 1.2))
  eager = estimators.divergences_to_target(log_pi, log_target, log_q, 1.2)
  jitted = fn(log_pi, log_target, log_q)
  for key in eager:
    assert float(jitted[key]) == pytest.approx(float(eager[key]), rel=1e-5)
  batched = jax.vmap(estimators.log_partition)(jnp.stack([log_target, log_target + 1]),
                                              jnp.stack([log_q, log_q]))
  assert float(batched[1] - batched[0]) == pytest.approx(1.0, rel=1e-5)


def test_huge_ratios_give_finite_estimates_for_bounded_terms():
  # On-policy, log P − log a = −110 (an RLHF target with a tiny β): f(t)
  # overflows in float32, but the term (π/q)·f(t)/t is finite.
  log_model = jnp.zeros(3, jnp.float32)
  log_target = jnp.array([-110.0, -1.0, 0.0], jnp.float32)
  for name, per_sample in (("js", 0.5 * math.log(2)), ("tv", 0.5),
                           ("reverse_kl", 110.0), ("hellinger", 1.0)):
    value = float(estimators.divergence(name, log_model[:1], log_target[:1],
                                        log_model[:1], 0.0))
    assert value == pytest.approx(per_sample, rel=1e-5), name
    assert math.isfinite(float(estimators.divergence(name, log_model, log_target,
                                                     log_model, 0.0))), name


def test_self_normalized_moments_without_information_are_nan():
  # Every weight zero (e.g. a target no sample satisfies): no estimate, not 0.
  phi = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  got = estimators.self_normalized_moments(phi, jnp.array([-jnp.inf, -jnp.inf]))
  assert np.all(np.isnan(np.asarray(got)))
  masked = estimators.self_normalized_moments(phi[:, 0], jnp.zeros(2),
                                              mask=jnp.array([False, False]))
  assert np.isnan(float(masked))
