"""Draw samples from a proposal and score them: what every step starts with.

`draw_and_score` samples x ~ q(·|prompt) with the KV-cache sampler (which
returns the exact log q of what it drew), then scores log a(x) under the frozen
base model and log P(x) under the target. `sample_metrics` turns scored samples
and log π into the importance-sampled metrics of π against the target that the
train step and the evaluation both report.

Parameters are passed as the train state holds them: `params` / `proposal_params`
are the policy's (under LoRA the adapters) and `base_params` the base model's
(under LoRA the frozen weights both share); `models.lora.policy_params` and
`base_model_params` turn them into what the model applies.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fdiv_jax.core import divergences, estimators, uncertainty
from fdiv_jax.lm import sampling, scoring
from fdiv_jax.lm.models import lora
from fdiv_jax.train import state as state_lib

Array = jax.Array
Metrics = dict[str, Array]


class Scored(NamedTuple):
  """Samples from q, their prompts and log-probabilities, all [B] unless noted."""
  tokens: Array          # int32 [B, N]
  mask: Array            # bool [B, N]
  token_log_q: Array     # float32 [B, N]: log q of each token (0 off the mask)
  log_q: Array           # log q(x) of the proposal that drew x
  log_base: Array        # log a(x)
  log_target: Array      # log P(x)
  lengths: Array         # int32 [B]
  prompts: Array         # int32 [B, P]: the prompt of each sample
  prompt_lengths: Array  # int32 [B]
  context_ids: Array     # int32 [B]: which log Ẑ_c the sample belongs to
  dropped_mass: Array | None = None  # [B, N]: π's mass q cannot draw (top-k/p)


def context(batch) -> dict[str, Array]:
  """The target's context of a batch (or of `Scored` samples): their prompts."""
  return {"prompts": batch.prompts, "prompt_lengths": batch.prompt_lengths}


def draw_and_score(model, target, sampler: sampling.SamplerConfig, proposal_params,
                   base_params, batch: state_lib.Batch, rng: Array) -> Scored:
  """x ~ q (the model at `proposal_params`, warped by `sampler`) with log q,
  log a(x) and log P(x); no gradient flows through any of them."""
  out = sampling.sample(model, lora.policy_params(model, base_params, proposal_params),
                        rng, batch.prompts, batch.prompt_lengths, sampler)
  out = jax.tree.map(jax.lax.stop_gradient, out)
  _, log_base = scoring.sequence_log_probs(
      model, lora.base_model_params(model, base_params), batch.prompts,
      batch.prompt_lengths, out.tokens, out.mask)
  log_base = jax.lax.stop_gradient(log_base)
  log_target = target.log_prob(out.tokens, out.mask, log_base, context(batch))
  return Scored(out.tokens, out.mask, out.token_log_q, out.log_q, log_base,
                jax.lax.stop_gradient(log_target), out.lengths, batch.prompts,
                batch.prompt_lengths, batch.context_ids, out.dropped_mass)


def draw_from_mixture(model, target, sampler: sampling.SamplerConfig, params,
                      base_params, batch: state_lib.Batch,
                      rng: Array) -> tuple[Scored, Array, Array]:
  """Samples of the defensive mixture ½π + ½a: one of π and one of a per row.

  Each of the B rows of `batch` is sampled twice, from π (the model at
  `params`) and from the base model a, both untempered (`sampler` must not
  warp). Every sample is scored under both, so the returned `Scored` (2B rows,
  π's samples first) has log q = log(½π + ½a), the balance heuristic
  (`uncertainty.mixture_log_density`), with which π/q ≤ 2 and P/q ≤ 2·P/a.

  Returns:
    (scored, log_model [2B] = log π, strata int32 [2B]: 0 for π's samples,
    1 for a's).
  """
  rng_pi, rng_a = jax.random.split(rng)
  ctx = context(batch)
  params = lora.policy_params(model, base_params, params)
  base_params = lora.base_model_params(model, base_params)
  from_pi = sampling.sample(model, params, rng_pi, batch.prompts,
                            batch.prompt_lengths, sampler)
  from_a = sampling.sample(model, base_params, rng_a, batch.prompts,
                           batch.prompt_lengths, sampler)
  _, log_a_of_pi = scoring.sequence_log_probs(
      model, base_params, batch.prompts, batch.prompt_lengths, from_pi.tokens,
      from_pi.mask)
  _, log_pi_of_a = scoring.sequence_log_probs(
      model, params, batch.prompts, batch.prompt_lengths, from_a.tokens,
      from_a.mask)
  join = lambda a, b: jnp.concatenate([a, b], axis=0)
  tokens, mask = join(from_pi.tokens, from_a.tokens), join(from_pi.mask, from_a.mask)
  log_pi = join(from_pi.log_q, log_pi_of_a)
  log_a = join(log_a_of_pi, from_a.log_q)
  both = {k: join(v, v) for k, v in ctx.items()}
  log_target = target.log_prob(tokens, mask, log_a, both)
  log_q = uncertainty.mixture_log_density([log_pi, log_a], [0.5, 0.5])
  scored = Scored(tokens, mask, join(from_pi.token_log_q, from_a.token_log_q),
                  log_q, log_a, log_target, join(from_pi.lengths, from_a.lengths),
                  both["prompts"], both["prompt_lengths"],
                  join(batch.context_ids, batch.context_ids))
  scored = jax.tree.map(jax.lax.stop_gradient, scored)
  n = batch.prompts.shape[0]
  strata = jnp.concatenate([jnp.zeros((n,), jnp.int32), jnp.ones((n,), jnp.int32)])
  return scored, jax.lax.stop_gradient(log_pi), strata


def reported_divergences(d: divergences.Divergence) -> tuple[divergences.Divergence,
                                                            ...]:
  """KL(p‖π), KL(π‖p), TV, JS and the trained divergence (if not among them)."""
  standard = tuple(divergences.get(n) for n in divergences.STANDARD)
  return standard if d in standard else (*standard, d)


def sample_metrics(d: divergences.Divergence, target, scored: Scored,
                   log_model: Array, prior: estimators.PartitionState, *,
                   strata: Array | None = None,
                   per_context: bool = False) -> Metrics:
  """Metrics of π against the target from samples of q, each with its error.

  Every estimate `name` comes with `name_se`, its standard error
  (`fdiv_jax.core.uncertainty`): the divergences to the target (the four
  standard ones and the trained one, under their `metric_name`s) with Ẑ_c the
  running `prior` merged with these samples; KL(π‖a), alignment, feature
  moments and the satisfied fraction as self-normalised expectations under π
  (weights π/q, exactly 1 on-policy). With several contexts each figure is the
  mean over contexts of its per-context value; `per_context` adds the
  moments of each context (`moment/<name>@<c>`).

  Also: log_z (the mean over contexts of the merged log Ẑ_c), ess_target (the
  normalised effective sample size of the weights p/q, in [0, 1]),
  zero_z_contexts (contexts present whose Ẑ_c is 0: no sample satisfies the
  target there) and, per feature, feature_min/<name> and feature_max/<name>
  over the samples (for coverage checks).

  Args:
    d: the trained divergence.
    target: the target.
    scored: the samples and their log q, log a, log P ([N] each).
    log_model: [N] log π of the samples.
    prior: the running log Ẑ before these samples.
    strata: optional int [N], the mixture component of each sample (0 = π).
    per_context: also report the moments per context.
  """
  log_model = jax.lax.stop_gradient(log_model)
  num_contexts = prior.count.shape[0]
  ids = scored.context_ids
  metrics: Metrics = {}

  def put(name, est):
    metrics[name] = est.value
    metrics[name + "_se"] = est.standard_error

  for dd in reported_divergences(d):
    put(dd.metric_name, uncertainty.divergence(
        dd, log_model, scored.log_target, scored.log_q, prior=prior,
        context_ids=ids, strata=strata))
  expect = functools.partial(uncertainty.expectation, log_model=log_model,
                             log_proposal=scored.log_q, context_ids=ids,
                             num_contexts=num_contexts, strata=strata)
  put("kl_from_base", expect(log_model - scored.log_base))
  context_of_samples = context(scored)
  put("alignment", expect(target.alignment(scored.tokens, scored.mask,
                                           context_of_samples)))
  put("satisfied_fraction", expect(
      (scored.log_target > -jnp.inf).astype(jnp.float32)))
  values = target.feature_values(scored.tokens, scored.mask, context_of_samples)
  if values.shape[-1]:
    moments = expect(values)
    for i, name in enumerate(target.feature_names):
      metrics[f"moment/{name}"] = moments.value[i]
      metrics[f"moment/{name}_se"] = moments.standard_error[i]
      metrics[f"feature_min/{name}"] = jnp.min(values[:, i])
      metrics[f"feature_max/{name}"] = jnp.max(values[:, i])
    if per_context and num_contexts > 1:
      each = uncertainty.expectation_per_context(
          values, log_model, scored.log_q, context_ids=ids,
          num_contexts=num_contexts, strata=strata)
      for c in range(num_contexts):
        for i, name in enumerate(target.feature_names):
          metrics[f"moment/{name}@{c}"] = each.value[c, i]
          metrics[f"moment/{name}@{c}_se"] = each.standard_error[c, i]
  merged = estimators.update_partition(prior, scored.log_target, scored.log_q, ids)
  present = jax.ops.segment_sum(jnp.ones(ids.shape), ids,
                                num_segments=num_contexts) > 0
  log_z = merged.log_z
  metrics["log_z"] = jnp.sum(jnp.where(present, log_z, 0.0)) / jnp.maximum(
      jnp.sum(present), 1)
  metrics["zero_z_contexts"] = jnp.sum(present & (log_z == -jnp.inf))
  log_p_over_q = scored.log_target - scored.log_q - jnp.where(
      jnp.isfinite(log_z), log_z, 0.0)[ids]
  metrics["ess_target"] = estimators.effective_sample_size(
      log_p_over_q) / log_p_over_q.shape[0]
  metrics["ess_policy"] = estimators.effective_sample_size(
      log_model - scored.log_q) / log_p_over_q.shape[0]
  if scored.dropped_mass is not None:
    # A truncated proposal (top-k / top-p): how much of the model's mass it
    # could not draw, per token, and along each sample (1 − Π_n (1 − m_n)).
    m = scored.dropped_mass
    metrics["truncated_mass"] = jnp.sum(m) / jnp.maximum(jnp.sum(scored.mask), 1)
    metrics["truncated_sequence_mass"] = jnp.mean(
        -jnp.expm1(jnp.sum(jnp.log1p(-jnp.minimum(m, 1.0)), axis=-1)))
  own = jnp.ones(ids.shape, bool) if strata is None else strata == 0
  metrics["mean_length"] = jnp.sum(jnp.where(own, scored.lengths, 0)) / jnp.maximum(
      jnp.sum(own), 1)
  return metrics
