"""The log-ratio clip before f' follows each divergence's own f'.

ℓ is bounded only on a side where f'(e^ℓ) grows exponentially, far enough that
R = −f'(e^ℓ) and R² stay finite; elsewhere R keeps its exact value and its
order in ℓ. Violated constraints (ℓ = +inf) get the exact limit −f'(∞) where it
is finite, otherwise a documented finite stand-in. Reference values of f' are
computed in t = e^ℓ with mpmath (50 digits), independently of the ℓ formulas of
`fdiv_jax.core.divergences`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from fdiv_jax.core import divergences, losses

ALL = [divergences.get(n) for n in divergences.NAMES if n != "alpha"] + [
    divergences.get("alpha", alpha=a) for a in (-1.5, 0.3, 0.5, 2.0, 3.0)]
DTYPES = [np.float32, np.float64]
CASES = [(dt, d) for dt in DTYPES for d in ALL]
CASE_IDS = [f"{np.dtype(dt).name}-{d}" for dt, d in CASES]

# (lo, hi) of `log_ratio_bounds`; L = the bound of a side where f' grows at
# most linearly, floor(sqrt(max float)/4).
L32 = float(math.floor(math.sqrt(float(np.finfo(np.float32).max)) / 4))
L64 = float(math.floor(math.sqrt(float(np.finfo(np.float64).max)) / 4))
BOUNDS = {
    # name: ((lo, hi) float32, (lo, hi) float64)
    "forward_kl": ((-44, L32), (-354, L64)),
    "reverse_kl": ((-L32, L32), (-L64, L64)),
    "tv": ((-L32, L32), (-L64, L64)),
    "js": ((-L32, L32), (-L64, L64)),
    "pearson_chi2": ((-L32, 43), (-L64, 354)),
    "neyman_chi2": ((-22, L32), (-177, L64)),
    "hellinger": ((-88, L32), (-709, L64)),
    "alpha(-1.5)": ((-17, L32), (-141, L64)),
    "alpha(0.3)": ((-62, L32), (-506, L64)),
    "alpha(0.5)": ((-87, L32), (-708, L64)),
    "alpha(2)": ((-L32, 44), (-L64, 354)),
    "alpha(3)": ((-L32, 22), (-L64, 177)),
}
RATES = {  # (growth_rate_at_zero, growth_rate_at_inf)
    "forward_kl": (1, 0), "reverse_kl": (0, 0), "tv": (0, 0), "js": (0, 0),
    "pearson_chi2": (0, 1), "neyman_chi2": (2, 0), "hellinger": (0.5, 0),
    "alpha(-1.5)": (2.5, 0), "alpha(0.3)": (0.7, 0), "alpha(0.5)": (0.5, 0),
    "alpha(2)": (0, 1), "alpha(3)": (0, 2),
}
ISSUE_POINTS = [30.0, 40.0, 50.0, -22.0, -30.0, -60.0] + [float(x) for x in range(-35, -24)]


def grid() -> np.ndarray:
  """Finite ℓ in [−1e4, 1e4], dense near 0, with the issue's points and ±½
  around every exponential bound; every point is exact in float32."""
  parts = [np.arange(-128, 129) / 64.0,              # [−2, 2], step 1/64
           np.arange(-400, 401) / 4.0,                # [−100, 100], step ¼
           np.arange(-1000, 1001) * 10.0,             # [−1e4, 1e4], step 10
           np.array(ISSUE_POINTS)]
  for (lo32, hi32), (lo64, hi64) in BOUNDS.values():
    for b in (lo32, hi32, lo64, hi64):
      if abs(b) < 1e4:
        parts.append(np.array([b - 0.5, b, b + 0.5]))
  g = np.unique(np.concatenate(parts))
  assert np.array_equal(g.astype(np.float32).astype(np.float64), g)
  return g


GRID = grid()
FAR = np.array([-1e30, -1e20, -1e19, -1e12, 1e12, 1e19, 1e20, 1e30])  # beyond ±L32


def f_prime_mp(d, ell):
  """f'(t) at t = e^ℓ, from the formulas in t, in 50-digit arithmetic."""
  t = mpmath.exp(mpmath.mpf(ell))
  name = d.name
  if name == "forward_kl":
    return -1 / t
  if name == "reverse_kl":
    return mpmath.log(t) + 1
  if name == "tv":
    return mpmath.mpf(0.5) * mpmath.sign(t - 1)
  if name == "js":
    return mpmath.log(2 * t / (1 + t)) / 2
  if name == "pearson_chi2":
    return 2 * (t - 1)
  if name == "neyman_chi2":
    return 1 - t ** -2
  if name == "hellinger":
    return 1 - t ** mpmath.mpf(-0.5)
  a = mpmath.mpf(d.alpha)
  return (t ** (a - 1) - 1) / (a - 1)


@functools.lru_cache(maxsize=None)
def reference(d, points: tuple) -> np.ndarray:
  """Exact R = −f'(e^ℓ) at `points`, as float64 (±inf beyond its range)."""
  with mpmath.workdps(50):
    return np.array([float(-f_prime_mp(d, x)) for x in points])


def rewards(d, ell, dtype, **kw):
  """R = −f'(exp(clip ℓ)) through the library, as the loss computes it."""
  clipped = losses.clip_log_ratio(d, jnp.asarray(ell, dtype), **kw)
  return np.asarray(d.pseudo_reward(clipped)), np.asarray(clipped)


@pytest.fixture(params=DTYPES, ids=lambda dt: np.dtype(dt).name)
def x64(request):
  with jax.enable_x64(request.param == np.float64):
    yield request.param


def in_dtype(dtype):
  return jax.enable_x64(dtype == np.float64)


# --- the growth rates of f' ----------------------------------------------------


@pytest.mark.parametrize("d", ALL, ids=str)
def test_growth_rates_match_f_prime(d):
  """The stated rate is the slope of log|f'| between |ℓ| = 30 and 60 (exact
  f' in t); a rate of 0 means f' grows at most linearly there. The stated
  scale c bounds |f'| ≤ c·e^{r|ℓ|} on that side and is attained as |ℓ| → ∞."""
  assert (d.growth_rate_at_zero, d.growth_rate_at_inf) == pytest.approx(
      RATES[str(d)], rel=1e-12)
  sides = [(-1.0, d.growth_rate_at_zero, d.growth_scale_at_zero),
           (1.0, d.growth_rate_at_inf, d.growth_scale_at_inf)]
  with mpmath.workdps(50):
    for sign, rate, scale in sides:
      at = {x: abs(f_prime_mp(d, sign * x)) for x in (30, 60)}
      if rate > 0:
        slope = float((mpmath.log(at[60]) - mpmath.log(at[30])) / 30)
        assert slope == pytest.approx(rate, rel=1e-6)
        for x in np.linspace(0.0, 60.0, 121):
          # (slack: the scale is a float64, 1/(1 − α) rounded)
          assert abs(f_prime_mp(d, sign * x)) <= scale * mpmath.exp(rate * x) * (
              1 + mpmath.mpf("1e-12"))
        assert float(at[60] / (scale * mpmath.exp(rate * 60))) == pytest.approx(
            1.0, rel=1e-6)
      else:
        slope = float((mpmath.log(at[60] + 1) - mpmath.log(at[30] + 1)) / 30)
        assert slope < 0.05, f"f' grows exponentially on the side {sign:+}"
        assert scale == 0.0
  # The properties of the f'(∞) limit agree with the rates.
  assert math.isinf(d.f_prime_at_inf) == (d.growth_rate_at_inf > 0
                                         or d.name == "reverse_kl")


# --- bounds ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype,d", CASES, ids=CASE_IDS)
def test_bounds_table(dtype, d):
  want = BOUNDS[str(d)][DTYPES.index(dtype)]
  assert losses.log_ratio_bounds(d, dtype) == (float(want[0]), float(want[1]))
  assert losses.log_ratio_bounds(d.metric_name if d.alpha is None else d, dtype) == (
      float(want[0]), float(want[1]))


# --- order and finiteness on the grid ---------------------------------------------


@pytest.mark.parametrize("dtype,d", CASES, ids=CASE_IDS)
def test_clipped_pseudo_rewards_are_finite_and_ordered(dtype, d):
  with in_dtype(dtype):
    lo, hi = losses.log_ratio_bounds(d, dtype)
    ell = np.concatenate([GRID, FAR, [lo, hi], [float(np.finfo(dtype).min),
                                                float(np.finfo(dtype).max)]])
    ell = np.unique(ell.astype(dtype))
    r, clipped = rewards(d, ell, dtype)
    assert r.dtype == dtype
    # R and R² finite everywhere (no warning: numpy squares in the dtype).
    assert np.all(np.isfinite(r)), ell[~np.isfinite(r)]
    with np.errstate(over="ignore"):
      assert np.all(np.isfinite(r * r)), ell[~np.isfinite(r * r)]
    # Clipping is exactly [lo, hi].
    np.testing.assert_array_equal(clipped, np.clip(ell, dtype(lo), dtype(hi)))
    # R is non-increasing in ℓ (f' is non-decreasing).
    assert np.all(np.diff(r) <= 0), ell[1:][np.diff(r) > 0]

    # Strictly decreasing inside [lo, hi] wherever the exact values differ by
    # more than the dtype can blur (8 ulps): the pseudo-reward loses no order
    # that the dtype can represent. (TV is constant on each side of 0.)
    inside = (GRID >= lo) & (GRID <= hi)
    g = GRID[inside]
    exact = reference(d, tuple(g.tolist()))
    got = rewards(d, g, dtype)[0]
    # (Below the smallest normal number JAX flushes to zero: no order there.)
    ulp = np.maximum(np.spacing(np.maximum(np.abs(exact[:-1]),
                                           np.abs(exact[1:])).astype(dtype)),
                     np.finfo(dtype).tiny)
    distinct = (exact[:-1] - exact[1:]) > 8 * ulp.astype(np.float64)
    assert np.count_nonzero(distinct) >= 100 or d.name == "tv"  # not vacuous
    bad = distinct & ~(got[:-1] > got[1:])
    assert not np.any(bad), list(zip(g[:-1][bad], got[:-1][bad], got[1:][bad]))
    # And they are the exact values (to a few ulps in the dtype; absolute near
    # a zero of f').
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,d", CASES, ids=CASE_IDS)
def test_beyond_the_bounds_the_reward_is_the_one_at_the_bound(dtype, d):
  with in_dtype(dtype):
    lo, hi = losses.log_ratio_bounds(d, dtype)
    r, _ = rewards(d, [lo, 2 * lo, float(np.finfo(dtype).min), -np.inf,
                       hi, 2 * hi, float(np.finfo(dtype).max)], dtype)
    assert np.all(r[:4] == r[0]) and np.all(r[4:] == r[4])


# --- the issue's examples -----------------------------------------------------------


def test_reverse_kl_keeps_the_order_of_large_ratios(x64):
  r = losses.pseudo_rewards("reverse_kl", jnp.array([30.0, 40.0, 50.0], x64),
                            jnp.zeros(3, x64), 0.0)
  assert r.dtype == x64
  np.testing.assert_array_equal(r, [-31.0, -41.0, -51.0])


def test_forward_kl_keeps_the_order_of_small_ratios(x64):
  ell = np.arange(-25.0, -36.0, -1.0)
  r = np.asarray(losses.pseudo_rewards("forward_kl", jnp.asarray(ell, x64),
                                       jnp.zeros(11, x64), 0.0))
  assert len(np.unique(r)) == 11 and np.all(np.diff(r) > 0)
  np.testing.assert_allclose(r, np.exp(-ell), rtol=1e-6 if x64 == np.float32 else 1e-14)


def test_js_keeps_the_order_below_minus_22(x64):
  ell = np.array([-30.0, -60.0])
  r = np.asarray(losses.pseudo_rewards("js", jnp.asarray(ell, x64), jnp.zeros(2, x64),
                                       0.0))
  assert r[1] > r[0]
  np.testing.assert_allclose(r, 0.5 * (np.logaddexp(0.0, -ell) - math.log(2)),
                             rtol=1e-6 if x64 == np.float32 else 1e-14)


# --- violated constraints and the infinities --------------------------------------


@pytest.mark.parametrize("dtype,d", CASES, ids=CASE_IDS)
def test_violated_constraint_gets_the_limit_or_the_lowest_reward(dtype, d):
  with in_dtype(dtype):
    r_v = np.asarray(losses.pseudo_rewards(d, jnp.zeros(1, dtype),
                                           jnp.full(1, -jnp.inf, dtype), 0.0))[0]
    assert r_v.dtype == dtype and np.isfinite(r_v)
    lo, hi = losses.log_ratio_bounds(d, dtype)
    v = losses.violated_log_ratio(d, dtype)
    if math.isfinite(d.f_prime_at_inf):
      # The exact limit −f'(∞), not a clipped approximation of it.
      assert v == math.inf
      assert r_v == dtype(-d.f_prime_at_inf)
      return
    r, _ = rewards(d, GRID, dtype)
    if d.name != "reverse_kl":
      # Pearson χ², α > 1: ℓ = hi, never rewarded above a satisfying sample.
      assert v == hi
      assert np.all(r_v <= r)
      return
    # Reverse KL, the documented exception: the stand-in ℓ_v = 22 (float32) /
    # 177 (float64) ranks a violated sample above satisfying samples with
    # ℓ > ℓ_v, and below all others.
    assert v == losses.default_log_ratio_clip(dtype, d) == {
        np.float32: 22, np.float64: 177}[dtype]
    assert r_v == -(v + 1)
    assert np.all(r_v <= r[GRID <= v]) and np.all(r_v > r[GRID > v])
    if dtype == np.float32:
      r50, _ = rewards(d, [50.0], dtype)
      assert r_v == -23.0 and r50[0] == -51.0


@pytest.mark.parametrize("dtype,d", CASES, ids=CASE_IDS)
def test_infinities_and_nan(dtype, d):
  with in_dtype(dtype):
    lo, _ = losses.log_ratio_bounds(d, dtype)
    ell = jnp.array([-jnp.inf, jnp.nan, jnp.inf, 0.0], dtype)
    clipped = np.asarray(losses.clip_log_ratio(d, ell))
    assert clipped[0] == lo                      # π = 0: the lower bound
    assert np.isnan(clipped[1])                  # NaN stays NaN
    assert clipped[2] == dtype(losses.violated_log_ratio(d, dtype))
    assert clipped[3] == 0.0
    np.testing.assert_array_equal(
        losses.is_clipped(ell, clipped), [True, False, True, False])
    # The same under jit.
    jitted = jax.jit(lambda x: losses.clip_log_ratio(d, x))(ell)
    np.testing.assert_array_equal(jitted, clipped)


def test_explicit_clip_is_symmetric_and_overrides(x64):
  ell = jnp.array([-jnp.inf, -30.0, -3.0, 3.0, 30.0, jnp.inf, jnp.nan], x64)
  for name in ("forward_kl", "reverse_kl", "js"):
    got = np.asarray(losses.clip_log_ratio(divergences.get(name), ell,
                                           log_ratio_clip=5.0))
    np.testing.assert_array_equal(got, [-5, -5, -3, 3, 5, 5, np.nan])
  r = losses.pseudo_rewards("reverse_kl", jnp.array([30.0, 50.0], x64),
                            jnp.array([0.0, -jnp.inf], x64), 0.0, log_ratio_clip=22.0)
  np.testing.assert_array_equal(r, [-23.0, -23.0])


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "pearson_chi2"])
def test_num_clipped_counts_violated_samples(name, x64):
  log_model = jnp.array([-1.0, -2.0, -1.0, -500.0], x64)
  log_target = jnp.array([-1.0, -jnp.inf, -jnp.inf, -1.0], x64)
  _, aux = losses.fdpg_loss(name, log_model, log_model, log_target, 0.0)
  # Two violated samples, and ℓ = −499 below the forward-KL bound only.
  assert int(aux["num_clipped"]) == (3 if name == "forward_kl" else 2)
  assert np.all(np.isfinite(np.asarray(aux["pseudo_reward"])))
  assert np.all(np.isinf(np.asarray(aux["log_ratio"])[1:3]))
