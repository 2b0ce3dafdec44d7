"""Importance-sampled estimates with their standard errors, per context.

Every figure a run reports is an estimate from finitely many samples; these
functions return it with its standard error, as `Estimate(value,
standard_error)`. Samples x_i ~ q, i = 1..N, may come from a mixture of
proposals: `mixture_log_density` gives the balance-heuristic density
q(x) = Σ_k c_k q_k(x) of a defensive mixture (Veach & Guibas, "Optimally
combining sampling techniques for Monte Carlo rendering", SIGGRAPH 1995; Owen &
Zhou, "Safe and effective importance sampling", JASA 2000). Evaluating π
against p ∝ a·b or a·e^{r/β} from samples of ½π + ½a keeps every weight
bounded: π/q ≤ 2, and P/q ≤ 2·P/a = 2b (or 2e^{r/β}).

Conditional targets have one Z_c per context c (Korbak et al., ICML 2022); a
figure is the mean over the contexts present of its per-context value, each
context normalised by its own Ẑ_c. Standard errors come from the delta method
(first-order linearisation; the usual plug-in), so they are asymptotic:
accurate once every context has a few dozen samples with bounded weights.
When the mixture is drawn in fixed shares (n samples of π, n of a), pass
`strata` (which component drew each sample): the variance is then the
stratified one, Σ_s n_s Var_s / n², which is smaller than the i.i.d. mixture's
whenever the components' terms differ in mean.

  `expectation`  E_π[φ], self-normalised with weights π/q (and
                 `expectation_per_context`);
  `divergence`   D_f(π‖p) with p = P/Ẑ_c, Ẑ_c the running estimate merged
                 with these samples; its error includes that of Ẑ_c.

This module imports only JAX.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fdiv_jax.core import _checks
from fdiv_jax.core import divergences, estimators

Array = jax.Array


class Estimate(NamedTuple):
  """A figure and its standard error (same shape)."""
  value: Array
  standard_error: Array


def mixture_log_density(log_densities: Sequence[Array],
                        fractions: Sequence[float]) -> Array:
  """log q(x) = log Σ_k c_k q_k(x): the balance heuristic of a mixture.

  Args:
    log_densities: K arrays [N], log q_k(x_i) of every sample under every
      component (whichever component drew it).
    fractions: K fractions c_k of the samples drawn from each component.

  Returns:
    [N] log q(x_i).
  """
  _checks.samples("mixture_log_density", **{f"log_densities[{k}]": x
                                            for k, x in enumerate(log_densities)})
  stacked = jnp.stack([jnp.asarray(x) for x in log_densities])
  log_c = jnp.log(jnp.asarray(fractions, stacked.dtype))[:, None]
  return jax.nn.logsumexp(stacked + log_c, axis=0)


def _contexts(context_ids: Array | None, n: int, num_contexts: int):
  ids = jnp.zeros((n,), jnp.int32) if context_ids is None else context_ids
  counts = jax.ops.segment_sum(jnp.ones((n,)), ids, num_segments=num_contexts)
  return ids, counts


def _segment(values: Array, ids: Array, num_contexts: int) -> Array:
  return jax.ops.segment_sum(values, ids, num_segments=num_contexts)


def _variance_of_mean(psi: Array, ids: Array, counts: Array, num_contexts: int,
                      strata: Array | None, num_strata: int) -> Array:
  """Var of the per-context mean of ψ: Σ_s n_{c,s} Var_{c,s}(ψ) / n_c² [C(, K)].

  Var_{c,s} is the sample variance (ddof 1) within each (context, stratum)
  cell; with one stratum it is Var_c(ψ)/n_c.
  """
  num_strata = 1 if strata is None else num_strata
  cells = ids if strata is None else ids * num_strata + strata
  num_cells = num_contexts * num_strata
  wide = (lambda x: x[:, None]) if psi.ndim == 2 else (lambda x: x)
  cell_counts = jax.ops.segment_sum(jnp.ones(ids.shape), cells,
                                    num_segments=num_cells)
  cell_mean = _segment(psi, cells, num_cells) / wide(jnp.maximum(cell_counts, 1.0))
  sq = _segment((psi - cell_mean[cells])**2, cells, num_cells)
  cell_var = sq / wide(jnp.maximum(cell_counts - 1.0, 1.0))
  # Σ_s n_{c,s} Var_{c,s}, per context.
  per_cell = wide(cell_counts) * cell_var
  context_of_cell = jnp.arange(num_cells) // num_strata
  summed = jax.ops.segment_sum(per_cell, context_of_cell, num_segments=num_contexts)
  return summed / wide(jnp.maximum(counts, 1.0)**2)


def _mean_over_present(per_context: Array, variance: Array,
                       counts: Array) -> Estimate:
  """Mean over the contexts with samples, and its standard error."""
  present = counts > 0
  if per_context.ndim == 2:
    present = present[:, None]
  num = jnp.maximum(jnp.sum(counts > 0), 1)
  value = jnp.sum(jnp.where(present, per_context, 0.0), axis=0) / num
  var = jnp.sum(jnp.where(present, variance, 0.0), axis=0) / num**2
  return Estimate(value, jnp.sqrt(var))


def expectation(values: Array, log_model: Array, log_proposal: Array, *,
                context_ids: Array | None = None, num_contexts: int = 1,
                strata: Array | None = None, num_strata: int = 2) -> Estimate:
  """E_π[φ] from x_i ~ q, the mean over contexts (see `expectation_per_context`).

  Returns:
    `Estimate` of shape [] or [K]. NaN for a quantity no sample informs.
  """
  mean_c, var_c, counts = _expectation_parts(values, log_model, log_proposal,
                                             context_ids, num_contexts, strata,
                                             num_strata)
  return _mean_over_present(mean_c, var_c, counts)


def expectation_per_context(values: Array, log_model: Array, log_proposal: Array,
                            *, context_ids: Array | None = None,
                            num_contexts: int = 1, strata: Array | None = None,
                            num_strata: int = 2) -> Estimate:
  """E_π[φ] from x_i ~ q, self-normalised with w = π/q, with its error.

    μ̂_c = Σ_{i∈c} w_i φ_i / Σ_{i∈c} w_i,   se_c² = Σ_{i∈c} w_i² (φ_i − μ̂_c)² / (Σ w)²

  (the delta-method variance of a ratio; on-policy, w = 1, it is the plain
  mean and its sample variance over N). The figure is the mean of μ̂_c over
  the contexts present.

  Args:
    values: [N] or [N, K] φ(x_i).
    log_model: [N] log π(x_i).
    log_proposal: [N] log q(x_i) of the distribution that drew x_i.
    context_ids: optional int [N] in [0, num_contexts).
    num_contexts: C.
    strata: optional int [N] in [0, num_strata): the mixture component that
      drew each sample, when the components' shares are fixed.
    num_strata: S.

  Returns:
    `Estimate` of shape [C] or [C, K]: E_π[φ | c] per context; NaN for a
    context without samples.
  """
  mean_c, var_c, _ = _expectation_parts(values, log_model, log_proposal,
                                        context_ids, num_contexts, strata,
                                        num_strata)
  return Estimate(mean_c, jnp.sqrt(var_c))


def _expectation_parts(values, log_model, log_proposal, context_ids, num_contexts,
                       strata, num_strata):
  _checks.samples("expectation", log_model=log_model, log_proposal=log_proposal,
                  context_ids=context_ids, strata=strata)
  _checks.samples_or_features("expectation", "log_model", log_model, values=values)
  values = jnp.asarray(values, jnp.result_type(values, jnp.float32))
  log_w = jnp.asarray(log_model, values.dtype) - jnp.asarray(log_proposal,
                                                             values.dtype)
  ids, counts = _contexts(context_ids, log_w.shape[0], num_contexts)
  # Weights relative to each context's largest, so nothing overflows.
  top = jax.ops.segment_max(log_w, ids, num_segments=num_contexts)
  w = jnp.exp(log_w - jnp.where(jnp.isfinite(top), top, 0.0)[ids])
  w = jnp.where(jnp.isnan(w), 0.0, w)
  wide = (lambda x: x[:, None]) if values.ndim == 2 else (lambda x: x)
  total = _segment(w, ids, num_contexts)
  safe_total = jnp.where(total > 0, total, 1.0)
  mean_c = _segment(wide(w) * values, ids, num_contexts) / wide(safe_total)
  # ψ_i = (w_i / w̄_c)(φ_i − μ̂_c): the ratio's influence, of mean 0 per context.
  w_bar = safe_total / jnp.maximum(counts, 1.0)
  psi = wide(w / w_bar[ids]) * (values - mean_c[ids])
  var_c = _variance_of_mean(psi, ids, counts, num_contexts, strata, num_strata)
  informed = wide(total > 0)
  mean_c = jnp.where(informed, mean_c, jnp.nan)
  var_c = jnp.where(informed, var_c, jnp.nan)
  return mean_c, var_c, counts


def divergence(d: divergences.Divergence | str, log_model: Array, log_target: Array,
               log_proposal: Array, *, prior: estimators.PartitionState,
               context_ids: Array | None = None, strata: Array | None = None,
               num_strata: int = 2) -> Estimate:
  """D_f(π‖p) from x_i ~ q with its standard error, Z estimated as it goes.

  Ẑ_c is `prior` (a running estimate, possibly empty) merged with these
  samples (`estimators.update_partition`). Per context, D̂_c is the mean of
  `estimators.divergence_terms` h_i(Ẑ_c), and the figure is the mean of D̂_c.
  Linearising in log Ẑ_c, with γ_c = ∂D̂_c/∂log Ẑ_c and α_c the share of the
  prior's samples in Ẑ_c:

    ψ_i = h_i + γ_c (1 − α_c) (w_i / Ẑ_c − 1),   w_i = P(x_i)/q(x_i),
    se_c² = Var(mean_{i∈c} ψ_i) + γ_c² α_c² Var(Ẑ_prior,c)/Z_c²,

  so the error covers both the samples' spread and that of Ẑ.

  Args:
    d: a `Divergence` or its name.
    log_model, log_target, log_proposal: [N] log π, log P, log q at x_i ~ q.
    prior: the running `PartitionState` before these samples ([C] entries).
    context_ids: optional int [N] in [0, C).
    strata: optional int [N] in [0, num_strata): the mixture component that
      drew each sample, when the components' shares are fixed.
    num_strata: S.

  Returns:
    `Estimate` of D_f(π‖p) (scalars); the standard error is +inf where the
    value is.
  """
  _checks.samples("divergence", log_model=log_model, log_target=log_target,
                  log_proposal=log_proposal, context_ids=context_ids,
                  strata=strata)
  d = divergences.get(d)
  num_contexts = prior.count.shape[0]
  ids, counts = _contexts(context_ids, jnp.shape(log_model)[0], num_contexts)
  merged = estimators.update_partition(prior, log_target, log_proposal, ids)
  log_z = merged.log_z
  known = jnp.isfinite(log_z)
  safe_log_z = jnp.where(known, log_z, 0.0)

  def per_context(lz):
    terms = estimators.divergence_terms(d, log_model, log_target, log_proposal,
                                        lz[ids])
    return _segment(terms, ids, num_contexts) / jnp.maximum(counts, 1.0), terms

  (mean_c, terms), (gamma, _) = jax.jvp(per_context, (safe_log_z,),
                                        (jnp.ones_like(safe_log_z),))
  gamma = jnp.where(known & jnp.isfinite(gamma), gamma, 0.0)
  alpha = prior.count / jnp.maximum(merged.count, 1.0)
  log_w = (jnp.asarray(log_target, safe_log_z.dtype)
           - jnp.asarray(log_proposal, safe_log_z.dtype))
  relative_w = jnp.where(known[ids], jnp.exp(log_w - safe_log_z[ids]), 0.0)
  psi = terms + (gamma * (1.0 - alpha))[ids] * (relative_w - 1.0)
  var_c = _variance_of_mean(psi, ids, counts, num_contexts, strata, num_strata)
  # (γα)²·Var: squared after the product, so that a γ² beyond the float range
  # times a variance of 0 (a prior of one sample) is 0, not inf·0 = NaN.
  var_c = var_c + jnp.square(gamma * alpha * jnp.sqrt(prior.relative_variance))
  # An infinite estimate (reverse KL with a sample where p = 0 < π, ...) has an
  # infinite standard error, not the NaN of inf − inf in its spread.
  var_c = jnp.where(jnp.isinf(mean_c), jnp.inf, var_c)
  return _mean_over_present(mean_c, var_c, counts)
