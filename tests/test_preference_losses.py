"""f-DPO and f-PO (fdiv_jax.core.preference) against independent closed forms.

Every expected value here is written from the papers' formulas in t = π/π_ref
(NumPy float64, or mpmath where the numbers leave the float range), not from
the registry's log-space code.
"""

import math
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from fdiv_jax.core import divergences, losses, preference

ALL = [divergences.get(n) for n in divergences.NAMES if n != "alpha"] + [
    divergences.get("alpha", alpha=a) for a in (-0.5, 0.5, 2.0)]
IDS = [str(d) for d in ALL]
SMOOTH = [d for d in ALL if d.name != "tv"]


# --- Independent closed forms, in t (NumPy float64) -------------------------

def f_np(d, t):
  """f(t) of the registry's table, written in t."""
  a = d.alpha
  return {
      "forward_kl": lambda: -np.log(t),
      "reverse_kl": lambda: t * np.log(t),
      "tv": lambda: 0.5 * np.abs(t - 1),
      "js": lambda: 0.5 * (t * np.log(t) - (t + 1) * np.log((t + 1) / 2)),
      "pearson_chi2": lambda: (t - 1) ** 2,
      "neyman_chi2": lambda: (t - 1) ** 2 / t,
      "hellinger": lambda: (np.sqrt(t) - 1) ** 2,
      "alpha": lambda: (t ** a - a * t - (1 - a)) / (a * (a - 1)),
  }[d.name]()


def f_prime_np(d, u):
  """f'(u), written in u (Wang et al.'s table)."""
  a = d.alpha
  return {
      "forward_kl": lambda: -1 / u,
      "reverse_kl": lambda: np.log(u) + 1,
      "tv": lambda: 0.5 * np.sign(u - 1),
      "js": lambda: 0.5 * np.log(2 * u / (1 + u)),
      "pearson_chi2": lambda: 2 * (u - 1),
      "neyman_chi2": lambda: 1 - u ** -2.0,
      "hellinger": lambda: 1 - u ** -0.5,
      "alpha": lambda: (u ** (a - 1) - 1) / (a - 1),
  }[d.name]()


def u_f_second_np(d, u):
  """u·f''(u) = d f'(e^ℓ)/dℓ."""
  a = d.alpha
  return {
      "forward_kl": lambda: 1 / u,
      "reverse_kl": lambda: np.ones_like(u),
      "tv": lambda: np.zeros_like(u),
      "js": lambda: 1 / (2 * (1 + u)),
      "pearson_chi2": lambda: 2 * u,
      "neyman_chi2": lambda: 2 * u ** -2.0,
      "hellinger": lambda: 0.5 * u ** -0.5,
      "alpha": lambda: u ** (a - 1),
  }[d.name]()


def sigmoid(x):
  return np.exp(-np.logaddexp(0.0, -x))


def softplus(x):
  return np.logaddexp(0.0, x)


def binary_entropy(p):
  return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def d_f_np(d, pi, p):
  """D_f(π‖p) = Σ p f(π/p), for π, p > 0 (last axis)."""
  return np.sum(p * f_np(d, pi / p), axis=-1)


def log_softmax_np(x):
  return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def pair_data(seed, n=7, spread=2.0):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=n) * spread - 3.0 for _ in range(4))


# --- f-DPO ------------------------------------------------------------------

@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_fdpo_value_gradient_and_aux_match_the_closed_form(d):
  beta = 0.37
  with jax.enable_x64(True):
    mw, ml, rw, rl = pair_data(1)
    uw, ul = np.exp(mw - rw), np.exp(ml - rl)
    margin = beta * (f_prime_np(d, uw) - f_prime_np(d, ul))
    want_loss = np.mean(softplus(-margin))
    # ∂/∂ log π(y_w) = −β σ(−m) u_w f''(u_w)/N, ∂/∂ log π(y_l) = +β σ(−m) u_l f''(u_l)/N.
    n = len(mw)
    g_w = -beta * sigmoid(-margin) * u_f_second_np(d, uw) / n
    g_l = beta * sigmoid(-margin) * u_f_second_np(d, ul) / n

    def loss(*args):
      return losses.fdpo_loss(d, *args, beta=beta)

    (value, aux), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        *map(jnp.asarray, (mw, ml, rw, rl)))
    np.testing.assert_allclose(value, want_loss, rtol=1e-12)
    for got, want in zip(grads, (g_w, g_l, -g_w, -g_l)):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(aux["margin"], margin, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(aux["chosen_reward"], beta * f_prime_np(d, uw), rtol=1e-12)
    np.testing.assert_allclose(aux["rejected_reward"], beta * f_prime_np(d, ul), rtol=1e-12)
    np.testing.assert_allclose(aux["losses"], softplus(-margin), rtol=1e-12)
    np.testing.assert_allclose(aux["log_ratio_chosen"], mw - rw, rtol=1e-15)
    assert float(aux["accuracy"]) == np.mean(margin > 0)
    np.testing.assert_allclose(aux["mean_margin"], margin.mean(), rtol=1e-12)
    assert int(aux["num_clipped"]) == 0
    np.testing.assert_allclose(
        preference.fdpo_losses(d, mw, ml, rw, rl, beta=beta), softplus(-margin),
        rtol=1e-12)


def dpo_loss_direct(mw, ml, rw, rl, beta):
  """DPO (Rafailov et al.): mean −log σ(β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)])."""
  logits = beta * ((mw - rw) - (ml - rl))
  return jnp.mean(-jax.nn.log_sigmoid(logits))


def test_reverse_kl_fdpo_is_dpo():
  with jax.enable_x64(True):
    for seed, beta in ((2, 0.1), (3, 1.0), (4, 5.0)):
      args = tuple(map(jnp.asarray, pair_data(seed, n=11, spread=4.0)))
      ours = jax.value_and_grad(lambda *a: losses.fdpo_loss(
          "reverse_kl", *a, beta=beta)[0], argnums=(0, 1, 2, 3))(*args)
      dpo = jax.value_and_grad(lambda *a: dpo_loss_direct(*a, beta),
                               argnums=(0, 1, 2, 3))(*args)
      np.testing.assert_allclose(ours[0], dpo[0], rtol=1e-12)
      for got, want in zip(ours[1], dpo[1]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_implicit_rewards_and_accuracy_with_a_mask():
  beta = 0.5
  # Reverse KL: implicit reward β(ℓ + 1); margins 2.0, −1.0, 0.0 (a tie is not
  # accurate), and a masked pair holding NaN.
  mw = jnp.array([-1.0, -3.0, -2.0, jnp.nan])
  ml = jnp.array([-5.0, -1.0, -2.0, 0.0])
  rw = jnp.array([-2.0, -2.0, -2.0, 0.0])
  rl = jnp.array([-2.0, -2.0, -2.0, jnp.inf])
  mask = jnp.array([True, True, True, False])
  loss, aux = losses.fdpo_loss("rkl", mw, ml, rw, rl, beta=beta, mask=mask)
  np.testing.assert_allclose(aux["chosen_reward"][:3], [1.0, 0.0, 0.5])
  np.testing.assert_allclose(aux["rejected_reward"][:3], [-1.0, 1.0, 0.5])
  np.testing.assert_allclose(aux["margin"][:3], [2.0, -1.0, 0.0])
  np.testing.assert_allclose(aux["accuracy"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(aux["mean_margin"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(aux["mean_chosen_reward"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(softplus(-np.array([2.0, -1.0, 0.0]))), rtol=1e-6)
  grads = jax.grad(lambda *a: losses.fdpo_loss("rkl", *a, beta=beta, mask=mask)[0],
                   argnums=(0, 1, 2, 3))(mw, ml, rw, rl)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))) and float(g[3]) == 0.0


def test_tv_is_a_step_with_zero_gradient():
  beta = 0.8
  mw, ml, rw, rl = map(jnp.asarray, pair_data(5, n=9))
  (value, aux), grads = jax.value_and_grad(
      lambda *a: losses.fdpo_loss("tv", *a, beta=beta), argnums=(0, 1, 2, 3),
      has_aux=True)(mw, ml, rw, rl)
  assert set(np.round(np.asarray(aux["margin"]) / beta, 6)) <= {-1.0, -0.5, 0.0, 0.5, 1.0}
  assert np.isfinite(float(value))
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def mp_fdpo(d, lw, ll, beta):
  """(loss, ∂loss/∂ℓ_w, ∂loss/∂ℓ_l) of one pair, in mpmath at 60 digits."""
  with mpmath.workdps(60):
    def fp(l):
      u = mpmath.exp(mpmath.mpf(l))
      a = d.alpha
      return {
          "forward_kl": lambda: -1 / u,
          "reverse_kl": lambda: mpmath.mpf(l) + 1,
          "tv": lambda: mpmath.mpf(0.5) * mpmath.sign(u - 1),
          "js": lambda: mpmath.mpf(0.5) * mpmath.log(2 * u / (1 + u)),
          "pearson_chi2": lambda: 2 * (u - 1),
          "neyman_chi2": lambda: 1 - u ** -2,
          "hellinger": lambda: 1 - u ** mpmath.mpf(-0.5),
          "alpha": lambda: (u ** (mpmath.mpf(a) - 1) - 1) / (mpmath.mpf(a) - 1),
      }[d.name]()

    def dfp(l):
      return mpmath.diff(fp, mpmath.mpf(l)) if d.name != "tv" else mpmath.mpf(0)

    m = mpmath.mpf(beta) * (fp(lw) - fp(ll))
    loss = mpmath.log1p(mpmath.exp(-m))
    s = 1 / (1 + mpmath.exp(m))  # σ(−m)
    return loss, -beta * s * dfp(lw), beta * s * dfp(ll)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_extreme_ratios_give_a_finite_loss_and_gradient(d, dtype):
  beta = 0.1
  values = np.array([-np.inf, -1e4, -700.0, -50.0, -1.0, 0.5, 30.0, 700.0, 1e4, np.inf])
  lw, ll = (a.ravel() for a in np.meshgrid(values, values))
  with jax.enable_x64(dtype == jnp.float64):
    zeros = jnp.zeros(lw.shape, dtype)
    fn = jax.jit(jax.value_and_grad(
        lambda a, b: losses.fdpo_loss(d, a, b, zeros, zeros, beta=beta), argnums=(0, 1),
        has_aux=True))
    (value, aux), (g_w, g_l) = fn(jnp.asarray(lw, dtype), jnp.asarray(ll, dtype))
    per = np.asarray(aux["losses"], np.float64)
    assert np.isfinite(float(value)) and np.all(np.isfinite(per))
    assert np.all(np.isfinite(np.asarray(g_w))) and np.all(np.isfinite(np.asarray(g_l)))
    # The values are those of the closed form at the documented clip of ℓ.
    lo, hi = losses.log_ratio_bounds(d, dtype)
    cw, cl = np.clip(lw, lo, hi), np.clip(ll, lo, hi)
    n = len(lw)
    rtol = 2e-5 if dtype == jnp.float32 else 1e-11
    # JAX differentiates expm1(x) as expm1(x) + 1, so where f' saturates
    # (Pearson χ² at ℓ ≪ 0, Neyman χ² and Hellinger at ℓ ≫ 0) df'/dℓ is exact
    # only to an absolute error of a few ulps of f'.
    atol = 4 * float(jnp.finfo(dtype).eps) * beta / n
    for i in range(n):
      want, dw, dl = mp_fdpo(d, cw[i], cl[i], beta)
      np.testing.assert_allclose(per[i], float(want), rtol=rtol, atol=1e-30)
      want_gw = float(dw) / n if lo < lw[i] < hi else 0.0   # 0 beyond the bound
      want_gl = float(dl) / n if lo < ll[i] < hi else 0.0
      np.testing.assert_allclose(g_w[i], want_gw, rtol=10 * rtol, atol=atol)
      np.testing.assert_allclose(g_l[i], want_gl, rtol=10 * rtol, atol=atol)
    clipped = (lw != cw).sum() + (ll != cl).sum()
    assert int(aux["num_clipped"]) == clipped
    if d.name in ("reverse_kl", "js"):      # linear sides: only ±inf is clipped
      assert clipped == (~np.isfinite(lw)).sum() + (~np.isfinite(ll)).sum() == 40


def test_the_clip_bounds_of_forward_kl_and_an_explicit_clip():
  zeros = jnp.zeros(2)
  # float32: forward KL's f' = −e^{−ℓ} is clipped below ℓ = −44.
  _, aux = losses.fdpo_loss("forward_kl", jnp.array([-50.0, -44.0]), zeros, zeros, zeros,
                            beta=1.0)
  np.testing.assert_allclose(aux["chosen_reward"], [-math.exp(44)] * 2, rtol=1e-6)
  assert int(aux["num_clipped"]) == 1
  # An explicit clip c: ℓ in [−c, c], ±inf included.
  _, aux = losses.fdpo_loss("reverse_kl", jnp.array([10.0, -jnp.inf]), zeros, zeros, zeros,
                            beta=1.0, log_ratio_clip=5.0)
  np.testing.assert_allclose(aux["chosen_reward"], [6.0, -4.0])
  assert int(aux["num_clipped"]) == 2


def test_shape_errors_name_the_argument():
  x = jnp.zeros(4)
  with pytest.raises(AssertionError, match=r"fdpo_loss: log_ref_rejected must have shape "
                     r"\[N\] = \(4,\) like log_model_chosen; got \(4, 1\)"):
    losses.fdpo_loss("js", x, x, x, x[:, None], beta=1.0)
  with pytest.raises(AssertionError, match=r"fdpo_loss: mask must have shape \[N\]"):
    losses.fdpo_loss("js", x, x, x, x, beta=1.0, mask=jnp.ones(3, bool))
  with pytest.raises(AssertionError, match=r"fdpo_losses: log_model_chosen must be a "
                     r"vector \[N\]"):
    losses.fdpo_losses("js", jnp.zeros((2, 2)), x, x, x, beta=1.0)
  y = jnp.zeros((2, 3))
  with pytest.raises(AssertionError, match=r"fpo_loss: log_model must be \[N, K\]"):
    losses.fpo_loss("js", x, x, x, beta=1.0)
  with pytest.raises(AssertionError, match=r"fpo_loss: rewards must have the shape of "
                     r"log_model, \(2, 3\); got \(2, 4\)"):
    losses.fpo_loss("js", y, y, jnp.zeros((2, 4)), beta=1.0)
  with pytest.raises(AssertionError, match=r"fpo_losses: mask must have the shape"):
    losses.fpo_losses("js", y, y, y, beta=1.0, mask=jnp.ones(2, bool))


@pytest.mark.parametrize("beta", [0.0, -1.0, math.nan, math.inf, True, np.ones(2)])
def test_beta_is_checked_when_concrete(beta):
  x, y = jnp.zeros(3), jnp.zeros((1, 3))
  with pytest.raises(ValueError, match=r"^beta: must be"):
    losses.fdpo_loss("js", x, x, x, x, beta=beta)
  with pytest.raises(ValueError, match=r"^beta: must be"):
    losses.fpo_loss("js", y, y, y, beta=beta)


def test_beta_is_keyword_only_and_the_clip_is_checked():
  x = jnp.zeros(3)
  with pytest.raises(TypeError):
    losses.fdpo_loss("js", x, x, x, x, 1.0)   # pylint: disable=too-many-function-args
  with pytest.raises(ValueError, match=r"^log_ratio_clip: must be a finite number > 0"):
    losses.fdpo_loss("js", x, x, x, x, beta=1.0, log_ratio_clip=0.0)
  # A concrete JAX or NumPy scalar is accepted and checked.
  losses.fdpo_loss("js", x, x, x, x, beta=jnp.float32(0.5))
  with pytest.raises(ValueError, match=r"^beta: "):
    losses.fdpo_loss("js", x, x, x, x, beta=np.float64(-0.5))


def test_fdpo_under_jit_vmap_and_grad_in_beta():
  d = divergences.get("alpha", alpha=0.5)
  with jax.enable_x64(True):
    batch = [pair_data(s, n=5) for s in range(3)]
    stacked = [jnp.asarray(np.stack(a)) for a in zip(*batch)]   # four [3, 5]

    @jax.jit
    def loss(beta, mw, ml, rw, rl):   # β traced
      return losses.fdpo_loss(d, mw, ml, rw, rl, beta=beta)[0]

    got = jax.vmap(loss, in_axes=(None, 0, 0, 0, 0))(0.7, *stacked)
    want = [losses.fdpo_loss(d, *args, beta=0.7)[0] for args in batch]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # ∂loss/∂β = mean −σ(−m)·(f'(u_w) − f'(u_l)).
    mw, ml, rw, rl = batch[0]
    gap = f_prime_np(d, np.exp(mw - rw)) - f_prime_np(d, np.exp(ml - rl))
    np.testing.assert_allclose(jax.grad(loss)(0.7, *map(jnp.asarray, batch[0])),
                               np.mean(-sigmoid(-0.7 * gap) * gap), rtol=1e-10)


def test_losses_reexports_the_preference_losses():
  for name in ("fdpo_loss", "fdpo_losses", "fpo_loss", "fpo_losses"):
    assert getattr(losses, name) is getattr(preference, name)


# --- The population minimiser of f-DPO on an enumerable space ---------------

@pytest.mark.parametrize("d", [divergences.get("reverse_kl"), divergences.get("forward_kl"),
                               divergences.get("js"), divergences.get("alpha", alpha=0.5)],
                         ids=str)
def test_population_minimiser_recovers_the_bradley_terry_reward(d):
  """6 outcomes, every ordered pair (i, j) drawn with weight π_ref(i)π_ref(j)
  and labelled i ≻ j with the Bradley–Terry probability σ(r_i − r_j): the
  minimiser over a free softmax policy has implicit reward β f'(π/π_ref) = r + c."""
  beta = 0.5
  reward = np.array([1.2, -0.3, 0.5, 2.0, -1.0, 0.1])
  with jax.enable_x64(True):
    log_ref = np.log(np.random.default_rng(0).dirichlet(np.full(6, 3.0)))
    i, j = np.where(~np.eye(6, dtype=bool))
    weight = np.exp(log_ref[i] + log_ref[j]) * sigmoid(reward[i] - reward[j])
    weight = jnp.asarray(weight / weight.sum())

    def expected_loss(theta):
      log_pi = jax.nn.log_softmax(theta)
      per_pair = losses.fdpo_losses(d, log_pi[i], log_pi[j], jnp.asarray(log_ref[i]),
                                    jnp.asarray(log_ref[j]), beta=beta)
      return jnp.sum(weight * per_pair)

    @jax.jit
    def descend(theta):
      def step(theta, _):
        return theta - 2.0 * jax.grad(expected_loss)(theta), None
      return jax.lax.scan(step, theta, None, length=10_000)[0]

    theta = descend(jnp.asarray(log_ref))
    value, grad = jax.value_and_grad(expected_loss)(theta)
    assert float(jnp.max(jnp.abs(grad))) < 1e-10
    log_pi = jax.nn.log_softmax(theta)
    implicit = np.asarray(beta * d.f_prime(log_pi - log_ref))
    np.testing.assert_array_equal(np.argsort(implicit), np.argsort(reward))
    np.testing.assert_allclose(implicit - implicit.mean(), reward - reward.mean(), atol=1e-8)
    # The minimum is the Bradley–Terry cross-entropy at h = r, whatever f is.
    bt = float(np.sum(np.asarray(weight) * softplus(-(reward[i] - reward[j]))))
    np.testing.assert_allclose(value, bt, rtol=1e-12)
    # ... but the minimising policy depends on f: π = π_ref·(f')^{-1}((r + c)/β).
    if d.name != "reverse_kl":
      dpo_policy = np.exp(log_ref + reward / beta)
      assert np.max(np.abs(np.exp(log_pi) - dpo_policy / dpo_policy.sum())) > 1e-2


# --- f-PO -------------------------------------------------------------------

def fpo_np(d, log_model, log_ref, rewards, beta):
  """Per-prompt D_f(π̂_θ‖π̂*) from the definition (NumPy float64)."""
  pi_hat = np.exp(log_softmax_np(beta * log_model + (1 - beta) * log_ref))
  star = np.exp(log_softmax_np(log_ref + rewards))
  return d_f_np(d, pi_hat, star), pi_hat, star


def listwise_data(seed, n=3, k=5):
  rng = np.random.default_rng(seed)
  log_ref = np.log(rng.dirichlet(np.ones(k), size=n)) - 2.0
  log_model = log_ref + rng.normal(size=(n, k))
  rewards = rng.normal(size=(n, k))
  return log_model, log_ref, rewards


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_fpo_matches_the_definition(d):
  beta = 0.6
  with jax.enable_x64(True):
    log_model, log_ref, rewards = listwise_data(7)
    want, pi_hat, star = fpo_np(d, log_model, log_ref, rewards, beta)
    loss, aux = losses.fpo_loss(d, log_model, log_ref, rewards, beta=beta)
    np.testing.assert_allclose(aux["losses"], want, rtol=1e-11)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-11)
    np.testing.assert_allclose(np.exp(aux["log_policy"]), pi_hat, rtol=1e-12)
    np.testing.assert_allclose(np.exp(aux["log_target"]), star, rtol=1e-12)
    assert int(aux["num_prompts"]) == 3
    np.testing.assert_allclose(losses.fpo_losses(d, log_model, log_ref, rewards, beta=beta),
                               want, rtol=1e-11)


@pytest.mark.parametrize("d", SMOOTH, ids=[str(d) for d in SMOOTH])
def test_fpo_gradient_matches_finite_differences(d):
  beta = 0.6
  with jax.enable_x64(True):
    log_model, log_ref, rewards = listwise_data(8, n=2, k=4)
    grad = np.asarray(jax.grad(lambda lm: losses.fpo_loss(
        d, lm, log_ref, rewards, beta=beta)[0])(jnp.asarray(log_model)))
    h = 1e-6
    numeric = np.zeros_like(log_model)
    for idx in np.ndindex(log_model.shape):
      e = np.zeros_like(log_model)
      e[idx] = h
      numeric[idx] = (fpo_np(d, log_model + e, log_ref, rewards, beta)[0].mean()
                      - fpo_np(d, log_model - e, log_ref, rewards, beta)[0].mean()) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert np.max(np.abs(grad)) > 1e-3
    # Each prompt's gradient sums to 0: π̂_θ is invariant to a shift of log π_θ.
    np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-12)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_fpo_is_zero_with_zero_gradient_at_the_target(d):
  with jax.enable_x64(True):
    _, log_ref, rewards = listwise_data(9)
    # β = 1: π̂_θ = softmax(log π_θ); log π_θ = log π_ref + r makes the two
    # log-softmaxes identical bit for bit (TV is not differentiable elsewhere).
    log_model = log_ref + rewards
    value, grad = jax.value_and_grad(lambda lm: losses.fpo_loss(
        d, lm, log_ref, rewards, beta=1.0)[0])(jnp.asarray(log_model))
    assert float(value) == 0.0
    np.testing.assert_allclose(grad, 0.0, atol=1e-15)
    if d.name == "tv":
      return
    # Any β and any per-prompt constant: β log(π_θ/π_ref) = r + c.
    beta = 0.3
    log_model = log_ref + (rewards + np.array([[1.0], [-2.0], [0.5]])) / beta
    value, grad = jax.value_and_grad(lambda lm: losses.fpo_loss(
        d, lm, log_ref, rewards, beta=beta)[0])(jnp.asarray(log_model))
    assert abs(float(value)) < 1e-14
    np.testing.assert_allclose(grad, 0.0, atol=1e-13)
    # Away from it the loss is positive.
    assert float(losses.fpo_loss(d, log_model + rewards, log_ref, rewards, beta=beta)[0]) > 1e-4


def two_responses(h, delta, beta=0.8, seed=10):
  """log π_θ, log π_ref [1, 2] with DPO margin h = β[(ℓ_1) − (ℓ_2)] and
  log π_ref(y_1) − log π_ref(y_2) = δ."""
  rng = np.random.default_rng(seed)
  log_ref = np.array([[-3.0 + delta, -3.0]])
  ell = rng.normal(size=2)
  ell[0] = ell[1] + h / beta
  return log_ref + ell, log_ref


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_fpo_with_two_responses_depends_only_on_the_dpo_margin(d):
  # K = 2, rewards (r, −r): π̂_θ = (σ(h + δ), σ(−h − δ)), π̂* = (σ(2r + δ), σ(−2r − δ)).
  beta, r = 0.8, 0.7
  with jax.enable_x64(True):
    for h, delta in ((1.3, 0.0), (-0.4, 0.9), (2.5, -1.7)):
      log_model, log_ref = two_responses(h, delta, beta)
      a, b = h + delta, 2 * r + delta
      want = d_f_np(d, np.array([sigmoid(a), sigmoid(-a)]), np.array([sigmoid(b), sigmoid(-b)]))
      got = losses.fpo_losses(d, log_model, log_ref, np.array([[r, -r]]), beta=beta)
      np.testing.assert_allclose(got, [want], rtol=1e-10)


def test_forward_kl_fpo_with_two_responses_is_label_smoothed_dpo():
  """KL(π̂*‖π̂_θ), K = 2, π_ref(y_1) = π_ref(y_2): DPO with label smoothing
  ε = σ(−2r) less its entropy, and DPO itself (= reverse-KL f-DPO) as r → ∞."""
  beta = 0.8
  with jax.enable_x64(True):
    for h in (-3.0, -0.2, 0.0, 1.1, 6.0):
      log_model, log_ref = two_responses(h, 0.0, beta)
      for r in (0.1, 1.0, 3.0):
        eps = sigmoid(-2 * r)
        want = (1 - eps) * softplus(-h) + eps * softplus(h) - binary_entropy(eps)
        got = losses.fpo_loss("forward_kl", log_model, log_ref, np.array([[r, -r]]),
                              beta=beta)[0]
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-15)
      # r = 40: ε = σ(−80) ≈ 2e-35, the loss is DPO's to rounding.
      fpo = losses.fpo_loss("forward_kl", log_model, log_ref, np.array([[40.0, -40.0]]),
                            beta=beta)[0]
      dpo = dpo_loss_direct(log_model[:, 0], log_model[:, 1], log_ref[:, 0], log_ref[:, 1],
                            beta)
      fdpo = losses.fdpo_loss("reverse_kl", log_model[:, 0], log_model[:, 1],
                              log_ref[:, 0], log_ref[:, 1], beta=beta)[0]
      np.testing.assert_allclose(fpo, dpo, rtol=1e-12)
      np.testing.assert_allclose(fdpo, dpo, rtol=1e-12)


def test_reverse_kl_fpo_with_two_responses_is_not_dpo():
  """KL(π̂_θ‖π̂*) = KL(Bernoulli σ(h)‖Bernoulli σ(2r)): its gradient in h is
  σ(h)σ(−h)(h − 2r) (zero at h = 2r, where DPO's never vanishes), and for large
  r it is 2r·σ(−h) − H(σ(h)) + O(e^{−2r}), not −log σ(h)."""
  beta = 0.8
  with jax.enable_x64(True):
    for h in (-3.0, 0.4, 2.0):
      log_model, log_ref = two_responses(h, 0.0, beta)
      for r in (0.3, 1.5):
        def of_h(shift):   # shift h by moving log π_θ(y_1)
          lm = jnp.asarray(log_model).at[0, 0].add(shift / beta)
          return losses.fpo_loss("reverse_kl", lm, log_ref, np.array([[r, -r]]),
                                 beta=beta)[0]
        np.testing.assert_allclose(jax.grad(of_h)(0.0),
                                   sigmoid(h) * sigmoid(-h) * (h - 2 * r), rtol=1e-10)
      r = 20.0
      got = losses.fpo_loss("reverse_kl", log_model, log_ref, np.array([[r, -r]]),
                            beta=beta)[0]
      np.testing.assert_allclose(got, 2 * r * sigmoid(-h) - binary_entropy(sigmoid(h)),
                                 rtol=1e-12)
      assert abs(float(got) - softplus(-h)) > 0.1


def exo_loss_np(log_model, log_ref, rewards, beta, beta_r):
  """EXO (Ji et al., ICML 2024) over K responses sampled from π_ref:
  KL(p_θ‖p_r), p_θ = softmax(β(log π_θ − log π_ref)), p_r = softmax(r/β_r)."""
  log_p_theta = log_softmax_np(beta * (log_model - log_ref))
  log_p_r = log_softmax_np(rewards / beta_r)
  return np.mean(np.sum(np.exp(log_p_theta) * (log_p_theta - log_p_r), axis=-1))


def test_the_directions_forward_kl_and_reverse_kl_exo():
  beta, beta_r = 0.4, 0.5
  with jax.enable_x64(True):
    log_model, log_ref, rewards = listwise_data(11, n=4, k=6)
    _, pi_hat, star = fpo_np(divergences.get("js"), log_model, log_ref, rewards, beta)
    kl = lambda p, q: np.sum(p * (np.log(p) - np.log(q)), axis=-1)   # KL(p‖q)
    forward = losses.fpo_loss("forward_kl", log_model, log_ref, rewards, beta=beta)[0]
    reverse = losses.fpo_loss("reverse_kl", log_model, log_ref, rewards, beta=beta)[0]
    np.testing.assert_allclose(forward, kl(star, pi_hat).mean(), rtol=1e-12)   # KL(π̂*‖π̂_θ)
    np.testing.assert_allclose(reverse, kl(pi_hat, star).mean(), rtol=1e-12)   # KL(π̂_θ‖π̂*)
    assert abs(float(forward) - float(reverse)) > 1e-3
    # forward KL = listwise cross-entropy −Σ π̂* log π̂_θ less the entropy of π̂*.
    cross_entropy = -np.sum(star * np.log(pi_hat), axis=-1)
    np.testing.assert_allclose(forward, (cross_entropy - (-np.sum(star * np.log(star), -1))).mean(),
                               rtol=1e-12)
    # EXO is the reverse KL: with responses sampled from π_ref, pass log π_θ − log π_ref
    # and a zero log π_ref (the π_ref factors are the sampling weights).
    exo = exo_loss_np(log_model, log_ref, rewards, beta, beta_r)
    ours = losses.fpo_loss("reverse_kl", log_model - log_ref, np.zeros_like(log_ref),
                           rewards / beta_r, beta=beta)[0]
    np.testing.assert_allclose(ours, exo, rtol=1e-12)
    other = losses.fpo_loss("forward_kl", log_model - log_ref, np.zeros_like(log_ref),
                            rewards / beta_r, beta=beta)[0]
    assert abs(float(other) - exo) > 1e-3
    # ... and directly when π_ref is the same on the K responses.
    flat = np.full_like(log_ref, -7.0)
    np.testing.assert_allclose(
        losses.fpo_loss("reverse_kl", log_model, flat, rewards / beta_r, beta=beta)[0],
        exo_loss_np(log_model, flat, rewards, beta, beta_r), rtol=1e-12)


def test_fpo_mask_normalises_over_the_real_responses_only():
  beta = 0.7
  d = divergences.get("alpha", alpha=0.5)
  with jax.enable_x64(True):
    log_model, log_ref, rewards = listwise_data(12, n=4, k=5)
    mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], bool)
    # Garbage where the mask is off: it must reach neither value nor gradient.
    poisoned = [np.where(mask, x, v) for x, v in
                ((log_model, np.nan), (log_ref, -np.inf), (rewards, np.inf))]
    (loss, aux), grad = jax.value_and_grad(lambda lm: losses.fpo_loss(
        d, lm, poisoned[1], poisoned[2], beta=beta, mask=mask), has_aux=True)(
            jnp.asarray(poisoned[0]))
    want = [fpo_np(d, log_model[n, mask[n]], log_ref[n, mask[n]], rewards[n, mask[n]],
                   beta)[0] for n in range(3)]
    np.testing.assert_allclose(aux["losses"], want + [0.0], rtol=1e-11)
    np.testing.assert_allclose(loss, np.mean(want), rtol=1e-11)   # 3 prompts, not 4
    assert int(aux["num_prompts"]) == 3
    assert np.all(np.isneginf(np.asarray(aux["log_policy"])[~mask]))
    np.testing.assert_allclose(np.exp(aux["log_target"][1, mask[1]]).sum(), 1.0, rtol=1e-12)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0.0)
    assert np.all(grad[mask] != 0.0)
    # A single real response: both distributions are a point mass, the loss is 0.
    assert float(aux["losses"][2]) != 0.0
    one = mask.copy()
    one[2, 3] = False
    assert float(losses.fpo_losses(d, log_model, log_ref, rewards, beta=beta, mask=one)[2]) == 0.0


def test_fpo_under_jit_vmap_and_grad_in_beta():
  d = divergences.get("js")
  with jax.enable_x64(True):
    batch = [listwise_data(s, n=2, k=3) for s in range(3)]
    stacked = [jnp.asarray(np.stack(a)) for a in zip(*batch)]   # three [3, 2, 3]

    @jax.jit
    def loss(beta, lm, lr, r):
      return losses.fpo_loss(d, lm, lr, r, beta=beta)[0]

    got = jax.vmap(loss, in_axes=(None, 0, 0, 0))(0.6, *stacked)
    np.testing.assert_allclose(got, [fpo_np(d, *b, 0.6)[0].mean() for b in batch], rtol=1e-11)
    h = 1e-6
    numeric = (fpo_np(d, *batch[0], 0.6 + h)[0].mean()
               - fpo_np(d, *batch[0], 0.6 - h)[0].mean()) / (2 * h)
    np.testing.assert_allclose(jax.grad(loss)(0.6, *map(jnp.asarray, batch[0])), numeric,
                               rtol=1e-6)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_fpo_float32_with_sequence_sized_log_probabilities(d):
  # Only differences within a prompt matter (both log-softmaxes): log-probs of
  # −10⁴ (long sequences) give, in float32, the value and gradient of the same
  # problem shifted to O(1) (the offsets are exact in float32).
  offsets = jnp.array([[0.0, -1.5, 0.75], [2.25, -0.5, -3.0]], jnp.float32)
  ref_offsets = jnp.array([[-0.25, 0.5, -1.0], [1.0, 0.0, -2.5]], jnp.float32)
  rewards = jnp.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]], jnp.float32)
  fn = jax.jit(jax.value_and_grad(lambda lm, lr: losses.fpo_loss(
      d, lm, lr, rewards, beta=0.5)[0]))
  far_value, far_grad = fn(offsets - 1e4, ref_offsets - 2e4)
  near_value, near_grad = fn(offsets, ref_offsets)
  assert far_value.dtype == jnp.float32 and np.isfinite(float(far_value))
  np.testing.assert_allclose(far_value, near_value, rtol=1e-5)
  np.testing.assert_allclose(far_grad, near_grad, rtol=1e-4, atol=1e-6)
