"""From a run's typed description to its task: ``build(spec) -> Task``.

``build(spec)`` loads the model, builds the target on the real
tokenizer, fits λ of a distributional target on samples of the base model,
and enumerates the support of a toy space for exact metrics. With LoRA
(``lora.rank > 0``) the task's model is a ``models.LoRALM`` around the loaded
model, its ``params`` the fresh adapters and ``base_params`` the loaded
weights, the only copy of them.

``describe(config) -> RunSpec`` (``fdiv_jax.run.run_spec``, re-exported here)
turns the ``ConfigDict`` into that description first; nothing below the run
layer sees the config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax import targets as targets_lib
from fdiv_jax.core import divergences, estimators
from fdiv_jax.lm import enumeration, models, sampling
from fdiv_jax.lm.models import lora as lora_lib
from fdiv_jax.run.config import ConfigError
from fdiv_jax.run.prompts import Prompts
# The description half, re-exported: `tasks.describe`, `tasks.RunSpec`, ...
from fdiv_jax.run.run_spec import (  # noqa: F401
    RunSpec, _check_divides, _config_errors, check_positions, describe)


# --------------------------------------------------------------------------
# The task: model, target and prompts, built from a RunSpec.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  """The pieces of one run, built by :func:`build`.

  Attributes:
    model: the language model (``models.LanguageModel``), shared by the policy
      π, the base model a and the proposal q; a ``models.LoRALM`` with LoRA.
    params: the initial policy π_θ0 (a copy of ``base_params``; with LoRA the
      fresh adapters, B = 0, so that π_θ0 = a).
    base_params: the base model a(x) (with LoRA also the policy's frozen
      weights).
    tokenizer: ``encode``/``decode``/``batch_decode`` and the special ids.
    target: the EBM; a ``ConditionalTarget`` when prompted, with λ fitted for
      a distributional one.
    sampler: the proposal's ``sampling.SamplerConfig``.
    prompts: the prompts and the batch rule.
    lambda_fit: ``targets.LambdaFit`` of a fitted distributional target.
    initial_log_partition: the running log Ẑ_c to start from (the λ fit's
      samples), or None to start empty.
    support: ``enumeration.Support`` of every continuation for exact metrics.
  """
  model: Any
  params: Any
  base_params: Any
  tokenizer: Any
  target: Any
  sampler: sampling.SamplerConfig
  prompts: Prompts
  lambda_fit: targets_lib.LambdaFit | None = None
  initial_log_partition: estimators.PartitionState | None = None
  support: enumeration.Support | None = None

  @property
  def num_contexts(self) -> int:
    return self.prompts.num_contexts

  @property
  def checkpoint_identity(self) -> dict:
    """What checkpoints record of the model beyond the trained parameters'
    size (``train.loop.run_identity``): LoRA's rank, α and targets, so that
    resuming with other ones (α alone changes no shape) is refused."""
    if not lora_lib.is_lora(self.model):
      return {}
    config = self.model.lora
    return {"lora": {"rank": config.rank, "alpha": config.alpha,
                     "targets": list(config.targets)}}

  def batch(self, step: int, batch_size: int):
    """The host batch of training step `step` (``Prompts.batch``)."""
    return self.prompts.batch(step, batch_size)

  def eval_batch(self, step: int, batch_size: int):
    """The rows of an evaluation: the prompts cycled, so each prompt gets its
    share of the samples whatever the training rule."""
    return self.prompts.batch(step, batch_size, cycle=True)

  def exact(self, params, base_params=None,
            extra: tuple[divergences.Divergence, ...] = ()
            ) -> enumeration.ExactMetrics:
    """Exact metrics of π = ``params`` by enumeration (toy spaces).

    ``base_params`` defaults to ``self.base_params`` (pass the state's copy
    when the train step donated the original buffers); ``extra`` divergences
    are reported beside the standard four (``enumeration.exact_metrics``).
    """
    if self.support is None:
      raise ValueError("Task.exact: the task has no enumerated support; set "
                       "config.exact_metrics=True on a toy space")
    prompt = self.prompts.tokens[0, -int(self.prompts.lengths[0]):]
    base = self.base_params if base_params is None else base_params
    return enumeration.exact_metrics(
        self.model, lora_lib.policy_params(self.model, base, params),
        lora_lib.base_model_params(self.model, base),
        self.target, prompt, self.support, extra=extra)


def fit_distributional(target: targets_lib.DistributionalTarget, model, params,
                       prompts: Prompts, sampler: sampling.SamplerConfig,
                       num_samples: int, chunk_size: int, rng: jax.Array
                       ) -> tuple[targets_lib.DistributionalTarget,
                                  targets_lib.LambdaFit,
                                  estimators.PartitionState]:
  """Fits λ on samples x ~ a(·|c) (GDC: q = a, so log q = log a).

  Draws ``ceil(num_samples / chunk_size)`` chunks of ``chunk_size`` rows with
  the untempered ``sampler``, prompts cycled over the C prompts, then calls
  ``target.fit``. With several prompts one λ is shared by all contexts and
  fitted so that the MEAN over contexts of the per-context moments equals
  μ̄, each context normalised by its own Z_c, as training does
  (``context_ids`` = the prompt of each sample; ``targets.fit_lambdas``).

  Returns:
    (the fitted target, the ``LambdaFit``, and the running estimate of log Z_c
    that these samples give under the fitted target: the best estimate there
    is before training, which the train state starts from).

  Raises:
    ConfigError (``target.moments``): the samples never reach the target
      moments (e.g. the feature never occurs), or a prompt got no samples:
      the message suggests more ``target.fit_samples``.
  """
  draw = sampling.make_sampler(model, sampler.untempered())
  num_chunks = max(1, math.ceil(num_samples / chunk_size))
  rows = np.arange(num_chunks * chunk_size) % prompts.num_contexts
  outs = []
  for i in range(num_chunks):
    ids = rows[i * chunk_size:(i + 1) * chunk_size]
    out = draw(params, jax.random.fold_in(rng, i), prompts.tokens[ids],
               prompts.lengths[ids])
    outs.append(jax.device_get((out.tokens, out.mask, out.log_q)))
  tokens, mask, log_q = (np.concatenate(x) for x in zip(*outs))
  context = {"prompts": prompts.tokens[rows], "prompt_lengths": prompts.lengths[rows]}
  try:
    fitted, fit = target.fit(tokens, mask, log_q, log_q, context, context_ids=rows,
                             num_contexts=prompts.num_contexts)
  except ValueError as e:
    raise ConfigError(
        f"config.target.moments: λ cannot be fitted on {len(rows)} samples "
        f"of the base model: {e}. Raise config.target.fit_samples, or set "
        "config.target.lambdas.") from e
  log_target = fitted.log_prob(jnp.asarray(tokens), jnp.asarray(mask),
                               jnp.asarray(log_q), context)
  partition = estimators.update_partition(
      estimators.init_partition(prompts.num_contexts), log_target,
      jnp.asarray(log_q), jnp.asarray(rows, jnp.int32))
  return fitted, fit, partition


def base_weights_name(spec: RunSpec) -> str:
  """What a LoRA checkpoint records as the origin of its base weights."""
  m = spec.model
  if m.kind == "hf" or (m.kind == "pretrained" and m.path):
    return os.path.abspath(m.path)
  if m.kind == "pretrained":
    return "the shipped demo model"
  return f"a random {m.kind} init (seed {spec.loop.seed})"


def export_hf(task: Task, spec: RunSpec, state, path: str) -> str:
  """Writes the evaluated policy of ``state`` (the EMA when on; LoRA merged
  into the weights) as a Hugging Face checkpoint at ``path``, with the
  tokenizer and generation files of ``model.path`` (kind "hf"). Every process
  gathers the weights; only process 0 writes. Returns ``path``."""
  from fdiv_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  model, params = lora_lib.merge(task.model, state.base_params,
                                 state_lib.evaluated_params(state))
  if jax.process_index() == 0:
    models.save_hf_checkpoint(
        model, params, path,
        source=spec.model.path if spec.model.kind == "hf" else None)
  return path


def build(spec: RunSpec) -> Task:
  """Loads the model and builds the target, λ and support of `spec`.

  Random inits use the key ``fold_in(PRNGKey(seed), 1)``, λ fitting
  ``fold_in(PRNGKey(seed), 2)`` and LoRA's A matrices ``fold_in(PRNGKey(seed),
  4)`` (the train state's RNG is ``PRNGKey(seed)``).

  Raises:
    ConfigError: weights that cannot be read (``config.model.path``), a
      tokenizer with more ids than the model has rows, or a distributional
      target whose λ cannot be fitted.
  """
  with _config_errors("model.path"):  # a truncated or corrupt weights file
    model, base_params = spec.model.load(spec.loop.seed)
  tokenizer = spec.tokenizer
  if tokenizer.vocab_size > model.vocab_size:
    raise ConfigError(
        f"config.tokenizer: the tokenizer has {tokenizer.vocab_size} ids but "
        f"the model only {model.vocab_size} (model.vocab_size).")
  target = spec.target.build(decode=tokenizer.batch_decode, encode=tokenizer.encode)
  lambda_fit = initial_log_partition = None
  if spec.target.fits_lambdas:
    fit_samples = spec.target.fit_samples
    target, lambda_fit, initial_log_partition = fit_distributional(
        target, model, base_params, spec.prompts, spec.sampler, fit_samples,
        min(fit_samples, spec.loop.eval_batch_size),
        jax.random.fold_in(jax.random.PRNGKey(spec.loop.seed), 2))
  if spec.ground_truth:  # reported as `alignment`
    from fdiv_jax.targets import ground_truth  # pylint: disable=g-import-not-at-top
    target = ground_truth.GroundTruthTarget(target, targets_lib.features.from_spec(
        spec.ground_truth, decode=tokenizer.batch_decode, encode=tokenizer.encode))
  if spec.prompts.is_conditional:
    target = targets_lib.ConditionalTarget(target)
  support = None
  if spec.exact_metrics:
    support = enumeration.all_continuations(
        model.vocab_size, spec.sampler.max_new_tokens, tokenizer.eos_id,
        tokenizer.pad_id)
  if spec.lora.enabled:
    model = lora_lib.LoRALM(model, spec.lora, base_path=base_weights_name(spec))
    params = lora_lib.init_adapters(
        spec.lora, base_params,
        jax.random.fold_in(jax.random.PRNGKey(spec.loop.seed), 4))
  else:
    params = jax.tree.map(jnp.array, base_params)
  return Task(model=model, params=params, base_params=base_params,
              tokenizer=tokenizer, target=target, sampler=spec.sampler,
              prompts=spec.prompts, lambda_fit=lambda_fit,
              initial_log_partition=initial_log_partition,
              support=support)
