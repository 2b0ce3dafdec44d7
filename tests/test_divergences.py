"""f, f' and exact D_f against independent references (mpmath, float64 NumPy sums)."""

import math
import zlib

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from fdiv_jax.core import divergences

mpmath.mp.dps = 60

ALL = [divergences.get(n) for n in divergences.NAMES if n != "alpha"] + [
    divergences.get("alpha", alpha=a) for a in (-1.5, 0.3, 0.5, 2.0, 3.0)]
IDS = [str(d) for d in ALL]


def ref_f(d, t):
  """f(t) written directly in t with mpmath (independent of the ℓ-forms)."""
  t = mpmath.mpf(t)
  if d.name == "forward_kl":
    return -mpmath.log(t)
  if d.name == "reverse_kl":
    return t * mpmath.log(t)
  if d.name == "tv":
    return abs(t - 1) / 2
  if d.name == "js":
    return (t * mpmath.log(t) - (t + 1) * mpmath.log((t + 1) / 2)) / 2
  if d.name == "pearson_chi2":
    return (t - 1) ** 2
  if d.name == "neyman_chi2":
    return (t - 1) ** 2 / t
  if d.name == "hellinger":
    return (mpmath.sqrt(t) - 1) ** 2
  a = mpmath.mpf(d.alpha)
  return (t ** a - a * t - (1 - a)) / (a * (a - 1))


def ref_f_prime(d, t):
  t = mpmath.mpf(t)
  if d.name == "forward_kl":
    return -1 / t
  if d.name == "reverse_kl":
    return mpmath.log(t) + 1
  if d.name == "tv":
    return mpmath.sign(t - 1) / 2
  if d.name == "js":
    return mpmath.log(2 * t / (1 + t)) / 2
  if d.name == "pearson_chi2":
    return 2 * (t - 1)
  if d.name == "neyman_chi2":
    return 1 - t ** -2
  if d.name == "hellinger":
    return 1 - t ** mpmath.mpf(-0.5)
  a = mpmath.mpf(d.alpha)
  return (t ** (a - 1) - 1) / (a - 1)


def check_against_reference(fn, ref, d, log_ts, dtype, rtol, atol_scale):
  """|fn(ℓ) − ref(e^ℓ)| ≤ rtol·|ref| + atol, or both overflow to the same inf."""
  got = np.asarray(fn(jnp.asarray(log_ts, dtype)), np.float64)
  big = float(jnp.finfo(dtype).max)
  worst = 0.0
  for l, g in zip(log_ts, got):
    r = ref(d, mpmath.exp(mpmath.mpf(float(l))))
    assert not math.isnan(g), (str(d), l)
    if abs(r) > big:  # the true value is outside the float range
      assert math.isinf(g) and (g > 0) == (r > 0), (str(d), l, g)
      continue
    r = float(r)
    atol = atol_scale * float(jnp.finfo(dtype).eps)
    err = abs(g - r)
    assert err <= rtol * abs(r) + atol, (str(d), float(l), g, r)
    worst = max(worst, err / (abs(r) + atol))
  return worst


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_f_and_f_prime_match_reference_float64(d):
  log_ts = np.concatenate([np.linspace(-700, 700, 57), np.linspace(-3, 3, 41),
                           [-1e-6, 1e-6, -1e-3, 1e-3]])
  with jax.enable_x64(True):
    check_against_reference(d.f, ref_f, d, log_ts, jnp.float64, 1e-12, 8)
    check_against_reference(d.f_prime, ref_f_prime, d, log_ts, jnp.float64, 1e-12, 8)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_f_and_f_prime_match_reference_float32(d):
  log_ts = np.concatenate([np.linspace(-80, 80, 33), np.linspace(-3, 3, 25)])
  check_against_reference(d.f, ref_f, d, log_ts, jnp.float32, 2e-5, 8)
  check_against_reference(d.f_prime, ref_f_prime, d, log_ts, jnp.float32, 2e-5, 8)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_f_of_one_is_zero(d):
  assert float(d.f(jnp.float32(0.0))) == 0.0
  with jax.enable_x64(True):
    assert float(d.f(jnp.float64(0.0))) == 0.0


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_f_prime_is_the_autodiff_derivative(d):
  # d f(e^ℓ)/dℓ = f'(t)·t.
  # (Beyond ℓ ≈ −12 JAX's own expm1 derivative, exp = expm1 + 1, loses digits.)
  log_ts = jnp.array([-12.0, -4.0, -0.7, -0.01, 0.02, 0.9, 5.0, 30.0])
  with jax.enable_x64(True):
    log_ts = log_ts.astype(jnp.float64)
    autodiff = jax.vmap(jax.grad(d.f))(log_ts)
    chex.assert_trees_all_close(autodiff, d.f_prime(log_ts) * jnp.exp(log_ts),
                                rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_limits_at_infinity_are_exact_and_never_nan(d):
  values = d.f(jnp.array([-jnp.inf, jnp.inf]))
  slopes = d.f_prime(jnp.array([-jnp.inf, jnp.inf]))
  assert not np.any(np.isnan(values)) and not np.any(np.isnan(slopes))
  # f(0), f'(∞) from the closed form at a tiny / huge t.
  assert float(values[0]) == pytest.approx(d.f_at_zero, rel=1e-6)
  assert float(slopes[1]) == pytest.approx(d.f_prime_at_inf, rel=1e-6)
  with jax.enable_x64(True):
    near_zero = float(ref_f(d, mpmath.mpf("1e-100000")))
    near_inf_slope = float(ref_f_prime(d, mpmath.mpf("1e100000")))
  if math.isfinite(d.f_at_zero):
    assert d.f_at_zero == pytest.approx(near_zero, rel=1e-6, abs=1e-9)
  else:
    assert near_zero > 1e5
  if math.isfinite(d.f_prime_at_inf):
    assert d.f_prime_at_inf == pytest.approx(near_inf_slope, rel=1e-6, abs=1e-9)
  else:
    assert near_inf_slope > 1e5
  # The gradient at ±inf is 0 (the limit is a constant), not NaN.
  grads = jax.vmap(jax.grad(d.f))(jnp.array([-jnp.inf, jnp.inf]))
  assert not np.any(np.isnan(grads))


def test_alpha_family_contains_the_named_divergences():
  l = jnp.linspace(-5.0, 5.0, 21)
  f = lambda name, **kw: divergences.get(name, **kw).f(l)
  np.testing.assert_allclose(f("alpha", alpha=2.0), f("pearson_chi2") / 2, rtol=2e-5,
                             atol=1e-5)
  np.testing.assert_allclose(f("alpha", alpha=-1.0), f("neyman_chi2") / 2, rtol=2e-5,
                             atol=1e-5)
  np.testing.assert_allclose(f("alpha", alpha=0.5), 2 * f("hellinger"), rtol=2e-5,
                             atol=1e-5)
  with jax.enable_x64(True):
    l64 = l.astype(jnp.float64)
    near_one = divergences.get("alpha", alpha=1 + 1e-7).f(l64)
    t = jnp.exp(l64)
    np.testing.assert_allclose(near_one, t * l64 - t + 1, rtol=1e-5, atol=1e-6)


def test_get_names_aliases_and_errors():
  assert divergences.get("kl") == divergences.get("forward_kl")
  assert divergences.get("rkl") == divergences.get("reverse_kl")
  assert hash(divergences.get("alpha", alpha=0.5)) == hash(
      divergences.get("alpha", alpha=0.5))
  with pytest.raises(ValueError, match="valid names: forward_kl, reverse_kl"):
    divergences.get("foo")
  with pytest.raises(ValueError, match="^alpha: .*needs a parameter alpha"):
    divergences.get("alpha")
  for bad in (0, 1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="^alpha: must be a finite real number"):
      divergences.get("alpha", alpha=bad)
  with pytest.raises(ValueError, match="takes no parameters"):
    divergences.get("js", alpha=0.5)


# ---------------------------------------------------------------- exact D_f.


def ref_exact(d, pi, p):
  """Σ_x p f(π/p) in mpmath with the limits written out case by case."""
  total = mpmath.mpf(0)
  for a, b in zip(pi, p):
    a, b = mpmath.mpf(float(a)), mpmath.mpf(float(b))
    if b > 0 and a > 0:
      total += b * ref_f(d, a / b)
    elif b > 0:
      total += b * d.f_at_zero
    elif a > 0:
      total += a * d.f_prime_at_inf
  return total


def random_pair(rng, k, zeros_in_p=0, zeros_in_pi=0):
  pi, p = rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k))
  if zeros_in_p:
    p[rng.choice(k, zeros_in_p, replace=False)] = 0.0
    p /= p.sum()
  if zeros_in_pi:
    pi[rng.choice(k, zeros_in_pi, replace=False)] = 0.0
    pi /= pi.sum()
  with np.errstate(divide="ignore"):
    return pi, p, np.log(pi), np.log(p)


@pytest.mark.parametrize("d", ALL, ids=IDS)
@pytest.mark.parametrize("zeros_in_p,zeros_in_pi", [(0, 0), (2, 0), (0, 2), (2, 2)])
def test_exact_matches_an_independent_sum(d, zeros_in_p, zeros_in_pi):
  rng = np.random.default_rng(zlib.crc32(f"{d}{zeros_in_p}{zeros_in_pi}".encode()))
  with jax.enable_x64(True):
    for _ in range(5):
      pi, p, log_pi, log_p = random_pair(rng, 9, zeros_in_p, zeros_in_pi)
      got = float(divergences.exact(d, jnp.asarray(log_pi), jnp.asarray(log_p)))
      want = ref_exact(d, pi, p)
      assert not math.isnan(got)
      if mpmath.isinf(want):
        assert got == math.inf
      else:
        assert got == pytest.approx(float(want), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_exact_is_differentiable_where_finite(d):
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    _, _, _, log_p = random_pair(rng, 7, zeros_in_p=2)
    theta = jnp.asarray(rng.normal(size=7))
    fn = lambda th: divergences.exact(d, jax.nn.log_softmax(th), jnp.asarray(log_p))
    value = fn(theta)
    if not jnp.isfinite(value):
      assert not d.is_bounded and d.f_prime_at_inf == math.inf
      return
    grad = jax.grad(fn)(theta)
    eps = 1e-6
    numeric = np.array([(fn(theta.at[i].add(eps)) - fn(theta.at[i].add(-eps))) / (2 * eps)
                        for i in range(7)])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_exact_reduces_the_last_axis_and_vmaps():
  rng = np.random.default_rng(5)
  d = divergences.get("js")
  log_pi = jnp.asarray(np.log(rng.dirichlet(np.ones(5), size=3)), jnp.float32)
  log_p = jnp.asarray(np.log(rng.dirichlet(np.ones(5), size=3)), jnp.float32)
  batched = divergences.exact(d, log_pi, log_p)
  assert batched.shape == (3,)
  np.testing.assert_allclose(jax.vmap(lambda a, b: divergences.exact(d, a, b))(
      log_pi, log_p), batched, rtol=1e-6)


# ------------------------------------------------------ property tests.

dists = st.integers(min_value=2, max_value=8).flatmap(
    lambda k: st.tuples(
        st.lists(st.floats(-6, 6), min_size=k, max_size=k),
        st.lists(st.floats(-6, 6), min_size=k, max_size=k)))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(dists, st.sampled_from(ALL))
def test_properties_nonnegative_zero_iff_equal_jit_and_dtypes(logits, d):
  a, b = (np.asarray(x) for x in logits)
  with jax.enable_x64(True):
    log_pi = jax.nn.log_softmax(jnp.asarray(a, jnp.float64))
    log_p = jax.nn.log_softmax(jnp.asarray(b, jnp.float64))
    value = float(divergences.exact(d, log_pi, log_p))
    same = float(divergences.exact(d, log_p, log_p))
    jitted = float(jax.jit(divergences.exact, static_argnums=0)(d, log_pi, log_p))
    total_variation = 0.5 * float(jnp.sum(jnp.abs(jnp.exp(log_pi) - jnp.exp(log_p))))
  assert value >= -1e-12
  assert abs(same) <= 1e-12
  if total_variation > 1e-3:
    assert value > 1e-9  # strictly convex f (and TV itself): zero only if π = p
  assert jitted == pytest.approx(value, rel=1e-12, abs=1e-15)
  value32 = float(divergences.exact(d, log_pi.astype(jnp.float32),
                                    log_p.astype(jnp.float32)))
  assert value32 == pytest.approx(value, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_nan_input_stays_visible(d):
  assert np.isnan(float(d.f(jnp.float32(jnp.nan))))
  assert np.isnan(float(d.f_prime(jnp.float32(jnp.nan))))


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_f_over_t_matches_reference_and_never_overflows_early(d):
  # f(t)/t for t > 1 is what `exact` and the estimators use where π ≫ p.
  log_ts = np.concatenate([np.linspace(1e-3, 5, 11), np.linspace(10, 700, 30)])
  with jax.enable_x64(True):
    got = np.asarray(d.f_over_t(jnp.asarray(log_ts)))
  for l, g in zip(log_ts, got):
    t = mpmath.exp(mpmath.mpf(float(l)))
    r = ref_f(d, t) / t
    if abs(r) > np.finfo(np.float64).max:
      assert g == math.inf
    else:
      # Absolute slack as for f itself: near t = 1 both terms cancel.
      assert g == pytest.approx(float(r), rel=1e-10, abs=1e-14), (str(d), l)
  # In float32 it stays finite far past where f itself overflows (ℓ ≈ 88).
  if math.isfinite(d.f_prime_at_inf):
    far = float(d.f_over_t(jnp.float32(200.0)))
    assert far == pytest.approx(d.f_prime_at_inf, rel=1e-5, abs=1e-6)
  assert float(d.f_over_t(jnp.float32(jnp.inf))) == pytest.approx(d.f_prime_at_inf)


def test_alpha_f_overflow_is_inf_not_nan():
  for alpha, l in ((2.0, 100.0), (0.5, 250.0), (3.0, 60.0)):
    assert float(divergences.get("alpha", alpha=alpha).f(jnp.float32(l))) == math.inf


def test_exact_with_a_huge_ratio_is_finite_where_the_divergence_is():
  # π puts 1/2 where p has e^-120: f(t) overflows in float32, p·f(t) does not.
  log_pi = jnp.log(jnp.array([0.5, 0.5], jnp.float32))
  log_p = jnp.array([-120.0, 0.0], jnp.float32)
  for name in ("js", "tv", "hellinger", "neyman_chi2", "reverse_kl"):
    value = float(divergences.exact(name, log_pi, log_p))
    assert math.isfinite(value), name
    with jax.enable_x64(True):
      want = float(divergences.exact(name, log_pi.astype(jnp.float64),
                                     log_p.astype(jnp.float64)))
    assert value == pytest.approx(want, rel=1e-4), name
