"""Offline preference optimisation with the divergences of the registry.

Two losses that train a policy π_θ from fixed preference data, next to a frozen
reference π_ref, with any f of `fdiv_jax.core.divergences` (f and f' in
ℓ = log t, the convention D_f(π‖p) = E_p f(π/p) = Σ p f(π/p)):

* **f-DPO** (Wang et al., "Beyond Reverse KL: Generalizing Direct Preference
  Optimization with Diverse Divergence Constraints", ICLR 2024,
  arXiv 2309.16240): pairs y_w ≻ y_l, the DPO loss with log u replaced by f'(u),
  u = π_θ/π_ref. `fdpo_losses` (per pair) and `fdpo_loss` (their masked mean,
  with diagnostics).
* **f-PO** (Han et al., "f-PO: Generalizing Preference Optimization with
  f-divergence Minimization", 2024, arXiv 2410.21662): K responses per prompt
  with scalar rewards, D_f(π̂_θ‖π̂*) between two distributions on the K
  responses. `fpo_losses` (per prompt) and `fpo_loss`.

Both are pure functions of log-probabilities (sums over the tokens of each
response), work under `jit`, `vmap` and `grad` in float32 and float64, check
their shapes (`_checks`) and take `beta` keyword-only. They are re-exported by
`fdiv_jax.core.losses` (`losses.fdpo_loss`, ...). No stop-gradient is applied:
the reference's log-probabilities are constants in practice (computed without
gradient); the functions differentiate in every argument.

f-DPO
-----
With the regulariser D_f(π‖π_ref) = E_{π_ref} f(π/π_ref) (`reverse_kl`:
KL(π‖π_ref), the RLHF one), the maximiser of E_π[r] − β D_f(π‖π_ref) satisfies
r(y) = β f'(π(y)/π_ref(y)) + const(x) wherever π(y) > 0 (Wang et al.; for f
with f'(0⁺) = −∞ every π(y) > 0; TV, Pearson χ² and α > 1 have a finite f'(0)
and the optimum may vanish on some responses). The Bradley–Terry model then
gives the loss, per pair i:

    ℓ_w = log π_θ(y_w) − log π_ref(y_w),  ℓ_l likewise       (ℓ = log u)
    m_i = β (f'(e^{ℓ_w}) − f'(e^{ℓ_l}))                       (margin)
    loss_i = −log σ(m_i) = softplus(−m_i)

`reverse_kl` (f' = ℓ + 1, the +1 cancels) is exactly DPO (Rafailov et al.,
NeurIPS 2023): m = β(ℓ_w − ℓ_l). `forward_kl` (f' = −1/u):
m = β(e^{−ℓ_l} − e^{−ℓ_w}). The implicit rewards are β f'(u_w), β f'(u_l).
The gradient: ∂loss_i/∂ℓ_w = −β σ(−m_i)·(df'/dℓ)(ℓ_w), with df'/dℓ = t f''(t) ≥ 0
(f convex), and ∂loss_i/∂ℓ_l = +β σ(−m_i)·(df'/dℓ)(ℓ_l).

* **TV**: f' = ½ sign(ℓ) is a step. The margin takes only the values 0, ±β/2,
  ±β, the loss is piecewise constant in the log-probabilities and its gradient
  (JAX's derivative of sign, 0 everywhere, also at ℓ = 0) is exactly 0: f-DPO
  with TV cannot be trained by gradient descent (its value can still be
  reported).

**The clip of ℓ.** Before f', ℓ is clipped to (lo, hi) =
`losses.log_ratio_bounds(d, dtype)` (or to [−c, c] with `log_ratio_clip=c`),
±inf included (NaN stays NaN). On a side where f' grows like c·e^{r|ℓ|}
(forward KL, Neyman χ², Hellinger, α < 1 below; Pearson χ², α > 1 above) the
bound keeps |f'| ≤ sqrt(max float) and |df'/dℓ| ≤ r·sqrt(max float): forward
KL is clipped below ℓ = −44 in float32 (−354 in float64), Neyman χ² below −22
(−177), Pearson χ² above 43 (354). Elsewhere (f' bounded or linear in ℓ,
e.g. reverse KL, JS) the bound is floor(sqrt(max float)/4) = 4.6·10¹⁸ in
float32: never reached by real log-probabilities, so the loss is exact there
(reverse KL is DPO for every finite ℓ). So |m| ≤ 2β·sqrt(max float) (1.8·10¹⁹
in float32), −log σ(m) is computed as softplus(−m) (finite, ≈ |m| for m ≪ 0),
and for any practical β loss and gradient are finite for every input that is
not NaN, however extreme (|ℓ| = 10⁴ in float32, ±inf). Beyond a bound the loss
is constant in that ℓ, so its gradient there is 0: a pair whose ratio is
clipped no longer pushes that response (as in PPO's clip).
`aux["num_clipped"]` counts them. (Where f' saturates, Pearson χ² at ℓ ≪ 0,
Neyman χ² and Hellinger at ℓ ≫ 0, JAX differentiates expm1(x) as
expm1(x) + 1: df'/dℓ is then exact to a few ulps of f', not relatively.)

f-PO
----
Per prompt n, with K responses y_1..y_K, log π_θ(y_k), log π_ref(y_k) and
rewards r_k (in nats: π̂* ∝ π_ref e^r; divide r by a temperature first if it
has one), restricted to the real responses R_n (all K without a mask):

    log π̂_θ(y_k) = β log π_θ(y_k) + (1 − β) log π_ref(y_k)
                    − logsumexp_{j∈R_n}[β log π_θ(y_j) + (1 − β) log π_ref(y_j)]
    log π̂*(y_k)  = log π_ref(y_k) + r_k − logsumexp_{j∈R_n}[log π_ref(y_j) + r_j]
    loss_n = D_f(π̂_θ‖π̂*) = Σ_{k∈R_n} π̂*(y_k) f(π̂_θ(y_k)/π̂*(y_k))
                            = `divergences.exact(d, log π̂_θ, log π̂*)`

(log-softmax over the last axis, masked responses at −inf in both). The log
ratio log π̂_θ/π̂* = β log(π_θ/π_ref) − r + (a constant per prompt): the policy
enters only through DPO's implicit reward β log(π_θ/π_ref), the reference also
as the weight π_ref(y_k) of each response in π̂*. loss_n ≥ 0, with equality
(and zero gradient) iff β log(π_θ/π_ref)(y_k) = r_k + c on R_n, i.e.
π_θ ∝ π_ref e^{r/β} there: the KL-regularised optimum.

* `forward_kl`: loss_n = KL(π̂*‖π̂_θ) = −Σ π̂* log π̂_θ − H(π̂*), a listwise
  soft-label DPO (a cross-entropy) less a constant. K = 2 with rewards
  (r, −r) and π_ref(y_1) = π_ref(y_2): with h = β[(log π_θ − log π_ref)(y_1) −
  (log π_θ − log π_ref)(y_2)] (DPO's margin) and ε = σ(−2r),
  loss = (1 − ε) softplus(−h) + ε softplus(h) − H(ε) (DPO with label smoothing ε,
  minus its entropy), → −log σ(h) = DPO as r → ∞.
* `reverse_kl`: loss_n = KL(π̂_θ‖π̂*), mode-seeking: the EXO loss (Ji et al.,
  "Towards Efficient Exact Optimization of Language Model Alignment",
  ICML 2024, arXiv 2402.00856), which they too call the reverse KL and which
  minimises KL(p_θ‖p_r) with p_θ ∝ exp(β log π_θ/π_ref), p_r ∝ exp(r/β_r) over
  K responses *sampled from π_ref* (the π_ref factors are then the sampling
  weights): `fpo_loss("reverse_kl", log_model − log_ref, zeros, rewards/β_r,
  beta=β)` is exactly their loss. It is not DPO: for K = 2 as above it is
  KL(Bernoulli σ(h) ‖ Bernoulli σ(2r)) = 2r σ(−h) − H(σ(h)) + O(e^{−2r}).
* Han et al.'s reference code writes the α-divergence with exponent 1 − α:
  their α is 1 − α of the registry.

f-PO is as accurate as `divergences.exact`, and only differences within a
prompt matter (log-probabilities of −10⁴ are fine in float32). For an unbounded
f (Pearson χ², Neyman χ², α ∉ (0, 1)) a ratio π̂_θ/π̂* outside the float range
makes the true value overflow; `exact` then returns NaN (0·inf, where π̂_θ
underflows to 0), not +inf.

This module imports only JAX, NumPy and chex.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import _checks, _values, divergences
# `losses` re-exports this module's functions at its end, after defining what is
# used here (`log_ratio_bounds`, `masked_mean`); the package imports `losses`
# first, so this import finds it complete whichever module is imported first.
from fdiv_jax.core import losses

Array = jax.Array


def _float_dtype(*arrays) -> Any:
  return jnp.result_type(*[jnp.asarray(a).dtype for a in arrays], jnp.float32)


def _positive(name: str, value) -> None:
  """`value` > 0 and finite when it is concrete; a traced value passes."""
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if np.ndim(value) != 0:
      raise ValueError(f"{name}: must be a scalar, got shape {np.shape(value)}.")
    value = np.asarray(value).item()
  _values.real(name, value, low=0.0, low_open=True)


def _clip(d: divergences.Divergence, log_u: Array,
          log_ratio_clip: float | Array | None) -> Array:
  if log_ratio_clip is None:
    lo, hi = losses.log_ratio_bounds(d, log_u.dtype)
  else:
    lo, hi = -log_ratio_clip, log_ratio_clip
  return jnp.clip(log_u, lo, hi)


def _fdpo_parts(fn: str, d, log_model_chosen, log_model_rejected, log_ref_chosen,
                log_ref_rejected, beta, mask, log_ratio_clip) -> dict[str, Array]:
  d = divergences.get(d)
  _checks.samples(fn, log_model_chosen=log_model_chosen,
                  log_model_rejected=log_model_rejected,
                  log_ref_chosen=log_ref_chosen, log_ref_rejected=log_ref_rejected,
                  mask=mask)
  _positive("beta", beta)
  if log_ratio_clip is not None:
    _positive("log_ratio_clip", log_ratio_clip)
  dtype = _float_dtype(log_model_chosen, log_model_rejected, log_ref_chosen,
                       log_ref_rejected)
  arrays = [jnp.asarray(x).astype(dtype) for x in (
      log_model_chosen, log_model_rejected, log_ref_chosen, log_ref_rejected)]
  if mask is not None:
    # Rows off the mask become 0 before any arithmetic, so that an inf or NaN
    # there reaches neither the value nor the gradient.
    m = jnp.asarray(mask) != 0
    arrays = [jnp.where(m, x, jnp.zeros((), dtype)) for x in arrays]
  model_w, model_l, ref_w, ref_l = arrays
  log_u_w = model_w - ref_w
  log_u_l = model_l - ref_l
  clipped_w = _clip(d, log_u_w, log_ratio_clip)
  clipped_l = _clip(d, log_u_l, log_ratio_clip)
  beta = jnp.asarray(beta, dtype)
  f_prime_w = d.f_prime(clipped_w)
  f_prime_l = d.f_prime(clipped_l)
  margin = beta * (f_prime_w - f_prime_l)
  return {
      "losses": jax.nn.softplus(-margin),
      "margin": margin,
      "chosen_reward": beta * f_prime_w,
      "rejected_reward": beta * f_prime_l,
      "log_ratio_chosen": log_u_w,
      "log_ratio_rejected": log_u_l,
      "clipped": ((clipped_w != log_u_w) & ~jnp.isnan(log_u_w)).astype(jnp.int32)
                 + ((clipped_l != log_u_l) & ~jnp.isnan(log_u_l)).astype(jnp.int32),
  }


def fdpo_losses(d: divergences.Divergence | str,
                log_model_chosen: Array,
                log_model_rejected: Array,
                log_ref_chosen: Array,
                log_ref_rejected: Array,
                *,
                beta: float | Array,
                log_ratio_clip: float | None = None) -> Array:
  """Per-pair f-DPO losses softplus(−β(f'(u_w) − f'(u_l))), u = π_θ/π_ref.

  Wang et al., ICLR 2024 (arXiv 2309.16240); `reverse_kl` is DPO. With
  ℓ = log π_θ(y) − log π_ref(y), clipped to `losses.log_ratio_bounds(d, dtype)`
  (or [−c, c]) before f' (the module docstring says why and what the gradient
  is beyond the bounds):

    m_i = β (f'(e^{ℓ_w,i}) − f'(e^{ℓ_l,i})),   loss_i = −log σ(m_i) = softplus(−m_i)

  Args:
    d: a `divergences.Divergence` or its name (any of the registry; TV gives a
      zero gradient, see the module docstring).
    log_model_chosen: [N] log π_θ(y_w | x), summed over the response's tokens.
    log_model_rejected: [N] log π_θ(y_l | x).
    log_ref_chosen: [N] log π_ref(y_w | x).
    log_ref_rejected: [N] log π_ref(y_l | x).
    beta: the regularisation strength β > 0 (checked when concrete; a traced β
      is allowed). Keyword-only.
    log_ratio_clip: None for the per-divergence bounds, or c > 0 for [−c, c].

  Returns:
    [N] per-pair losses, in the floating dtype of the inputs (at least float32).

  Raises:
    AssertionError: an argument is not [N] like `log_model_chosen` (the message
      names it).
    ValueError: β (or `log_ratio_clip`) is concrete and not a finite number > 0.
  """
  return _fdpo_parts("fdpo_losses", d, log_model_chosen, log_model_rejected,
                     log_ref_chosen, log_ref_rejected, beta, None,
                     log_ratio_clip)["losses"]


def fdpo_loss(d: divergences.Divergence | str,
              log_model_chosen: Array,
              log_model_rejected: Array,
              log_ref_chosen: Array,
              log_ref_rejected: Array,
              *,
              beta: float | Array,
              mask: Array | None = None,
              log_ratio_clip: float | None = None) -> tuple[Array, dict[str, Any]]:
  """f-DPO: the masked mean over pairs of `fdpo_losses`, with diagnostics.

    loss = Σ_i m_i softplus(−β(f'(u_w,i) − f'(u_l,i))) / Σ_i m_i,   u = π_θ/π_ref

  (Wang et al., ICLR 2024, arXiv 2309.16240). `reverse_kl` gives DPO exactly
  (f'(u) = log u + 1, the +1 cancels), `forward_kl` f'(u) = −1/u, `js`
  ½ log(2u/(1 + u)), `alpha` (u^(α−1) − 1)/(α − 1), `hellinger` 1 − u^(−½),
  `pearson_chi2` 2(u − 1), `neyman_chi2` 1 − u^(−2), `tv` ½ sign(u − 1) (a step:
  zero gradient). ℓ = log u is clipped as in `fdpo_losses`.

  Args:
    d: a `divergences.Divergence` or its name.
    log_model_chosen: [N] log π_θ(y_w | x) (differentiable).
    log_model_rejected: [N] log π_θ(y_l | x) (differentiable).
    log_ref_chosen: [N] log π_ref(y_w | x).
    log_ref_rejected: [N] log π_ref(y_l | x).
    beta: β > 0 (checked when concrete; traced allowed). Keyword-only.
    mask: optional [N] bool, True for real pairs; pairs off the mask reach
      neither the value nor the gradient, even when they hold inf or NaN.
    log_ratio_clip: None for `losses.log_ratio_bounds(d, dtype)`, or c > 0 for
      the symmetric clip [−c, c].

  Returns:
    (loss, aux): the scalar loss and a dict of [N] arrays "losses" (per pair),
    "margin" (β(f'(u_w) − f'(u_l))), "chosen_reward" (the implicit reward
    β f'(u_w)), "rejected_reward" (β f'(u_l)), "log_ratio_chosen",
    "log_ratio_rejected" (ℓ, unclipped), and scalars over the real pairs
    "accuracy" (the fraction with margin > 0), "mean_margin",
    "mean_chosen_reward", "mean_rejected_reward", "num_clipped" (how many
    log-ratios the clip changed, two per pair at most).

  Raises:
    AssertionError: an argument is not [N] like `log_model_chosen` (the message
      names it).
    ValueError: β (or `log_ratio_clip`) is concrete and not a finite number > 0.
  """
  parts = _fdpo_parts("fdpo_loss", d, log_model_chosen, log_model_rejected,
                      log_ref_chosen, log_ref_rejected, beta, mask, log_ratio_clip)
  margin = parts["margin"]
  m = jnp.ones(margin.shape, bool) if mask is None else jnp.asarray(mask) != 0
  loss = losses.masked_mean(parts["losses"], m)
  aux = {name: parts[name] for name in (
      "losses", "margin", "chosen_reward", "rejected_reward", "log_ratio_chosen",
      "log_ratio_rejected")}
  aux.update(
      accuracy=losses.masked_mean((margin > 0).astype(margin.dtype), m),
      mean_margin=losses.masked_mean(margin, m),
      mean_chosen_reward=losses.masked_mean(parts["chosen_reward"], m),
      mean_rejected_reward=losses.masked_mean(parts["rejected_reward"], m),
      num_clipped=jnp.sum(jnp.where(m, parts["clipped"], 0)),
  )
  return loss, aux


def _responses(fn: str, **arrays) -> None:
  """The first array is [N, K]; the others (None skipped) have its shape."""
  (first_name, first), *_ = arrays.items()
  first = np.asarray(first) if isinstance(first, (list, tuple)) else first
  chex.assert_rank(first, 2, custom_message=(
      f"{fn}: {first_name} must be [N, K] (N prompts, K responses each); got "
      f"shape {tuple(jnp.shape(first))}"))
  _checks.same_shape(fn, **arrays)


def _fpo_parts(fn: str, d, log_model, log_ref, rewards, beta, mask):
  d = divergences.get(d)
  _responses(fn, log_model=log_model, log_ref=log_ref, rewards=rewards, mask=mask)
  _positive("beta", beta)
  dtype = _float_dtype(log_model, log_ref, rewards)
  log_model, log_ref, rewards = (jnp.asarray(x).astype(dtype)
                                 for x in (log_model, log_ref, rewards))
  beta = jnp.asarray(beta, dtype)
  if mask is None:
    real = jnp.ones(log_model.shape, bool)
  else:
    real = jnp.asarray(mask) != 0
    zero = jnp.zeros((), dtype)
    log_model, log_ref, rewards = (jnp.where(real, x, zero)
                                   for x in (log_model, log_ref, rewards))
  has_real = jnp.any(real, axis=-1)
  # Masked responses are −inf in both, so that both log-softmaxes normalise over
  # the real ones only; a prompt without any real response keeps finite logits
  # (no −inf − (−inf)) and is dropped below.
  keep = real | ~has_real[..., None]
  policy_logits = jnp.where(keep, beta * log_model + (1.0 - beta) * log_ref, -jnp.inf)
  target_logits = jnp.where(keep, log_ref + rewards, -jnp.inf)
  log_policy = jax.nn.log_softmax(policy_logits, axis=-1)
  log_target = jax.nn.log_softmax(target_logits, axis=-1)
  per_prompt = jnp.where(has_real, divergences.exact(d, log_policy, log_target), 0.0)
  return per_prompt, log_policy, log_target, real, has_real


def fpo_losses(d: divergences.Divergence | str,
               log_model: Array,
               log_ref: Array,
               rewards: Array,
               *,
               beta: float | Array,
               mask: Array | None = None) -> Array:
  """Per-prompt f-PO losses D_f(π̂_θ‖π̂*) over K responses (Han et al., 2024).

    log π̂_θ = log_softmax_K(β log π_θ + (1 − β) log π_ref)   (π̂_θ ∝ π_θ^β π_ref^(1−β))
    log π̂*  = log_softmax_K(log π_ref + r)                  (π̂* ∝ π_ref e^r)
    loss_n  = Σ_k π̂*(y_k) f(π̂_θ(y_k)/π̂*(y_k)) = `divergences.exact(d, log π̂_θ, log π̂*)`

  both log-softmaxes over the real responses of prompt n only (the module
  docstring has the special cases: `forward_kl` is KL(π̂*‖π̂_θ), a soft-label
  DPO; `reverse_kl` is KL(π̂_θ‖π̂*), EXO).

  Args:
    d: a `divergences.Divergence` or its name.
    log_model: [N, K] log π_θ(y_k | x_n), differentiable.
    log_ref: [N, K] log π_ref(y_k | x_n), finite on the real responses.
    rewards: [N, K] finite scalar rewards r_k, in nats (π̂* ∝ π_ref e^r).
    beta: β > 0 (checked when concrete; traced allowed). Keyword-only.
    mask: optional [N, K] bool, True for real responses (a prompt with fewer
      than K). Masked responses are excluded from both normalisations and reach
      neither the value nor the gradient.

  Returns:
    [N] per-prompt divergences (0 for a prompt without any real response).

  Raises:
    AssertionError: `log_model` is not [N, K], or another argument is not of
      its shape (the message names it).
    ValueError: β is concrete and not a finite number > 0.
  """
  return _fpo_parts("fpo_losses", d, log_model, log_ref, rewards, beta, mask)[0]


def fpo_loss(d: divergences.Divergence | str,
             log_model: Array,
             log_ref: Array,
             rewards: Array,
             *,
             beta: float | Array,
             mask: Array | None = None) -> tuple[Array, dict[str, Any]]:
  """f-PO: the mean over prompts of D_f(π̂_θ‖π̂*) (Han et al., arXiv 2410.21662).

  `fpo_losses` per prompt, averaged over the prompts with at least one real
  response. π̂_θ ∝ π_θ^β π_ref^(1−β) and π̂* ∝ π_ref e^r, each normalised over the
  prompt's real responses; the loss is 0 with zero gradient iff
  β log(π_θ/π_ref) = r + c on them. With K responses sampled from π_ref (EXO's
  setting, Ji et al., ICML 2024), pass `log_model − log_ref` and zeros for
  `log_ref`: π̂_θ ∝ exp(β log π_θ/π_ref), π̂* ∝ e^r.

  Args:
    d: a `divergences.Divergence` or its name.
    log_model: [N, K] log π_θ(y_k | x_n), differentiable.
    log_ref: [N, K] log π_ref(y_k | x_n), finite on the real responses.
    rewards: [N, K] finite rewards, in nats.
    beta: β > 0 (checked when concrete; traced allowed). Keyword-only.
    mask: optional [N, K] bool, True for real responses.

  Returns:
    (loss, aux): the scalar loss and a dict with "losses" [N] (per prompt),
    "log_policy" [N, K] (log π̂_θ, −inf on masked responses), "log_target"
    [N, K] (log π̂*, likewise) and "num_prompts" (prompts with a real response).

  Raises:
    AssertionError: `log_model` is not [N, K], or another argument is not of
      its shape (the message names it).
    ValueError: β is concrete and not a finite number > 0.
  """
  per_prompt, log_policy, log_target, real, has_real = _fpo_parts(
      "fpo_loss", d, log_model, log_ref, rewards, beta, mask)
  loss = losses.masked_mean(per_prompt, has_real)
  aux = {
      "losses": per_prompt,
      "log_policy": jnp.where(real, log_policy, -jnp.inf),
      "log_target": jnp.where(real, log_target, -jnp.inf),
      "num_prompts": jnp.sum(has_real),
  }
  return loss, aux
