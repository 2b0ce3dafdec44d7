"""The f-DPG training state: a Flax `TrainState` plus everything f-DPG needs to
continue exactly after a restart, and the optax optimiser built from a config.

Fields beyond `TrainState` (step, params, opt_state, tx, apply_fn):

  base_params      the frozen base model a(x) (the EBM's prior), never updated
  proposal_params  the proposal q of offline DPG (Khalifa et al., ICLR 2021);
                   None in online mode, where q = π
  log_partition    running importance-sampling estimate of log Z, one per context
                   (`estimators.PartitionState`)
  baseline_state   state of the pseudo-reward baseline (`baselines.Baseline`)
  rng              raw uint32[2] PRNG key; split once per step
  ema_params       Polyak average of `params` (the "smoothing" of GDC), or
                   None when `ema_decay` is 0
  policy_scores,   offline mode: the last W per-step estimates of D(π‖p) and
  proposal_scores  D(q‖p) on which "replace q by π when π is closer" is decided
  num_proposal_updates  how often q was replaced by π

Every field is an array pytree, so Orbax saves and restores all of it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from fdiv_jax.core import baselines, estimators

Array = jax.Array


class FDPGState(train_state.TrainState):
  base_params: Any = None
  proposal_params: Any = None
  log_partition: estimators.PartitionState = None
  baseline_state: Any = None
  rng: Array = None
  ema_params: Any = None
  policy_scores: Array = None
  proposal_scores: Array = None
  num_proposal_updates: Array = None

  @property
  def num_skipped_updates(self) -> Array:
    """Updates skipped because the gradient was not finite."""
    return skipped_updates(self.opt_state)


def skipped_updates(opt_state) -> Array:
  """The `total_notfinite` counter of `optax.apply_if_finite` (outermost)."""
  return opt_state.total_notfinite


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant, cosine or linear decay."""
  peak = config.learning_rate
  warmup = max(int(config.warmup_steps), 0)
  updates = max(int(config.num_steps) // max(int(config.grad_accum_steps), 1), 1)
  decay_steps = max(updates - warmup, 1)
  if config.lr_schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1)
  elif config.lr_schedule == "linear":
    decay = optax.linear_schedule(peak, 0.1 * peak, decay_steps)
  else:
    raise ValueError(f"lr_schedule must be one of constant, cosine, linear; got "
                     f"{config.lr_schedule!r}.")
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, a schedule, accumulation and a finite guard.

  Layers, outermost first:
    optax.apply_if_finite   a gradient with a NaN/inf is skipped (not applied,
                            not accumulated) and counted in `total_notfinite`;
    optax.MultiSteps        accumulates `grad_accum_steps` micro-batch gradients
                            (one per train step) and updates on the last;
    clip_by_global_norm → adamw(schedule).
  """
  inner = optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0
      else optax.identity(),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1,
                  b2=config.adam_b2, eps=1e-8, weight_decay=config.weight_decay),
  )
  if config.grad_accum_steps > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=int(config.grad_accum_steps))
  # A large error budget: skipping is reported in the metrics, never fatal here.
  return optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)


def create_state(config, model, params, base_params=None, num_contexts: int = 1,
                 rng: Array | None = None) -> FDPGState:
  """A fresh state at step 0 from initial policy params (usually = base params).

  Args:
    config: the run's `ml_collections.ConfigDict` (see `configs/`).
    model: the Flax language model (its `apply` becomes `apply_fn`).
    params: the policy's initial parameters π_θ0.
    base_params: the base model a; defaults to a copy of `params`.
    num_contexts: number of log Ẑ entries (1 unless the target is conditional).
    rng: a raw uint32[2] key; default `jax.random.PRNGKey(config.seed)`.
  """
  # Separate buffers for every copy: the jitted step donates the whole state, and
  # a buffer shared by two fields could not be donated twice.
  copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  base_params = copy(params if base_params is None else base_params)
  params = copy(params)  # the caller keeps its own arrays
  baseline = baseline_from_config(config)
  window = max(int(config.proposal_update_window), 1)
  ema = copy(params)
  return FDPGState.create(
      apply_fn=model.apply,
      params=params,
      tx=make_optimizer(config),
      base_params=base_params,
      proposal_params=copy(base_params) if config.mode == "offline" else None,
      log_partition=estimators.init_partition(num_contexts),
      baseline_state=baseline.init(),
      rng=jax.random.PRNGKey(config.seed) if rng is None else rng,
      ema_params=ema if config.ema_decay > 0 else None,
      policy_scores=jnp.full((window,), jnp.nan, jnp.float32),
      proposal_scores=jnp.full((window,), jnp.nan, jnp.float32),
      num_proposal_updates=jnp.zeros((), jnp.int32),
  )


def baseline_from_config(config) -> baselines.Baseline:
  return baselines.get(config.baseline, window=int(config.baseline_window),
                       decay=float(config.baseline_decay))


@flax.struct.dataclass
class Batch:
  """What the host feeds one train step (the samples are drawn inside it).

  Attributes:
    prompts: int32 [B, P], left-padded (`sampling.pad_prompts`); a BOS token
      for unconditional generation.
    prompt_lengths: int32 [B].
    context_ids: int32 [B] in [0, C): which log Ẑ each row uses (0 if
      unconditional).
  """
  prompts: Array
  prompt_lengths: Array
  context_ids: Array
