"""f-divergences D_f(π‖p) written in the log density ratio ℓ = log t = log π − log p.

For a convex f with f(1) = 0,

    D_f(π‖p) = E_{x~p}[ f(π(x)/p(x)) ] = Σ_x p(x) f(t(x)),   t = π/p = exp(ℓ).

Every function here takes ℓ (not t) so that ratios far outside the float range
stay exact: each f and f' is written with `expm1`, `softplus`, `sinh` so that it is
accurate for |ℓ| ≤ 700 in float64 and |ℓ| ≤ 80 in float32 (values that truly
overflow come out as ±inf, never NaN). ℓ = ±inf (π = 0 or p = 0) gives the limit.

| name           | D_f(π‖p)             | f(t)                                   | f'(t)                  |
|----------------|----------------------|----------------------------------------|------------------------|
| `forward_kl`   | KL(p‖π)              | −log t                                 | −1/t                   |
| `reverse_kl`   | KL(π‖p)              | t log t                                | log t + 1              |
| `tv`           | ½ Σ|π − p|           | ½|t − 1|                               | ½ sign(t − 1)          |
| `js`           | ½KL(π‖m) + ½KL(p‖m)  | ½[t log t − (t+1) log((t+1)/2)]        | ½ log(2t/(1+t))        |
| `pearson_chi2` | Σ (π − p)²/p         | (t − 1)²                               | 2(t − 1)               |
| `neyman_chi2`  | Σ (p − π)²/π         | (t − 1)²/t                             | 1 − t⁻²                |
| `hellinger`    | Σ (√π − √p)²         | (√t − 1)²                              | 1 − t^(−1/2)           |
| `alpha`        | Amari α (α ∉ {0, 1}) | (t^α − αt − (1−α))/(α(α−1))            | (t^(α−1) − 1)/(α−1)    |

m = (π + p)/2; JS is the standard one, bounded by log 2.

How fast |f'(e^ℓ)| grows on each side (`Divergence.growth_rate_at_zero`,
`growth_rate_at_inf`, with |f'| ≤ c·e^{r|ℓ|}, c = `growth_scale_at_*`; rate 0:
f' bounded or at most linear in ℓ): forward KL (1, 0), reverse KL (0, 0), TV
(0, 0), JS (0, 0), Pearson χ² (0, 1), Neyman χ² (2, 0), Hellinger (½, 0), α < 1
(1 − α, 0), α > 1 (0, α − 1). The pseudo-reward clip of `fdiv_jax.core.losses`
follows these rates. The f-DPG pseudo-reward is
R(x) = −f'(t(x)) (Go et al., "Aligning Language Models with Preferences through
f-divergence Minimization", ICML 2023, arXiv 2302.08215).

This module imports only JAX (and chex, for the shape check of `exact`).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from fdiv_jax.core import _checks

Array = jax.Array
_LOG2 = math.log(2.0)
_INF = math.inf


class _Spec(NamedTuple):
  """Formulas of one divergence, in ℓ = log t, with the limits at t = 0 and t = ∞."""
  f: Callable[[Array, float | None], Array]        # f(t) for finite ℓ
  f_prime: Callable[[Array, float | None], Array]  # f'(t) for finite ℓ
  f_at_zero: Callable[[float | None], float]       # lim_{t→0} f(t)
  f_at_inf: Callable[[float | None], float]        # lim_{t→∞} f(t)
  f_prime_at_zero: Callable[[float | None], float]  # lim_{t→0} f'(t)
  f_prime_at_inf: Callable[[float | None], float]   # lim_{t→∞} f'(t) = lim f(t)/t
  # How |f'(e^ℓ)| grows as ℓ → −∞ (t → 0) and as ℓ → +∞: (rate r, scale c) with
  # |f'(e^ℓ)| ≤ c·e^{r|ℓ|} on that side of ℓ = 0 and |f'| ~ c·e^{r|ℓ|} in the
  # limit; (0, 0) where f' stays bounded or grows at most linearly in ℓ.
  growth_at_zero: Callable[[float | None], tuple[float, float]]
  growth_at_inf: Callable[[float | None], tuple[float, float]]


def _const(value: float) -> Callable[[float | None], float]:
  return lambda alpha: value


def _js_f(l, _):
  # ½[t log(2t/(1+t)) + log(2/(1+t))], with log(2t/(1+t)) = log 2 − softplus(−ℓ)
  # and log(2/(1+t)) = log 2 − softplus(ℓ).
  return 0.5 * (jnp.exp(l) * (_LOG2 - jax.nn.softplus(-l))
                + (_LOG2 - jax.nn.softplus(l)))


def _scaled_expm1(x, scale):
  """expm1(x)/scale without overflowing first when |scale| > 1.

  For |x| ≥ 1 it is sign(scale)·exp(x − log|scale|) − 1/scale, which has no
  cancellation there; below, expm1(x)/scale is exact.
  """
  small = jnp.abs(x) < 1.0
  direct = jnp.expm1(jnp.where(small, x, 0.0)) / scale
  shifted = (math.copysign(1.0, scale) * jnp.exp(jnp.where(small, 0.0, x)
                                                 - math.log(abs(scale))) - 1.0 / scale)
  return jnp.where(small, direct, shifted)


def _alpha_f(l, alpha):
  # (t^α − αt − (1 − α))/(α(α−1)) = expm1(αℓ)/(α(α−1)) − expm1(ℓ)/(α−1).
  value = (_scaled_expm1(alpha * l, alpha * (alpha - 1.0))
           - _scaled_expm1(l, alpha - 1.0))
  # Both terms overflow (inf − inf) only where f itself is beyond the float
  # range, and f ≥ 0: the value is +inf.
  return jnp.where(jnp.isnan(value) & ~jnp.isnan(l), jnp.inf, value)


def _alpha_f_over_t(l, alpha):
  # f(t)/t = [expm1((α−1)ℓ) + (α−1)·expm1(−ℓ)]/(α(α−1)).
  value = (_scaled_expm1((alpha - 1.0) * l, alpha * (alpha - 1.0))
           + jnp.expm1(-l) / alpha)
  return jnp.where(jnp.isnan(value) & ~jnp.isnan(l), jnp.inf, value)


def _alpha_f_at_zero(alpha):
  return 1.0 / alpha if alpha > 0 else _INF


def _alpha_f_prime_at_zero(alpha):
  return -1.0 / (alpha - 1.0) if alpha > 1 else -_INF


def _alpha_f_prime_at_inf(alpha):
  return _INF if alpha > 1 else 1.0 / (1.0 - alpha)


_NO_GROWTH = (0.0, 0.0)


def _const_growth(rate: float, scale: float):
  return lambda alpha: (rate, scale)


_NONE = _const_growth(*_NO_GROWTH)  # f' bounded, or at most linear in ℓ


def _alpha_growth_at_zero(alpha):
  # f' = (e^{(α−1)ℓ} − 1)/(α−1): |f'| ≤ e^{(1−α)|ℓ|}/(1−α) for ℓ ≤ 0 when α < 1.
  return (1.0 - alpha, 1.0 / (1.0 - alpha)) if alpha < 1 else _NO_GROWTH


def _alpha_growth_at_inf(alpha):
  # |f'| ≤ e^{(α−1)ℓ}/(α−1) for ℓ ≥ 0 when α > 1.
  return (alpha - 1.0, 1.0 / (alpha - 1.0)) if alpha > 1 else _NO_GROWTH


_SPECS: dict[str, _Spec] = {
    "forward_kl": _Spec(
        f=lambda l, _: -l,
        f_prime=lambda l, _: -jnp.exp(-l),
        f_at_zero=_const(_INF), f_at_inf=_const(-_INF),
        f_prime_at_zero=_const(-_INF), f_prime_at_inf=_const(0.0),
        growth_at_zero=_const_growth(1.0, 1.0), growth_at_inf=_NONE),
    "reverse_kl": _Spec(
        f=lambda l, _: jnp.exp(l) * l,
        f_prime=lambda l, _: l + 1.0,
        f_at_zero=_const(0.0), f_at_inf=_const(_INF),
        f_prime_at_zero=_const(-_INF), f_prime_at_inf=_const(_INF),
        growth_at_zero=_NONE, growth_at_inf=_NONE),
    "tv": _Spec(
        f=lambda l, _: 0.5 * jnp.abs(jnp.expm1(l)),
        f_prime=lambda l, _: 0.5 * jnp.sign(l),
        f_at_zero=_const(0.5), f_at_inf=_const(_INF),
        f_prime_at_zero=_const(-0.5), f_prime_at_inf=_const(0.5),
        growth_at_zero=_NONE, growth_at_inf=_NONE),
    "js": _Spec(
        f=_js_f,
        f_prime=lambda l, _: 0.5 * (_LOG2 - jax.nn.softplus(-l)),
        f_at_zero=_const(0.5 * _LOG2), f_at_inf=_const(_INF),
        f_prime_at_zero=_const(-_INF), f_prime_at_inf=_const(0.5 * _LOG2),
        growth_at_zero=_NONE, growth_at_inf=_NONE),
    "pearson_chi2": _Spec(
        f=lambda l, _: jnp.square(jnp.expm1(l)),
        f_prime=lambda l, _: 2.0 * jnp.expm1(l),
        f_at_zero=_const(1.0), f_at_inf=_const(_INF),
        f_prime_at_zero=_const(-2.0), f_prime_at_inf=_const(_INF),
        growth_at_zero=_NONE, growth_at_inf=_const_growth(1.0, 2.0)),
    "neyman_chi2": _Spec(
        # (t − 1)²/t = t − 2 + 1/t = 4 sinh²(ℓ/2).
        f=lambda l, _: 4.0 * jnp.square(jnp.sinh(0.5 * l)),
        f_prime=lambda l, _: -jnp.expm1(-2.0 * l),
        f_at_zero=_const(_INF), f_at_inf=_const(_INF),
        f_prime_at_zero=_const(-_INF), f_prime_at_inf=_const(1.0),
        growth_at_zero=_const_growth(2.0, 1.0), growth_at_inf=_NONE),
    "hellinger": _Spec(
        f=lambda l, _: jnp.square(jnp.expm1(0.5 * l)),
        f_prime=lambda l, _: -jnp.expm1(-0.5 * l),
        f_at_zero=_const(1.0), f_at_inf=_const(_INF),
        f_prime_at_zero=_const(-_INF), f_prime_at_inf=_const(1.0),
        growth_at_zero=_const_growth(0.5, 1.0), growth_at_inf=_NONE),
    "alpha": _Spec(
        f=_alpha_f,
        f_prime=lambda l, alpha: _scaled_expm1((alpha - 1.0) * l, alpha - 1.0),
        f_at_zero=_alpha_f_at_zero, f_at_inf=_const(_INF),
        f_prime_at_zero=_alpha_f_prime_at_zero,
        f_prime_at_inf=_alpha_f_prime_at_inf,
        growth_at_zero=_alpha_growth_at_zero, growth_at_inf=_alpha_growth_at_inf),
}

# f(t)/t in ℓ, for t > 1: the form to use where π ≫ p, since there p·f(t) =
# π·f(t)/t and f(t) alone overflows long before f(t)/t does (e.g. JS at ℓ = 100
# in float32: f(t) = inf but f(t)/t ≈ ½ log 2).
_F_OVER_T = {
    "forward_kl": lambda l, _: -l * jnp.exp(-l),
    "reverse_kl": lambda l, _: l,
    "tv": lambda l, _: 0.5 * jnp.abs(jnp.expm1(-l)),
    "js": lambda l, _: 0.5 * ((_LOG2 - jax.nn.softplus(-l))
                              + jnp.exp(-l) * (_LOG2 - jax.nn.softplus(l))),
    "pearson_chi2": lambda l, _: 4.0 * jnp.square(jnp.sinh(0.5 * l)),
    "neyman_chi2": lambda l, _: jnp.square(jnp.expm1(-l)),
    "hellinger": lambda l, _: jnp.square(jnp.expm1(-0.5 * l)),
    "alpha": _alpha_f_over_t,
}

NAMES: tuple[str, ...] = tuple(_SPECS)
# The four divergences to the target that the literature reports for every run
# (KL(p‖π), KL(π‖p), TV, JS), whatever f is trained.
STANDARD: tuple[str, ...] = ("forward_kl", "reverse_kl", "tv", "js")

# The one alias table (alias -> canonical name in `NAMES`): `get`, the CLI and
# the reports all read this one. Read-only.
ALIASES: Mapping[str, str] = types.MappingProxyType({
    "kl": "forward_kl", "rkl": "reverse_kl", "jensen_shannon": "js",
    "total_variation": "tv"})


def accepted_names() -> tuple[str, ...]:
  """Every name `get` accepts: the canonical `NAMES`, then the `ALIASES`."""
  return NAMES + tuple(ALIASES)


def _with_limits(formula, at_neg_inf: float, at_pos_inf: float, log_t: Array,
                 alpha: float | None) -> Array:
  """Evaluates `formula` at finite ℓ and the given limits at ℓ = ±inf.

  The double `where` keeps gradients finite: the formula never sees an infinite
  argument, so no NaN leaks into the cotangent of the branch that is not taken.
  """
  log_t = jnp.asarray(log_t)
  if not jnp.issubdtype(log_t.dtype, jnp.floating):
    log_t = log_t.astype(jnp.float32)
  infinite = jnp.isinf(log_t)
  # NaN in ℓ stays NaN (garbage in, visible garbage out).
  safe = jnp.where(infinite, jnp.zeros_like(log_t), log_t)
  value = formula(safe, alpha)
  limit = jnp.where(log_t > 0, jnp.asarray(at_pos_inf, log_t.dtype),
                    jnp.asarray(at_neg_inf, log_t.dtype))
  return jnp.where(infinite, limit, value)


def _exp_times(log_scale: Array, value: Array) -> Array:
  """exp(log_scale)·value, never the NaN of 0·inf.

  Where exp(log_scale) underflows to 0 while `value` is ±inf, or overflows
  while `value` is 0 (or the product alone leaves the float range), the
  product is formed in log space instead, sign(value)·exp(log_scale +
  log|value|): a positive weight times +inf is +inf, any finite weight times 0
  is 0. Elsewhere it is the plain product, rounded as before. NaN in either
  stays NaN; log_scale = −inf (a weight that is exactly 0) is left to the
  caller. Both branches see only safe arguments, so gradients stay finite
  wherever the plain product is used.
  """
  probe = jax.lax.stop_gradient(jnp.exp(log_scale) * value)
  redo = (~jnp.isfinite(probe) & jnp.isfinite(jax.lax.stop_gradient(log_scale))
          & ~jnp.isnan(jax.lax.stop_gradient(value)))
  direct = jnp.exp(jnp.where(redo, 0.0, log_scale)) * jnp.where(redo, 0.0, value)
  safe_value = jnp.where(redo, value, 1.0)
  in_logs = jnp.sign(safe_value) * jnp.exp(jnp.where(redo, log_scale, 0.0)
                                           + jnp.log(jnp.abs(safe_value)))
  return jnp.where(redo, in_logs, direct)


@dataclasses.dataclass(frozen=True)
class Divergence:
  """An f-divergence, a small immutable (hashable, jit-static) record.

  Attributes:
    name: one of `NAMES` ("forward_kl", "reverse_kl", "tv", "js", "pearson_chi2",
      "neyman_chi2", "hellinger", "alpha").
    alpha: the parameter of the Amari α-divergence (only for name == "alpha").

  All methods are elementwise in ℓ = log t = log π(x) − log p(x) (any shape, any
  float dtype) and work under `jit`, `vmap` and `grad`.
  """
  name: str
  alpha: float | None = None

  @property
  def _spec(self) -> _Spec:
    return _SPECS[self.name]

  def f(self, log_t: Array) -> Array:
    """f(t) at t = exp(log_t); the limits f(0), f(∞) at log_t = ∓inf."""
    s = self._spec
    return _with_limits(s.f, s.f_at_zero(self.alpha), s.f_at_inf(self.alpha),
                        log_t, self.alpha)

  def f_prime(self, log_t: Array) -> Array:
    """f'(t) at t = exp(log_t); the limits f'(0), f'(∞) at log_t = ∓inf."""
    s = self._spec
    return _with_limits(s.f_prime, s.f_prime_at_zero(self.alpha),
                        s.f_prime_at_inf(self.alpha), log_t, self.alpha)

  def f_over_t(self, log_t: Array) -> Array:
    """f(t)/t at t = exp(log_t), stable for large t (where p·f(π/p) = π·f(t)/t).

    The limit f'(∞) at log_t = +inf; ±inf at log_t = −inf (−inf for reverse
    KL, whose f(0) = 0, else +inf).
    """
    at_neg_inf = -_INF if self.name == "reverse_kl" else _INF
    return _with_limits(_F_OVER_T[self.name], at_neg_inf, self.f_prime_at_inf,
                        log_t, self.alpha)

  def pseudo_reward(self, log_t: Array) -> Array:
    """The f-DPG pseudo-reward R = −f'(t): REINFORCE on R descends D_f(π‖p)."""
    return -self.f_prime(log_t)

  @property
  def f_at_zero(self) -> float:
    """f(0) = lim_{t→0} f(t): the contribution p·f(0) of a point where π = 0."""
    return self._spec.f_at_zero(self.alpha)

  @property
  def f_prime_at_inf(self) -> float:
    """lim_{t→∞} f(t)/t = f'(∞): a point with p = 0 contributes π·f'(∞)."""
    return self._spec.f_prime_at_inf(self.alpha)

  @property
  def growth_rate_at_zero(self) -> float:
    """The rate r ≥ 0 at which |f'(t)| grows as t → 0 (ℓ → −∞): e^{r|ℓ|}.

    0 where f' stays bounded or grows at most linearly in ℓ there. Forward KL 1,
    Neyman χ² 2, Hellinger ½, α < 1: 1 − α; 0 for the others. The pseudo-reward
    clip (`fdiv_jax.core.losses.log_ratio_bounds`) bounds ℓ from below by it.
    """
    return self._spec.growth_at_zero(self.alpha)[0]

  @property
  def growth_rate_at_inf(self) -> float:
    """The rate r ≥ 0 at which |f'(t)| grows as t → ∞ (ℓ → +∞): e^{rℓ}.

    0 where f' stays bounded or grows at most linearly in ℓ there (reverse KL's
    f' = ℓ + 1). Pearson χ² 1, α > 1: α − 1; 0 for the others.
    """
    return self._spec.growth_at_inf(self.alpha)[0]

  @property
  def growth_scale_at_zero(self) -> float:
    """The c with |f'(e^ℓ)| ≤ c·e^{r|ℓ|} for every ℓ ≤ 0, r = `growth_rate_at_zero`
    (and |f'| ~ c·e^{r|ℓ|} as ℓ → −∞); 0 where that rate is 0."""
    return self._spec.growth_at_zero(self.alpha)[1]

  @property
  def growth_scale_at_inf(self) -> float:
    """The c with |f'(e^ℓ)| ≤ c·e^{rℓ} for every ℓ ≥ 0, r = `growth_rate_at_inf`
    (Pearson χ²: 2, α > 1: 1/(α − 1)); 0 where that rate is 0."""
    return self._spec.growth_at_inf(self.alpha)[1]

  @property
  def is_bounded(self) -> bool:
    """True when D_f(π‖p) is finite for every pair π, p (f(0), f'(∞) finite)."""
    return math.isfinite(self.f_at_zero) and math.isfinite(self.f_prime_at_inf)

  @property
  def metric_name(self) -> str:
    """The key its estimate is reported under: `name`, or e.g. "alpha_0.5"."""
    return self.name if self.alpha is None else f"alpha_{self.alpha:g}"

  def __str__(self) -> str:
    return self.name if self.alpha is None else f"alpha({self.alpha:g})"


def get(name: str | Divergence, **params) -> Divergence:
  """Returns the divergence called `name`.

  Args:
    name: one of `accepted_names()`: "forward_kl" (alias "kl"), "reverse_kl"
      ("rkl"), "js" ("jensen_shannon"), "tv" ("total_variation"),
      "pearson_chi2", "neyman_chi2", "hellinger", or "alpha"; or a `Divergence`,
      returned as is.
    **params: `alpha=<float>` for "alpha" (any real except 0 and 1, which are the
      forward and reverse KL limits); nothing for the others.

  Raises:
    ValueError: unknown name (the message lists every valid name and alias); a
      missing or invalid alpha (the message starts with "alpha: "); or an
      unexpected parameter (it starts with "Divergence '<name>'").
  """
  if isinstance(name, Divergence):
    return name
  key = ALIASES.get(name, name)
  if key not in _SPECS:
    valid = ", ".join(list(NAMES) + [f"{a} (= {k})" for a, k in ALIASES.items()])
    raise ValueError(f"Unknown divergence {name!r}; valid names: {valid}.")
  if key != "alpha":
    if params:
      raise ValueError(f"Divergence {key!r} takes no parameters, got {sorted(params)}.")
    return Divergence(key)
  unknown = set(params) - {"alpha"}
  if unknown:
    raise ValueError(f"Divergence 'alpha' takes only 'alpha', got {sorted(unknown)}.")
  if "alpha" not in params or params["alpha"] is None:
    raise ValueError("alpha: divergence 'alpha' needs a parameter alpha=<float>, "
                     "any real number except 0 and 1.")
  try:
    alpha = float(params["alpha"])
  except (TypeError, ValueError):
    alpha = math.nan
  if not math.isfinite(alpha) or alpha in (0.0, 1.0):
    raise ValueError(f"alpha: must be a finite real number other than 0 and 1, "
                     f"got {params['alpha']!r}; alpha -> 0 is 'forward_kl' and "
                     f"alpha -> 1 is 'reverse_kl'.")
  return Divergence("alpha", alpha)


def exact(d: Divergence | str, log_pi: Array, log_p: Array) -> Array:
  """Exact D_f(π‖p) = Σ_x p(x) f(π(x)/p(x)) over a finite support.

  Points where p = 0 contribute the limit π·f'(∞) (+inf for reverse KL, Pearson χ²
  and α > 1 when π > 0 there); points where π = 0 contribute p·f(0); points where
  both vanish contribute 0. Differentiable in `log_pi` wherever the value is finite.
  Never NaN for non-NaN input: a p (or π) that underflows to 0 next to an
  infinite f(π/p) (or f(t)/t) gives +inf, not 0·inf. A NaN entry gives NaN.

  Args:
    d: a `Divergence` or its name.
    log_pi: [..., K] normalised log-probabilities of π (−inf allowed).
    log_p: [..., K] normalised log-probabilities of p, the same shape as
      `log_pi` (no broadcasting: a [K] against a [K, 1] is an error).

  Returns:
    [...]: the divergence, summed over the last axis.

  Raises:
    AssertionError: `log_pi` has no axis, or `log_p` is not of its shape.
  """
  d = get(d) if isinstance(d, str) else d
  _checks.rank_at_least("exact", 1, log_pi=log_pi)
  _checks.same_shape("exact", log_pi=log_pi, log_p=log_p)
  log_pi, log_p = jnp.asarray(log_pi), jnp.asarray(log_p)
  dtype = jnp.result_type(log_pi.dtype, log_p.dtype, jnp.float32)
  log_pi, log_p = log_pi.astype(dtype), log_p.astype(dtype)
  p_pos = log_p > -jnp.inf
  pi_pos = log_pi > -jnp.inf
  safe_log_p = jnp.where(p_pos, log_p, 0.0)
  safe_log_pi = jnp.where(pi_pos, log_pi, 0.0)
  # p > 0: p·f(t), with t = 0 (π = 0) handled by f's own limit. Where p = 0
  # that branch is not taken: ℓ = 0 there keeps f finite, so that its
  # gradient cannot turn the zero cotangent into 0·inf = NaN.
  log_t = jnp.where(p_pos, jnp.where(pi_pos, safe_log_pi, -jnp.inf) - safe_log_p,
                    0.0)
  # p·f(t), written π·f(t)/t where t > 1 so that a huge ratio cannot overflow;
  # a p (or π) that underflows to 0 next to f = inf is not NaN (`_exp_times`).
  above = log_t > 0
  on_support = jnp.where(
      above, _exp_times(safe_log_pi, d.f_over_t(jnp.where(above, log_t, 1.0))),
      _exp_times(safe_log_p, d.f(jnp.where(above, 0.0, log_t))))
  # p = 0 < π: π·f'(∞). Where f'(∞) = inf, write the inf only where π > 0.
  slope = d.f_prime_at_inf
  if math.isfinite(slope):
    off_support = jnp.exp(safe_log_pi) * slope
  else:
    off_support = jnp.full_like(log_pi, slope)
  off_support = jnp.where(pi_pos, off_support, 0.0)
  terms = jnp.where(p_pos, on_support, off_support)
  # NaN in, NaN out: the tests `> -inf` above would read a NaN as a zero.
  terms = jnp.where(jnp.isnan(log_pi) | jnp.isnan(log_p), jnp.nan, terms)
  return jnp.sum(terms, axis=-1)
