"""The evaluation step: fresh samples of π and of a, their metrics, the samples.

`make_eval_step(config, model, target, sampler)` returns a pure function

    eval_step(state, batch, rng) -> (metrics, EvalSamples)

Each of the B rows of `batch` is sampled once from the evaluated policy π and
once from the base model a (`rollout.draw_from_mixture`): a defensive mixture
½π + ½a whose importance weights π/q ≤ 2 and P/q ≤ 2·P/a stay bounded, so the
divergences to the target, KL(π‖a), alignment and moments are low-variance
estimates, each with its standard error (`rollout.sample_metrics`, stratified:
exactly B samples of each). The running log Ẑ of the state is merged with
these samples' own estimate for the divergences (for this evaluation only).

One compiled, sharded sampler call serves every evaluation figure: the metrics
computed here and, from π's returned samples, the diversity figures and the
samples a run writes (`fdiv_jax.run.evaluation`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

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
                   sampler: sampling.SamplerConfig, *, per_context: bool = True
                   ) -> Callable[..., tuple[dict[str, Array], EvalSamples]]:
  """`eval_step(state, batch, rng) -> (metrics, samples)`; see the module doc.

  Args:
    config: the run's `StepConfig` (its divergence is reported beside the
      standard four; with `ema_decay > 0` the Polyak-averaged policy is the one
      evaluated).
    model: the language model.
    target: the target.
    sampler: the sampler of the policy being evaluated: pass the proposal's
      `SamplerConfig.untempered()` to evaluate π itself.
    per_context: also report the moments of each context.
  """
  if sampler.warping != scoring.Warping():
    raise ValueError(
        f"sampler: the evaluation samples π itself, so its sampler must be "
        f"untempered (temperature 1, no top-k/top-p); got {sampler.warping}. "
        f"Pass SamplerConfig.untempered().")
  def eval_step(state: state_lib.FDPGState, batch: state_lib.Batch, rng: Array):
    params = state_lib.evaluated_params(state)
    x, log_model, strata = rollout.draw_from_mixture(
        model, target, sampler, params, state.base_params, batch, rng)
    metrics = rollout.sample_metrics(config.divergence, target, x, log_model,
                                     state.log_partition, strata=strata,
                                     per_context=per_context)
    n = batch.prompts.shape[0]
    return metrics, EvalSamples(x.tokens[:n], x.mask[:n], batch.context_ids)

  return eval_step
