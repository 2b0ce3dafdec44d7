"""Importance-sampling estimators: partition function, f-divergences, moments, ESS.

Conventions (docs/mathematics.md). Samples x_i, i = 1..N, are drawn from a proposal q (the
policy π itself when on-policy). Per sample the caller passes log-probabilities
as float arrays of shape [N]:

  log_model    log π(x_i)   the policy being trained
  log_target   log P(x_i)   the unnormalised target (−inf where a hard constraint fails)
  log_proposal log q(x_i)   the distribution that generated x_i
  log_base     log a(x_i)   the base (pretrained) model
  log_z        log Z        (an estimate of) the target's log-normaliser, p = P/Z

Everything is a pure function of arrays: no model, no state, no config. All work
under `jit`, `vmap` and `grad`, in float32 and float64. An optional boolean `mask`
[N] marks real samples (padding rows are ignored: they neither count in N nor
contribute; a mask without any real sample gives log Ẑ = −inf and estimates of
0, the empty mean, rather than NaN).

Shape contracts (rlax style): every per-sample argument must be [N] with one N,
log_z a scalar or [N], moment features [N] or [N, K]; nothing is broadcast. A
violation raises AssertionError naming the function and the argument (a [4]
log_model against a [4, 1] log_target would otherwise broadcast to a wrong
[4, 4]). The checks read static shapes, so they cost nothing under `jit`; under
`vmap` they apply per example, so a batch of [B, N] problems is a vmapped call.
This module imports only JAX (and chex, for the checks).

References: Khalifa et al., "A Distributional Approach to Controlled Text
Generation", ICLR 2021 (importance-sampled Z and divergences); Go et al., ICML 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fdiv_jax.core import _checks
from fdiv_jax.core import divergences

Array = jax.Array


def _masked(values: Array, mask: Array | None, fill) -> Array:
  if mask is None:
    return values
  return jnp.where(mask, values, fill)


def _count(like: Array, mask: Array | None) -> Array:
  """The number of real samples, at least 1: a mask without any real sample
  gives the empty sum (0, or −inf in logs), not 0/0 = NaN."""
  if mask is None:
    return jnp.asarray(like.shape[-1], like.dtype)
  return jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(like.dtype)


def _float(*arrays):
  dtype = jnp.result_type(*[jnp.asarray(a).dtype for a in arrays], jnp.float32)
  return [jnp.asarray(a, dtype) for a in arrays]


def log_mean_exp(log_values: Array, mask: Array | None = None, axis: int = -1) -> Array:
  """log( (1/N) Σ_i exp(log_values_i) ), stable; N counts unmasked entries.

  Args:
    log_values: [N] log v_i (−inf allowed).
    mask: optional [N] bool, True for real samples.
    axis: the sample axis; the values are [N], so 0 or −1 (batches of [N]
      problems: `jax.vmap`).

  Returns:
    Scalar; −inf when every (unmasked) value is −inf, or no value is unmasked.
  """
  _checks.samples("log_mean_exp", log_values=log_values, mask=mask)
  (log_values,) = _float(log_values)
  log_values = _masked(log_values, mask, -jnp.inf)
  n = _count(log_values, mask)
  return jax.nn.logsumexp(log_values, axis=axis) - jnp.log(n)


def log_importance_weights(log_numerator: Array, log_proposal: Array) -> Array:
  """log w = log numerator − log q, per sample (e.g. log π/q or log P/q).

  Args:
    log_numerator: [N] log π(x_i) or log P(x_i).
    log_proposal: [N] log q(x_i).

  Returns:
    [N] log w_i.
  """
  _checks.samples("log_importance_weights", log_numerator=log_numerator,
                  log_proposal=log_proposal)
  log_numerator, log_proposal = _float(log_numerator, log_proposal)
  return log_numerator - log_proposal


def log_partition(log_target: Array, log_proposal: Array,
                  mask: Array | None = None) -> Array:
  """Importance-sampling estimate of log Z, Z = Σ_x P(x), from x_i ~ q.

    log Ẑ = logsumexp_i(log P(x_i) − log q(x_i)) − log N.

  Ẑ (not log Ẑ) is unbiased. Samples violating a hard constraint (log P = −inf)
  contribute 0; if all do, the result is −inf.

  Args:
    log_target: [N] log P(x_i).
    log_proposal: [N] log q(x_i) of the distribution that drew x_i.
    mask: optional [N] bool, True for real samples.

  Returns:
    Scalar log Ẑ.
  """
  _checks.samples("log_partition", log_target=log_target,
                  log_proposal=log_proposal, mask=mask)
  return log_mean_exp(log_importance_weights(log_target, log_proposal), mask)


class PartitionState(NamedTuple):
  """Running importance-sampling estimate of log Z, one entry per context.

  Attributes:
    log_sum_weights: [C] log Σ_i w_i, w = P(x_i)/q(x_i), over every sample seen.
    count: [C] number of samples seen so far (a float, like the weights).
    log_sum_squared_weights: [C] log Σ_i w_i², for the variance of Ẑ.
  """
  log_sum_weights: Array
  count: Array
  log_sum_squared_weights: Array

  @property
  def log_z(self) -> Array:
    """[C] current log Ẑ = log Σ w − log n; −inf for a context never seen."""
    return jnp.where(self.count > 0,
                     self.log_sum_weights - jnp.log(jnp.maximum(self.count, 1.0)),
                     -jnp.inf)

  @property
  def relative_variance(self) -> Array:
    """[C] Var(Ẑ)/Ẑ² = (n Σw²/(Σw)² − 1)/n, the sample estimate; 0 for a
    context with fewer than two samples or Ẑ = 0 (nothing to say yet)."""
    n = jnp.maximum(self.count, 1.0)
    ratio = jnp.exp(self.log_sum_squared_weights - 2.0 * self.log_sum_weights)
    value = jnp.maximum(n * ratio - 1.0, 0.0) / n
    return jnp.where((self.count > 1) & jnp.isfinite(self.log_sum_weights), value,
                     0.0)


def init_partition(num_contexts: int = 1, dtype=jnp.float32) -> PartitionState:
  """An empty running estimate for `num_contexts` contexts (1 if unconditional)."""
  # Three separate buffers: a train step donates its state, field by field.
  return PartitionState(jnp.full((num_contexts,), -jnp.inf, dtype),
                        jnp.zeros((num_contexts,), dtype),
                        jnp.full((num_contexts,), -jnp.inf, dtype))


def _segment_log_sum_exp(log_values: Array, context_ids: Array, prior: Array) -> Array:
  """log(exp(prior_c) + Σ_{i: c_i = c} exp(log_values_i)) per context c."""
  num_contexts = prior.shape[0]
  batch_max = jax.ops.segment_max(log_values, context_ids, num_segments=num_contexts)
  shift = jnp.maximum(batch_max, prior)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  batch_sum = jax.ops.segment_sum(jnp.exp(log_values - shift[context_ids]),
                                  context_ids, num_segments=num_contexts)
  total = batch_sum + jnp.exp(prior - shift)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + shift,
                   -jnp.inf)


def update_partition(state: PartitionState, log_target: Array, log_proposal: Array,
                     context_ids: Array | None = None,
                     mask: Array | None = None) -> PartitionState:
  """Merges a batch into the running log Ẑ (pure; for the per-step Ẑ of training).

  Since Z does not depend on the proposal, batches drawn from different proposals
  (a policy changing every step) merge into one unbiased estimate:
  Ẑ = Σ_all w / n_all, w = P/q — provided every q covers the support of P. A
  truncated proposal (top-k / top-p sampling) never draws some x with P(x) > 0,
  and Ẑ then estimates only the mass of P on what q can draw (biased low).

  Args:
    state: the running estimate, C contexts.
    log_target: [N] log P(x_i | c_i).
    log_proposal: [N] log q(x_i | c_i).
    context_ids: optional [N] int in [0, C): which context each sample belongs to
      (conditional targets, one Z_c per context). None: all in context 0.
    mask: optional [N] bool, True for real samples.

  Returns:
    The merged state.
  """
  _checks.samples("update_partition", log_target=log_target,
                  log_proposal=log_proposal, context_ids=context_ids, mask=mask)
  _checks.integers("update_partition", context_ids=context_ids)
  log_w = log_importance_weights(log_target, log_proposal).astype(
      state.log_sum_weights.dtype)
  log_w = _masked(log_w, mask, -jnp.inf)
  ones = jnp.ones_like(log_w) if mask is None else mask.astype(log_w.dtype)
  num_contexts = state.count.shape[0]
  if context_ids is None:
    context_ids = jnp.zeros(log_w.shape, jnp.int32)
  log_sum = _segment_log_sum_exp(log_w, context_ids, state.log_sum_weights)
  log_sum_sq = _segment_log_sum_exp(2.0 * log_w, context_ids,
                                    state.log_sum_squared_weights)
  count = state.count + jax.ops.segment_sum(ones, context_ids,
                                            num_segments=num_contexts)
  return PartitionState(log_sum, count, log_sum_sq)


def _check_divergence_args(fn: str, log_model, log_target, log_proposal, log_z,
                           mask) -> None:
  _checks.samples(fn, log_model=log_model, log_target=log_target,
                  log_proposal=log_proposal, mask=mask)
  _checks.scalar_or_samples(fn, log_model, log_z=log_z)


def divergence(d: divergences.Divergence | str, log_model: Array, log_target: Array,
               log_proposal: Array, log_z: Array, mask: Array | None = None) -> Array:
  """Importance-sampling estimate of D_f(π‖p), p = P/Z, from x_i ~ q.

    D_f(π‖p) = Σ_x p f(π/p) = E_q[ (p/q) f(t) ] + E_q[ (π/q) 1{p=0} ] f'(∞),

  with t = π/p, i.e. ℓ = log π − log P + log Z. Points with p = 0 (violated hard
  constraints) contribute their limit π·f'(∞): +inf for reverse KL, Pearson χ² and
  α > 1 as soon as one such sample has π > 0, finite for the others. Unbiased for
  the true Z; with an estimate Ẑ it is the usual consistent plug-in.

  Args:
    d: a `divergences.Divergence` or its name.
    log_model, log_target, log_proposal: [N] log π, log P, log q at x_i ~ q.
    log_z: scalar or [N] (per-context) log Z or log Ẑ.
    mask: optional [N] bool, True for real samples.

  Returns:
    Scalar estimate.
  """
  _check_divergence_args("divergence", log_model, log_target, log_proposal, log_z,
                         mask)
  return _divergence(d, log_model, log_target, log_proposal, log_z, mask)


def divergence_terms(d: divergences.Divergence | str, log_model: Array,
                     log_target: Array, log_proposal: Array,
                     log_z: Array) -> Array:
  """The per-sample terms whose mean is `divergence`: [N].

  (p/q)·f(π/p) on the support of p and (π/q)·f'(∞) off it (module `divergence`);
  their spread gives the estimate's standard error (`fdiv_jax.core.uncertainty`).
  """
  _check_divergence_args("divergence_terms", log_model, log_target, log_proposal,
                         log_z, None)
  return _terms(divergences.get(d), log_model, log_target, log_proposal, log_z)


def _divergence(d, log_model, log_target, log_proposal, log_z, mask) -> Array:
  """`divergence` without the checks (its callers have made them)."""
  terms = _terms(divergences.get(d), log_model, log_target, log_proposal, log_z)
  terms = _masked(terms, mask, 0.0)
  return jnp.sum(terms, axis=-1) / _count(terms, mask)


def _terms(d, log_model, log_target, log_proposal, log_z) -> Array:
  log_model, log_target, log_proposal, log_z = _float(
      log_model, log_target, log_proposal, log_z)
  log_p = log_target - log_z
  on_support = log_p > -jnp.inf
  safe_log_p = jnp.where(on_support, log_p, 0.0)
  log_t = log_model - safe_log_p
  # (p/q)·f(t), written (π/q)·f(t)/t where t > 1: f(t) alone overflows for
  # large t (float32: ℓ > 88) while the term itself is finite.
  # A weight π/q or p/q beyond the float range next to f = inf or 0 is not
  # 0·inf = NaN: `_exp_times` forms such products in log space.
  above = log_t > 0
  term_on = jnp.where(
      above,
      divergences._exp_times(log_model - log_proposal,
                             d.f_over_t(jnp.where(above, log_t, 1.0))),
      divergences._exp_times(safe_log_p - log_proposal,
                             d.f(jnp.where(above, 0.0, log_t))))
  slope = d.f_prime_at_inf
  term_off = divergences._exp_times(
      log_model - log_proposal, jnp.full_like(log_model, slope)) if slope != 0 else (
          jnp.zeros_like(log_model))
  # 0·inf would be NaN where π = 0 exactly; such a point contributes nothing.
  term_off = jnp.where(log_model > -jnp.inf, term_off, 0.0)
  return jnp.where(on_support, term_on, term_off)


def _named(name: str, fn: str, log_model, log_target, log_proposal, log_z,
           mask) -> Array:
  _check_divergence_args(fn, log_model, log_target, log_proposal, log_z, mask)
  return _divergence(name, log_model, log_target, log_proposal, log_z, mask)


def forward_kl(log_model, log_target, log_proposal, log_z, mask=None) -> Array:
  """KL(p‖π) = E_p[log p − log π], importance-sampled from q (see `divergence`).

  Arguments and shapes as `divergence`: [N] arrays, log_z scalar or [N].
  """
  return _named("forward_kl", "forward_kl", log_model, log_target, log_proposal,
                log_z, mask)


def reverse_kl(log_model, log_target, log_proposal, log_z, mask=None) -> Array:
  """KL(π‖p) = E_π[log π − log p], importance-sampled from q (see `divergence`).

  Arguments and shapes as `divergence`: [N] arrays, log_z scalar or [N].
  """
  return _named("reverse_kl", "reverse_kl", log_model, log_target, log_proposal,
                log_z, mask)


def total_variation(log_model, log_target, log_proposal, log_z, mask=None) -> Array:
  """TV(π, p) = ½ Σ|π − p|, importance-sampled from q (see `divergence`).

  Arguments and shapes as `divergence`: [N] arrays, log_z scalar or [N].
  """
  return _named("tv", "total_variation", log_model, log_target, log_proposal,
                log_z, mask)


def jensen_shannon(log_model, log_target, log_proposal, log_z, mask=None) -> Array:
  """JS(π, p) = ½KL(π‖m) + ½KL(p‖m), m = (π+p)/2 (≤ log 2), sampled from q.

  Arguments and shapes as `divergence`: [N] arrays, log_z scalar or [N].
  """
  return _named("js", "jensen_shannon", log_model, log_target, log_proposal,
                log_z, mask)


def divergences_to_target(log_model, log_target, log_proposal, log_z,
                          mask=None) -> dict[str, Array]:
  """The four metrics the literature reports, as a dict of scalars.

  Keys: "forward_kl" = KL(p‖π), "reverse_kl" = KL(π‖p), "tv", "js". Arguments
  and shapes as `divergence`: [N] arrays, log_z scalar or [N].
  """
  _check_divergence_args("divergences_to_target", log_model, log_target,
                         log_proposal, log_z, mask)
  args = (log_model, log_target, log_proposal, log_z, mask)
  return {name: _divergence(name, *args)
          for name in divergences.STANDARD}


def kl_from_base(log_model: Array, log_base: Array, log_proposal: Array,
                 mask: Array | None = None) -> Array:
  """KL(π‖a) = E_π[log π − log a] = E_q[(π/q)(log π − log a)], from x_i ~ q.

  On-policy (q = π) this is the plain mean of log π − log a. Unbiased (π and q are
  normalised), unlike the target divergences no Z is involved.

  Args:
    log_model, log_base, log_proposal: [N] log π, log a, log q at x_i ~ q.
    mask: optional [N] bool.

  Returns:
    Scalar estimate; +inf when a sample has a(x) = 0 < π(x).
  """
  _checks.samples("kl_from_base", log_model=log_model, log_base=log_base,
                  log_proposal=log_proposal, mask=mask)
  log_model, log_base, log_proposal = _float(log_model, log_base, log_proposal)
  # (π/q)(log π − log a), +inf where a = 0 < π even if π/q underflows, 0 where
  # π = a even if π/q overflows (`_exp_times`: no 0·inf).
  terms = divergences._exp_times(log_model - log_proposal, log_model - log_base)
  terms = jnp.where(log_model > -jnp.inf, terms, 0.0)
  terms = _masked(terms, mask, 0.0)
  return jnp.sum(terms, axis=-1) / _count(terms, mask)


def self_normalized_moments(values: Array, log_weights: Array,
                            mask: Array | None = None) -> Array:
  """Self-normalised importance-sampling moment Σ_i w_i φ(x_i) / Σ_i w_i.

  For E_π[φ] from x ~ q use log w = log π − log q; for E_p[φ] use log P − log q
  (Z cancels). Biased O(1/N) but consistent, and needs no normaliser.

  Args:
    values: [N] or [N, K] feature values φ(x_i).
    log_weights: [N] log w_i (−inf allowed).
    mask: optional [N] bool.

  Returns:
    [] or [K]. NaN when every weight is zero (no sample carries information).
  """
  _checks.samples("self_normalized_moments", log_weights=log_weights, mask=mask)
  _checks.samples_or_features("self_normalized_moments", "log_weights",
                              log_weights, values=values)
  values, log_weights = _float(values, log_weights)
  log_weights = _masked(log_weights, mask, -jnp.inf)
  probs = jax.nn.softmax(log_weights)
  informative = jnp.any(log_weights > -jnp.inf)
  if values.ndim == 2:
    probs = probs[:, None]
  moments = jnp.sum(jnp.where(probs > 0, probs * values, 0.0), axis=0)
  return jnp.where(informative, moments, jnp.nan)


def effective_sample_size(log_weights: Array, mask: Array | None = None) -> Array:
  """Kish's effective sample size (Σ w)² / Σ w² of importance weights, in [0, N].

  N for uniform weights, 1 when one weight dominates, 0 when all are zero.

  Args:
    log_weights: [N] log w_i (−inf allowed).
    mask: optional [N] bool.

  Returns:
    Scalar ESS.
  """
  _checks.samples("effective_sample_size", log_weights=log_weights, mask=mask)
  (log_weights,) = _float(log_weights)
  log_weights = _masked(log_weights, mask, -jnp.inf)
  lse = jax.nn.logsumexp(log_weights, axis=-1)
  lse2 = jax.nn.logsumexp(2.0 * log_weights, axis=-1)
  return jnp.where(jnp.isfinite(lse), jnp.exp(2.0 * lse - lse2), 0.0)
