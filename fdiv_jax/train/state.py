"""The f-DPG training state: a Flax `TrainState` plus everything f-DPG needs to
continue exactly after a restart, and the batch the host feeds a step.

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
  frozen_base      LoRA only (static, not an array): the `FrozenBase` that
                   names the frozen weights in `base_params`

Every field is an array pytree, so Orbax saves and restores all of it, except
under LoRA (`models.LoRALM`): then `params` (and the EMA and the proposal) are
the adapters, `base_params` the frozen weights that serve both the policy
π = base + adapters and the base model a, and `frozen_base` names them. The
step neither donates nor copies them (`sharding.jit_train_step`), and
checkpoints leave them out and record `frozen_base` instead
(`checkpoint.Checkpointer`): the same weights are loaded again on resume,
checked against the fingerprint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from fdiv_jax.core import estimators
from fdiv_jax.lm.models import lora
from fdiv_jax.train import optimizer as optimizer_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FrozenBase:
  """The frozen base weights that LoRA adapters belong to.

  Attributes:
    path: where they were loaded from (a Hugging Face directory, ...); for
      messages.
    fingerprint: `models.lora.fingerprint` of the weights as held (dtype
      included); what a checkpoint is checked against on restore.
  """
  path: str
  fingerprint: str


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
  frozen_base: FrozenBase | None = flax.struct.field(pytree_node=False,
                                                     default=None)

  @property
  def num_skipped_updates(self) -> Array:
    """Updates skipped because the gradient was not finite."""
    return optimizer_lib.skipped_updates(self.opt_state)


def evaluated_params(state: FDPGState) -> Any:
  """The policy that evaluation reports: the Polyak average when the run keeps
  one (`StepConfig.ema_decay > 0`), else the current parameters (under LoRA:
  the adapters; `lora.policy_params` adds the base)."""
  return state.params if state.ema_params is None else state.ema_params


def create_state(model, params, *, step_config,
                 optimizer: optimizer_lib.OptimizerConfig | optax.GradientTransformation,
                 base_params=None, num_contexts: int = 1, seed: int = 0,
                 rng: Array | None = None,
                 log_partition: estimators.PartitionState | None = None
                 ) -> FDPGState:
  """A fresh state at step 0 from initial policy params (usually = base params).

  Args:
    model: the Flax language model (its `apply` becomes `apply_fn`), or a
      `models.LoRALM`.
    params: the policy's initial parameters π_θ0 (under LoRA: the adapters,
      `lora.init_adapters`).
    step_config: the `train.StepConfig` (its baseline, mode, EMA and proposal
      window size the state).
    optimizer: an `OptimizerConfig` or an optax transformation.
    base_params: the base model a; defaults to a copy of `params`. Under
      LoRA the frozen weights, required, and held as they are (not copied:
      the state shares them with the caller; the step never donates them).
    num_contexts: number of log Ẑ entries (1 unless the target is conditional).
    seed: the RNG seed, `jax.random.PRNGKey(seed)`, unless `rng` is given.
    rng: a raw uint32[2] key.
    log_partition: the running log Ẑ to start from (e.g. the λ fit's
      samples); default empty, with `num_contexts` entries.
  """
  # Separate buffers for every copy: the jitted step donates the whole state, and
  # a buffer shared by two fields could not be donated twice.
  copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  frozen_base = None
  if lora.is_lora(model):
    if base_params is None:
      raise ValueError("base_params: a LoRA policy needs the frozen base "
                       "weights (its params are the adapters).")
    frozen_base = FrozenBase(model.base_path, lora.fingerprint(base_params))
    proposal = params  # the initial adapters: q = a when B = 0
  else:
    base_params = copy(params if base_params is None else base_params)
    proposal = base_params
  params = copy(params)  # the caller keeps its own arrays
  window = step_config.proposal_update_window
  tx = (optimizer_lib.make_optimizer(optimizer)
        if isinstance(optimizer, optimizer_lib.OptimizerConfig) else optimizer)
  return FDPGState.create(
      apply_fn=model.apply,
      params=params,
      tx=tx,
      base_params=base_params,
      proposal_params=copy(proposal) if step_config.offline else None,
      log_partition=(estimators.init_partition(num_contexts)
                     if log_partition is None else copy(log_partition)),
      baseline_state=step_config.baseline.init(),
      rng=jax.random.PRNGKey(seed) if rng is None else rng,
      ema_params=copy(params) if step_config.ema_decay > 0 else None,
      policy_scores=jnp.full((window,), jnp.nan, jnp.float32),
      proposal_scores=jnp.full((window,), jnp.nan, jnp.float32),
      num_proposal_updates=jnp.zeros((), jnp.int32),
      frozen_base=frozen_base,
  )


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
