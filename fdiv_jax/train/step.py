"""One f-DPG train step: sample, score, estimate Ẑ, policy-gradient update.

`make_train_step(config, model, target)` returns a pure function

    step(state: FDPGState, batch: Batch) -> (state, metrics)

that a caller compiles once with `jax.jit` (see `fdiv_jax.train.sharding`):

  1. draw B continuations x ~ q(·|prompt) with the KV-cache sampler, which also
     returns the exact log q(x) of what it sampled (q = π_θ online; the separate
     proposal of offline DPG otherwise);
  2. score log π_θ(x) (differentiably) and log a(x) under the frozen base model,
     and log P(x) = `target.log_prob(x, log a(x))`. Online without temperature
     or truncation q = π, so log π(x) is the sampler's log q and scoring π
     only computes its gradient (`scoring.sequence_log_probs` with
     `known_token_log_probs`);
  3. fold the batch into the running log Ẑ (`estimators.update_partition`, one
     per context), and compute the pseudo-reward baseline;
  4. minimise `losses.fdpg_loss` for the configured divergence with optax
     (clipping, schedule, accumulation, non-finite updates skipped);
  5. offline: replace q by π when π's estimated divergence to the target, averaged
     over a window of steps, is lower than q's;
  6. report metrics: loss, log Ẑ, ESS, the four divergences to the target,
     KL(π‖a), alignment and feature moments under π, pseudo-reward and advantage
     statistics, gradient norm, skipped updates.

All importance-sampled metrics use the same samples: E_π[·] is estimated with the
self-normalised weights π/q (exactly 1 on-policy).

References: Go et al., ICML 2023 (f-DPG); Khalifa et al., ICLR 2021 (DPG/GDC,
offline proposal updates); Korbak et al., ICML 2022 (per-context Z, CDPG).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fdiv_jax.run import config as config_lib
from fdiv_jax.core import divergences, estimators, losses
from fdiv_jax.lm import sampling, scoring
from fdiv_jax.train import state as state_lib

Array = jax.Array
Metrics = dict[str, Array]

def divergence_from_config(config) -> divergences.Divergence:
  if config.divergence == "alpha":
    return divergences.get("alpha", alpha=config.alpha)
  return divergences.get(config.divergence)


def sampler_from_config(config, eos_id: int | None, pad_id: int) -> sampling.SamplerConfig:
  """The proposal's sampler: `max_new_tokens` and its temperature/top-k/top-p."""
  return sampling.SamplerConfig(
      max_new_tokens=int(config.max_new_tokens), temperature=float(config.temperature),
      top_k=int(config.top_k), top_p=float(config.top_p), eos_id=eos_id, pad_id=pad_id)


class Scored(NamedTuple):
  """Samples from q and their log-probabilities, all [B] unless noted."""
  tokens: Array        # int32 [B, N]
  mask: Array          # bool [B, N]
  token_log_q: Array   # float32 [B, N]: log q of each token (0 off the mask)
  log_q: Array         # log q(x) of the warped proposal that drew x
  log_base: Array      # log a(x)
  log_target: Array    # log P(x)
  lengths: Array       # int32 [B]


def _context(batch: state_lib.Batch) -> dict[str, Array]:
  return {"prompts": batch.prompts, "prompt_lengths": batch.prompt_lengths}


def draw_and_score(model, target, sampler: sampling.SamplerConfig, proposal_params,
                   base_params, batch: state_lib.Batch, rng: Array) -> Scored:
  """Steps 1–2 without π: samples from q with log q, log a and log P."""
  out = sampling.sample(model, proposal_params, rng, batch.prompts,
                        batch.prompt_lengths, sampler)
  out = jax.tree.map(jax.lax.stop_gradient, out)
  _, log_base = scoring.sequence_log_probs(model, base_params, batch.prompts,
                                           batch.prompt_lengths, out.tokens, out.mask)
  log_base = jax.lax.stop_gradient(log_base)
  log_target = target.log_prob(out.tokens, out.mask, log_base, _context(batch))
  return Scored(out.tokens, out.mask, out.token_log_q, out.log_q, log_base,
                jax.lax.stop_gradient(log_target), out.lengths)


def sample_metrics(target, scored: Scored, log_model: Array, log_z: Array,
                   batch: state_lib.Batch) -> Metrics:
  """Metrics of π against the target from samples of q (no gradient)."""
  log_model = jax.lax.stop_gradient(log_model)
  args = (log_model, scored.log_target, scored.log_q, log_z)
  metrics = dict(estimators.divergences_to_target(*args))
  metrics["kl_from_base"] = estimators.kl_from_base(log_model, scored.log_base,
                                                    scored.log_q)
  log_w_pi = log_model - scored.log_q
  context = _context(batch)
  alignment = target.alignment(scored.tokens, scored.mask, context)
  metrics["alignment"] = estimators.self_normalized_moments(alignment, log_w_pi)
  values = target.feature_values(scored.tokens, scored.mask, context)
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


def _tree_where(pred: Array, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(config, model, target,
                    sampler: sampling.SamplerConfig | None = None,
                    ) -> Callable[[state_lib.FDPGState, state_lib.Batch],
                                  tuple[state_lib.FDPGState, Metrics]]:
  """Builds the pure train step (see the module docstring).

  Args:
    config: the run config; fields used: `divergence` (and `alpha`), `mode`
      ("online" | "offline"), `reuse_sampler_log_probs`, `max_new_tokens`,
      `temperature`, `top_k`, `top_p`,
      `baseline*`, `log_ratio_clip` (0 = dtype default), `ema_decay`,
      `proposal_update_metric`, `proposal_update_window`.
    model: the Flax language model shared by π, a and q.
    target: a `fdiv_jax.targets` target (log_prob, alignment, feature_values).
    sampler: the proposal's `SamplerConfig`; by default from the config, with
      `config.eos_id` / `config.pad_id`.

  Returns:
    `step(state, batch) -> (state, metrics)`, pure and jittable.
  """
  divergence = divergence_from_config(config)
  if sampler is None:
    sampler = sampler_from_config(config, config.eos_id, config.pad_id)
  baseline = state_lib.baseline_from_config(config)
  offline = config.mode == "offline"
  # The proposal is π itself, unwarped: the sampler's log q is log π.
  on_policy = (bool(config.reuse_sampler_log_probs) and not offline
               and sampler.warping == scoring.Warping())
  clip = float(config.log_ratio_clip) if config.log_ratio_clip else None
  ema_decay = float(config.ema_decay)
  metric_name = config.proposal_update_metric
  if metric_name not in config_lib.PROPOSAL_METRICS:
    raise ValueError(f"proposal_update_metric must be one of "
                     f"{', '.join(config_lib.PROPOSAL_METRICS)}; got {metric_name!r}.")

  def step(state: state_lib.FDPGState, batch: state_lib.Batch):
    rng, sample_rng = jax.random.split(state.rng)
    proposal_params = state.proposal_params if offline else state.params
    scored = draw_and_score(model, target, sampler, proposal_params,
                            state.base_params, batch, sample_rng)
    # A NaN log P (a broken feature) must not poison the running Ẑ for good: it
    # is left out here, while the loss turns NaN and the update is skipped.
    log_partition = estimators.update_partition(
        state.log_partition, scored.log_target, scored.log_q, batch.context_ids,
        mask=~jnp.isnan(scored.log_target))
    log_z = log_partition.log_z[batch.context_ids]

    def loss_fn(params):
      # On-policy (q = π exactly), the sampler's log q is log π: only its
      # gradient is computed, and π/q is exactly 1 (rather than 1 up to the
      # rounding of two forward passes).
      known = scored.token_log_q if on_policy else None
      _, log_model = scoring.sequence_log_probs(
          model, params, batch.prompts, batch.prompt_lengths, scored.tokens,
          scored.mask, known_token_log_probs=known)
      fixed = jax.lax.stop_gradient(log_model)
      # The baseline needs this batch's pseudo-rewards for batch-mean / LOO.
      _, pre = losses.fdpg_loss(divergence, fixed, scored.log_q, scored.log_target,
                                log_z, 0.0, log_ratio_clip=clip)
      b = baseline.value(state.baseline_state, pre["pseudo_reward"],
                         pre["importance_weight"])
      loss, aux = losses.fdpg_loss(divergence, log_model, scored.log_q,
                                   scored.log_target, log_z, b, log_ratio_clip=clip)
      return loss, (aux, fixed)

    (loss, (aux, log_model)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state = state.apply_gradients(grads=grads)
    # Non-finite rewards (a NaN log P, an overflowing weight) stay out of the
    # baseline, which would otherwise carry them into every later step.
    baseline_state = baseline.update(
        state.baseline_state, aux["pseudo_reward"], aux["importance_weight"],
        mask=jnp.isfinite(aux["pseudo_reward"] * aux["importance_weight"]))
    updates = dict(rng=rng, log_partition=log_partition, baseline_state=baseline_state)
    if state.ema_params is not None:
      updates["ema_params"] = jax.tree.map(
          lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params,
          new_state.params)

    metrics = sample_metrics(target, scored, log_model, log_z, batch)
    if offline:
      args = (scored.log_target, scored.log_q, log_z)
      policy_score = estimators.divergence(metric_name, log_model, *args)
      proposal_score = estimators.divergence(metric_name, scored.log_q, *args)
      slot = state.step % state.policy_scores.shape[0]
      policy_scores = state.policy_scores.at[slot].set(policy_score)
      proposal_scores = state.proposal_scores.at[slot].set(proposal_score)
      # Means are NaN (so the comparison False) until the window is full.
      better = jnp.mean(policy_scores) < jnp.mean(proposal_scores)
      updates["proposal_params"] = _tree_where(better, new_state.params,
                                               state.proposal_params)
      reset = jnp.full_like(policy_scores, jnp.nan)
      updates["policy_scores"] = jnp.where(better, reset, policy_scores)
      updates["proposal_scores"] = jnp.where(better, reset, proposal_scores)
      updates["num_proposal_updates"] = state.num_proposal_updates + better
      metrics["proposal_" + metric_name] = proposal_score
      metrics["proposal_updates"] = updates["num_proposal_updates"]
    new_state = new_state.replace(**updates)

    metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        pseudo_reward_mean=jnp.mean(aux["pseudo_reward"]),
        pseudo_reward_std=jnp.std(aux["pseudo_reward"]),
        advantage_mean=jnp.mean(aux["advantage"]),
        advantage_std=jnp.std(aux["advantage"]),
        importance_weight_mean=aux["mean_importance_weight"],
        num_clipped=aux["num_clipped"],
        skipped_updates=state_lib.skipped_updates(new_state.opt_state),
    )
    return new_state, metrics

  return step


def make_eval_step(config, model, target, sampler: sampling.SamplerConfig | None = None,
                   use_ema: bool = False) -> Callable[..., Metrics]:
  """`eval_step(state, batch, rng) -> metrics` on fresh on-policy samples x ~ π.

  Samples come from the policy itself, untempered (the distribution being
  evaluated), with log Ẑ from the state merged with these samples' own
  estimate; with `use_ema` the Polyak-averaged parameters are evaluated.
  """
  if sampler is None:
    sampler = sampler_from_config(config, config.eos_id, config.pad_id)
  plain = sampling.SamplerConfig(max_new_tokens=sampler.max_new_tokens,
                                 eos_id=sampler.eos_id, pad_id=sampler.pad_id)

  def eval_step(state: state_lib.FDPGState, batch: state_lib.Batch, rng: Array):
    params = state.ema_params if use_ema and state.ema_params is not None else (
        state.params)
    scored = draw_and_score(model, target, plain, params, state.base_params, batch,
                            rng)
    # The fresh samples also estimate Z (unbiasedly, whatever the proposal), so
    # they are merged into the running estimate for this evaluation only; at
    # step 0 they are the only estimate there is.
    log_z = estimators.update_partition(
        state.log_partition, scored.log_target, scored.log_q, batch.context_ids,
        mask=~jnp.isnan(scored.log_target)).log_z[batch.context_ids]
    # On-policy: q = π exactly, so the log q from the sampler is log π.
    return sample_metrics(target, scored, scored.log_q, log_z, batch)

  return eval_step
