"""One f-DPG train step: sample, score, estimate Ẑ, policy-gradient update.

`make_train_step(config, model, target, sampler)` returns a pure function

    step(state: FDPGState, batch: Batch) -> (state, metrics)

that a caller compiles once with `jax.jit` (see `fdiv_jax.train.sharding`). It
reads top to bottom in the order of the paper, each quantity computed once:

  1. x ~ q(·|prompt) with its exact log q (q = π_θ online; the separate
     proposal of offline DPG otherwise), log a(x) and log P(x);
  2. the running log Ẑ, one per context (`estimators.update_partition`);
  3. log π_θ(x) and the pullback of its gradient (`jax.vjp`). Online without
     temperature or truncation q = π, so log π(x) is the sampler's log q and
     only its gradient is computed;
  4. ℓ = log π − log P + log Ẑ → pseudo-reward R = −f'(e^ℓ) → importance
     weight w = π/q → baseline b → advantage A = R − b;
  5. the surrogate mean_i −w_i A_i log π(x_i), whose gradient in log π is pulled
     back to the parameters: an unbiased estimate of +∇D_f(π‖p);
  6. the optax update (clipping, schedule, accumulation, non-finite updates
     skipped), the baseline and EMA updates, and offline the proposal update
     (q ← π when π's estimated divergence to the target, averaged over a window
     of steps, is lower than q's);
  7. metrics (`rollout.sample_metrics`, each estimate with its standard
     error): the four divergences to the target and the trained one, KL(π‖a),
     alignment and moments under π, log Ẑ, ESS; and loss, pseudo-reward and
     advantage statistics, gradient norm, clipped samples, skipped updates.

Under LoRA (`models.LoRALM`) the state's `params` are the adapters and its
`base_params` the frozen weights: π is the base plus the adapters, a the base
alone, and the gradient (3, 5) and the optimiser (6) see the adapters only.

References: Go et al., ICML 2023 (f-DPG); Khalifa et al., ICLR 2021 (DPG/GDC,
offline proposal updates); Korbak et al., ICML 2022 (per-context Z, CDPG).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fdiv_jax.core import _values, baselines, divergences, estimators, losses
from fdiv_jax.lm import sampling, scoring
from fdiv_jax.lm.models import lora
from fdiv_jax.train import optimizer as optimizer_lib
from fdiv_jax.train import rollout
from fdiv_jax.train import state as state_lib

Array = jax.Array
Metrics = dict[str, Array]
MODES = ("online", "offline")
PROPOSAL_METRICS = divergences.STANDARD


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """How one step updates the policy (static: closed over by `jit`).

  Attributes:
    divergence: the f of D_f(π‖p) to minimise (a `Divergence` or a name that
      `divergences.get` accepts).
    baseline: the pseudo-reward baseline (`baselines.Baseline`).
    mode: "online" (q = π) or "offline" (DPG: a separate proposal q, replaced
      by π when π is closer to the target).
    ema_decay: Polyak averaging of the policy, in [0, 1) (0 = off).
    log_ratio_clip: the bound c on |ℓ| of `losses.clip_log_ratio`; None for
      the dtype default.
    proposal_update_metric: offline: the divergence on which q and π are
      compared, one of `PROPOSAL_METRICS`.
    proposal_update_window: offline: steps averaged in that comparison, >= 1.
    reuse_sampler_log_probs: online and unwarped (q = π exactly), take log π
      from the sampler and compute only its gradient (one vocabulary pass
      fewer). Turn it off with bfloat16 activations, where a cached decode and
      a full forward differ by more than float32 rounding.
  """
  divergence: divergences.Divergence
  baseline: baselines.Baseline = baselines.Baseline()
  mode: str = "online"
  ema_decay: float = 0.0
  log_ratio_clip: float | None = None
  proposal_update_metric: str = "tv"
  proposal_update_window: int = 5
  reuse_sampler_log_probs: bool = True

  def __post_init__(self):
    object.__setattr__(self, "divergence", divergences.get(self.divergence))
    if not isinstance(self.baseline, baselines.Baseline):
      raise TypeError(f"baseline: must be a baselines.Baseline, got "
                      f"{self.baseline!r}.")
    _values.choice("mode", self.mode, MODES)
    _values.real("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True,
                 note=" (0 = off)")
    if self.log_ratio_clip is not None:
      _values.real("log_ratio_clip", self.log_ratio_clip, low=0.0, low_open=True,
                   note=" (or None for the dtype default)")
    _values.choice("proposal_update_metric", self.proposal_update_metric,
                   PROPOSAL_METRICS)
    _values.integer("proposal_update_window", self.proposal_update_window,
                    minimum=1)
    _values.boolean("reuse_sampler_log_probs", self.reuse_sampler_log_probs)

  @property
  def offline(self) -> bool:
    return self.mode == "offline"


def _tree_where(pred: Array, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(config: StepConfig, model, target,
                    sampler: sampling.SamplerConfig,
                    ) -> Callable[[state_lib.FDPGState, state_lib.Batch],
                                  tuple[state_lib.FDPGState, Metrics]]:
  """Builds the pure train step (see the module docstring).

  Args:
    config: the update rule (`StepConfig`).
    model: the Flax language model shared by π, a and q (a `LoRALM`: π and
      q with adapters, a without).
    target: a `fdiv_jax.targets` target (log_prob, alignment, feature_values).
    sampler: the proposal's `SamplerConfig` (its eos/pad ids, warping).

  Returns:
    `step(state, batch) -> (state, metrics)`, pure and jittable.
  """
  d = config.divergence
  # The proposal is π itself, unwarped: the sampler's log q is log π.
  on_policy = (config.reuse_sampler_log_probs and not config.offline
               and sampler.warping == scoring.Warping())

  def step(state: state_lib.FDPGState, batch: state_lib.Batch):
    rng, sample_rng = jax.random.split(state.rng)
    # 1. x ~ q, with log q, log a, log P.
    proposal_params = state.proposal_params if config.offline else state.params
    x = rollout.draw_and_score(model, target, sampler, proposal_params,
                               state.base_params, batch, sample_rng)
    # 2. Ẑ. A NaN log P (a broken feature) is left out of the running estimate,
    # which it would poison for good; the update below turns NaN and is skipped.
    log_partition = estimators.update_partition(
        state.log_partition, x.log_target, x.log_q, batch.context_ids,
        mask=~jnp.isnan(x.log_target))
    log_z = log_partition.log_z[batch.context_ids]

    # 3. log π(x) and its pullback. On-policy the sampler's log q is log π:
    # only the gradient is computed, and π/q is exactly 1.
    def log_policy(params):
      return scoring.sequence_log_probs(
          model, lora.policy_params(model, state.base_params, params),
          batch.prompts, batch.prompt_lengths, x.tokens, x.mask,
          known_token_log_probs=x.token_log_q if on_policy else None)[1]
    log_model, pullback = jax.vjp(log_policy, state.params)

    # 4. ℓ → pseudo-reward → importance weight → baseline → advantage.
    log_t = losses.log_ratio(log_model, x.log_target, log_z)
    clipped = losses.clip_log_ratio(d, log_t, log_ratio_clip=config.log_ratio_clip)
    rewards = d.pseudo_reward(clipped)
    weights = losses.importance_weights(log_model, x.log_q)
    baseline = config.baseline.value(state.baseline_state, rewards, weights)
    advantages = rewards - baseline

    # 5. The surrogate, and its gradient pulled back to the parameters.
    loss, d_log_model = jax.value_and_grad(
        lambda lm: losses.masked_mean(losses.surrogate(lm, weights, advantages))
    )(log_model)
    (grads,) = pullback(d_log_model)

    # 6. Updates: parameters, baseline (finite rewards only: a NaN log P or an
    # overflowing weight would otherwise reach every later step), EMA, proposal.
    new_state = state.apply_gradients(grads=grads)
    updates = dict(rng=rng, log_partition=log_partition)
    updates["baseline_state"] = config.baseline.update(
        state.baseline_state, rewards, weights,
        mask=jnp.isfinite(rewards * weights))
    if state.ema_params is not None:
      decay = config.ema_decay
      updates["ema_params"] = jax.tree.map(
          lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params,
          new_state.params)

    # 7. Metrics.
    metrics = rollout.sample_metrics(d, target, x, log_model, state.log_partition)
    if config.offline:
      # π is scored with the parameters that would be installed as q.
      log_new_model = jax.lax.stop_gradient(log_policy(new_state.params))
      updates.update(_proposal_update(config, state, new_state, x, log_new_model,
                                      log_z, metrics))
    new_state = new_state.replace(**updates)
    metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        pseudo_reward_mean=jnp.mean(rewards),
        pseudo_reward_std=jnp.std(rewards),
        advantage_mean=jnp.mean(advantages),
        advantage_std=jnp.std(advantages),
        importance_weight_mean=jnp.mean(weights),
        num_clipped=jnp.sum(losses.is_clipped(log_t, clipped)),
        skipped_updates=optimizer_lib.skipped_updates(new_state.opt_state),
    )
    return new_state, metrics

  return step


def _proposal_update(config: StepConfig, state, new_state, x: rollout.Scored,
                     log_model: Array, log_z: Array, metrics: Metrics) -> dict:
  """Offline DPG: replace q by π when π is closer to the target (windowed).

  `log_model` is log π of the batch under `new_state.params`, the parameters
  that would become q. A metric that is +inf for both (reverse KL under a hard
  constraint) would never compare: the run layer refuses that configuration.
  """
  name = config.proposal_update_metric
  args = (x.log_target, x.log_q, log_z)
  policy_score = estimators.divergence(name, log_model, *args)
  proposal_score = estimators.divergence(name, x.log_q, *args)
  slot = state.step % state.policy_scores.shape[0]
  policy_scores = state.policy_scores.at[slot].set(policy_score)
  proposal_scores = state.proposal_scores.at[slot].set(proposal_score)
  # Means are NaN (so the comparison False) until the window is full.
  better = jnp.mean(policy_scores) < jnp.mean(proposal_scores)
  reset = jnp.full_like(policy_scores, jnp.nan)
  updates = dict(
      proposal_params=_tree_where(better, new_state.params, state.proposal_params),
      policy_scores=jnp.where(better, reset, policy_scores),
      proposal_scores=jnp.where(better, reset, proposal_scores),
      num_proposal_updates=state.num_proposal_updates + better)
  metrics["proposal_" + name] = proposal_score
  metrics["proposal_updates"] = updates["num_proposal_updates"]
  return updates
