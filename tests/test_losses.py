"""The f-DPG loss: its gradient is exactly ∇D_f(π‖p) on an enumerable space."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.core import baselines, divergences, losses

K = 10
ALL = [divergences.get(n) for n in divergences.NAMES if n != "alpha"] + [
    divergences.get("alpha", alpha=a) for a in (-0.5, 0.5, 2.0)]
IDS = [str(d) for d in ALL]
LOG_Z = 1.7


def setup(seed=0, zeros_in_target=0):
  rng = np.random.default_rng(seed)
  theta = rng.normal(size=K)
  log_p = np.log(rng.dirichlet(np.ones(K)))
  if zeros_in_target:
    log_p[rng.choice(K, zeros_in_target, replace=False)] = -np.inf
    log_p = log_p - np.logaddexp.reduce(log_p)
  return theta, log_p, log_p + LOG_Z  # θ, log p (normalised), log P = log p + log Z


def whole_support_loss(d, log_target, baseline=0.0):
  uniform = jnp.full(K, -math.log(K))

  def loss(theta):
    log_pi = jax.nn.log_softmax(theta)
    return losses.fdpg_loss(d, log_pi, uniform, log_target, LOG_Z, baseline)[0]
  return loss


@pytest.mark.parametrize("d", ALL, ids=IDS)
@pytest.mark.parametrize("baseline", [0.0, -3.0, 0.37, 12.5])
def test_gradient_identity_is_exact(d, baseline):
  with jax.enable_x64(True):
    theta, log_p, log_target = setup(zlib.crc32(str(d).encode()) % 1000)
    theta = jnp.asarray(theta)
    want = jax.grad(lambda t: divergences.exact(d, jax.nn.log_softmax(t), log_p))(theta)
    got = jax.grad(whole_support_loss(d, log_target, baseline))(theta)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12 * float(
        jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("d", [d for d in ALL if d.is_bounded], ids=lambda d: str(d))
def test_gradient_identity_with_violated_hard_constraints(d):
  # For bounded f the exact divergence stays finite where p = 0, and the loss's
  # pseudo-reward there is exactly the limit −f'(∞) (ℓ stays +inf).
  with jax.enable_x64(True):
    theta, log_p, log_target = setup(11, zeros_in_target=3)
    theta = jnp.asarray(theta)
    want = jax.grad(lambda t: divergences.exact(d, jax.nn.log_softmax(t), log_p))(theta)
    got = jax.grad(whole_support_loss(d, log_target, 0.5))(theta)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_violated_constraints_never_give_nan(d, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    theta, _, log_target = setup(12, zeros_in_target=4)
    theta = jnp.asarray(theta, dtype)
    log_target = jnp.asarray(log_target, dtype)
    loss_fn = whole_support_loss(d, log_target, 0.1)
    value, grad = jax.value_and_grad(loss_fn)(theta)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    uniform = jnp.full(K, -math.log(K), dtype)
    _, aux = losses.fdpg_loss(d, jax.nn.log_softmax(theta), uniform, log_target, LOG_Z)
    assert int(aux["num_clipped"]) == 4
    violated = ~np.isfinite(np.asarray(log_target))
    r = np.asarray(aux["pseudo_reward"])
    if d.f_prime_at_inf == math.inf:  # the penalty is large, finite, and pushes down
      assert np.all(r[violated] < -10)
      assert np.all(r[violated] <= r[~violated].min())
    else:                             # the exact limit
      assert np.all(r[violated] == dtype(-d.f_prime_at_inf))


@pytest.mark.parametrize("d", [divergences.get(n) for n in ("forward_kl", "reverse_kl",
                                                             "js", "tv")],
                         ids=lambda d: str(d))
def test_on_policy_monte_carlo_gradient_converges(d):
  """x ~ π, N = 10^5: each coordinate within 5 exact standard errors."""
  with jax.enable_x64(True):
    theta, log_p, log_target = setup(13)
    theta = jnp.asarray(theta)
    log_pi = jax.nn.log_softmax(theta)
    want = jax.grad(lambda t: divergences.exact(d, jax.nn.log_softmax(t), log_p))(theta)
    n = 100_000
    x = jax.random.categorical(jax.random.key(0), log_pi, shape=(n,))

    def loss(t):
      lp = jax.nn.log_softmax(t)[x]
      return losses.fdpg_loss(d, lp, jax.lax.stop_gradient(lp), log_target[x], LOG_Z,
                              baseline=0.2)[0]
    got = jax.grad(loss)(theta)
    # Per-sample gradient g(x) = f'(t(x))·(e_x − π) shifted by the baseline; its
    # exact covariance diagonal from the enumeration gives the standard error.
    pi = np.exp(np.asarray(log_pi))
    r = np.asarray(d.f_prime(log_pi - log_p)) + 0.2
    g = r[:, None] * (np.eye(K) - pi[None, :])
    var = pi @ g**2 - (pi @ g)**2
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= 5 * np.sqrt(var / n)
                  + 1e-12)


def test_mask_ignores_padding_rows_and_aux_is_complete():
  theta, _, log_target = setup(14)
  log_pi = jax.nn.log_softmax(jnp.asarray(theta, jnp.float32))
  log_q = jnp.full(K, -math.log(K))
  d = divergences.get("js")
  pad = 4
  padded = lambda a, v: jnp.concatenate([a, jnp.full(pad, v, a.dtype)])
  mask = jnp.arange(K + pad) < K
  ref, ref_aux = losses.fdpg_loss(d, log_pi, log_q, log_target, LOG_Z)
  got, aux = losses.fdpg_loss(d, padded(log_pi, -jnp.inf), padded(log_q, 0.0),
                              padded(jnp.asarray(log_target, jnp.float32), jnp.nan),
                              LOG_Z, mask=mask)
  assert float(got) == pytest.approx(float(ref), rel=1e-6)
  for key in ("mean_pseudo_reward", "mean_advantage", "mean_importance_weight"):
    assert float(aux[key]) == pytest.approx(float(ref_aux[key]), rel=1e-6)
  assert aux["pseudo_reward"].shape == (K + pad,)
  assert set(aux) >= {"log_ratio", "pseudo_reward", "importance_weight", "advantage",
                      "num_clipped"}
  # Off-policy weights are π/q; on-policy they are exactly one.
  np.testing.assert_allclose(ref_aux["importance_weight"], jnp.exp(log_pi - log_q),
                             rtol=1e-6)
  _, on_aux = losses.fdpg_loss(d, log_pi, log_pi, log_target, LOG_Z)
  np.testing.assert_array_equal(on_aux["importance_weight"], np.ones(K))


def test_gradient_of_padded_rows_is_zero():
  theta, _, log_target = setup(15)
  mask = jnp.arange(K) < 6

  def loss(t):
    log_pi = jax.nn.log_softmax(t)
    return losses.fdpg_loss("reverse_kl", log_pi, jnp.full(K, -2.0), log_target, LOG_Z,
                            mask=mask)[0]
  g_masked = jax.grad(loss)(jnp.asarray(theta, jnp.float32))

  def loss_first6(t):
    log_pi = jax.nn.log_softmax(t)[:6]
    return losses.fdpg_loss("reverse_kl", log_pi, jnp.full(6, -2.0), log_target[:6],
                            LOG_Z)[0]
  np.testing.assert_allclose(g_masked, jax.grad(loss_first6)(
      jnp.asarray(theta, jnp.float32)), rtol=1e-5, atol=1e-7)


def test_jit_matches_eager_and_per_sample_baselines_work():
  theta, _, log_target = setup(16)
  log_pi = jax.nn.log_softmax(jnp.asarray(theta, jnp.float32))
  d = divergences.get("hellinger")
  b = baselines.get("leave_one_out")
  _, aux = losses.fdpg_loss(d, log_pi, log_pi, log_target, LOG_Z)
  per_sample = b.value(b.init(), aux["pseudo_reward"])
  eager = losses.fdpg_loss(d, log_pi, log_pi, log_target, LOG_Z, per_sample)[0]
  jitted = jax.jit(lambda *a: losses.fdpg_loss(d, *a)[0])(log_pi, log_pi, log_target,
                                                          LOG_Z, per_sample)
  assert float(jitted) == pytest.approx(float(eager), rel=1e-6)


def test_float32_gradient_close_to_float64():
  theta, _, log_target = setup(17)
  for d in ALL:
    g32 = jax.grad(whole_support_loss(d, jnp.asarray(log_target, jnp.float32), 0.3))(
        jnp.asarray(theta, jnp.float32))
    with jax.enable_x64(True):
      g64 = jax.grad(whole_support_loss(d, jnp.asarray(log_target), 0.3))(
          jnp.asarray(theta))
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5 * float(
        np.max(np.abs(g64))))


def test_default_log_ratio_clip():
  assert losses.default_log_ratio_clip(jnp.float32) == 22
  assert losses.default_log_ratio_clip(jnp.float64) == 177
  # It is what a violated sample gets under reverse KL (no exponential bound).
  for dtype, c in ((jnp.float32, 22), (jnp.float64, 177)):
    assert losses.violated_log_ratio("reverse_kl", dtype) == c


def test_a_context_whose_z_is_still_zero_gives_no_nan():
  # Every sample of the context so far violated the constraint: log Ẑ = −inf.
  theta, _, log_target = setup(18, zeros_in_target=3)
  log_pi = jax.nn.log_softmax(jnp.asarray(theta, jnp.float32))

  def loss(t):
    lp = jax.nn.log_softmax(t)
    return losses.fdpg_loss("js", lp, lp, jnp.asarray(log_target, jnp.float32),
                            -jnp.inf)[0]
  value, grad = jax.value_and_grad(loss)(jnp.asarray(theta, jnp.float32))
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  _, aux = losses.fdpg_loss("js", log_pi, log_pi, log_target, -jnp.inf)
  violated = ~np.isfinite(log_target)
  assert np.all(np.asarray(aux["log_ratio"])[violated] == np.inf)


def test_default_clip_keeps_alpha_pseudo_rewards_finite():
  d = divergences.get("alpha", alpha=10.0)
  clip = losses.default_log_ratio_clip(jnp.float32, d)
  assert clip == 4
  r = d.pseudo_reward(jnp.array([-clip, clip], jnp.float32))
  assert np.all(np.isfinite(np.asarray(r))) and np.all(np.isfinite(np.asarray(r)**2))


@pytest.mark.parametrize("poison", ["nan_target", "nan_proposal", "inf_weight",
                                    "nan_log_model"])
def test_padding_rows_never_reach_the_gradient(poison):
  """A masked-out row holding inf or NaN changes neither the loss nor its
  gradient (a float mask works too)."""
  log_model = jnp.log(jnp.array([0.2, 0.3, 0.5]))
  log_q = jnp.log(jnp.array([0.25, 0.25, 0.5]))
  log_target = jnp.log(jnp.array([0.1, 0.6, 0.3]))
  if poison == "nan_target":
    log_target = log_target.at[2].set(jnp.nan)
  elif poison == "nan_proposal":
    log_q = log_q.at[2].set(jnp.nan)
  elif poison == "inf_weight":
    log_q = log_q.at[2].set(-jnp.inf)

  def loss(theta, mask):
    # The gradient is taken with respect to log π itself (a NaN that an
    # upstream op makes has a NaN derivative of its own, which no loss undoes).
    return losses.fdpg_loss("js", theta, log_q, log_target, 0.0, 0.1, mask=mask)[0]

  theta = jnp.log(jnp.array([0.2, 0.3, 0.5]))
  if poison == "nan_log_model":
    theta = theta.at[2].set(jnp.nan)
  for mask in (jnp.array([True, True, False]), jnp.array([1.0, 1.0, 0.0])):
    value, grad = jax.value_and_grad(loss)(theta, mask)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), (
        poison, value, grad)
  clean = losses.fdpg_loss("js", jnp.log(jnp.array([0.2, 0.3])),
                           jnp.log(jnp.array([0.25, 0.25])),
                           jnp.log(jnp.array([0.1, 0.6])), 0.0, 0.1)[0]
  assert float(loss(theta, jnp.array([True, True, False]))) == pytest.approx(
      float(clean), rel=1e-6)
