"""One offline preference step: f-DPO on pairs, f-PO on ranked lists.

`make_preference_step(config, model)` returns a pure function

    step(state: FDPGState, batch: PairBatch | ListBatch) -> (state, metrics)

that a caller compiles once (`sharding.jit_train_step`: the state donated and
placed on the mesh, the batch split over its devices along the first axis).
No sampling: the batch holds the responses and their log-probabilities under
the frozen reference π_ref (the base model a), and the step

  1. scores log π_θ of every response in one forward pass over the batch
     (`scoring.sequence_log_probs`; pairs: chosen and rejected stacked into
     [2B]; lists: [B·K]), with LoRA the adapters on the frozen base;
  2. takes the loss of the registry's divergence: `losses.fdpo_loss(d,
     log π(y_w), log π(y_l), log π_ref(y_w), log π_ref(y_l), beta=β)` for
     pairs, `losses.fpo_loss(d, log π, log π_ref, rewards / T, beta=β)` for
     lists (T = `reward_temperature`), rows of weight 0 masked out;
  3. applies the optax update (non-finite gradients skipped and counted) and
     the Polyak average (`ema_decay`);
  4. reports the loss, the preference accuracy and margins of the batch, the
     implicit rewards β f'(π/π_ref) (f-DPO), the mean log-ratios
     log π/π_ref of the responses, the clipped ratios, the gradient norm and
     the skipped updates.

The state is the f-DPG `FDPGState` (`state.create_state` with
`PreferenceConfig.step_config()`): `params` (π_θ; under LoRA the adapters),
`base_params` (π_ref = a: the frozen base model, which the evaluation also
samples), `opt_state`, `ema_params`, `rng` (unused by the step, kept for the
evaluation's state) and the f-DPG fields, unused here, so that the
checkpoints, shardings and the evaluation step (`eval_step.make_eval_step`)
of f-DPG serve it unchanged.

**Reference log-probabilities are cached.** π_ref is frozen, so log π_ref of
every response is computed once, before training (`reference_log_probs`:
jitted, in fixed-size chunks, float32, no gradient), and fed with each batch
(`ref_chosen`, `ref_rejected`, `ref`). That saves a third of the work of a
step (one forward pass of the three: π's forward and backward remain). The
values are a deterministic function of the data and the base weights, so a
resumed run recomputes them bit for bit instead of storing them. They agree
with the step's own log π at π = π_ref only to rounding (other shapes, another
program): the first step's log-ratios are ~1e-6, not 0.

`make_heldout_step` gives the same loss and accuracy on held-out data without
an update (per-batch sums, for the host to add up; `heldout_summary`). It
scores log π_ref itself, beside log π, rather than reading a cache, so that
π = π_ref gives exact ties (accuracy ½) and not rounding noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdiv_jax.core import _values, divergences, losses
from fdiv_jax.lm import scoring
from fdiv_jax.lm.models import lora
from fdiv_jax.train import optimizer as optimizer_lib
from fdiv_jax.train import state as state_lib
from fdiv_jax.train import step as step_lib

Array = jax.Array
Metrics = dict[str, Array]
OBJECTIVES = ("fdpo", "fpo")
DATA_FORMATS = {"fdpo": "pairs", "fpo": "lists"}


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  """The offline preference update (static: closed over by `jit`).

  Attributes:
    objective: "fdpo" (pairs, `losses.fdpo_loss`) or "fpo" (ranked lists,
      `losses.fpo_loss`).
    divergence: the f (a `Divergence` or a name `divergences.get` accepts).
      f-DPO with `tv` is refused: its gradient is exactly 0.
    beta: β > 0, the strength of the D_f(π‖π_ref) regulariser.
    reward_temperature: f-PO: rewards are divided by it (π̂* ∝ π_ref e^{r/T}).
    log_ratio_clip: the clip c of log π/π_ref, or None for the
      per-divergence bounds (`losses.log_ratio_bounds`).
    ema_decay: Polyak averaging of the policy, in [0, 1) (0 = off).
  """
  objective: str
  divergence: divergences.Divergence
  beta: float = 0.1
  reward_temperature: float = 1.0
  log_ratio_clip: float | None = None
  ema_decay: float = 0.0

  def __post_init__(self):
    _values.choice("objective", self.objective, OBJECTIVES)
    object.__setattr__(self, "divergence", divergences.get(self.divergence))
    _values.real("beta", self.beta, low=0.0, low_open=True)
    _values.real("reward_temperature", self.reward_temperature, low=0.0,
                 low_open=True)
    if self.log_ratio_clip is not None:
      _values.real("log_ratio_clip", self.log_ratio_clip, low=0.0, low_open=True,
                   note=" (or None for the per-divergence bounds)")
    _values.real("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True,
                 note=" (0 = off)")
    if self.objective == "fdpo" and self.divergence.name == "tv":
      raise ValueError(
          "divergence: f-DPO with tv has an exactly zero gradient (f' = ½ sign "
          "is a step; docs/mathematics.md §9); use another f, or objective fpo.")

  @property
  def data_format(self) -> str:
    """"pairs" (f-DPO) or "lists" (f-PO)."""
    return DATA_FORMATS[self.objective]

  def step_config(self) -> step_lib.StepConfig:
    """The f-DPG `StepConfig` of the state and the evaluation: the same f
    (reported beside the four standard divergences) and EMA."""
    return step_lib.StepConfig(divergence=self.divergence, ema_decay=self.ema_decay)


@flax.struct.dataclass
class PairBatch:
  """B preference pairs (f-DPO).

  Attributes:
    prompts: int32 [B, P] left-padded, prompt_lengths int32 [B].
    chosen_tokens, rejected_tokens: int32 [B, N]; chosen_mask,
      rejected_mask: bool [B, N] (`preference_data.encode_pairs`).
    ref_chosen, ref_rejected: float32 [B], log π_ref of the responses.
    weights: float32 [B], 1 for a real pair, 0 for padding.
  """
  prompts: Array
  prompt_lengths: Array
  chosen_tokens: Array
  chosen_mask: Array
  rejected_tokens: Array
  rejected_mask: Array
  ref_chosen: Array
  ref_rejected: Array
  weights: Array


@flax.struct.dataclass
class ListBatch:
  """B prompts with K responses each (f-PO).

  Attributes:
    prompts: int32 [B, P], prompt_lengths int32 [B].
    tokens: int32 [B, K, N]; mask bool [B, K, N].
    response_mask: bool [B, K], False on padding responses.
    ref: float32 [B, K], log π_ref of the responses.
    rewards: float32 [B, K].
    weights: float32 [B], 1 for a real prompt, 0 for padding.
  """
  prompts: Array
  prompt_lengths: Array
  tokens: Array
  mask: Array
  response_mask: Array
  ref: Array
  rewards: Array
  weights: Array


def sequence_log_probs(model, params, prompts, prompt_lengths, tokens, mask
                       ) -> Array:
  """log π(response | prompt) [rows] (`scoring.sequence_log_probs`)."""
  return scoring.sequence_log_probs(model, params, prompts, prompt_lengths,
                                    tokens, mask)[1]


def pair_log_probs(model, params, batch: PairBatch) -> tuple[Array, Array]:
  """(log π(y_w) [B], log π(y_l) [B]) in one forward pass over [2B] rows;
  ``params`` as `model.apply` takes them."""
  b = batch.prompts.shape[0]
  both = lambda x, y: jnp.concatenate([x, y], axis=0)
  log_probs = sequence_log_probs(
      model, params, both(batch.prompts, batch.prompts),
      both(batch.prompt_lengths, batch.prompt_lengths),
      both(batch.chosen_tokens, batch.rejected_tokens),
      both(batch.chosen_mask, batch.rejected_mask))
  return log_probs[:b], log_probs[b:]


def list_log_probs(model, params, batch: ListBatch) -> Array:
  """log π of every response, [B, K], in one forward pass over [B·K] rows."""
  b, k, n = batch.tokens.shape
  repeat = lambda x: jnp.repeat(x, k, axis=0)
  log_probs = sequence_log_probs(
      model, params, repeat(batch.prompts), repeat(batch.prompt_lengths),
      batch.tokens.reshape(b * k, n), batch.mask.reshape(b * k, n))
  return log_probs.reshape(b, k)


def _list_pairs(implicit: Array, rewards: Array, real: Array) -> tuple[Array, Array]:
  """(ordered pairs i, j of a list with r_i > r_j, both real [B, K, K] bool;
  their score [B, K, K] float32: 1 where the implicit reward orders them
  alike, ½ where it ties, 0 otherwise)."""
  ordered = ((rewards[:, :, None] > rewards[:, None, :])
             & real[:, :, None] & real[:, None, :])
  return ordered, jnp.where(ordered, _tie_half(implicit[:, :, None]
                                               - implicit[:, None, :]), 0.0)


def _tie_half(margin: Array) -> Array:
  """1 for margin > 0, ½ for a tie (margin = 0), 0 otherwise: a policy that
  cannot tell two responses apart scores chance, not 0."""
  return jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))


def preference_loss(config: PreferenceConfig, log_model, batch
                    ) -> tuple[Array, dict[str, Array]]:
  """The loss of a batch from π's log-probabilities, and its diagnostics.

  Args:
    config: the objective, f and β.
    log_model: f-DPO: ``(log π(y_w) [B], log π(y_l) [B])``; f-PO: ``[B, K]``.
    batch: the `PairBatch` or `ListBatch` they belong to.

  Returns:
    (loss, aux): `losses.fdpo_loss`'s or `losses.fpo_loss`'s, rows of weight
    0 masked out; f-PO's aux gains "accuracy" (the fraction of ordered pairs
    r_i > r_j of a list whose implicit rewards β log π/π_ref are ordered the
    same way, a tie counting ½), "num_pairs" and "log_ratio" (log π −
    log π_ref, [B, K]).
  """
  real_rows = batch.weights > 0
  if config.objective == "fdpo":
    chosen, rejected = log_model
    return losses.fdpo_loss(config.divergence, chosen, rejected, batch.ref_chosen,
                            batch.ref_rejected, beta=config.beta, mask=real_rows,
                            log_ratio_clip=config.log_ratio_clip)
  real = batch.response_mask & real_rows[:, None]
  loss, aux = losses.fpo_loss(config.divergence, log_model, batch.ref,
                              batch.rewards / config.reward_temperature,
                              beta=config.beta, mask=real)
  log_ratio = jnp.where(real, log_model - batch.ref, 0.0)
  ordered, score = _list_pairs(log_ratio, batch.rewards, real)
  num_pairs = jnp.sum(ordered)
  aux = dict(aux, log_ratio=log_ratio, num_pairs=num_pairs,
             accuracy=jnp.sum(score) / jnp.maximum(num_pairs, 1))
  return loss, aux


def _policy_log_probs(config: PreferenceConfig, model, base_params, params, batch):
  full = lora.policy_params(model, base_params, params)
  if config.objective == "fdpo":
    return pair_log_probs(model, full, batch)
  return list_log_probs(model, full, batch)


def _masked_mean(x: Array, mask: Array) -> Array:
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def make_preference_step(config: PreferenceConfig, model
                         ) -> Callable[[state_lib.FDPGState, Any],
                                       tuple[state_lib.FDPGState, Metrics]]:
  """Builds the pure step (module docstring); `jit` it once."""

  def step(state: state_lib.FDPGState, batch):
    def loss_fn(params):
      log_model = _policy_log_probs(config, model, state.base_params, params, batch)
      return preference_loss(config, log_model, batch)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    if state.ema_params is not None:
      decay = config.ema_decay
      new_state = new_state.replace(ema_params=jax.tree.map(
          lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params,
          new_state.params))
    metrics = {"loss": loss, "accuracy": aux["accuracy"],
               "grad_norm": optax.tree.norm(grads),
               "skipped_updates": optimizer_lib.skipped_updates(new_state.opt_state)}
    real = batch.weights > 0
    if config.objective == "fdpo":
      metrics.update(
          margin=aux["mean_margin"], chosen_reward=aux["mean_chosen_reward"],
          rejected_reward=aux["mean_rejected_reward"],
          log_ratio_chosen=_masked_mean(aux["log_ratio_chosen"], real),
          log_ratio_rejected=_masked_mean(aux["log_ratio_rejected"], real),
          num_clipped=aux["num_clipped"])
    else:
      listed = batch.response_mask & real[:, None]
      metrics.update(log_ratio=_masked_mean(aux["log_ratio"], listed),
                     num_pairs=aux["num_pairs"])
    return new_state, metrics

  return step


def _with_reference(config: PreferenceConfig, model, base_params, batch):
  """``batch`` with log π_ref of its responses scored now (adapters off under
  LoRA), by the very computation that scores π (`_policy_log_probs`)."""
  ref = lora.base_model_params(model, base_params)
  if config.objective == "fdpo":
    chosen, rejected = pair_log_probs(model, ref, batch)
    return batch.replace(ref_chosen=chosen, ref_rejected=rejected)
  return batch.replace(ref=jnp.where(batch.response_mask,
                                     list_log_probs(model, ref, batch), 0.0))


def make_heldout_step(config: PreferenceConfig, model) -> Callable[..., Metrics]:
  """``heldout(state, batch) -> sums`` on the evaluated policy (the EMA when
  on), no update: the batch's real rows ``n``, ``loss_sum`` (per-pair /
  per-prompt losses), and f-DPO ``correct`` (margin > 0, a tie counting ½),
  ``ties`` (margin = 0), ``margin_sum``, ``margin_sq_sum``,
  ``chosen_reward_sum``, ``rejected_reward_sum``; f-PO ``pairs`` (ordered
  pairs r_i > r_j), ``correct`` (ordered alike by the implicit reward, a tie
  counting ½) and ``ties``. Add them up over batches with `heldout_summary`.

  log π_ref is not the batch's cache: it is scored here, in the same program,
  on the same arrays and shapes as log π, so that π = π_ref (step 0) gives
  margins of exactly 0, accuracy ½, instead of rounding noise of either sign
  (the cache comes from another program, of other shapes: its values differ
  from π's in the last bits). One more forward pass per held-out batch.
  """

  def heldout(state: state_lib.FDPGState, batch) -> Metrics:
    batch = _with_reference(config, model, state.base_params, batch)
    params = state_lib.evaluated_params(state)
    log_model = _policy_log_probs(config, model, state.base_params, params, batch)
    _, aux = preference_loss(config, log_model, batch)
    real = batch.weights > 0
    per_row = jnp.where(real, aux["losses"], 0.0)
    sums = {"n": jnp.sum(real.astype(jnp.float32)), "loss_sum": jnp.sum(per_row)}
    if config.objective == "fdpo":
      margin = jnp.where(real, aux["margin"], 0.0)
      sums.update(correct=jnp.sum(jnp.where(real, _tie_half(aux["margin"]), 0.0)),
                  ties=jnp.sum(real & (aux["margin"] == 0)).astype(jnp.float32),
                  margin_sum=jnp.sum(margin), margin_sq_sum=jnp.sum(margin ** 2),
                  chosen_reward_sum=jnp.sum(jnp.where(real, aux["chosen_reward"], 0.0)),
                  rejected_reward_sum=jnp.sum(
                      jnp.where(real, aux["rejected_reward"], 0.0)))
    else:
      listed = batch.response_mask & real[:, None]
      ordered, score = _list_pairs(aux["log_ratio"], batch.rewards, listed)
      sums.update(pairs=jnp.sum(ordered).astype(jnp.float32),
                  correct=jnp.sum(score),
                  ties=jnp.sum(ordered & (score == 0.5)).astype(jnp.float32))
    return sums

  return heldout


def heldout_summary(objective: str, sums: dict[str, float]) -> dict[str, float]:
  """Held-out figures from summed `make_heldout_step` outputs, with standard
  errors: ``loss``, ``accuracy`` (pairs: of the pairs; lists: of the ordered
  pairs within lists; a tie counts ½; binomial error), ``ties`` (the fraction
  tied: 1 at π = π_ref), and for f-DPO ``margin`` (error sd/√n),
  ``chosen_reward``, ``rejected_reward``; ``num_pairs``."""
  n = max(sums["n"], 1.0)
  out = {"loss": sums["loss_sum"] / n}
  total = sums["n"] if objective == "fdpo" else sums["pairs"]
  acc = sums["correct"] / max(total, 1.0)
  out.update(accuracy=acc, accuracy_se=float(np.sqrt(acc * (1 - acc) / max(total, 1.0))),
             ties=sums.get("ties", 0.0) / max(total, 1.0), num_pairs=total)
  if objective == "fdpo":
    mean = sums["margin_sum"] / n
    var = max(sums["margin_sq_sum"] / n - mean ** 2, 0.0)
    out.update(margin=mean, margin_se=float(np.sqrt(var / n)),
               chosen_reward=sums["chosen_reward_sum"] / n,
               rejected_reward=sums["rejected_reward_sum"] / n)
  return out


def make_reference_scorer(model) -> Callable[..., Array]:
  """A jitted ``score(base_params, prompts, prompt_lengths, tokens, mask) ->
  log π_ref [rows]`` under the base model (adapters off under LoRA)."""

  @jax.jit
  def score(base_params, prompts, prompt_lengths, tokens, mask):
    params = lora.base_model_params(model, base_params)
    return jax.lax.stop_gradient(sequence_log_probs(
        model, params, prompts, prompt_lengths, tokens, mask))

  return score


def reference_log_probs(model, base_params, prompts: np.ndarray,
                        prompt_lengths: np.ndarray, tokens: np.ndarray,
                        mask: np.ndarray, *, chunk_size: int = 256,
                        score: Callable[..., Array] | None = None) -> np.ndarray:
  """log π_ref of each row, float32 NumPy ``[rows]``, computed in chunks of
  ``chunk_size`` rows (the last padded by repeating row 0, so one shape is
  compiled). The cache of the module docstring."""
  score = score or make_reference_scorer(model)
  rows = tokens.shape[0]
  out = np.zeros((rows,), np.float32)
  for start in range(0, rows, chunk_size):
    idx = np.arange(start, start + chunk_size)
    idx = np.where(idx < rows, idx, 0)
    values = np.asarray(jax.device_get(score(
        base_params, prompts[idx], prompt_lengths[idx], tokens[idx], mask[idx])))
    take = min(chunk_size, rows - start)
    out[start:start + take] = values[:take]
  return out
