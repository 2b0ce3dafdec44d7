"""The f-DPG policy-gradient loss (Go et al., ICML 2023, arXiv 2302.08215).

Gradient identity: for π_θ and a target p = P/Z,

    ∇_θ D_f(π_θ‖p) = E_{x~π_θ}[ f'(t(x)) ∇_θ log π_θ(x) ],   t = π_θ/p.

So minimising D_f is REINFORCE with the pseudo-reward R(x) = −f'(t(x)), held
constant (stop-gradient). With samples from a proposal q (offline / off-policy, as
in DPG: Khalifa et al., ICLR 2021) each term is weighted by w = π(x)/q(x), also held
constant. A baseline b that does not depend on the sample's own score function
leaves the expectation unchanged, since E_π[∇ log π] = 0.

The surrogate whose gradient is the estimate:

    L(θ) = −(1/N) Σ_i w_i (R_i − b_i) log π_θ(x_i),   x_i ~ q.

This module imports only JAX.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fdiv_jax.core import divergences

Array = jax.Array


def default_log_ratio_clip(dtype, d: divergences.Divergence | None = None) -> float:
  """The default bound on |ℓ| used for pseudo-rewards: every f' stays finite.

  f'(t) of the named divergences grows at most like e^{2|ℓ|} (Neyman χ² as
  t → 0), and that of α-divergences like e^{|α−1||ℓ|}; the bound
  log(max float) / (2·max(2, |α−1|)) keeps the pseudo-rewards and their squares
  finite: 22 in float32 and 177 in float64 for all but α-divergences with
  |α − 1| > 2.
  """
  growth = 2.0
  if d is not None and d.alpha is not None:
    growth = max(growth, abs(d.alpha - 1.0))
  return math.floor(math.log(float(jnp.finfo(dtype).max)) / (2.0 * growth))


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
  baseline.

  Violated hard constraints (log P = −inf, ℓ = +inf) and other extreme ratios: ℓ
  is clipped to [−c, c] before f' (c = `log_ratio_clip`, by default
  `default_log_ratio_clip(dtype, d)`: 22 in float32, 177 in float64), so the update
  is always finite. Where f'(∞) is finite (forward KL, TV, JS, Neyman χ²,
  Hellinger, α < 1) a violated sample's pseudo-reward is within e^{−c} of its
  exact limit −f'(∞); where f'(∞) = +∞ (reverse KL, Pearson χ², α > 1) the exact
  pseudo-reward is −∞ and the sample gets the large finite −f'(e^c) instead. On
  the other side, ℓ < −c (π far below p) caps R = −f'(e^{−c}) for the divergences
  whose f'(0) = −∞. `aux["num_clipped"]` counts the clipped samples.

  Args:
    d: a `divergences.Divergence` or its name.
    log_model: [N] log π_θ(x_i), differentiable in θ.
    log_proposal: [N] log q(x_i) of the distribution that drew x_i.
    log_target: [N] log P(x_i) (−inf allowed).
    log_z: scalar or [N] (per context) log Ẑ.
    baseline: scalar or [N] baseline b (see `fdiv_jax.core.baselines`); must not depend
      on x_i's own log π to stay unbiased (leave-one-out is fine).
    mask: optional [N] bool, True for real samples (False: padding, ignored).
    log_ratio_clip: the bound c above; None for the dtype default.

  Returns:
    (loss, aux): the scalar surrogate and a dict of [N] arrays "log_ratio" (ℓ,
    unclipped), "pseudo_reward", "importance_weight", "advantage", scalars
    "mean_pseudo_reward", "mean_advantage", "mean_importance_weight",
    "num_clipped".
  """
  d = divergences.get(d) if isinstance(d, str) else d
  log_model = jnp.asarray(log_model)
  dtype = jnp.result_type(log_model.dtype, jnp.float32)
  log_model = log_model.astype(dtype)
  log_proposal = jnp.asarray(log_proposal, dtype)
  log_target = jnp.asarray(log_target, dtype)
  log_z = jnp.asarray(log_z, dtype)
  clip = (default_log_ratio_clip(dtype, d) if log_ratio_clip is None
          else log_ratio_clip)

  fixed_log_model = jax.lax.stop_gradient(log_model)
  # A violated constraint is ℓ = +inf whatever log Ẑ is; written out so that a
  # context whose Ẑ is still 0 (log Ẑ = −inf: no sample of it satisfied the
  # constraint yet) gives +inf rather than NaN (−(−inf) + (−inf)).
  log_ratio = jax.lax.stop_gradient(jnp.where(
      log_target == -jnp.inf, jnp.inf, fixed_log_model - log_target + log_z))
  clipped = jnp.clip(log_ratio, -clip, clip)
  pseudo_reward = d.pseudo_reward(clipped)
  log_weight = jax.lax.stop_gradient(fixed_log_model - log_proposal)
  weight = jnp.exp(log_weight)
  advantage = jax.lax.stop_gradient(pseudo_reward - baseline)

  m = jnp.ones_like(log_model) if mask is None else mask.astype(dtype)
  count = jnp.maximum(jnp.sum(m), 1.0)
  # The where keeps padding rows (whose log π may be anything) out of the value
  # and out of the gradient.
  per_sample = jnp.where(m > 0, -weight * advantage * log_model, 0.0)
  loss = jnp.sum(per_sample) / count

  def mean(x):
    return jnp.sum(jnp.where(m > 0, x, 0.0)) / count

  aux = {
      "log_ratio": log_ratio,
      "pseudo_reward": pseudo_reward,
      "importance_weight": weight,
      "advantage": advantage,
      "mean_pseudo_reward": mean(pseudo_reward),
      "mean_advantage": mean(advantage),
      "mean_importance_weight": mean(weight),
      "num_clipped": jnp.sum(jnp.where(m > 0, jnp.abs(log_ratio) > clip, False)),
  }
  return loss, aux
