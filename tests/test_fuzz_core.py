"""Property-based fuzzing of the pure core (issue "Nothing lost, nothing silent").

Every divergence of the registry (and α at seven values) through
`divergences.exact`, the estimators, `uncertainty`, `fdpg_loss` and its parts,
the preference losses (`fdpo_loss`, `fpo_loss`) and the baselines, in float32
and float64, on [N] arrays (N in {1, 2, 7, 64}) that mix ordinary values, huge
magnitudes (|x| up to 1e4; ℓ beyond, up to 3e38), ±inf and, where the property
allows, NaN; masks random, all off, exactly one on, all on; log Ẑ = −inf.

Properties (one test each):

* `test_f_f_prime_reward_and_clip`: f, f', R = −f', f/t never NaN for non-NaN
  ℓ (NaN stays NaN); the limits at ℓ = ±inf are those of the table of
  docs/mathematics.md §5; f(t) ≥ f'(1)(t − 1) (convexity; f ≥ 0 where
  f'(1) = 0); R non-increasing in ℓ; `clip_log_ratio` stays in
  `log_ratio_bounds` (a violated ℓ = +inf gets `violated_log_ratio`), keeps R
  and R² finite, and `is_clipped` flags exactly what it changed.
* `test_exact_divergence`: on normalised distributions with zeros in either,
  D_f ≥ 0, D_f(p‖p) = 0 exactly, never NaN; on the accurate range it matches a
  40-digit reference, is +inf exactly where documented (p = 0 < π with
  f'(∞) = ∞, π = 0 < p with f(0) = ∞) and > 0 when π ≠ p; its gradient in
  log π is never NaN where the value is finite.
* `test_fdpg_loss_is_finite`, `test_nan_input_gives_a_nan_loss_that_is_skipped`,
  `test_masked_rows_change_nothing`: for non-NaN inputs the loss and its
  gradient in log π are finite (log P = −inf, log Ẑ = −inf, |ℓ| up to 2e4, any
  mask, on- and off-policy with π = 0 rows) and the project's optimiser
  (`train.make_optimizer`: `skip_if_not_finite` outermost) applies the
  update; a NaN in a row the loss reads gives a NaN loss and a NaN gradient,
  and the optimiser leaves the parameters unchanged and counts it in
  `total_notfinite`; rows off the mask change neither value nor gradient,
  whatever they hold.
* `test_estimators_never_nan_and_stay_in_range`: no NaN for non-NaN input (the
  documented NaN of a moment no sample informs aside), ESS in [0, N], moments
  inside the range of the values, log Ẑ = −inf exactly when no sample
  satisfies the target, +inf exactly where documented.
* `test_estimators_are_invariant_to_a_shift_of_log_p`: log P → log P + c with
  log Ẑ → log Ẑ + c leaves every divergence estimate, moment and ESS unchanged
  (bitwise where log Ẑ is an input, up to rounding where it is re-estimated)
  and shifts every log Ẑ by c.
* `test_preference_losses_are_finite`, `test_preference_nan_input_gives_a_nan_loss`,
  `test_preference_masked_entries_change_nothing`: the same three for f-DPO
  (`losses.fdpo_loss`) and f-PO (`losses.fpo_loss`).
* `test_baselines_are_finite`: finite values and states for finite rewards;
  leave-one-out of a single sample is 0.

Domains. "Non-NaN input" means valid input: log-probabilities of normalised
distributions are ≤ 0 or −inf (π = 0; never +inf), log q is finite where x ~ q,
log P and log Ẑ are finite or −inf, and the f-DPG importance weights satisfy
|log π/q| ≤ 20 (beyond, w·R can truly overflow and the optimiser skips the
update). Each strategy's docstring states its domain.

What the fuzzing found is kept as plain regression tests at the end of the
file (`test_regression_*`), one per fix in `fdiv_jax/core`.

Profiles. By default each property runs 40 to 60 examples (the whole file in
about 75 s of CPU, nearly all of it compiling). `FDIV_FUZZ_EXAMPLES=5000 pytest
tests/test_fuzz_core.py -m fuzz_long` runs that many per property instead and
marks the tests `fuzz_long`; it is meant to run outside CI. Every run counts
the examples each property actually executed and prints the counts at the end
of the module (and writes them as JSON to `$FDIV_FUZZ_REPORT` if set).

JAX retraces per shape and dtype, so N is drawn from a small set, arrays are
padded to a few compiled widths, and every property calls one jitted function
that evaluates all divergences at once.
"""

import collections
import functools
import json
import math
import os
import time

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from fdiv_jax.core import baselines, divergences, estimators, losses, uncertainty

# ------------------------------------------------------------------ profiles.

LONG_EXAMPLES = int(os.environ.get("FDIV_FUZZ_EXAMPLES", "0") or 0)
if LONG_EXAMPLES:
  pytestmark = pytest.mark.fuzz_long


def fuzz(ci_examples: int):
  """hypothesis settings: `ci_examples` by default, $FDIV_FUZZ_EXAMPLES if set."""
  return hypothesis.settings(
      max_examples=LONG_EXAMPLES or ci_examples, deadline=None,
      suppress_health_check=[hypothesis.HealthCheck.too_slow,
                             hypothesis.HealthCheck.data_too_large,
                             hypothesis.HealthCheck.large_base_example],
      print_blob=True)


COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def count(test: str, **features) -> None:
  """One example of `test` ran; `features` (truthy ones) say what it held."""
  COUNTS[test]["examples"] += 1
  for name, present in features.items():
    if present:
      COUNTS[test][name] += 1
      hypothesis.event(name)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
  start = time.perf_counter()
  yield
  lines = [f"fuzz examples run ({'long' if LONG_EXAMPLES else 'CI'} profile, "
           f"{time.perf_counter() - start:.0f} s):"]
  for test, counter in sorted(COUNTS.items()):
    extras = ", ".join(f"{k} {v}" for k, v in sorted(counter.items())
                       if k != "examples")
    lines.append(f"  {test}: {counter['examples']} examples ({extras})")
  reporter = request.config.pluginmanager.get_plugin("terminalreporter")
  capture = request.config.pluginmanager.get_plugin("capturemanager")
  if reporter is not None and capture is not None:
    with capture.global_and_fixture_disabled():
      reporter.write_line("")
      for line in lines:
        reporter.write_line(line)
  path = os.environ.get("FDIV_FUZZ_REPORT")
  if path:
    with open(path, "w") as f:
      json.dump({"profile": "long" if LONG_EXAMPLES else "ci",
                 "seconds": time.perf_counter() - start,
                 "counts": {t: dict(c) for t, c in COUNTS.items()}}, f, indent=1)


# ------------------------------------------------------------ divergences.

ALPHAS = (-2.0, -0.5, 0.3, 0.5, 0.9, 2.0, 3.0)
ALL = tuple([divergences.get(n) for n in divergences.NAMES if n != "alpha"]
            + [divergences.get("alpha", alpha=a) for a in ALPHAS])
INF = math.inf
LOG2 = math.log(2.0)


def documented_limits(d):
  """(f(0), f(∞), R(ℓ = −∞), R(ℓ = +∞)): docs/mathematics.md §4–5, typed out."""
  f_inf = -INF if d.name == "forward_kl" else INF
  table = {
      "forward_kl": (INF, INF, 0.0), "reverse_kl": (0.0, INF, -INF),
      "tv": (0.5, 0.5, -0.5), "js": (0.5 * LOG2, INF, -0.5 * LOG2),
      "pearson_chi2": (1.0, 2.0, -INF), "neyman_chi2": (INF, INF, -1.0),
      "hellinger": (1.0, INF, -1.0)}
  if d.name != "alpha":
    f0, r_lo, r_hi = table[d.name]
  else:
    a = d.alpha
    f0 = 1.0 / a if a > 0 else INF
    r_lo = 1.0 / (a - 1.0) if a > 1 else INF
    r_hi = -INF if a > 1 else -1.0 / (1.0 - a)
  return f0, f_inf, r_lo, r_hi


def f_prime_at_one(d):
  return {"forward_kl": -1.0, "reverse_kl": 1.0}.get(d.name, 0.0)


# ------------------------------------------------------------- strategies.

# N is drawn from SIZES. JAX compiles once per shape and dtype, so the arrays
# are padded to WIDTH rows: for elementwise functions and `exact` with ℓ = 0
# and with points where π = p = 0 (which contribute 0); for masked functions
# with rows off the mask (which change nothing: `test_masked_rows_change_nothing`,
# `test_preference_masked_entries_change_nothing`); for `uncertainty`, which
# has no mask, with the drawn rows repeated (the same samples again). The
# f-DPG loss and the baselines also keep a real [1] shape for N = 1.
SIZES = (1, 2, 7, 64)
WIDTH = 64


def width(n: int) -> int:
  """The compiled width of the f-DPG loss for N = n: [1] or [WIDTH]."""
  return 1 if n == 1 else WIDTH


def tile_rows(x, to: int = WIDTH):
  """[n, ...] → [to, ...] by repeating the rows."""
  x = np.asarray(x)
  reps = -(-to // x.shape[0])
  return np.concatenate([x] * reps)[:to]


def pad_rows(x, fill=0.0, to: int | None = None):
  """[n, ...] → [to, ...] (default width(n)), the new rows filled with `fill`."""
  x = np.asarray(x)
  if x.ndim == 0:
    return x
  extra = (width(x.shape[0]) if to is None else to) - x.shape[0]
  return np.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)


DTYPES = ("float32", "float64")
BOUNDS_NEAR = (-745.0, -709.0, -708.0, -354.0, -177.0, -88.0, -87.0, -44.0, -22.0,
               -17.0, 22.0, 43.0, 44.0, 88.0, 177.0, 354.0, 709.0, 710.0)

ELEMENTS = {
    "ordinary": st.floats(-30.0, 30.0),
    "huge": st.floats(-1e4, 1e4),
    "zero": st.just(0.0),
    "bound": st.sampled_from(BOUNDS_NEAR).flatmap(
        lambda b: st.sampled_from([b, b - 0.5, b + 0.5, math.nextafter(b, 0.0)])),
    "far": st.sampled_from([-3e38, -1e30, -4.6e18, -1e12, 1e12, 4.6e18, 1e30, 3e38]),
    "-inf": st.just(-INF),
    "+inf": st.just(INF),
    "nan": st.just(math.nan),
}
# How often each kind appears: "plain" arrays hold no specials at all.
MIXES = {
    "plain": ("ordinary",) * 3 + ("huge",),
    "mixed": ("ordinary",) * 4 + ("huge",) * 2 + ("zero", "special"),
    "wild": ("ordinary", "huge", "special", "special"),
}


@st.composite
def arrays(draw, n: int, specials=("-inf",), extra=(), sign: float = 0.0):
  """[n] float64 values: ordinary, huge, and the allowed `specials`.

  sign < 0 makes every finite value ≤ 0 (log-probabilities of normalised
  distributions); `extra` adds kinds such as "far" or "bound".
  """
  mix = draw(st.sampled_from(sorted(MIXES)))
  kinds = MIXES[mix] + tuple(extra)
  out = []
  for _ in range(n):
    kind = draw(st.sampled_from(kinds))
    if kind == "special":
      if not specials:
        kind = "ordinary"
      else:
        kind = draw(st.sampled_from(specials))
    x = draw(ELEMENTS[kind])
    if sign < 0 and math.isfinite(x):
      x = -abs(x)
    out.append(x)
  return np.array(out, np.float64)


@st.composite
def masks(draw, n: int):
  kind = draw(st.sampled_from(["random", "all_off", "one_on", "all_on"]))
  if kind == "random":
    mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
  elif kind == "all_off":
    mask = np.zeros(n, bool)
  elif kind == "one_on":
    mask = np.zeros(n, bool)
    mask[draw(st.integers(0, n - 1))] = True
  else:
    mask = np.ones(n, bool)
  return mask


def in_dtype(dtype: str):
  """float64 only inside the context (never globally)."""
  return jax.enable_x64(dtype == "float64")


def eps(dtype: str) -> float:
  return float(np.finfo(dtype).eps)


def cast(x, dtype):
  """`x` in `dtype`, subnormals flushed to (signed) zero as XLA's CPU kernels
  do, so that the references below see the numbers the library sees."""
  with np.errstate(over="ignore", invalid="ignore"):
    x = np.asarray(x, np.float64).astype(dtype)
  x = np.where(np.abs(x) < np.finfo(dtype).tiny, np.copysign(0.0, x).astype(dtype), x)
  return jnp.asarray(x)


def no_nan(tree) -> bool:
  return not any(np.any(np.isnan(np.asarray(x))) for x in jax.tree.leaves(tree))


def all_finite(tree) -> bool:
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


# ================================================ f, f', R and the clip of ℓ.


@jax.jit
def _registry_values(ell):
  out = {}
  for d in ALL:
    clipped = losses.clip_log_ratio(d, ell)
    explicit = losses.clip_log_ratio(
        d, ell, log_ratio_clip=float(losses.default_log_ratio_clip(ell.dtype, d)))
    out[str(d)] = dict(
        f=d.f(ell), f_prime=d.f_prime(ell), reward=d.pseudo_reward(ell),
        f_over_t=d.f_over_t(ell), clipped=clipped,
        clipped_reward=d.pseudo_reward(clipped),
        is_clipped=losses.is_clipped(ell, clipped),
        explicit=explicit, explicit_reward=d.pseudo_reward(explicit))
  return out


@fuzz(60)
@hypothesis.given(st.sampled_from(SIZES).flatmap(
    lambda n: arrays(n, specials=("-inf", "+inf", "nan"), extra=("far", "bound"))),
    st.sampled_from(DTYPES))
def test_f_f_prime_reward_and_clip(ell, dtype):
  count("f_f_prime_reward_and_clip", float64=dtype == "float64",
        has_inf=np.isinf(ell).any(), has_nan=np.isnan(ell).any(),
        beyond_1e4=(np.abs(ell[np.isfinite(ell)]) > 1e4).any())
  with in_dtype(dtype):
    x = cast(np.pad(ell, (0, WIDTH - ell.size)), dtype)
    values = jax.device_get(_registry_values(x))
  x = np.asarray(x, np.float64)
  nan, neg, pos = np.isnan(x), x == -INF, x == INF
  finite = np.isfinite(x)
  e = eps(dtype)
  for d in ALL:
    v = {k: np.asarray(a, np.float64) if a.dtype != bool else np.asarray(a)
         for k, a in values[str(d)].items()}
    name = str(d)
    # NaN in, NaN out; nothing else is NaN.
    for key in ("f", "f_prime", "reward", "f_over_t", "clipped", "clipped_reward",
                "explicit", "explicit_reward"):
      assert np.array_equal(np.isnan(v[key]), nan), (name, key, x[np.isnan(v[key]) != nan])
    assert not v["is_clipped"][nan].any(), name
    # The documented limits at ℓ = ±inf (docs/mathematics.md §5).
    f0, f_inf, r_lo, r_hi = documented_limits(d)
    typed = lambda c: float(np.asarray(c, dtype))
    assert (d.f_at_zero, d.f_prime_at_inf) == (f0, -r_hi), name
    assert np.all(v["f"][neg] == typed(f0)) and np.all(v["f"][pos] == f_inf), name
    assert np.all(v["reward"][neg] == typed(r_lo)), name
    assert np.all(v["reward"][pos] == typed(r_hi)), name
    assert np.all(v["f_over_t"][pos] == typed(-r_hi)), name
    assert np.all(v["f_over_t"][neg] == (-INF if d.name == "reverse_kl" else INF))
    assert np.array_equal(v["reward"], -v["f_prime"], equal_nan=True), name
    # At t = 1: f(1) = 0 and f'(1) (R at ℓ = 0 in the table: 0, forward KL 1,
    # reverse KL −1). The padding holds ℓ = 0.
    assert np.all(v["f"][x == 0] == 0.0), name
    assert np.all(v["f_prime"][x == 0] == f_prime_at_one(d)), name
    # Convexity: f(t) ≥ f(1) + f'(1)(t − 1), f(1) = 0; f ≥ 0 where f'(1) = 0.
    with np.errstate(over="ignore", invalid="ignore"):
      tangent = f_prime_at_one(d) * np.expm1(x) if f_prime_at_one(d) else 0.0 * x
      t = np.exp(np.minimum(x, 700.0))
      slack = 16 * e * (1.0 + np.abs(tangent) + t * (1.0 + np.abs(x))
                        + np.abs(v["f"]))
      ok = (v["f"] - tangent >= -slack) | ~finite | (np.isinf(tangent) & (
          np.sign(tangent) == np.sign(v["f"])))
    assert ok.all(), (name, x[~ok], v["f"][~ok])
    if f_prime_at_one(d) == 0.0:
      assert np.all(v["f"][finite] >= -slack[finite]), name
    # R = −f'(e^ℓ) is non-increasing in ℓ (f convex).
    order = np.argsort(x[~nan], kind="stable")
    r = v["reward"][~nan][order]
    if r.size > 1:
      with np.errstate(invalid="ignore"):
        tol = np.where(np.isfinite(r[:-1]), 8 * e * np.abs(r[:-1]) + 8 * e, 0.0)
      ok = r[1:] <= r[:-1] + tol
      assert ok.all(), (name, x[~nan][order][1:][~ok], r[1:][~ok], r[:-1][~ok])
    # The clip: inside (lo, hi), +inf → violated_log_ratio, R and R² finite.
    lo, hi = losses.log_ratio_bounds(d, dtype)
    violated = losses.violated_log_ratio(d, dtype)
    c = v["clipped"]
    assert np.all((c[finite | neg] >= typed(lo)) & (c[finite | neg] <= typed(hi))), name
    assert np.all(c[pos] == violated), name
    r = v["clipped_reward"][~nan]
    assert np.all(np.isfinite(r)) and np.all(np.isfinite(r * r)), name
    with np.errstate(invalid="ignore"):
      changed = (c != x) | pos
    assert np.array_equal(v["is_clipped"][~nan], changed[~nan]), name
    # An explicit clip c = default_log_ratio_clip(dtype, d): symmetric, R finite.
    bound = losses.default_log_ratio_clip(dtype, d)
    assert np.all(np.abs(v["explicit"][~nan]) <= bound), name
    r = v["explicit_reward"][~nan]
    assert np.all(np.isfinite(r)) and np.all(np.isfinite(r * r)), name


# ================================================== divergences.exact.


@jax.jit
def _exact_values(log_pi, log_p):
  out = {}
  for d in ALL:
    value, grad = jax.value_and_grad(lambda lp: divergences.exact(d, lp, log_p))(log_pi)
    out[str(d)] = (value, grad, divergences.exact(d, log_p, log_p))
  return out


def _mp_f(d, t):
  """f(t) in t with mpmath (independent of the ℓ-forms of the library)."""
  name = d.name
  if name == "forward_kl":
    return -mpmath.log(t)
  if name == "reverse_kl":
    return t * mpmath.log(t)
  if name == "tv":
    return abs(t - 1) / 2
  if name == "js":
    return (t * mpmath.log(t) - (t + 1) * mpmath.log((t + 1) / 2)) / 2
  if name == "pearson_chi2":
    return (t - 1) ** 2
  if name == "neyman_chi2":
    return (t - 1) ** 2 / t
  if name == "hellinger":
    return (mpmath.sqrt(t) - 1) ** 2
  a = mpmath.mpf(d.alpha)
  return (t ** a - a * t - (1 - a)) / (a * (a - 1))


def _mp_f_prime(d, t):
  name = d.name
  if name == "forward_kl":
    return -1 / t
  if name == "reverse_kl":
    return mpmath.log(t) + 1
  if name == "tv":
    return mpmath.sign(t - 1) / 2
  if name == "js":
    return mpmath.log(2 * t / (1 + t)) / 2
  if name == "pearson_chi2":
    return 2 * (t - 1)
  if name == "neyman_chi2":
    return 1 - t ** -2
  if name == "hellinger":
    return 1 - 1 / mpmath.sqrt(t)
  a = mpmath.mpf(d.alpha)
  return (t ** (a - 1) - 1) / (a - 1)


def _reference_exact(d, log_pi, log_p):
  """(Σ_x p f(π/p) with the limits, Σ_x |π f'(t)|(1 + |ℓ|)): the value and the
  sensitivity that scales its rounding error, in 40-digit arithmetic."""
  total, sensitivity = mpmath.mpf(0), mpmath.mpf(0)
  with mpmath.workdps(40):
    for a, b in zip(log_pi, log_p):
      if b == -INF or a == -INF:   # the limits π·f'(∞) and p·f(0); 0 if both vanish
        if b == -INF and a == -INF:
          continue
        weight, limit = ((a, d.f_prime_at_inf) if b == -INF else (b, d.f_at_zero))
        term = mpmath.exp(mpmath.mpf(float(weight))) * limit if math.isfinite(
            limit) else mpmath.inf
        total += term
        sensitivity += abs(term)
        continue
      a, b = mpmath.mpf(float(a)), mpmath.mpf(float(b))
      t = mpmath.exp(a - b)
      term = mpmath.exp(b) * _mp_f(d, t)
      total += term
      # The rounding of ℓ moves the term by π f'(t)·δℓ; f itself, written in ℓ,
      # is accurate to a few ulps of the parts it adds (which cancel near
      # t = 1: ~(1 + t)(1 + |ℓ|), and 1/|α(α − 1)| for the α-family).
      parts = (mpmath.exp(a) + mpmath.exp(b)) * (1 + abs(a - b)) * (
          1 if d.alpha is None else 1 + 1 / abs(d.alpha * (d.alpha - 1)))
      sensitivity += abs(term) + parts + abs(mpmath.exp(a) * _mp_f_prime(d, t)) * (
          1 + abs(a - b) + abs(a) + abs(b))
  return total, sensitivity


@st.composite
def distribution_pairs(draw):
  k = draw(st.sampled_from(SIZES))
  accurate = draw(st.booleans())   # log-probabilities within the accurate range
  logits = [draw(arrays(k, specials=("-inf",))) for _ in range(2)]
  dtype = draw(st.sampled_from(DTYPES))
  return k, accurate, logits, dtype


def _normalise(logits, floor):
  """log-softmax in float64 (−inf kept); finite values below `floor` become
  −inf (a zero), so that every p > 0 is ≥ e^floor. At least one entry stays."""
  x = np.array(logits)
  if not np.isfinite(x).any():
    x[0] = 0.0
  with np.errstate(invalid="ignore", divide="ignore"):
    x = x - np.logaddexp.reduce(x[np.isfinite(x)])
    x = np.where(x < floor, -INF, x)
    return x - np.logaddexp.reduce(x[np.isfinite(x)])


@fuzz(40)
@hypothesis.given(distribution_pairs())
def test_exact_divergence(case):
  k, accurate, logits, dtype = case
  floor = (-40.0 if dtype == "float32" else -300.0) if accurate else -INF
  log_pi, log_p = (_normalise(x, floor) for x in logits)
  count("exact_divergence", float64=dtype == "float64", accurate=accurate,
        zeros_in_pi=(log_pi == -INF).any(), zeros_in_p=(log_p == -INF).any(),
        single_point=k == 1)
  # Padded to WIDTH points with π = p = 0, which contribute 0 (documented).
  pad = lambda x: np.pad(x, (0, WIDTH - k), constant_values=-INF)
  with in_dtype(dtype):
    log_pi, log_p = cast(pad(log_pi), dtype), cast(pad(log_p), dtype)
    values = jax.device_get(_exact_values(log_pi, log_p))
  log_pi, log_p = np.asarray(log_pi, np.float64), np.asarray(log_p, np.float64)
  pi, p = np.exp(log_pi), np.exp(log_p)
  total_variation = 0.5 * np.abs(pi - p).sum()
  e = eps(dtype)
  for d in ALL:
    value, grad, same = (np.asarray(x, np.float64) for x in values[str(d)])
    name = str(d)
    assert not np.isnan(value), (name, log_pi, log_p)
    assert same == 0.0, (name, same)
    if np.isfinite(value):
      assert not np.isnan(grad).any(), (name, log_pi, log_p, grad)
    if not accurate:
      assert value >= -1e-3, name          # loose: the accurate case is below
      continue
    want, sensitivity = _reference_exact(d, log_pi, log_p)
    documented_inf = bool(
        (np.isinf(d.f_prime_at_inf) and ((log_p == -INF) & (log_pi > -INF)).any())
        or (np.isinf(d.f_at_zero) and ((log_pi == -INF) & (log_p > -INF)).any()))
    assert mpmath.isinf(want) == documented_inf, name
    if documented_inf:
      assert value == INF, name
      continue
    tol = 16 * e * float(sensitivity) + 1e-300
    assert abs(value - float(want)) <= tol, (name, value, float(want), tol)
    assert value >= -tol, name
    if total_variation > 0.05:
      assert value > 0.0, (name, total_variation)


# ========================================================== fdpg_loss.

@jax.jit
def _losses_and_grads(log_model, log_proposal, log_target, log_z, baseline, mask):
  """For every divergence: the loss (default, per-divergence clip), its
  gradient in log π and the aux diagnostics. (The explicit symmetric clip is
  fuzzed in `test_f_f_prime_reward_and_clip`: it keeps R and R² finite.)"""
  out = {}
  for d in ALL:
    def loss_fn(lm):
      return losses.fdpg_loss(d, lm, log_proposal, log_target, log_z, baseline, mask)
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(log_model)
    out[str(d)] = dict(loss=loss, grad=grad, aux=aux)
  return out


# The project's optimiser: skip_if_not_finite ∘ clip ∘ AdamW, as the train step has it.
@functools.cache
def _optimizer():
  from fdiv_jax.train import optimizer as optimizer_lib
  return optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(
      learning_rate=0.1, warmup_steps=0, max_grad_norm=1.0))


@jax.jit
def _optimizer_step(params, grads):
  import optax
  tx = _optimizer()
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state.total_notfinite


def optimizer_step(log_model, grad):
  """One step of the optimiser on θ = log π (padded to WIDTH with zero
  gradients, one compilation per dtype): the new θ and `total_notfinite`."""
  n = log_model.shape[0]
  pad = lambda x: jnp.pad(x, (0, WIDTH - n))
  params, skipped = _optimizer_step({"log_model": pad(log_model)},
                                    {"log_model": pad(grad)})
  return params["log_model"][:n], skipped


@st.composite
def loss_inputs(draw, nan_row: bool = False):
  """Valid f-DPG inputs: log π ≤ 0 (−inf only off-policy: π = 0 where q > 0),
  log q with |log π − log q| ≤ 20 (bounded importance weights), log P and log Ẑ
  in [−1e4, 1e4] or −inf, a finite baseline, any mask."""
  n = draw(st.sampled_from(SIZES))
  dtype = draw(st.sampled_from(DTYPES))
  on_policy = draw(st.booleans())
  log_model = draw(arrays(n, specials=() if on_policy else ("-inf",), sign=-1.0))
  if on_policy:
    log_proposal = log_model.copy()
  else:
    log_w = np.array(draw(st.lists(st.floats(-20.0, 20.0), min_size=n, max_size=n)))
    fallback = draw(arrays(n, specials=(), sign=-1.0))
    log_proposal = np.where(np.isfinite(log_model), log_model - log_w, fallback)
  log_target = draw(arrays(n, specials=("-inf",)))
  per_sample = draw(st.booleans())     # log Ẑ and the baseline: [N] or scalars
  if per_sample:
    log_z = draw(arrays(n, specials=("-inf",)))
    baseline = draw(arrays(n, specials=()))
  else:
    log_z = np.array(draw(st.one_of(st.just(-INF), st.floats(-1e4, 1e4))))
    baseline = np.array(draw(st.floats(-1e4, 1e4)))
  if draw(st.booleans()):   # a baseline as large as the clipped rewards get
    baseline = baseline * 1e14
  mask = draw(masks(n))
  case = dict(n=n, dtype=dtype, on_policy=on_policy, log_model=log_model,
              log_proposal=log_proposal, log_target=log_target, log_z=log_z,
              baseline=baseline, mask=mask)
  if nan_row:
    hypothesis.assume(mask.any())
    row = draw(st.sampled_from(np.flatnonzero(mask).tolist()))
    fields = ["log_model", "log_proposal", "log_target", "baseline"]
    if per_sample or log_target[mask].max() > -INF:
      fields.append("log_z")
    field = draw(st.sampled_from(fields))
    if field == "log_z" and not per_sample:
      case["log_z"] = np.array(math.nan)
    elif field == "log_z":
      # Where log P = −inf, ℓ = +inf whatever log Ẑ is (documented): the NaN
      # goes to a row whose ℓ reads log Ẑ.
      hypothesis.assume(log_target[row] > -INF)
      case["log_z"] = log_z.copy()
      case["log_z"][row] = math.nan
    elif field == "baseline" and not per_sample:
      case["baseline"] = np.array(math.nan)
    else:
      case[field] = case[field].copy()
      case[field][row] = math.nan
      if field == "log_model" and on_policy:
        case["log_proposal"] = case["log_model"]
    case["nan_field"] = field
  for key in ("log_model", "log_proposal", "log_target", "log_z", "baseline"):
    case[key] = pad_rows(case[key])
  case["mask"] = pad_rows(case["mask"], False)
  return case


def _run_losses(case, poison=None):
  dtype = case["dtype"]
  keys = ("log_model", "log_proposal", "log_target", "log_z", "baseline")
  with in_dtype(dtype):
    args = [cast(case[k] if poison is None else poison[k], dtype) for k in keys]
    out = _losses_and_grads(*args, jnp.asarray(case["mask"]))
    return jax.device_get(out), args


def _features(case):
  finite_target = case["log_target"][np.isfinite(case["log_target"])]
  return dict(float64=case["dtype"] == "float64", on_policy=case["on_policy"],
              single_sample=case["n"] == 1,
              mask_all_off=not case["mask"].any(),
              mask_one_on=case["mask"].sum() == 1,
              violated_rows=(case["log_target"] == -INF).any(),
              pi_zero_rows=(case["log_model"] == -INF).any(),
              log_z_minus_inf=np.any(case["log_z"] == -INF),
              huge_ratio=(np.abs(finite_target) > 1e3).any())


@fuzz(40)
@hypothesis.given(loss_inputs())
def test_fdpg_loss_is_finite(case):
  count("fdpg_loss_is_finite", **_features(case))
  out, args = _run_losses(case)
  mask = case["mask"]
  for key, v in out.items():
    loss, grad, aux = v["loss"], np.asarray(v["grad"]), v["aux"]
    assert np.isfinite(loss), (key, case)
    assert np.all(np.isfinite(grad)), (key, grad, case)
    assert np.all(grad[~mask] == 0.0), key
    for name in ("pseudo_reward", "advantage", "importance_weight"):
      assert np.all(np.isfinite(np.asarray(aux[name])[mask])), (key, name)
    # ℓ = +inf wherever log P = −inf, whatever log Ẑ is; w = 1 exactly on-policy.
    ell = np.asarray(aux["log_ratio"])
    assert not np.isnan(ell).any(), key
    assert np.all(ell[case["log_target"] == -INF] == INF), key
    if case["on_policy"]:
      assert np.all(np.asarray(aux["importance_weight"]) == 1.0), key
    assert 0 <= int(aux["num_clipped"]) <= mask.sum(), key
    if not mask.any():
      assert float(loss) == 0.0 and not grad.any(), key
  # The train step's optimiser applies such an update (and counts nothing).
  key = str(ALL[COUNTS["fdpg_loss_is_finite"]["examples"] % len(ALL)])
  with in_dtype(case["dtype"]):
    grad = jnp.asarray(out[key]["grad"])
    params, skipped = optimizer_step(args[0], grad)
  assert int(skipped) == 0
  moved = np.asarray(params) != np.asarray(args[0])
  if np.max(np.abs(np.asarray(grad)), initial=0.0) > 1e-6:   # Adam moves ±0.1
    assert moved.any(), key


@fuzz(40)
@hypothesis.given(loss_inputs(nan_row=True))
def test_nan_input_gives_a_nan_loss_that_is_skipped(case):
  count("nan_input_gives_nan_loss", **{f"nan_in_{case['nan_field']}": True},
        **_features(case))
  out, args = _run_losses(case)
  for key, v in out.items():
    assert np.isnan(v["loss"]), (key, case["nan_field"], v["loss"])
    assert np.isnan(np.asarray(v["grad"])).any(), (key, case["nan_field"])
  # The train step's optimiser skips the update and counts it.
  key = str(ALL[COUNTS["nan_input_gives_nan_loss"]["examples"] % len(ALL)])
  with in_dtype(case["dtype"]):
    params, skipped = optimizer_step(args[0], jnp.asarray(out[key]["grad"]))
  assert int(skipped) == 1
  np.testing.assert_array_equal(np.asarray(params), np.asarray(args[0]))


@fuzz(40)
@hypothesis.given(loss_inputs(), st.data())
def test_masked_rows_change_nothing(case, data):
  mask = case["mask"]
  hypothesis.assume(not mask.all())
  count("masked_rows_change_nothing", **_features(case))
  # Anything at all in the rows off the mask: NaN, ±inf, huge, ordinary.
  poison = {}
  for k in ("log_model", "log_proposal", "log_target", "log_z", "baseline"):
    x = np.array(case[k], np.float64)
    if x.ndim == 0:
      poison[k] = x
      continue
    junk = data.draw(arrays(mask.size, specials=("-inf", "+inf", "nan"),
                            extra=("far",)), label=k)
    poison[k] = np.where(mask, x, junk)
  if case["on_policy"] and data.draw(st.booleans(), label="junk on-policy"):
    poison["log_proposal"] = poison["log_model"]
  clean, _ = _run_losses(case)
  dirty, _ = _run_losses(case, poison)
  for key in clean:
    a, b = clean[key], dirty[key]
    np.testing.assert_array_equal(a["loss"], b["loss"], err_msg=key)
    np.testing.assert_array_equal(a["grad"], b["grad"], err_msg=key)
    assert np.all(np.asarray(b["grad"])[~mask] == 0.0), key
    for name in ("mean_pseudo_reward", "mean_advantage", "mean_importance_weight",
                 "num_clipped"):
      np.testing.assert_array_equal(a["aux"][name], b["aux"][name],
                                    err_msg=f"{key} {name}")


# ============================================ preference losses (f-DPO, f-PO).


@jax.jit
def _fdpo_losses(chosen, rejected, ref_chosen, ref_rejected, pair_mask, beta):
  """For every divergence: f-DPO's loss and its gradients in (log π_θ(y_w),
  log π_θ(y_l))."""
  out = {}
  for d in ALL:
    def fdpo(w, l):
      return losses.fdpo_loss(d, w, l, ref_chosen, ref_rejected, beta=beta,
                              mask=pair_mask)[0]
    out[str(d)] = jax.value_and_grad(fdpo, argnums=(0, 1))(chosen, rejected)
  return out


@jax.jit
def _fpo_losses(model, ref, rewards, response_mask, beta):
  """For every divergence: f-PO's loss, per-prompt losses and gradient in log π_θ."""
  out = {}
  for d in ALL:
    def fpo(m):
      return losses.fpo_loss(d, m, ref, rewards, beta=beta, mask=response_mask)
    (value, aux), grad = jax.value_and_grad(fpo, has_aux=True)(model)
    out[str(d)] = (value, aux["losses"], grad)
  return out


PROMPTS, RESPONSES = 4, 8   # f-PO runs on [4, 8]; its mask makes K and N smaller


@st.composite
def preference_inputs(draw, nan: bool = False):
  """f-DPO pairs: log π_θ and log π_ref in [−1e4, 0] or −inf (not both −inf
  for one response: u = 0/0), so ℓ = log u is anything from −inf to +inf; any
  mask; β in [0.01, 10]. f-PO: K ≤ 8 responses per prompt, log π_θ in [−1e4, 0]
  or −inf (not on every real response of a prompt), log π_ref and the rewards
  finite, any mask."""
  n = draw(st.sampled_from(SIZES))
  dtype = draw(st.sampled_from(DTYPES))
  pair = {k: draw(arrays(n, specials=("-inf",), sign=-1.0))
          for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
  for model, ref in (("chosen", "ref_chosen"), ("rejected", "ref_rejected")):
    both = (pair[model] == -INF) & (pair[ref] == -INF)
    pair[ref] = np.where(both, 0.0, pair[ref])
  pair_mask = draw(masks(n))
  beta = draw(st.floats(0.01, 10.0))
  shape = (PROMPTS, RESPONSES)
  model = draw(arrays(PROMPTS * RESPONSES, specials=("-inf",), sign=-1.0)).reshape(shape)
  ref = draw(arrays(PROMPTS * RESPONSES, specials=(), sign=-1.0)).reshape(shape)
  rewards = draw(arrays(PROMPTS * RESPONSES, specials=())).reshape(shape)
  response_mask = np.stack([draw(masks(RESPONSES)) for _ in range(PROMPTS)])
  # Every prompt with a real response keeps one where π_θ > 0.
  for i in range(PROMPTS):
    real = np.flatnonzero(response_mask[i])
    if real.size and (model[i, real] == -INF).all():
      model[i, real[0]] = 0.0
  case = dict(n=n, dtype=dtype, beta=beta, pair_mask=pair_mask, model=model,
              ref=ref, rewards=rewards, response_mask=response_mask, **pair)
  if nan:
    # A NaN in a real pair and in a real response (one field each).
    hypothesis.assume(pair_mask.any() and response_mask.any())
    field = draw(st.sampled_from(["chosen", "rejected", "ref_chosen",
                                  "ref_rejected"]))
    case[field] = case[field].copy()
    case[field][draw(st.sampled_from(np.flatnonzero(pair_mask).tolist()))] = math.nan
    list_field = draw(st.sampled_from(["model", "ref", "rewards"]))
    rows, cols = np.nonzero(response_mask)
    at = draw(st.integers(0, rows.size - 1))
    case[list_field] = case[list_field].copy()
    case[list_field][rows[at], cols[at]] = math.nan
    case["nan_fields"] = (field, list_field)
  for key in ("chosen", "rejected", "ref_chosen", "ref_rejected"):
    case[key] = pad_rows(case[key], to=WIDTH)
  case["pair_mask"] = pad_rows(case["pair_mask"], False, to=WIDTH)
  return case


def _run_preference(case, poison=None):
  src = case if poison is None else poison
  with in_dtype(case["dtype"]):
    args = [cast(src[k], case["dtype"]) for k in (
        "chosen", "rejected", "ref_chosen", "ref_rejected")]
    lists = [cast(src[k], case["dtype"]) for k in ("model", "ref", "rewards")]
    beta = cast(case["beta"], case["dtype"])
    pairs = _fdpo_losses(*args, jnp.asarray(case["pair_mask"]), beta)
    lists = _fpo_losses(*lists, jnp.asarray(case["response_mask"]), beta)
    out = {str(d): dict(fdpo=pairs[str(d)][0], fdpo_grad=pairs[str(d)][1],
                        fpo=lists[str(d)][0], fpo_losses=lists[str(d)][1],
                        fpo_grad=lists[str(d)][2]) for d in ALL}
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))


def _preference_features(case):
  log_u = np.concatenate([case["chosen"] - case["ref_chosen"],
                          case["rejected"] - case["ref_rejected"]])
  return dict(float64=case["dtype"] == "float64", single_pair=case["n"] == 1,
              pair_mask_all_off=not case["pair_mask"].any(),
              pair_mask_one_on=case["pair_mask"].sum() == 1,
              infinite_log_ratio=np.isinf(log_u).any(),
              huge_log_ratio=(np.abs(log_u[np.isfinite(log_u)]) > 1e3).any(),
              prompt_with_one_response=(case["response_mask"].sum(axis=1) == 1).any(),
              prompt_without_response=(~case["response_mask"].any(axis=1)).any())


@fuzz(40)
@hypothesis.given(preference_inputs())
def test_preference_losses_are_finite(case):
  """f-DPO: loss and gradient finite for every non-NaN input (preference.py:
  "however extreme (|ℓ| = 10⁴ in float32, ±inf)"), 0 with an empty mask.
  f-PO: never NaN, ≥ 0, +inf only for an unbounded f, and a gradient without
  NaN wherever the loss is finite (`exact` is differentiable there)."""
  count("preference_losses_are_finite", **_preference_features(case))
  out = _run_preference(case)
  e = eps(case["dtype"])
  for d in ALL:
    v = out[str(d)]
    name = str(d)
    assert np.isfinite(v["fdpo"]), (name, v["fdpo"])
    assert all_finite(v["fdpo_grad"]), name
    for g in v["fdpo_grad"]:
      assert np.all(g[~case["pair_mask"]] == 0.0), name
    if not case["pair_mask"].any():
      assert v["fdpo"] == 0.0, name
    assert not np.isnan(v["fpo"]) and no_nan(v["fpo_losses"]), (name, v["fpo_losses"])
    assert np.all(v["fpo_losses"] >= -64 * e * (1 + np.abs(v["fpo_losses"]))), name
    if np.isinf(v["fpo"]):
      assert not d.is_bounded, name
    else:
      assert no_nan(v["fpo_grad"]), name
    assert np.all(v["fpo_grad"][~case["response_mask"]] == 0.0), name


@fuzz(40)
@hypothesis.given(preference_inputs(nan=True))
def test_preference_nan_input_gives_a_nan_loss(case):
  count("preference_nan_input", **{f"nan_in_{f}": True for f in case["nan_fields"]},
        **_preference_features(case))
  out = _run_preference(case)
  for d in ALL:
    v = out[str(d)]
    assert np.isnan(v["fdpo"]), str(d)
    if d.name != "tv":   # TV's f-DPO gradient is identically 0 (documented)
      assert any(np.isnan(g).any() for g in v["fdpo_grad"]), str(d)
    assert np.isnan(v["fpo"]), str(d)


@fuzz(40)
@hypothesis.given(preference_inputs(), st.data())
def test_preference_masked_entries_change_nothing(case, data):
  hypothesis.assume(not case["pair_mask"].all() or not case["response_mask"].all())
  count("preference_masked_entries", **_preference_features(case))
  poison = dict(case)
  for k in ("chosen", "rejected", "ref_chosen", "ref_rejected"):
    junk = data.draw(arrays(case["pair_mask"].size, specials=("-inf", "+inf", "nan"),
                            extra=("far",)), label=k)
    poison[k] = np.where(case["pair_mask"], case[k], junk)
  for k in ("model", "ref", "rewards"):
    junk = data.draw(arrays(PROMPTS * RESPONSES, specials=("-inf", "+inf", "nan"),
                            extra=("far",)), label=k).reshape(PROMPTS, RESPONSES)
    poison[k] = np.where(case["response_mask"], case[k], junk)
  clean, dirty = _run_preference(case), _run_preference(case, poison)
  for d in ALL:
    a, b = clean[str(d)], dirty[str(d)]
    for key in ("fdpo", "fpo", "fpo_losses"):
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{d} {key}")
    for ga, gb in zip(a["fdpo_grad"], b["fdpo_grad"]):
      np.testing.assert_array_equal(ga, gb, err_msg=str(d))
    np.testing.assert_array_equal(a["fpo_grad"], b["fpo_grad"], err_msg=str(d))


# ============================================================ estimators.

NUM_CONTEXTS = 3
FEATURES = 2


def _uncertainty_sensitivity(d, log_model, log_target, log_proposal, ids, merged):
  """Mean over the contexts present of mean_i |∂h_i/∂log Ẑ_c|: how much the
  rounding of a re-estimated log Ẑ can move `uncertainty.divergence`."""
  log_z = merged.log_z
  safe = jnp.where(jnp.isfinite(log_z), log_z, 0.0)
  _, tangent = jax.jvp(
      lambda lz: estimators.divergence_terms(d, log_model, log_target, log_proposal,
                                             lz[ids]), (safe,), (jnp.ones_like(safe),))
  counts = jax.ops.segment_sum(jnp.ones(ids.shape), ids, num_segments=NUM_CONTEXTS)
  per = jax.ops.segment_sum(jnp.abs(tangent), ids, num_segments=NUM_CONTEXTS)
  per = per / jnp.maximum(counts, 1.0)
  present = counts > 0
  return jnp.sum(jnp.where(present, per, 0.0)) / jnp.maximum(jnp.sum(present), 1)


@jax.jit
def _estimates(log_model, log_target, log_proposal, log_base, log_z, values, ids,
               mask, prior_target, prior_proposal, prior_ids):
  prior = estimators.update_partition(
      estimators.init_partition(NUM_CONTEXTS, log_model.dtype), prior_target,
      prior_proposal, prior_ids)
  merged = estimators.update_partition(prior, log_target, log_proposal, ids)
  args = (log_model, log_target, log_proposal, log_z)
  out = dict(
      log_partition=estimators.log_partition(log_target, log_proposal, mask),
      log_mean_exp=estimators.log_mean_exp(log_target - log_proposal, mask),
      prior_log_z=prior.log_z, merged_log_z=merged.log_z,
      merged_count=merged.count, relative_variance=merged.relative_variance,
      to_target=estimators.divergences_to_target(*args, mask),
      kl_from_base=estimators.kl_from_base(log_model, log_base, log_proposal, mask),
      moments_pi=estimators.self_normalized_moments(values, log_model - log_proposal,
                                                    mask),
      moments_p=estimators.self_normalized_moments(values[:, 0],
                                                   log_target - log_proposal, mask),
      ess_pi=estimators.effective_sample_size(log_model - log_proposal, mask),
      ess_p=estimators.effective_sample_size(log_target - log_proposal, mask),
      divergence={str(d): estimators.divergence(d, *args, mask) for d in ALL},
      terms={str(d): estimators.divergence_terms(d, *args) for d in ALL})
  return out


@jax.jit
def _with_errors(log_model, log_target, log_proposal, values, ids, prior_target,
                 prior_proposal, prior_ids):
  """`uncertainty`: the costliest to compile, so only on [WIDTH] arrays (N ≥ 2,
  the drawn rows repeated: it takes no mask)."""
  prior = estimators.update_partition(
      estimators.init_partition(NUM_CONTEXTS, log_model.dtype), prior_target,
      prior_proposal, prior_ids)
  merged = estimators.update_partition(prior, log_target, log_proposal, ids)
  out = {"expectation": uncertainty.expectation(
      values, log_target, log_proposal, context_ids=ids, num_contexts=NUM_CONTEXTS)}
  for d in ALL:
    estimate = uncertainty.divergence(d, log_model, log_target, log_proposal,
                                      prior=prior, context_ids=ids)
    out[str(d)] = (estimate.value, estimate.standard_error,
                   _uncertainty_sensitivity(d, log_model, log_target, log_proposal,
                                            ids, merged))
  return out


GRID = 2.0 ** -8   # multiples of 2^-8 below 2^15 are exact in float32 and float64


@st.composite
def estimator_inputs(draw, grid: bool = False):
  """Samples x_i ~ q: log q ≤ 0 finite; log π, log a and log P relative to log q,
  the ratios π/q, a/q, P/q ≤ e^30 (representable importance weights) and down
  to e^-1e4, or 0 (−inf); log Ẑ consistent with the samples (the IS estimate,
  times e^δ, |δ| ≤ 5), −inf exactly when every sample violates the target."""
  n = draw(st.sampled_from(SIZES))
  dtype = draw(st.sampled_from(DTYPES))
  log_proposal = draw(arrays(n, specials=(), sign=-1.0))

  def relative(allow_zero=True):
    ratios = draw(arrays(n, specials=("-inf",) if allow_zero else (), sign=-1.0))
    lift = np.array(draw(st.lists(st.floats(0.0, 30.0), min_size=n, max_size=n)))
    return log_proposal + np.where(np.isfinite(ratios), ratios + lift, ratios)

  log_model, log_base, log_target = relative(), relative(), relative()
  values = draw(arrays(n * FEATURES, specials=())).reshape(n, FEATURES)
  ids = np.array(draw(st.lists(st.integers(0, NUM_CONTEXTS - 1), min_size=n,
                               max_size=n)), np.int32)
  mask = draw(masks(n))
  # A prior running estimate: empty, or from another batch of the same size.
  prior_target = np.where(draw(st.booleans()), -INF, relative())
  prior_ids = np.array(draw(st.lists(st.integers(0, NUM_CONTEXTS - 1), min_size=n,
                                     max_size=n)), np.int32)
  prior_proposal = log_proposal[::-1].copy()
  if grid:
    snap = lambda x: np.where(np.isfinite(x), np.round(x / GRID) * GRID, x)
    log_proposal, log_model, log_base, log_target, prior_target, prior_proposal = (
        snap(x) for x in (log_proposal, log_model, log_base, log_target,
                          prior_target, prior_proposal))
  with np.errstate(divide="ignore"):
    usable = mask & np.isfinite(log_target)
    log_z = (np.logaddexp.reduce((log_target - log_proposal)[usable]) - math.log(
        max(mask.sum(), 1))) if usable.any() else -INF
  if math.isfinite(log_z):
    log_z += draw(st.floats(-5.0, 5.0))
    if grid:
      log_z = round(log_z / GRID) * GRID
  shift = draw(st.floats(-1e4, 1e4))
  if grid:
    shift = round(shift / GRID) * GRID
  case = dict(n=n, dtype=dtype, log_model=log_model, log_target=log_target,
              log_proposal=log_proposal, log_base=log_base, log_z=np.array(log_z),
              values=values, ids=ids, mask=mask, prior_target=prior_target,
              prior_proposal=prior_proposal, prior_ids=prior_ids, shift=shift)
  # To [WIDTH] rows: the same rows again, off the mask.
  for key in ("log_model", "log_target", "log_proposal", "log_base", "values",
              "ids", "prior_target", "prior_proposal", "prior_ids"):
    case[key] = tile_rows(case[key])
  case["mask"] = pad_rows(mask, False, to=WIDTH)
  return case


def _run_estimates(case, shift=0.0):
  dtype = case["dtype"]
  with in_dtype(dtype):
    f = lambda k, c=0.0: cast(case[k] + c, dtype)
    ids, prior_ids = jnp.asarray(case["ids"]), jnp.asarray(case["prior_ids"])
    out = _estimates(f("log_model"), f("log_target", shift), f("log_proposal"),
                     f("log_base"), f("log_z", shift), f("values"), ids,
                     jnp.asarray(case["mask"]), f("prior_target", shift),
                     f("prior_proposal"), prior_ids)
    errors = _with_errors(f("log_model"), f("log_target", shift), f("log_proposal"),
                          f("values"), ids, f("prior_target", shift),
                          f("prior_proposal"), prior_ids)
    out["expectation"] = errors.pop("expectation")
    out["with_error"] = errors
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))


def _estimator_features(case):
  return dict(float64=case["dtype"] == "float64", single_sample=case["n"] == 1,
              mask_all_off=not case["mask"].any(),
              mask_one_on=case["mask"].sum() == 1,
              violated_rows=(case["log_target"] == -INF).any(),
              log_z_minus_inf=case["log_z"] == -INF,
              pi_zero_rows=(case["log_model"] == -INF).any(),
              empty_prior=(case["prior_target"] == -INF).all())


@fuzz(40)
@hypothesis.given(estimator_inputs())
def test_estimators_never_nan_and_stay_in_range(case):
  count("estimators_never_nan", **_estimator_features(case))
  out = _run_estimates(case)
  mask = case["mask"]
  n_on = int(mask.sum())
  target, model = case["log_target"], case["log_model"]
  # No NaN, except the documented NaN of a moment that no sample informs.
  informs_pi = (mask & (model > -INF)).any()
  informs_p = (mask & (target > -INF)).any()
  for key, value in out.items():
    if key in ("moments_pi", "moments_p", "expectation", "with_error", "terms"):
      continue
    assert no_nan(value), (key, value)
  assert np.isnan(out["moments_pi"]).any() == (not informs_pi)
  assert np.isnan(out["moments_p"]).any() == (not informs_p)
  # log Ẑ = −inf exactly when no (unmasked) sample satisfies the target.
  assert (out["log_partition"] == -INF) == (not informs_p), out["log_partition"]
  assert out["log_mean_exp"] == out["log_partition"]
  # ESS in [0, N], ≥ 1 when a weight is positive.
  for key, informs in (("ess_pi", informs_pi), ("ess_p", informs_p)):
    ess = out[key]
    assert 0.0 <= ess <= n_on * (1 + 8 * eps(case["dtype"])), (key, ess, n_on)
    if informs:
      assert ess >= 1.0 - 8 * eps(case["dtype"]), (key, ess)
    else:
      assert ess == 0.0
  # Self-normalised moments inside the range of the values they average.
  for key, informs, cols, weights in (("moments_pi", informs_pi, slice(None), model),
                                      ("moments_p", informs_p, 0, target)):
    if not informs:
      continue
    rows = mask & (weights > -INF)
    # The values as the estimator sees them: in float32 a float64 subnormal
    # (found by the long profile: -1.1e-308) is already 0.
    vals = case["values"][rows][:, cols].astype(case["dtype"])
    span = 8 * eps(case["dtype"]) * np.abs(case["values"]).max() * max(n_on, 1)
    assert np.all(out[key] >= vals.min(axis=0) - span), key
    assert np.all(out[key] <= vals.max(axis=0) + span), key
  # uncertainty.expectation: NaN only for a context no sample informs.
  present = set(case["ids"].tolist())
  informed = set(case["ids"][target > -INF].tolist())
  assert no_nan(out["expectation"]) == (present == informed), out["expectation"]
  # +inf exactly where documented.
  violated_pi = (mask & (target == -INF) & (model > -INF)).any()
  for d in ALL:
    value = out["divergence"][str(d)]
    if math.isinf(d.f_prime_at_inf) and violated_pi:
      assert value == INF, (str(d), value)
    value_and_error = out["with_error"][str(d)][:2]
    assert no_nan(value_and_error), (str(d), value_and_error)
    assert no_nan(out["terms"][str(d)][mask]), str(d)   # log Ẑ fits these rows
  for name in divergences.STANDARD:
    np.testing.assert_array_equal(out["to_target"][name],
                                  out["divergence"][str(divergences.get(name))])
  base_zero = (mask & (case["log_base"] == -INF) & (model > -INF)).any()
  assert (out["kl_from_base"] == INF) == base_zero, out["kl_from_base"]
  assert np.isfinite(out["kl_from_base"]) or base_zero
  # The running estimate: counts add up; −inf only for a context without a
  # satisfying sample.
  np.testing.assert_array_equal(
      out["merged_count"], np.bincount(case["ids"], minlength=NUM_CONTEXTS)
      + np.bincount(case["prior_ids"], minlength=NUM_CONTEXTS))
  satisfied = set(case["ids"][target > -INF]) | set(
      case["prior_ids"][case["prior_target"] > -INF])
  for c in range(NUM_CONTEXTS):
    assert (out["merged_log_z"][c] > -INF) == (c in satisfied), c
  assert np.all(out["relative_variance"] >= 0.0)


@fuzz(40)
@hypothesis.given(estimator_inputs(grid=True))
def test_estimators_are_invariant_to_a_shift_of_log_p(case):
  c = case["shift"]
  count("shift_invariance", large_shift=abs(c) > 1e3,
        **_estimator_features(case))
  a = _run_estimates(case)
  b = _run_estimates(case, shift=c)
  e = eps(case["dtype"])
  # Where log Ẑ is an input: the same numbers, bit for bit (on this grid
  # log P + c − (log Ẑ + c) is exact).
  for group in ("divergence", "terms", "to_target"):
    for key in a[group]:
      np.testing.assert_array_equal(a[group][key], b[group][key],
                                    err_msg=f"{group} {key}")
  for key in ("moments_p",):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_array_equal(a["expectation"], b["expectation"])
  # Where log Ẑ is re-estimated: it shifts by c, up to rounding.
  finite_w = np.abs(np.concatenate([
      (case["log_target"] - case["log_proposal"]),
      (case["prior_target"] - case["prior_proposal"])]))
  scale = 1.0 + abs(c) + np.max(finite_w[np.isfinite(finite_w)], initial=0.0) + 8.0
  tol = 8 * e * scale
  for key in ("log_partition", "log_mean_exp", "prior_log_z", "merged_log_z"):
    x, y = np.asarray(a[key]), np.asarray(b[key])
    assert np.array_equal(x == -INF, y == -INF), key
    fin = np.isfinite(x)
    assert np.all(np.abs(y[fin] - c - x[fin]) <= tol), (key, y - c - x, tol)
  np.testing.assert_allclose(b["ess_p"], a["ess_p"], rtol=16 * e * scale)
  # relative variance: n Σw²/(Σw)² − 1 over n, each log-sum moved by rounding.
  rv_a, rv_b = a["relative_variance"], b["relative_variance"]
  counts = np.maximum(a["merged_count"], 1.0)
  assert np.all(np.abs(rv_b - rv_a) <= (rv_a + 1 / counts) * np.expm1(4 * tol)
                + 1e-300), (rv_a, rv_b)
  # uncertainty.divergence: Ẑ_c re-estimated, so D moves by at most the rounding
  # of log p (≤ 2·tol) times its sensitivity to log Ẑ.
  for key in a["with_error"]:
    (va, sa, sens), (vb, sb, _) = a["with_error"][key], b["with_error"][key]
    assert not np.isnan(sa) and not np.isnan(sb), key
    if not np.isfinite(va) or not np.isfinite(vb):
      assert va == vb, (key, va, vb)
      continue
    allowed = 4 * tol * sens * (1 + 4 * tol) + 16 * e * abs(va) + 1e-300
    assert abs(vb - va) <= allowed, (key, va, vb, allowed)
    # (The standard error is checked for NaN only: its own sensitivity to the
    # rounding of log Ẑ_c is not bounded by that of the value.)


# ============================================================= baselines.


@jax.jit
def _baseline_values(rewards, weights, mask):
  out = {}
  for kind in baselines.KINDS:
    b = baselines.Baseline(kind, window=3)
    state = b.init(rewards.dtype)
    values = []
    for step in range(rewards.shape[0]):
      values.append(b.value(state, rewards[step], weights[step], mask[step]))
      state = b.update(state, rewards[step], weights[step], mask[step])
    out[kind] = (jnp.stack(values), state)
  return out


@st.composite
def baseline_inputs(draw):
  n = draw(st.sampled_from(SIZES))
  dtype = draw(st.sampled_from(DTYPES))
  steps = 4
  rewards = np.stack([draw(arrays(n, specials=())) for _ in range(steps)])
  if draw(st.booleans()):   # as large as a clipped pseudo-reward gets
    rewards = rewards * 1e14
  on_policy = draw(st.booleans())
  if on_policy:
    weights = np.ones((steps, n))
  else:
    weights = np.exp(np.array(draw(st.lists(st.floats(-30.0, 30.0), min_size=steps * n,
                                            max_size=steps * n))).reshape(steps, n))
  mask = np.stack([draw(masks(n)) for _ in range(steps)])
  return dtype, rewards, weights, mask


@fuzz(40)
@hypothesis.given(baseline_inputs())
def test_baselines_are_finite(case):
  dtype, rewards, weights, mask = case
  n = rewards.shape[1]
  count("baselines_are_finite", float64=dtype == "float64", single_sample=n == 1,
        mask_all_off=(~mask).all(axis=1).any(),
        mask_one_on=(mask.sum(axis=1) == 1).any())
  with in_dtype(dtype):
    out = jax.device_get(_baseline_values(cast(rewards, dtype), cast(weights, dtype),
                                          jnp.asarray(mask)))
  for kind, (values, state) in out.items():
    assert all_finite(values) and all_finite(state), kind
  loo = np.asarray(out["leave_one_out"][0], np.float64)
  with in_dtype(dtype):
    rw = np.asarray(cast(rewards, dtype), np.float64) * np.asarray(
        cast(weights, dtype), np.float64)
  for step in range(rewards.shape[0]):
    m = mask[step]
    terms = np.where(m, rw[step], 0.0)
    for i in range(n):
      others = m.sum() - m[i]
      want = (terms.sum() - terms[i]) / others if others else 0.0
      scale = np.abs(terms).sum() / max(others, 1)
      # XLA:CPU flushes subnormal results to zero: a reward·weight below the
      # smallest normal number reads 0 (found: 1.2e-38 · e^-1 in float32),
      # so each of the n terms may be off by up to `tiny`.
      slack = n * float(np.finfo(dtype).tiny)
      assert abs(loo[step, i] - want) <= 64 * eps(dtype) * scale + slack, (
          step, i, loo[step, i], want)
    if m.sum() == 1:          # a single real sample: no other to average
      assert loo[step][m][0] == 0.0
  if n == 1:
    assert np.all(loo == 0.0)


# =========================================== what the fuzzing found (fixed).
# Each case below is a minimal example the properties above found, kept as a
# plain regression test (both dtypes where the failure was dtype-dependent).


def test_regression_pi_zero_off_policy_gives_a_finite_loss():
  """A sample with π(x) = 0 drawn by q (off-policy: w = π/q = 0) made the
  surrogate 0·(−inf) = NaN, so `fdpg_loss` (and the train step's loss) was NaN
  while its gradient was finite and applied. It now contributes 0."""
  for dtype in DTYPES:
    with in_dtype(dtype):
      log_model = cast([-INF, -1.0], dtype)
      log_q, log_p = cast([-1.0, -1.0], dtype), cast([-1.0, -2.0], dtype)
      for d in (ALL[0], ALL[1], ALL[3], ALL[-1]):   # forward/reverse KL, JS, α = 3
        loss, grad = jax.value_and_grad(
            lambda lm: losses.fdpg_loss(d, lm, log_q, log_p, 0.0)[0])(log_model)
        alone = losses.fdpg_loss(d, log_model[1:], log_q[1:], log_p[1:], 0.0)[0]
        assert np.isfinite(float(loss)) and all_finite(grad), (dtype, str(d))
        np.testing.assert_allclose(2 * float(loss), float(alone), rtol=1e-6)
        assert float(losses.surrogate(log_model, jnp.zeros(2), jnp.ones(2))[0]) == 0.0
      # A NaN stays NaN.
      assert np.isnan(float(losses.surrogate(cast([math.nan], dtype), jnp.zeros(1),
                                             jnp.ones(1))[0]))


def test_regression_a_mask_without_samples_is_not_nan():
  """With every row off the mask the estimators divided 0 by 0: log Ẑ, log
  mean exp, the divergences and KL(π‖a) were NaN. Now log Ẑ = −inf (as a
  running estimate reports for a context never seen) and the estimates are
  the empty mean 0 (as `losses.masked_mean`)."""
  x = jnp.array([0.0, 1.0])
  off = jnp.array([False, False])
  assert float(estimators.log_partition(x, x * 0, off)) == -INF
  assert float(estimators.log_mean_exp(x, off)) == -INF
  assert float(estimators.kl_from_base(x, x, x, off)) == 0.0
  for name, value in estimators.divergences_to_target(x, x, x, 0.0, off).items():
    assert float(value) == 0.0, name
  assert float(estimators.effective_sample_size(x, off)) == 0.0
  assert np.isnan(float(estimators.self_normalized_moments(x, x, off)))  # documented


def test_regression_exact_with_an_underflowing_probability():
  """p or π below the float range (0 after underflow; float32 flushes e^-88)
  next to f(0) = inf or f(t)/t = inf made `exact` 0·inf = NaN; it is +inf."""
  with in_dtype("float32"):
    # π = 0 where p = e^-88 > 0 (forward KL's f(0) = inf).
    log_pi = cast([0.0, -INF], "float32")
    log_p = cast([math.log1p(-math.exp(-88.0)), -88.0], "float32")
    assert float(divergences.exact("forward_kl", log_pi, log_p)) == INF
    # π = e^-200 (0 in float32) where p = e^-1e4: Pearson's f(t)/t = inf.
    assert float(divergences.exact(
        "pearson_chi2", cast([0.0, -200.0], "float32"),
        cast([0.0, -1e4], "float32"))) == INF


def test_regression_exact_gradient_where_p_is_zero():
  """Where p = 0 < π the p·f(π/p) branch is not taken, but it was evaluated at
  ℓ = log π, where f overflowed (α = −2 at ℓ = −45.8 in float32): its zero
  cotangent times an infinite derivative made the gradient NaN although the
  value was finite."""
  d = divergences.get("alpha", alpha=-2.0)
  log_pi = jax.nn.log_softmax(jnp.array([0.0] * 6 + [-44.0]))   # ℓ = −45.8 at the end
  log_p = jnp.array([-INF, 0.0] + [-INF] * 5)
  value, grad = jax.value_and_grad(lambda lp: divergences.exact(d, lp, log_p))(log_pi)
  assert np.isfinite(float(value)) and all_finite(grad)


def test_regression_exact_keeps_nan_visible():
  """`exact` read a NaN log π (or log p) as a zero probability (NaN > −inf is
  false), so f-PO with a NaN in a real response gave a finite loss."""
  for d in ALL:
    assert np.isnan(float(divergences.exact(d, jnp.array([math.nan, 0.0]),
                                            jnp.array([0.0, -1.0]))))
    assert np.isnan(float(divergences.exact(d, jnp.array([0.0, -1.0]),
                                            jnp.array([math.nan, 0.0]))))
    loss, _ = losses.fpo_loss(d, jnp.array([[math.nan, 0.0]]), jnp.zeros((1, 2)),
                              jnp.zeros((1, 2)), beta=0.5)
    assert np.isnan(float(loss)), str(d)


def test_regression_estimators_with_weights_beyond_the_float_range():
  """An importance weight π/q or p/q that under- or overflows float32 next to
  f = inf or f = 0 gave NaN terms (0·inf); they are now the limit (+inf where
  π > 0 = p under reverse KL, Pearson χ², α > 1) or the finite value."""
  f32 = lambda *x: cast(x, "float32")
  with in_dtype("float32"):
    for name in ("reverse_kl", "pearson_chi2"):    # π/q = e^-200 > 0, P = 0
      assert float(estimators.divergence(name, f32(-200.0), f32(-INF), f32(0.0),
                                         0.0)) == INF
    # π/q = e^100 (inf in float32), p/q = e^-100, ℓ = 200: (p/q)·(−ℓ).
    value = float(estimators.divergence("forward_kl", f32(0.0), f32(-200.0),
                                        f32(-100.0), 0.0))
    assert value == pytest.approx(-200.0 * math.exp(-100.0), rel=1e-3)
    # π = p with π/q = e^100: f(1) = 0, the term is 0.
    for d in ALL:
      assert float(estimators.divergence(d, f32(0.0), f32(0.0), f32(-100.0),
                                         0.0)) == 0.0, str(d)
    # KL(π‖a): +inf where a = 0 < π, whatever π/q; 0 where π = a.
    assert float(estimators.kl_from_base(f32(-200.0), f32(-INF), f32(0.0))) == INF
    assert float(estimators.kl_from_base(f32(0.0), f32(0.0), f32(-200.0))) == 0.0


def test_regression_uncertainty_standard_errors_are_not_nan():
  """`uncertainty.divergence`: an infinite estimate had a NaN standard error
  (inf − inf in the spread), and a finite one could too, when (γα)² overflowed
  float32 next to a prior of variance 0 (inf·0)."""
  f32 = lambda *x: cast(x, "float32")
  with in_dtype("float32"):
    empty = estimators.init_partition(1)
    # Reverse KL with a violated sample where π > 0: +inf ± inf.
    est = uncertainty.divergence("reverse_kl", f32(0.0), f32(-INF), f32(0.0),
                                 prior=empty)
    assert float(est.value) == INF and float(est.standard_error) == INF
    # A prior of one sample (relative variance 0) with P/q = e^24: the α = 3
    # estimate is ~3e19 and its γ² overflows.
    prior = estimators.update_partition(empty, f32(24.0), f32(0.0))
    est = uncertainty.divergence(divergences.get("alpha", alpha=3.0), f32(0.0),
                                 f32(0.0), f32(0.0), prior=prior)
    assert np.isfinite(float(est.value)) and not np.isnan(float(est.standard_error))
