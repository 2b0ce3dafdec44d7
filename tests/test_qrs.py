"""QRS on an enumerable space: every sequence of 4 tokens over 3 (81 of them)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from fdiv_jax import targets
from fdiv_jax.core import qrs
from fdiv_jax.targets import features

V, N = 3, 4
TOKENS = np.array(list(itertools.product(range(V), repeat=N)), np.int32)
MASK = np.ones(TOKENS.shape, bool)
M = TOKENS.shape[0]
LOG_A = np.log(np.random.default_rng(0).dirichlet(np.full(M, 2.0)))
LOG_Q = np.log(np.random.default_rng(1).dirichlet(np.full(M, 2.0)))
# P(x) = a(x) exp(#1(x) / 2) · [x contains a 2]: a product target.
TARGET = targets.ProductTarget((
    targets.RewardTarget(features.count_tokens(1), beta=2.0),
    targets.PointwiseTarget(features.contains_tokens(2)),
))
LOG_P = np.asarray(TARGET.log_prob(TOKENS, MASK, LOG_A.astype(np.float32)),
                   np.float64)
LOG_RATIO = LOG_P - LOG_Q
BATCH = 8192


def index_of(tokens):
  return tokens @ (V ** np.arange(N - 1, -1, -1))


def propose(rng):
  idx = jax.random.categorical(rng, jnp.asarray(LOG_Q, jnp.float32), shape=(BATCH,))
  idx = np.asarray(idx)
  return (TOKENS[idx], MASK[idx]), LOG_Q[idx]


@jax.jit
def log_target_fn(samples):
  tokens, mask = samples
  log_a = jnp.asarray(LOG_A, jnp.float32)[index_of(tokens)]
  return TARGET.log_prob(tokens, mask, log_a)


def exact_p_beta(log_beta):
  log_pb = np.minimum(LOG_P, log_beta + LOG_Q)
  log_z_beta = scipy.special.logsumexp(log_pb)
  return np.exp(log_pb - log_z_beta), log_z_beta


def chi_square_p_value(counts, probs):
  support = probs > 0
  assert np.all(counts[~support] == 0)
  expected = probs[support] * counts.sum()
  assert expected.min() >= 5
  return scipy.stats.chisquare(counts[support], expected).pvalue


def run(log_beta, num_samples, seed):
  result = qrs.sample(jax.random.PRNGKey(seed), propose, log_target_fn,
                      num_samples, log_beta=log_beta)
  assert result.complete and result.num_accepted == num_samples
  counts = np.bincount(index_of(result.samples[0]), minlength=M)
  return result, counts


def test_accepted_samples_follow_p_beta():
  log_beta = float(np.quantile(LOG_RATIO[np.isfinite(LOG_RATIO)], 0.5))
  assert log_beta < LOG_RATIO.max()  # p_β ≠ p.
  p_beta, log_z_beta = exact_p_beta(log_beta)
  p = np.exp(LOG_P - scipy.special.logsumexp(LOG_P))
  result, counts = run(log_beta, 40_000, seed=0)
  p_value = chi_square_p_value(counts, p_beta)
  p_value_vs_p = chi_square_p_value(counts, p)
  # Acceptance rate: Z_β / β, exact; the empirical rate is binomial.
  exact_rate = math.exp(log_z_beta - log_beta)
  rate_se = math.sqrt(exact_rate * (1 - exact_rate) / result.num_proposed)
  rate_err = abs(result.empirical_acceptance_rate - exact_rate)
  log_z = scipy.special.logsumexp(LOG_P)
  exact_tv_bound = -math.expm1(log_z_beta - log_z)
  exact_tv = 0.5 * np.sum(np.abs(p_beta - p))
  print(f"QRS β<max P/q: chi2 p={p_value:.3f} (vs p: {p_value_vs_p:.1e}), "
        f"rate {result.empirical_acceptance_rate:.4f} vs exact "
        f"{exact_rate:.4f} ({rate_err / rate_se:.2f} SE), TV bound "
        f"{result.diagnostics.tv_bound:.4f} vs exact {exact_tv_bound:.4f} "
        f"≥ TV {exact_tv:.4f}")
  assert p_value > 1e-3
  assert p_value_vs_p < 1e-6  # The test can tell p_β from p.
  assert rate_err < 4 * rate_se
  d = result.diagnostics
  assert abs(d.acceptance_rate - exact_rate) < 0.02 * exact_rate
  assert abs(d.log_z_beta - log_z_beta) < 0.02
  assert abs(d.log_z - log_z) < 0.02
  assert abs(d.tv_bound - exact_tv_bound) < 0.02
  assert exact_tv <= exact_tv_bound
  # The first accepted samples carry their log P and log q.
  np.testing.assert_allclose(result.log_target,
                             LOG_P[index_of(result.samples[0])], rtol=1e-6)
  np.testing.assert_allclose(result.log_proposal,
                             LOG_Q[index_of(result.samples[0])])


def test_large_beta_samples_p_exactly():
  log_beta = float(LOG_RATIO.max()) + 0.1
  p = np.exp(LOG_P - scipy.special.logsumexp(LOG_P))
  p_beta, log_z_beta = exact_p_beta(log_beta)
  np.testing.assert_allclose(p_beta, p, rtol=1e-12)
  result, counts = run(log_beta, 20_000, seed=1)
  p_value = chi_square_p_value(counts, p)
  exact_rate = math.exp(log_z_beta - log_beta)
  rate_se = math.sqrt(exact_rate * (1 - exact_rate) / result.num_proposed)
  print(f"QRS β≥max P/q: chi2 p={p_value:.3f}, rate error "
        f"{abs(result.empirical_acceptance_rate - exact_rate) / rate_se:.2f} SE")
  assert p_value > 1e-3
  assert abs(result.empirical_acceptance_rate - exact_rate) < 4 * rate_se
  assert result.diagnostics.tv_bound == 0.0


def test_pure_functions_exact():
  log_beta = 0.3
  with jax.enable_x64(True):
    log_acc = np.asarray(qrs.log_acceptance_probability(LOG_P, LOG_Q, log_beta))
    with np.errstate(divide="ignore"):
      expected = np.log(np.minimum(1.0, np.exp(LOG_P) / (np.exp(log_beta) *
                                                          np.exp(LOG_Q))))
    np.testing.assert_allclose(log_acc, expected, rtol=1e-12)
    assert not np.any(np.isnan(log_acc))
    keep = np.asarray(qrs.accept(jax.random.PRNGKey(0), LOG_P, LOG_Q, log_beta))
    assert not np.any(keep[np.isneginf(LOG_P)])
    # Diagnostics from a weighted "sample" equal to the proposal itself: with
    # a uniform q over the enumeration they are exact sums.
    log_u = np.full(M, -np.log(M))
    d = qrs.diagnostics(LOG_P, log_u, log_beta)
    z_beta = np.sum(np.minimum(np.exp(LOG_P), np.exp(log_beta) / M))
    np.testing.assert_allclose(float(d.log_z_beta), np.log(z_beta), rtol=1e-12)
    np.testing.assert_allclose(float(d.log_z),
                               scipy.special.logsumexp(LOG_P), rtol=1e-12)
    np.testing.assert_allclose(float(d.acceptance_rate),
                               z_beta / np.exp(log_beta), rtol=1e-12)
    np.testing.assert_allclose(
        float(d.tv_bound), 1 - z_beta / np.exp(LOG_P).sum(), rtol=1e-10)
  lb = qrs.log_beta_for_quantile(LOG_P, LOG_Q, 1.0)
  assert float(lb) == pytest.approx(LOG_RATIO.max(), rel=1e-6)
  d = jax.jit(qrs.diagnostics)(LOG_P.astype(np.float32),
                               LOG_Q.astype(np.float32), lb)
  assert float(d.tv_bound) == 0.0


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"beta": -2.0},
                                    {"beta": float("nan")}, {}])
def test_bad_beta(kwargs):
  with pytest.raises(ValueError, match="beta"):
    qrs.sample(jax.random.PRNGKey(0), propose, log_target_fn, 10, **kwargs)


def test_cap_warns_and_returns_partial():
  with pytest.warns(qrs.QRSWarning, match="accepted"):
    result = qrs.sample(jax.random.PRNGKey(0), propose, log_target_fn,
                        10 * BATCH, beta=1e3, max_proposals=BATCH)
  assert not result.complete and result.num_proposed == BATCH
  assert result.num_accepted == result.samples[0].shape[0] < 10 * BATCH
