"""The f-DPG policy-gradient loss, in parts (Go et al., ICML 2023, arXiv 2302.08215).

Gradient identity: for π_θ and a target p = P/Z,

    ∇_θ D_f(π_θ‖p) = E_{x~π_θ}[ f'(t(x)) ∇_θ log π_θ(x) ],   t = π_θ/p.

So minimising D_f is REINFORCE with the pseudo-reward R(x) = −f'(t(x)), held
constant (stop-gradient). With samples from a proposal q (offline / off-policy, as
in DPG: Khalifa et al., ICLR 2021) each term is weighted by w = π(x)/q(x), also held
constant. A baseline b that does not depend on the sample's own score function
leaves the expectation unchanged, since E_π[∇ log π] = 0.

One step, in the order the quantities are computed, x_i ~ q:

    ℓ_i = log π(x_i) − log P(x_i) + log Z     `log_ratio`          log t = log π/p
    R_i = −f'(exp ℓ_i)                        `pseudo_rewards`     (ℓ clipped per f)
    w_i = π(x_i)/q(x_i)                       `importance_weights`
    A_i = R_i − b_i                           (b from `fdiv_jax.core.baselines`)
    s_i = −w_i A_i log π_θ(x_i)               `surrogate`          per example

and the loss is the masked mean of s; its gradient in θ is an unbiased estimate of
+∇D_f(π‖p). `fdpg_loss` composes the parts. Every function takes [N] arrays (one
entry per sample), checks their shapes, and works under `jit`, `vmap` and `grad`
in float32 and float64. This module imports only JAX (and chex for the checks).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fdiv_jax.core import _checks
from fdiv_jax.core import divergences

Array = jax.Array


def default_log_ratio_clip(dtype, d: divergences.Divergence | None = None) -> float:
  """The former one-size clip c = floor(log(max float) / (2·max(2, |α − 1|))).

  22 in float32 and 177 in float64 (less for α-divergences with |α − 1| > 2):
  the largest c for which −f'(e^{±c}) and its square are finite for every
  divergence at once. It is no longer the default of `clip_log_ratio` (each
  divergence now has its own bounds, `log_ratio_bounds`). It is still:

  * the finite stand-in ℓ_v that a violated hard constraint (ℓ = +inf) gets
    under reverse KL, whose f'(∞) = +∞ but f' = ℓ + 1 grows only linearly, so
    no exponential bound exists to use instead (`violated_log_ratio`: R = −23 in
    float32, −178 in float64, as before);
  * a conservative symmetric clip one can pass as `log_ratio_clip=`.
  """
  growth = 2.0
  if d is not None and d.alpha is not None:
    growth = max(growth, abs(d.alpha - 1.0))
  return math.floor(math.log(float(jnp.finfo(dtype).max)) / (2.0 * growth))


def log_ratio_bounds(d: divergences.Divergence | str, dtype) -> tuple[float, float]:
  """(lo, hi): the default clip of ℓ for `d` in `dtype`, one bound per side.

  Each side follows how f' grows there (`Divergence.growth_rate_at_zero`,
  `growth_rate_at_inf`: |f'(e^ℓ)| ≤ c·e^{r|ℓ|}):

  * rate r > 0 (forward KL, Neyman χ², Hellinger, α < 1 below; Pearson χ², α > 1
    above): |ℓ| ≤ floor((log(max float) − 2·log max(1, c)) / (2r)), so that R
    and R² stay finite (the c term lowers it only for Pearson χ², c = 2, and
    0 < α < 1, c = 1/(1 − α)). E.g. forward KL: lo = −44 in float32, −354 in
    float64.
  * rate 0 (f' bounded, or linear in ℓ like reverse KL's ℓ + 1 and JS's
    ½ softplus(−ℓ)): |ℓ| ≤ floor(sqrt(max float) / 4) (4.6e18 in float32,
    3.4e153 in float64), which only keeps R² finite. Log-probabilities of real
    sequences never come near it; on these sides the pseudo-reward is in effect
    not clipped at all.

  Args:
    d: a `divergences.Divergence` or its name.
    dtype: the floating dtype ℓ is computed in.

  Returns:
    (lo, hi), Python floats with lo < 0 < hi.
  """
  d = divergences.get(d)
  largest = float(jnp.finfo(dtype).max)
  linear = float(math.floor(math.sqrt(largest) / 4.0))

  def bound(rate: float, scale: float) -> float:
    if rate <= 0.0:
      return linear
    return float(math.floor((math.log(largest) - 2.0 * math.log(max(1.0, scale)))
                            / (2.0 * rate)))

  return (-bound(d.growth_rate_at_zero, d.growth_scale_at_zero),
          bound(d.growth_rate_at_inf, d.growth_scale_at_inf))


def violated_log_ratio(d: divergences.Divergence | str, dtype) -> float:
  """The ℓ that a violated hard constraint (log P = −inf, ℓ = +inf) is given.

  * f'(∞) finite (forward KL, TV, JS, Neyman χ², Hellinger, α < 1): +inf, kept
    as is, so that the pseudo-reward is the exact limit −f'(∞)
    (`Divergence.pseudo_reward` evaluates it at ℓ = +inf).
  * f'(∞) = +∞ with exponential growth (Pearson χ², α > 1): the upper bound hi
    of `log_ratio_bounds`. A satisfying sample is clipped to ℓ ≤ hi too, so a
    violated sample is never rewarded above a satisfying one.
  * reverse KL (f'(∞) = +∞, f' = ℓ + 1 linear): the finite stand-in
    ℓ_v = `default_log_ratio_clip(dtype, d)`, 22 in float32 and 177 in float64
    (R = −23 and −178). Beware: **a satisfying sample with ℓ > ℓ_v then gets a
    lower pseudo-reward than a violated one** (in float32, R = −51 at ℓ = 50
    against −23). A larger ℓ_v would keep the order for more samples but make
    the penalty of every violated sample as large, which a policy initialised
    at the base model (with many violations) pays on every step.

  Args:
    d: a `divergences.Divergence` or its name.
    dtype: the floating dtype ℓ is computed in.
  """
  d = divergences.get(d)
  if math.isfinite(d.f_prime_at_inf):
    return math.inf
  if d.growth_rate_at_inf > 0.0:
    return log_ratio_bounds(d, dtype)[1]
  return float(default_log_ratio_clip(dtype, d))


def _float_dtype(*arrays) -> Any:
  return jnp.result_type(*[jnp.asarray(a).dtype for a in arrays], jnp.float32)


def log_ratio(log_model: Array, log_target: Array, log_z: Array | float) -> Array:
  """ℓ = log π(x) − log P(x) + log Z, the log of t = π/p; no gradient.

  A violated hard constraint (log P = −inf) is ℓ = +inf whatever log Z is, so a
  context whose Ẑ is still 0 (log Ẑ = −inf: none of its samples satisfied the
  constraint yet) gives +inf rather than NaN (−(−inf) + (−inf)).

  Args:
    log_model: [N] log π(x_i).
    log_target: [N] log P(x_i) (−inf allowed).
    log_z: scalar or [N] (per context) log Ẑ.

  Returns:
    [N] ℓ, a stop-gradient.
  """
  _checks.samples("log_ratio", log_model=log_model, log_target=log_target)
  _checks.scalar_or_samples("log_ratio", log_model, log_z=log_z)
  dtype = _float_dtype(log_model, log_target, log_z)
  log_model = jax.lax.stop_gradient(jnp.asarray(log_model, dtype))
  log_target = jnp.asarray(log_target, dtype)
  log_z = jnp.asarray(log_z, dtype)
  return jax.lax.stop_gradient(jnp.where(
      log_target == -jnp.inf, jnp.inf, log_model - log_target + log_z))


def clip_log_ratio(d: divergences.Divergence | str, log_t: Array, *,
                   log_ratio_clip: float | None = None) -> Array:
  """ℓ made safe for f': every pseudo-reward −f'(e^ℓ) and its square are finite.

  By default (`log_ratio_clip=None`), with (lo, hi) = `log_ratio_bounds(d, dtype)`:

  * finite ℓ is clipped to [lo, hi]. A side is bounded near the float range only
    where f' grows exponentially (e.g. forward KL below ℓ = −44 in float32);
    elsewhere the bound is ~10^18 or more and R keeps its exact value, so
    R = −f'(e^ℓ) stays strictly ordered in ℓ (reverse KL at ℓ = 50 gives −51).
  * ℓ = +inf (a violated hard constraint) becomes `violated_log_ratio(d,
    dtype)`: it stays +inf where f'(∞) is finite (the pseudo-reward is then
    the exact limit −f'(∞)), becomes hi for Pearson χ² and α > 1, and
    becomes 22 (float32) / 177 (float64) for reverse KL, which then rewards a
    violated sample above a satisfying one with ℓ > 22 (see
    `violated_log_ratio`).
  * ℓ = −inf (π = 0) becomes lo; NaN stays NaN.

  An explicit `log_ratio_clip=c > 0` overrides all of this with the symmetric
  clip [−c, c] (ℓ = +inf becomes c, −inf becomes −c), as in earlier versions.

  Args:
    d: a `divergences.Divergence` or its name.
    log_t: ℓ, any shape (typically [N], from `log_ratio`).
    log_ratio_clip: None for the per-divergence default, or c > 0.

  Returns:
    ℓ, clipped, of the shape and floating dtype of `log_t`.
  """
  d = divergences.get(d)
  log_t = jnp.asarray(log_t)
  if not jnp.issubdtype(log_t.dtype, jnp.floating):
    log_t = log_t.astype(jnp.float32)
  if log_ratio_clip is not None:
    return jnp.clip(log_t, -log_ratio_clip, log_ratio_clip)
  lo, hi = log_ratio_bounds(d, log_t.dtype)
  violated = violated_log_ratio(d, log_t.dtype)
  return jnp.where(log_t == jnp.inf, jnp.asarray(violated, log_t.dtype),
                   jnp.clip(log_t, lo, hi))


def is_clipped(log_t: Array, clipped: Array) -> Array:
  """Which samples `clip_log_ratio` changed, violated ones (ℓ = +inf) included.

  A violated sample counts even where its ℓ stays +inf (f'(∞) finite): its
  pseudo-reward is a limit, not a value of f'. NaN never counts.

  Args:
    log_t: ℓ before `clip_log_ratio`.
    clipped: ℓ after it, the same shape.

  Returns:
    bool, the shape of `log_t`.
  """
  log_t = jnp.asarray(log_t)
  return ((clipped != log_t) | (log_t == jnp.inf)) & ~jnp.isnan(log_t)


def pseudo_rewards(d: divergences.Divergence | str, log_model: Array,
                   log_target: Array, log_z: Array | float, *,
                   log_ratio_clip: float | None = None) -> Array:
  """R = −f'(t(x)), t = π/p: the reward whose REINFORCE descends D_f(π‖p).

  ℓ = `log_ratio`(log π, log P, log Z), clipped by `clip_log_ratio`. A
  stop-gradient: R is held constant in the policy gradient.

  Args:
    d: a `divergences.Divergence` or its name (D_f(π‖p), f as in
      `fdiv_jax.core.divergences`).
    log_model: [N] log π(x_i).
    log_target: [N] log P(x_i) (−inf allowed: a violated hard constraint).
    log_z: scalar or [N] (per context) log Ẑ.
    log_ratio_clip: None for the per-divergence bounds of `clip_log_ratio`, or
      c > 0 for the symmetric clip [−c, c].

  Returns:
    [N] pseudo-rewards.
  """
  d = divergences.get(d)
  ell = log_ratio(log_model, log_target, log_z)
  return d.pseudo_reward(clip_log_ratio(d, ell, log_ratio_clip=log_ratio_clip))


def importance_weights(log_model: Array, log_proposal: Array) -> Array:
  """w = π(x)/q(x) for x ~ q (exactly 1 on-policy); a stop-gradient.

  Args:
    log_model: [N] log π(x_i).
    log_proposal: [N] log q(x_i) of the distribution that drew x_i.

  Returns:
    [N] weights.
  """
  _checks.samples("importance_weights", log_model=log_model,
                  log_proposal=log_proposal)
  dtype = _float_dtype(log_model, log_proposal)
  log_w = (jnp.asarray(log_model, dtype) - jnp.asarray(log_proposal, dtype))
  return jnp.exp(jax.lax.stop_gradient(log_w))


def surrogate(log_model: Array, weights: Array, advantages: Array) -> Array:
  """Per-example policy-gradient surrogate s_i = −w_i · A_i · log π_θ(x_i).

  Only `log_model` carries a gradient (w and A are stop-gradients here), so
  ∇_θ mean_i s_i = −mean_i w_i A_i ∇_θ log π_θ(x_i), the f-DPG estimate of
  +∇D_f(π‖p) when A = R − b. Reduce it with `masked_mean`. A sample with
  log π = −inf and w·A = 0 (π = 0 off-policy: w = π/q = 0) gives s = 0, not NaN.

  Args:
    log_model: [N] log π_θ(x_i), differentiable.
    weights: [N] importance weights π/q.
    advantages: [N] R − b.

  Returns:
    [N] per-example surrogate values.
  """
  _checks.samples("surrogate", log_model=log_model, weights=weights,
                  advantages=advantages)
  weights = jax.lax.stop_gradient(weights)
  advantages = jax.lax.stop_gradient(advantages)
  scale = weights * advantages
  # A sample the policy cannot produce (log π = −inf, off-policy only: its
  # weight π/q is 0) contributes 0, not 0·(−inf) = NaN; a NaN stays NaN.
  return jnp.where((scale == 0) & (log_model == -jnp.inf), 0.0,
                   -scale * log_model)


def masked_mean(values: Array, mask: Array | None = None) -> Array:
  """Σ_i m_i v_i / max(Σ_i m_i, 1); entries off the mask never reach the value
  or the gradient (even when they are inf or NaN)."""
  if mask is None:
    return jnp.mean(values)
  _checks.samples("masked_mean", values=values, mask=mask)
  count = jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)
  return jnp.sum(jnp.where(mask, values, 0.0)) / count


def fdpg_loss(d: divergences.Divergence | str,
              log_model: Array,
              log_proposal: Array,
              log_target: Array,
              log_z: Array,
              baseline: Array | float = 0.0,
              mask: Array | None = None,
              log_ratio_clip: float | None = None) -> tuple[Array, dict[str, Any]]:
  """f-DPG surrogate loss; its gradient is an unbiased estimate of +∇D_f(π‖p).

  Samples x_i are drawn from the proposal q (on-policy: q = π, pass
  `log_proposal = log_model`, or its stop-gradient). Only `log_model` carries a
  gradient; the pseudo-reward and the importance weight are stop-gradients:

    ℓ_i = log π(x_i) − log P(x_i) + log Z          (log of t = π/p)
    R_i = −f'(exp ℓ_i)                             (pseudo-reward)
    w_i = π(x_i) / q(x_i)                          (importance weight)
    A_i = R_i − b_i                                (advantage)
    loss = −Σ_i m_i w_i A_i log π(x_i) / Σ_i m_i   (m = mask, 1 if None)

  Minimising the loss lowers D_f(π‖p): with the whole finite support as samples and
  a uniform q, its gradient equals ∇ `divergences.exact` exactly, for any constant
  baseline. The composition of `pseudo_rewards`, `importance_weights`,
  `surrogate` and `masked_mean`.

  Violated hard constraints (log P = −inf, ℓ = +inf) and other extreme ratios: ℓ
  goes through `clip_log_ratio` before f', so every pseudo-reward is finite;
  `aux["num_clipped"]` counts the samples it changed, violated ones included
  (`is_clipped`).

  Args:
    d: a `divergences.Divergence` or its name.
    log_model: [N] log π_θ(x_i), differentiable in θ.
    log_proposal: [N] log q(x_i) of the distribution that drew x_i.
    log_target: [N] log P(x_i) (−inf allowed).
    log_z: scalar or [N] (per context) log Ẑ.
    baseline: scalar or [N] baseline b (see `fdiv_jax.core.baselines`); must not
      depend on x_i's own log π to stay unbiased (leave-one-out is fine).
    mask: optional [N] bool, True for real samples (False: padding, ignored).
    log_ratio_clip: None for the per-divergence bounds of `clip_log_ratio`, or
      c > 0 for the symmetric clip [−c, c].

  Returns:
    (loss, aux): the scalar surrogate and a dict of [N] arrays "log_ratio" (ℓ,
    unclipped), "pseudo_reward", "importance_weight", "advantage", scalars
    "mean_pseudo_reward", "mean_advantage", "mean_importance_weight",
    "num_clipped" (samples whose ℓ `clip_log_ratio` changed, violated ones
    included).
  """
  d = divergences.get(d)
  _checks.samples("fdpg_loss", log_model=log_model, log_proposal=log_proposal,
                  log_target=log_target, mask=mask)
  _checks.scalar_or_samples("fdpg_loss", log_model, log_z=log_z,
                            baseline=baseline)
  dtype = _float_dtype(log_model)
  log_model = jnp.asarray(log_model).astype(dtype)
  ell = log_ratio(log_model, jnp.asarray(log_target, dtype), jnp.asarray(log_z, dtype))
  clipped = clip_log_ratio(d, ell, log_ratio_clip=log_ratio_clip)
  rewards = d.pseudo_reward(clipped)
  weights = importance_weights(log_model, jnp.asarray(log_proposal, dtype))
  advantages = jax.lax.stop_gradient(rewards - baseline)
  m = jnp.ones(log_model.shape, bool) if mask is None else jnp.asarray(mask) != 0
  # Rows off the mask get w·A = 0 *before* the product with log π, so that an
  # inf or NaN weight, reward or log π there reaches neither value nor gradient.
  loss = masked_mean(surrogate(log_model, jnp.where(m, weights, 0.0),
                               jnp.where(m, advantages, 0.0)), m)
  aux = {
      "log_ratio": ell,
      "pseudo_reward": rewards,
      "importance_weight": weights,
      "advantage": advantages,
      "mean_pseudo_reward": masked_mean(rewards, m),
      "mean_advantage": masked_mean(advantages, m),
      "mean_importance_weight": masked_mean(weights, m),
      "num_clipped": jnp.sum(m & is_clipped(ell, clipped)),
  }
  return loss, aux


# The offline preference losses (f-DPO, f-PO) live in `preference`, which uses
# `log_ratio_bounds` and `masked_mean` above; imported last for that reason.
from fdiv_jax.core.preference import (  # pylint: disable=wrong-import-position  # noqa: E402
    fdpo_loss, fdpo_losses, fpo_loss, fpo_losses)
