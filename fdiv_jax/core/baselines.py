"""Baselines for the f-DPG policy gradient, as pure state updates.

A baseline b is subtracted from the pseudo-reward R(x) = −f'(t(x)) to reduce the
variance of the REINFORCE estimate. Any b that does not depend on the sample's
own score ∇ log π(x_i) leaves the gradient unbiased, since E_π[∇ log π] = 0:

  - "none": b = 0.
  - "moving_average": mean of the last `window` batch statistics (DPG's choice).
  - "ema": exponential moving average of the batch statistics, bias-corrected.
  - "batch_mean": mean of the current batch (biased by O(1/N), simple).
  - "leave_one_out": for sample i, the mean over the other samples of the batch
    (unbiased, RLOO-style).

The batch statistic is the importance-weighted mean pseudo-reward
(1/N) Σ_i w_i R_i with w = π/q, an unbiased estimate of E_π[R] also off-policy.
Stateful baselines use only past batches, so their value is a constant for the
current batch. Per-sample arguments (rewards, weights, mask) must all be [N]
(checked, with an AssertionError naming the function and the argument; nothing
is broadcast). This module imports only JAX (and chex, for the checks); its
states are pytrees that a train step carries in its state.

Constructor errors are ValueErrors whose message starts with the offending
parameter, ``"<param>: ..."`` (e.g. ``"window: must be an integer >= 1, got
0."``), so that a caller can name the setting that fed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdiv_jax.core import _checks, _values

Array = jax.Array
KINDS = ("none", "moving_average", "ema", "batch_mean", "leave_one_out")


class MovingAverageState(NamedTuple):
  """The last `window` batch statistics in a ring buffer."""
  values: Array   # [window]
  count: Array    # [] int32, batches seen (capped at window for the mean)
  index: Array    # [] int32, next slot to write


class EMAState(NamedTuple):
  """Exponential moving average with Adam-style bias correction."""
  value: Array    # [] biased average
  steps: Array    # [] int32, updates seen


def weighted_mean_reward(rewards: Array, weights: Array | None = None,
                         mask: Array | None = None) -> Array:
  """(1/N) Σ_i m_i w_i R_i / (1/N) Σ_i m_i: the batch statistic baselines track.

  Args:
    rewards: [N] pseudo-rewards R_i.
    weights: optional [N] importance weights π/q (1 if None).
    mask: optional [N] bool, True for real samples.

  Returns:
    Scalar.
  """
  _checks.samples("weighted_mean_reward", rewards=rewards, weights=weights,
                  mask=mask)
  rewards = jnp.asarray(rewards)
  w = jnp.ones_like(rewards) if weights is None else weights
  m = jnp.ones_like(rewards) if mask is None else mask.astype(rewards.dtype)
  return jnp.sum(jnp.where(m > 0, w * rewards, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A baseline rule: `init`, `value` (per sample) and `update`, all pure.

  Attributes:
    kind: one of `KINDS`.
    window: batches averaged by "moving_average".
    decay: the EMA decay of "ema", in [0, 1).
  """
  kind: str = "moving_average"
  window: int = 10
  decay: float = 0.9

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind: unknown baseline kind {self.kind!r}; valid kinds: "
                       f"{', '.join(KINDS)}.")
    # Checked whatever the kind: a bad value is a mistake even where unused.
    _values.integer("window", self.window, minimum=1)
    _values.real("decay", self.decay, low=0.0, high=1.0, high_open=True)

  def init(self, dtype=jnp.float32) -> Any:
    """The state before any batch (the baseline is 0 until then)."""
    if self.kind == "moving_average":
      return MovingAverageState(jnp.zeros((self.window,), dtype),
                                jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    if self.kind == "ema":
      return EMAState(jnp.zeros((), dtype), jnp.zeros((), jnp.int32))
    return ()

  def value(self, state: Any, rewards: Array, weights: Array | None = None,
            mask: Array | None = None) -> Array:
    """Per-sample baselines b_i, shape [N] (broadcast of a scalar when stateful).

    Args:
      state: from `init` / `update`.
      rewards: [N] pseudo-rewards R_i of the current batch.
      weights: optional [N] importance weights π/q (1 on-policy).
      mask: optional [N] bool, True for real samples.

    Returns:
      [N] baselines.
    """
    _checks.samples("Baseline.value", rewards=rewards, weights=weights, mask=mask)
    rewards = jnp.asarray(rewards)
    if self.kind == "none":
      return jnp.zeros_like(rewards)
    if self.kind == "moving_average":
      n = jnp.maximum(state.count, 1).astype(rewards.dtype)
      slots = jnp.arange(self.window) < state.count
      mean = jnp.sum(jnp.where(slots, state.values, 0.0)) / n
      return jnp.broadcast_to(mean.astype(rewards.dtype), rewards.shape)
    if self.kind == "ema":
      correction = 1.0 - jnp.power(self.decay, state.steps.astype(rewards.dtype))
      mean = jnp.where(state.steps > 0, state.value / jnp.where(
          correction > 0, correction, 1.0), 0.0)
      return jnp.broadcast_to(mean.astype(rewards.dtype), rewards.shape)
    w = jnp.ones_like(rewards) if weights is None else weights
    m = jnp.ones_like(rewards) if mask is None else mask.astype(rewards.dtype)
    terms = jnp.where(m > 0, w * rewards, 0.0)
    total, count = jnp.sum(terms), jnp.sum(m)
    if self.kind == "batch_mean":
      return jnp.broadcast_to(total / jnp.maximum(count, 1.0), rewards.shape)
    # leave_one_out: the mean of the other real samples (0 if there are none).
    others = count - m
    return jnp.where(others > 0, (total - terms) / jnp.maximum(others, 1.0), 0.0)

  def update(self, state: Any, rewards: Array, weights: Array | None = None,
             mask: Array | None = None) -> Any:
    """Folds the current batch's statistic into the state (after computing b).

    Args:
      state: from `init` / `update`.
      rewards: [N] pseudo-rewards R_i of the current batch.
      weights: optional [N] importance weights π/q (1 on-policy).
      mask: optional [N] bool, True for real samples.

    Returns:
      The new state (the same one for the stateless kinds).
    """
    _checks.samples("Baseline.update", rewards=rewards, weights=weights, mask=mask)
    if self.kind == "moving_average":
      stat = weighted_mean_reward(rewards, weights, mask).astype(state.values.dtype)
      values = state.values.at[state.index].set(stat)
      return MovingAverageState(values, jnp.minimum(state.count + 1, self.window),
                                (state.index + 1) % self.window)
    if self.kind == "ema":
      stat = weighted_mean_reward(rewards, weights, mask).astype(state.value.dtype)
      return EMAState(self.decay * state.value + (1.0 - self.decay) * stat,
                      state.steps + 1)
    return state


def get(kind: str, **params) -> Baseline:
  """A `Baseline` by name (see `KINDS`), with its parameters."""
  return Baseline(kind, **params)
