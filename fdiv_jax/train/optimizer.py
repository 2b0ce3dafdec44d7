"""The optimiser of the policy: AdamW with clipping, a schedule, accumulation.

`OptimizerConfig` is the typed description (validated when constructed);
`make_optimizer(config)` builds the optax transformation from it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fdiv_jax.core import _values

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW settings (all checked at construction).

  Attributes:
    learning_rate: the peak learning rate, > 0.
    num_steps: train steps of the run; the schedule spans
      num_steps // grad_accum_steps optimiser updates.
    lr_schedule: "constant", "cosine" (to 10% of the peak) or "linear" (to
      10%), after a linear warm-up of `warmup_steps` updates from 0.
    warmup_steps: >= 0.
    adam_b1, adam_b2: Adam's decays, in [0, 1).
    weight_decay: decoupled weight decay, >= 0.
    max_grad_norm: global-norm clipping, >= 0 (0 = no clipping).
    grad_accum_steps: micro-batches (train steps) per update, >= 1.
  """
  learning_rate: float = 1e-4
  num_steps: int = 200
  lr_schedule: str = "constant"
  warmup_steps: int = 10
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    _values.real("learning_rate", self.learning_rate, low=0.0, low_open=True)
    _values.integer("num_steps", self.num_steps, minimum=1)
    _values.integer("grad_accum_steps", self.grad_accum_steps, minimum=1)
    _values.integer("warmup_steps", self.warmup_steps, minimum=0)
    _values.choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
    for name in ("adam_b1", "adam_b2"):
      _values.real(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
    _values.real("weight_decay", self.weight_decay, low=0.0)
    _values.real("max_grad_norm", self.max_grad_norm, low=0.0,
                 note=" (0 = no clipping)")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant, cosine or linear decay."""
  peak = config.learning_rate
  warmup = config.warmup_steps
  updates = max(config.num_steps // config.grad_accum_steps, 1)
  decay_steps = max(updates - warmup, 1)
  if config.lr_schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1)
  else:
    decay = optax.linear_schedule(peak, 0.1 * peak, decay_steps)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` whose norm cannot overflow.

  The norm is m·‖g/m‖ with m = max_i |g_i|, so gradients with entries near
  1e19 in float32 (large pseudo-rewards of Pearson χ² or α > 1 divergences,
  whose bounds keep R and R² finite but not Σ g²) are rescaled to `max_norm`
  instead of being multiplied by max_norm/inf = 0: a silent no-op update.
  """

  def update(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
    safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    norm = safe * jnp.sqrt(sum(jnp.sum(jnp.square(x / safe)) for x in leaves))
    factor = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    return jax.tree.map(lambda x: (x * factor).astype(x.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def all_finite(tree) -> jax.Array:
  """bool scalar: no leaf of ``tree`` holds a NaN or ±inf.

  Tested as ``isfinite(Σ_leaves Σ x·0)``: x·0 is 0 for a finite x and NaN for
  NaN or ±inf, and a float sum passes NaN on. One float reduction per leaf,
  where ``all(isfinite(x))`` reduces a boolean array, which XLA:CPU does in
  several passes: 4.7x slower at GPT-2 small's embedding (50257 x 768), 0.1 s
  of a 124M-parameter update. (``max(|x|)`` would not do: XLA:CPU's max
  reduction can drop a NaN.)
  """
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(x * 0, dtype=jnp.float32) for x in leaves)
  return jnp.isfinite(jnp.asarray(total, jnp.float32))


def skip_if_not_finite(inner: optax.GradientTransformation,
                       max_consecutive_errors: int
                       ) -> optax.GradientTransformationExtraArgs:
  """``optax.apply_if_finite(inner, max_consecutive_errors)`` with the
  finiteness test of ``all_finite``.

  Same behaviour, state (``optax.ApplyIfFiniteState``, so checkpoints and
  ``skipped_updates`` are unchanged) and extra arguments (passed on to
  ``inner``): an update whose gradient holds a NaN or ±inf is rejected (zero
  update, inner state kept) and counted in ``notfinite_count`` (consecutive)
  and ``total_notfinite``; after more than ``max_consecutive_errors``
  consecutive rejections it is applied.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params))

  def update(updates, state, params=None, **extra_args):
    finite = all_finite(updates)
    notfinite_count = jnp.where(finite, 0,
                                optax.safe_increment(state.notfinite_count))
    new_updates, inner_state = jax.lax.cond(
        finite | (notfinite_count > max_consecutive_errors),
        lambda: inner.update(updates, state.inner_state, params, **extra_args),
        lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state))
    total = jnp.where(finite, state.total_notfinite,
                      optax.safe_increment(state.total_notfinite))
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count, last_finite=finite,
        total_notfinite=total, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, a schedule, accumulation and a finite guard.

  Layers, outermost first:
    skip_if_not_finite      a gradient with a NaN/inf is skipped (not applied,
                            not accumulated) and counted in `total_notfinite`
                            (`optax.apply_if_finite`, with a faster test);
    optax.MultiSteps        accumulates `grad_accum_steps` micro-batch gradients
                            (one per train step) and updates on the last;
    clip_by_global_norm (overflow-safe) → adamw(schedule).
  """
  inner = optax.chain(
      clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0
      else optax.identity(),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1,
                  b2=config.adam_b2, eps=1e-8, weight_decay=config.weight_decay),
  )
  if config.grad_accum_steps > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=config.grad_accum_steps)
  # A large error budget: skipping is reported in the metrics, never fatal here.
  return skip_if_not_finite(inner, max_consecutive_errors=1_000_000)


def skipped_updates(opt_state) -> int:
  """The `total_notfinite` counter of `skip_if_not_finite` (outermost)."""
  return opt_state.total_notfinite
