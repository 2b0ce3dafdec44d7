"""Estimates with standard errors: exact means, calibrated errors, contexts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.core import divergences, estimators, uncertainty

K = 12


def _space(seed, violated=3):
  """π, a and P = a·b on K points (b = 0 on `violated` points)."""
  rng = np.random.default_rng(seed)
  log_pi = np.log(rng.dirichlet(np.ones(K)))
  log_a = np.log(rng.dirichlet(np.ones(K)))
  b = np.ones(K)
  b[:violated] = 0.0
  with np.errstate(divide="ignore"):
    log_target = log_a + np.log(b)
  return log_pi, log_a, log_target


def _draw(key, log_pi, log_a, n):
  """n samples from π and n from a, with the balance-heuristic log q and the
  stratum (0: π, 1: a) of each."""
  k1, k2 = jax.random.split(key)
  x = jnp.concatenate([jax.random.categorical(k1, log_pi, shape=(n,)),
                       jax.random.categorical(k2, log_a, shape=(n,))])
  log_q = uncertainty.mixture_log_density([log_pi[x], log_a[x]], [0.5, 0.5])
  strata = jnp.repeat(jnp.arange(2), n)
  return x, log_q, strata


def test_mixture_log_density_is_the_balance_heuristic():
  a, b = jnp.log(jnp.array([0.2, 0.5])), jnp.log(jnp.array([0.6, 0.1]))
  got = uncertainty.mixture_log_density([a, b], [0.25, 0.75])
  np.testing.assert_allclose(np.exp(got), [0.25 * 0.2 + 0.75 * 0.6,
                                           0.25 * 0.5 + 0.75 * 0.1], rtol=1e-6)


def test_expectation_on_policy_is_the_mean_and_its_standard_error():
  values = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
  est = uncertainty.expectation(values, jnp.zeros(8), jnp.zeros(8))
  assert float(est.value) == pytest.approx(0.625)
  assert float(est.standard_error) == pytest.approx(
      np.std(np.asarray(values), ddof=1) / math.sqrt(8), rel=1e-6)


def test_expectation_averages_contexts_and_their_variances():
  values = jnp.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
  ids = jnp.array([0, 0, 0, 1, 1, 1])
  est = uncertainty.expectation(values, jnp.zeros(6), jnp.zeros(6),
                                context_ids=ids, num_contexts=3)
  # Context 2 has no sample and is left out of the mean.
  assert float(est.value) == pytest.approx(0.5 * (2 / 3 + 1 / 3))
  var0 = np.var([1.0, 1.0, 0.0], ddof=1) / 3
  var1 = np.var([0.0, 1.0, 0.0], ddof=1) / 3
  assert float(est.standard_error) == pytest.approx(
      math.sqrt(var0 + var1) / 2, rel=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tv", "js",
                                  "hellinger"])
def test_divergence_from_a_mixture_is_exact_in_the_mean_and_calibrated(name):
  """Against enumeration: the mean over repeated draws is the exact D_f(π‖p)
  (up to the O(1/N) plug-in bias of Ẑ), and the spread of the estimates over
  draws is the reported standard error."""
  with jax.enable_x64(True):
    log_pi, log_a, log_target = _space(0, violated=0 if name == "reverse_kl"
                                       else 3)
    log_p = log_target - np.logaddexp.reduce(log_target)
    exact = float(divergences.exact(name, jnp.asarray(log_pi), jnp.asarray(log_p)))
    log_pi, log_a, log_target = map(jnp.asarray, (log_pi, log_a, log_target))
    prior = estimators.init_partition(1, jnp.float64)

    def one(key):
      x, log_q, strata = _draw(key, log_pi, log_a, 256)
      return uncertainty.divergence(name, log_pi[x], log_target[x], log_q,
                                    prior=prior, strata=strata)

    est = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(1), 2000))
    values, errors = np.asarray(est.value), np.asarray(est.standard_error)
    spread = np.std(values)
    assert abs(np.mean(values) - exact) < 4 * spread / math.sqrt(2000) + 2e-3, (
        np.mean(values), exact)
    assert np.mean(errors) == pytest.approx(spread, rel=0.1), (np.mean(errors),
                                                               spread)


def test_divergence_error_includes_the_priors_uncertainty():
  """With a prior that holds most of the samples, the error of Ẑ is that of the
  prior: an empty-variance prior (all weights equal) gives the plain
  standard error of the terms; a noisy prior gives a larger one."""
  with jax.enable_x64(True):
    log_pi, log_a, log_target = map(jnp.asarray, _space(1, violated=0))
    log_p = log_target - jax.nn.logsumexp(log_target)
    x, log_q, _ = _draw(jax.random.PRNGKey(2), log_pi, log_a, 512)
    log_z = jax.nn.logsumexp(log_target)
    quiet = estimators.PartitionState(jnp.array([log_z + math.log(1e6)]),
                                      jnp.array([1e6]),
                                      jnp.array([2 * log_z + math.log(1e6)]))
    # Σw² = 5001·n·Z²: Var(Ẑ)/Ẑ² = 5000/n.
    noisy = quiet._replace(log_sum_squared_weights=jnp.array(
        [2 * log_z + math.log(1e6) + math.log(5001.0)]))
    args = ("js", log_pi[x], log_target[x], log_q)
    with_quiet = uncertainty.divergence(*args, prior=quiet)
    terms = estimators.divergence_terms("js", log_pi[x], log_target[x], log_q,
                                        log_z)
    assert float(with_quiet.value) == pytest.approx(float(jnp.mean(terms)),
                                                    rel=1e-3)
    assert float(with_quiet.standard_error) == pytest.approx(
        float(jnp.std(terms, ddof=1)) / math.sqrt(1024), rel=0.02)
    with_noisy = uncertainty.divergence(*args, prior=noisy)
    # γ = ∂JS/∂log Z by central differences; α = 1e6 / (1e6 + 1024).
    h = 1e-5
    gamma = float(jnp.mean(estimators.divergence_terms(
        "js", log_pi[x], log_target[x], log_q, log_z + h)) - jnp.mean(
            estimators.divergence_terms("js", log_pi[x], log_target[x], log_q,
                                        log_z - h))) / (2 * h)
    alpha = 1e6 / (1e6 + 1024)
    want = math.sqrt(float(with_quiet.standard_error)**2
                     + (gamma * alpha)**2 * 5000 / 1e6)
    assert float(with_noisy.standard_error) == pytest.approx(want, rel=0.02)
    assert float(with_noisy.standard_error) > 1.5 * float(with_quiet.standard_error)
    exact = float(divergences.exact("js", log_pi, log_p))
    assert abs(float(with_quiet.value) - exact) < 4 * float(with_quiet.standard_error)


def test_divergence_per_context_normalises_each_context():
  """Two contexts with different Z: the figure is the mean of the per-context
  divergences, each to its own p_c = P_c / Z_c."""
  with jax.enable_x64(True):
    spaces = [tuple(map(jnp.asarray, _space(s, violated=2))) for s in (3, 4)]
    scale = [0.0, math.log(1e-3)]       # very different Z_c
    xs, ids, lp, lt, lq = [], [], [], [], []
    for c, ((log_pi, log_a, log_target), s) in enumerate(zip(spaces, scale)):
      x, log_q, _ = _draw(jax.random.PRNGKey(10 + c), log_pi, log_a, 4000)
      ids.append(jnp.full(x.shape, c))
      lp.append(log_pi[x])
      lt.append(log_target[x] + s)
      lq.append(log_q)
    est = uncertainty.divergence(
        "tv", jnp.concatenate(lp), jnp.concatenate(lt), jnp.concatenate(lq),
        prior=estimators.init_partition(2, jnp.float64),
        context_ids=jnp.concatenate(ids).astype(jnp.int32))
    exact = np.mean([float(divergences.exact(
        "tv", log_pi, log_target - jax.nn.logsumexp(log_target)))
                     for log_pi, _, log_target in spaces])
    assert abs(float(est.value) - exact) < 4 * float(est.standard_error)
    assert float(est.standard_error) < 0.02


def test_partition_tracks_the_variance_of_z():
  w = np.array([0.5, 1.5, 2.0, 0.0, 1.0])
  state = estimators.update_partition(
      estimators.init_partition(1, jnp.float32),
      jnp.log(jnp.asarray(w, jnp.float32)), jnp.zeros(5))
  n = len(w)
  want = (np.mean(w**2) - np.mean(w)**2) / n / np.mean(w)**2
  assert float(state.relative_variance[0]) == pytest.approx(want, rel=1e-5)
  assert float(estimators.init_partition(1).relative_variance[0]) == 0.0


def test_stratified_expectation_is_calibrated():
  """E_π[φ] from fixed shares of π and a: the reported error equals the spread
  over repeated draws (the i.i.d. mixture formula would overstate it)."""
  with jax.enable_x64(True):
    log_pi, log_a, _ = map(jnp.asarray, _space(5, violated=0))
    phi = jnp.linspace(0.0, 1.0, K)**2
    exact = float(jnp.sum(jnp.exp(log_pi) * phi))

    def one(key):
      x, log_q, strata = _draw(key, log_pi, log_a, 256)
      return uncertainty.expectation(phi[x], log_pi[x], log_q, strata=strata)

    est = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(7), 2000))
    values, errors = np.asarray(est.value), np.asarray(est.standard_error)
    assert abs(np.mean(values) - exact) < 4 * np.std(values) / math.sqrt(2000)
    assert np.mean(errors) == pytest.approx(np.std(values), rel=0.1)
