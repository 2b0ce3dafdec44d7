"""The evaluation step: fresh samples x ~ π, their metrics, and the samples.

`make_eval_step(config, model, target, sampler)` returns a pure function

    eval_step(state, batch, rng) -> (metrics, EvalSamples)

One compiled, sharded sampler call serves every evaluation figure: the
importance-sampled metrics computed here, and, from the returned samples, the
diversity figures and the samples a run writes (`fdiv_jax.run.evaluation`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from fdiv_jax.core import estimators
from fdiv_jax.lm import sampling, scoring
from fdiv_jax.train import rollout
from fdiv_jax.train import state as state_lib
from fdiv_jax.train import step as step_lib

Array = jax.Array


class EvalSamples(NamedTuple):
  """The evaluation's samples x ~ π (B rows, N = max_new_tokens columns).

  Attributes:
    tokens: int32 [B, N]; pad after EOS.
    mask: bool [B, N]; True up to and including EOS.
    context_ids: int32 [B]; the prompt of each row.
  """
  tokens: Array
  mask: Array
  context_ids: Array


def make_eval_step(config: step_lib.StepConfig, model, target,
                   sampler: sampling.SamplerConfig
                   ) -> Callable[..., tuple[dict[str, Array], EvalSamples]]:
  """`eval_step(state, batch, rng) -> (metrics, samples)` on fresh x ~ π.

  Args:
    config: the run's `StepConfig` (its divergence is reported beside the
      standard four; with `ema_decay > 0` the Polyak-averaged policy is the one
      evaluated).
    model: the language model.
    target: the target.
    sampler: the sampler of the policy being evaluated: pass the proposal's
      `SamplerConfig.untempered()` to evaluate π itself.

  The metrics use log Ẑ from the state merged with these samples' own estimate
  (for this evaluation only); on-policy, the sampler's log q is log π.
  """
  if sampler.warping != scoring.Warping():
    raise ValueError(
        f"sampler: the evaluation samples π itself, so its sampler must be "
        f"untempered (temperature 1, no top-k/top-p); got {sampler.warping}. "
        f"Pass SamplerConfig.untempered().")
  use_ema = config.ema_decay > 0

  def eval_step(state: state_lib.FDPGState, batch: state_lib.Batch, rng: Array):
    params = state.ema_params if use_ema else state.params
    x = rollout.draw_and_score(model, target, sampler, params, state.base_params,
                               batch, rng)
    # The fresh samples also estimate Z (unbiasedly, whatever the proposal); at
    # step 0 they are the only estimate there is.
    log_z = estimators.update_partition(
        state.log_partition, x.log_target, x.log_q, batch.context_ids,
        mask=~jax.numpy.isnan(x.log_target)).log_z[batch.context_ids]
    metrics = rollout.sample_metrics(config.divergence, target, x, x.log_q, log_z,
                                     batch)
    return metrics, EvalSamples(x.tokens, x.mask, batch.context_ids)

  return eval_step
