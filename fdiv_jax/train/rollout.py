"""Draw samples from a proposal and score them: what every step starts with.

`draw_and_score` samples x ~ q(·|prompt) with the KV-cache sampler (which
returns the exact log q of what it drew), then scores log a(x) under the frozen
base model and log P(x) under the target. `sample_metrics` turns scored samples
and log π into the importance-sampled metrics of π against the target that the
train step and the evaluation both report.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fdiv_jax.core import divergences, estimators
from fdiv_jax.lm import sampling, scoring
from fdiv_jax.train import state as state_lib

Array = jax.Array
Metrics = dict[str, Array]


class Scored(NamedTuple):
  """Samples from q and their log-probabilities, all [B] unless noted."""
  tokens: Array        # int32 [B, N]
  mask: Array          # bool [B, N]
  token_log_q: Array   # float32 [B, N]: log q of each token (0 off the mask)
  log_q: Array         # log q(x) of the warped proposal that drew x
  log_base: Array      # log a(x)
  log_target: Array    # log P(x)
  lengths: Array       # int32 [B]


def context(batch: state_lib.Batch) -> dict[str, Array]:
  """The target's context of a batch: its prompts."""
  return {"prompts": batch.prompts, "prompt_lengths": batch.prompt_lengths}


def draw_and_score(model, target, sampler: sampling.SamplerConfig, proposal_params,
                   base_params, batch: state_lib.Batch, rng: Array) -> Scored:
  """x ~ q (the model at `proposal_params`, warped by `sampler`) with log q,
  log a(x) and log P(x); no gradient flows through any of them."""
  out = sampling.sample(model, proposal_params, rng, batch.prompts,
                        batch.prompt_lengths, sampler)
  out = jax.tree.map(jax.lax.stop_gradient, out)
  _, log_base = scoring.sequence_log_probs(model, base_params, batch.prompts,
                                           batch.prompt_lengths, out.tokens, out.mask)
  log_base = jax.lax.stop_gradient(log_base)
  log_target = target.log_prob(out.tokens, out.mask, log_base, context(batch))
  return Scored(out.tokens, out.mask, out.token_log_q, out.log_q, log_base,
                jax.lax.stop_gradient(log_target), out.lengths)


def divergence_metrics(d: divergences.Divergence, log_model: Array,
                       log_target: Array, log_proposal: Array,
                       log_z: Array) -> Metrics:
  """KL(p‖π), KL(π‖p), TV, JS and the trained divergence D_f(π‖p), sampled
  from q, under their `metric_name`s ("forward_kl", ..., "hellinger",
  "alpha_0.5")."""
  args = (log_model, log_target, log_proposal, log_z)
  metrics = dict(estimators.divergences_to_target(*args))
  if d.metric_name not in metrics:
    metrics[d.metric_name] = estimators.divergence(d, *args)
  return metrics


def sample_metrics(d: divergences.Divergence, target, scored: Scored,
                   log_model: Array, log_z: Array,
                   batch: state_lib.Batch) -> Metrics:
  """Metrics of π against the target from samples of q (no gradient).

  E_π[·] is estimated with the self-normalised weights π/q (exactly 1
  on-policy); the divergences with weights p/q (`divergence_metrics`).
  """
  log_model = jax.lax.stop_gradient(log_model)
  metrics = divergence_metrics(d, log_model, scored.log_target, scored.log_q, log_z)
  metrics["kl_from_base"] = estimators.kl_from_base(log_model, scored.log_base,
                                                    scored.log_q)
  log_w_pi = log_model - scored.log_q
  ctx = context(batch)
  alignment = target.alignment(scored.tokens, scored.mask, ctx)
  metrics["alignment"] = estimators.self_normalized_moments(alignment, log_w_pi)
  values = target.feature_values(scored.tokens, scored.mask, ctx)
  if values.shape[-1]:
    moments = estimators.self_normalized_moments(values, log_w_pi)
    for i, name in enumerate(target.feature_names):
      metrics[f"moment/{name}"] = moments[i]
  n = scored.log_q.shape[0]
  metrics["ess_target"] = estimators.effective_sample_size(
      scored.log_target - scored.log_q) / n
  metrics["ess_policy"] = estimators.effective_sample_size(log_w_pi) / n
  metrics["log_z"] = jnp.mean(log_z)
  metrics["mean_length"] = jnp.mean(scored.lengths.astype(jnp.float32))
  metrics["satisfied_fraction"] = jnp.mean(
      (scored.log_target > -jnp.inf).astype(jnp.float32))
  return metrics
