"""A scalar reward model r(x) learnt from pairwise preferences (Bradley–Terry).

The reward-modelling step of RLHF (Ziegler et al. 2019; Stiennon et al.
2020): a scalar head on the last hidden state of a language-model backbone,
trained on pairs (chosen x⁺, rejected x⁻) with the Bradley–Terry likelihood

    P(x⁺ ≻ x⁻) = σ(r(x⁺) − r(x⁻)),
    loss = −mean log σ(r(x⁺) − r(x⁻)) = mean softplus(−(r(x⁺) − r(x⁻))).

The trained model then serves as r(x) in ``targets.RewardTarget``
(P(x) = a(x) e^{r(x)/β}) through :func:`reward_feature`.

Shapes: ``tokens`` int32 ``[B, N]``, ``mask`` bool ``[B, N]`` (True on real
tokens). The head reads the hidden state at the last True position of the
mask, so with a causal backbone and right padding the padding never reaches
it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdiv_jax.targets import features as features_lib

Array = jax.Array
Params = Any
Batch = Mapping[str, Array]

BATCH_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens",
              "rejected_mask")


def last_position(mask: Array) -> Array:
  """Index of the last True of each row of ``mask`` [B, N]; int32 [B] (0 if none)."""
  n = mask.shape[-1]
  has_any = jnp.any(mask, axis=-1)
  last = n - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
  return jnp.where(has_any, last, 0).astype(jnp.int32)


class RewardModel(nn.Module):
  """r(x) = w · h_last(x) + b, h from a language-model backbone.

  Attributes:
    backbone: a Flax LM with ``backbone(tokens, return_hidden=True) ->
      (logits [B, N, V], hidden [B, N, D])`` (e.g. ``models.GPT2LM``). Its
      parameters live under ``"backbone"``, the head's under ``"head"``.
    pass_attention_mask: also pass ``attention_mask=mask`` to the backbone
      (needed with left padding; GPT2LM accepts it).
  """

  backbone: nn.Module
  pass_attention_mask: bool = False

  @nn.compact
  def __call__(self, tokens: Array, mask: Array) -> Array:
    """Rewards, float32 ``[B]``."""
    if self.pass_attention_mask:
      _, hidden = self.backbone(tokens, attention_mask=mask,
                                return_hidden=True)
    else:
      _, hidden = self.backbone(tokens, return_hidden=True)
    last = last_position(mask)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    head = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.zeros, name="head")
    return head(h.astype(jnp.float32))[:, 0]


def bradley_terry_loss(r_chosen: Array, r_rejected: Array) -> Array:
  """mean_i softplus(−(r_c,i − r_r,i)) = −mean_i log σ(r_c,i − r_r,i); scalar.

  The negative log-likelihood of the preferences under Bradley–Terry.
  Args are ``[B]`` rewards of the chosen and the rejected samples.
  """
  return jnp.mean(jax.nn.softplus(r_rejected - r_chosen))


def preference_accuracy(r_chosen: Array, r_rejected: Array) -> Array:
  """Fraction of pairs ordered correctly, mean(r_c > r_r); scalar."""
  return jnp.mean((r_chosen > r_rejected).astype(jnp.float32))


def check_batch(batch: Batch) -> None:
  """Raises ValueError naming a missing or mis-shaped preference field."""
  for key in BATCH_KEYS:
    if key not in batch:
      raise ValueError(f"preference data: missing field {key!r}; expected "
                       f"{BATCH_KEYS}")
  for side in ("chosen", "rejected"):
    t, m = (np.shape(batch[f"{side}_{k}"]) for k in ("tokens", "mask"))
    if len(t) != 2 or t != m:
      raise ValueError(f"preference data: {side}_tokens {t} and {side}_mask "
                       f"{m} must both be [B, N]")
  if np.shape(batch["chosen_tokens"])[0] != np.shape(
      batch["rejected_tokens"])[0]:
    raise ValueError("preference data: chosen_tokens and rejected_tokens have "
                     "different numbers of pairs")


def loss_fn(model: RewardModel, params: Params,
            batch: Batch) -> tuple[Array, dict[str, Array]]:
  """Bradley–Terry loss of a batch of pairs, and metrics."""
  r_c = model.apply({"params": params}, batch["chosen_tokens"],
                    batch["chosen_mask"])
  r_r = model.apply({"params": params}, batch["rejected_tokens"],
                    batch["rejected_mask"])
  loss = bradley_terry_loss(r_c, r_r)
  return loss, {"loss": loss, "accuracy": preference_accuracy(r_c, r_r),
                "margin": jnp.mean(r_c - r_r)}


def make_train_step(model: RewardModel, optimizer: optax.GradientTransformation
                    ) -> Callable[..., tuple[Params, Any, dict[str, Array]]]:
  """A jitted ``step(params, opt_state, batch) -> (params, opt_state, metrics)``."""

  @jax.jit
  def step(params, opt_state, batch):
    grads, metrics = jax.grad(lambda p: loss_fn(model, p, batch),
                              has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def init_params(rng: Array, model: RewardModel, tokens: Array, mask: Array,
                backbone_params: Params | None = None) -> Params:
  """Initial parameters; ``backbone_params`` (a pretrained LM's) replace the
  backbone's random ones."""
  params = model.init(rng, tokens, mask)["params"]
  if backbone_params is not None:
    params = {**params, "backbone": backbone_params}
  return params


def train(rng: Array, model: RewardModel, data: Batch, *, num_steps: int,
          batch_size: int, optimizer: optax.GradientTransformation | None = None,
          learning_rate: float = 1e-3, params: Params | None = None
          ) -> tuple[Params, list[dict[str, float]]]:
  """Trains a reward model on preference pairs with the Bradley–Terry loss.

  Args:
    rng: PRNG key (initialisation and minibatch sampling).
    model: the :class:`RewardModel`.
    data: ``{"chosen_tokens", "chosen_mask", "rejected_tokens",
      "rejected_mask"}``, each ``[num_pairs, N]``.
    num_steps: optimisation steps.
    batch_size: pairs per step, drawn uniformly with replacement.
    optimizer: an optax optimiser (default ``optax.adam(learning_rate)``).
    learning_rate: used by the default optimiser.
    params: initial parameters (default: ``model.init``).

  Returns:
    (params, history): final parameters and one metrics dict per step.
  """
  check_batch(data)
  if num_steps <= 0 or batch_size <= 0:
    raise ValueError(f"num_steps ({num_steps}) and batch_size ({batch_size}) "
                     "must be > 0")
  data = {k: jnp.asarray(data[k]) for k in BATCH_KEYS}
  num_pairs = data["chosen_tokens"].shape[0]
  init_rng, rng = jax.random.split(rng)
  if params is None:
    params = init_params(init_rng, model, data["chosen_tokens"][:1],
                         data["chosen_mask"][:1])
  optimizer = optimizer or optax.adam(learning_rate)
  opt_state = optimizer.init(params)
  step = make_train_step(model, optimizer)
  history = []
  for _ in range(num_steps):
    rng, key = jax.random.split(rng)
    idx = jax.random.randint(key, (batch_size,), 0, num_pairs)
    batch = {k: v[idx] for k, v in data.items()}
    params, opt_state, metrics = step(params, opt_state, batch)
    history.append(metrics)
  return params, [jax.tree.map(float, m) for m in history]


def reward_feature(model: RewardModel, params: Params, name: str = "reward",
                   value_range: tuple[float, float] = (-math.inf, math.inf)
                   ) -> features_lib.Feature:
  """r(x) of a trained reward model as a feature, for ``targets.RewardTarget``.

  ``params`` are closed over (constants of any jitted function that uses the
  feature). The model scores the continuation ``tokens``/``mask``; the
  context is ignored.
  """

  def fn(tokens, mask, context=None):
    del context
    return model.apply({"params": params}, tokens, mask)

  return features_lib.Feature(name, fn, False, value_range)
