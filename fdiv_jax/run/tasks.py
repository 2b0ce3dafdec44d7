"""From a run config to typed objects (once), and from those to a task.

``describe(config) -> RunSpec`` is the one place where the ``ConfigDict`` becomes
typed, frozen objects; nothing below the run layer sees the config. It is cheap
(no weights are loaded; at most a checkpoint's config.json and tokenizer are
read), so a bad value stops the run before anything is written:

==================================  ==========================================
config fields                       object (its constructor checks them)
==================================  ==========================================
divergence, alpha                   ``divergences.get`` → ``Divergence``
baseline, baseline_window, _decay   ``baselines.Baseline``
mode, ema_decay, log_ratio_clip,    ``train.StepConfig``
proposal_update_*, reuse_sampler_*
learning_rate, lr_schedule, ...     ``train.OptimizerConfig``
num_steps, batch_size, eval_*,      ``train.LoopConfig`` (+ the device count of
log_every, checkpoint_*, mesh_*     the mesh, ``sharding.mesh_shape``)
max_new_tokens, temperature,        ``sampling.SamplerConfig`` (the proposal;
top_k, top_p                        ``.untempered()`` for evaluation)
model.*, tokenizer                  ``models.ModelSpec`` and its tokenizer
lora.*                              ``models.LoRAConfig`` (targets resolved
                                    for the model's family)
prompts, prompt_sampling            ``prompts.Prompts``
target.*                            ``targets.TargetSpec``
ground_truth                        a feature spec (``targets.features``)
preference.*                        ``run.preference_data.PreferenceSpec``
                                    (the data files read and checked)
==================================  ==========================================

Constructors raise ValueError (or TypeError) whose message starts with the
parameter at fault (``"top_p: must be in (0, 1] ..."``); ``describe`` turns it
into ``ConfigError("config.top_p: ...")``. What no constructor owns is checked
here: prompt plus continuation within the model's positions, the device count,
and what exact metrics need.

``build(spec) -> Task`` then loads the model, builds the target on the real
tokenizer, fits λ of a distributional target on samples of the base model,
and enumerates the support of a toy space for exact metrics. With LoRA
(``lora.rank > 0``) the task's model is a ``models.LoRALM`` around the loaded
model, its ``params`` the fresh adapters and ``base_params`` the loaded
weights, the only copy of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax import targets as targets_lib
from fdiv_jax.core import _values, baselines, divergences, estimators
from fdiv_jax.lm import enumeration, models, sampling
from fdiv_jax.lm.models import lora as lora_lib
from fdiv_jax.run import preference_data
from fdiv_jax.run.config import ConfigError
from fdiv_jax.run.prompts import Prompts
from fdiv_jax.train import loop as loop_lib
from fdiv_jax.train import optimizer as optimizer_lib
from fdiv_jax.train import sharding
from fdiv_jax.train import step as step_lib

_LEADING_PARAM = re.compile(r"^([A-Za-z_]\w*)((?:\[\d+\])?): (.*)$", re.S)
_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


@contextlib.contextmanager
def _config_errors(default: str, prefix: str = "", **fields: str) -> Iterator[None]:
  """Re-raises a constructor's ValueError/TypeError as `ConfigError`.

  A message "param: ..." (or "param[i]: ...") whose param is a key of `fields`
  names the config field `fields[param]`; an unexpected keyword `k` (a field
  the config has but the object does not know) names `prefix + k`; any other
  message names `default`.
  """
  try:
    yield
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    message = str(e)
    match = _LEADING_PARAM.match(message)
    unexpected = _UNEXPECTED_KEYWORD.search(message)
    if match and match.group(1) in fields:
      field = fields[match.group(1)] + match.group(2)
      message = match.group(3)
    elif unexpected and prefix:
      field = prefix + unexpected.group(1)
      message = f"is not a field of {prefix.rstrip('.') or 'the config'}."
    else:
      field = default
    raise ConfigError(f"config.{field}: {message}") from e


def _same_names(cls, prefix: str = "") -> dict[str, str]:
  """{field: prefix + field} for the fields of dataclass `cls`."""
  return {f.name: prefix + f.name for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True, eq=False)
class RunSpec:
  """Everything a run needs, as typed objects (built by :func:`describe`).

  Attributes:
    loop: steps, batch sizes, report intervals, seed, mesh.
    step: the f-DPG update rule (divergence, baseline, mode, ...).
    optimizer: the optimiser's settings.
    sampler: the proposal's sampler (with the tokenizer's EOS and pad ids);
      evaluation uses ``sampler.untempered()``.
    model: the base model to load.
    tokenizer: the tokenizer (``encode``/``decode``/``batch_decode``, ids).
    prompts: the encoded prompts and the batch rule.
    target: the target's description (built on the tokenizer by ``build``).
    exact_metrics: enumerate the (toy) space for exact metrics.
    num_samples_md: samples per prompt and model written to samples.md.
    qrs_samples: samples of the QRS report after training (0 = none).
    config_json: the config as JSON, for the workdir and the summary.
    lora: the LoRA adapters (rank 0 = none; targets resolved).
    export_hf: write the trained policy as a Hugging Face checkpoint.
    preference: offline preference training (``config.preference``:
      ``run.preference_data.PreferenceSpec``, its data read and checked), or
      None for f-DPG.
    ground_truth: ``config.ground_truth``, the feature spec every evaluation
      reports as ``alignment`` ("" = the target's own).
  """
  loop: loop_lib.LoopConfig
  step: step_lib.StepConfig
  optimizer: optimizer_lib.OptimizerConfig
  sampler: sampling.SamplerConfig
  model: models.ModelSpec
  tokenizer: Any
  prompts: Prompts
  target: targets_lib.TargetSpec
  exact_metrics: bool
  num_samples_md: int
  qrs_samples: int
  config_json: str
  lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig()
  export_hf: bool = False
  preference: Any = None
  ground_truth: Any = ""


def _divergence(c) -> divergences.Divergence:
  name = c.divergence
  if isinstance(name, str) and divergences.ALIASES.get(name, name) == "alpha":
    return divergences.get(name, alpha=c.alpha)
  return divergences.get(name)


def describe(config) -> RunSpec:
  """The typed objects of a run (module docstring); raises `ConfigError`."""
  c = config
  with _config_errors("num_steps", **_same_names(loop_lib.LoopConfig)):
    loop = loop_lib.LoopConfig(
        num_steps=c.num_steps, batch_size=c.batch_size, seed=c.seed,
        eval_every=c.eval_every, eval_batch_size=c.eval_batch_size,
        log_every=c.log_every, checkpoint_every=c.checkpoint_every,
        keep_checkpoints=c.keep_checkpoints, mesh_data=c.mesh_data,
        mesh_fsdp=c.mesh_fsdp)
    data, fsdp = sharding.mesh_shape(loop.mesh_data, loop.mesh_fsdp,
                                     jax.device_count())
  _check_divides(loop, data * fsdp)
  with _config_errors("divergence", alpha="alpha"):
    divergence = _divergence(c)
  with _config_errors("baseline", kind="baseline", window="baseline_window",
                      decay="baseline_decay"):
    baseline = baselines.Baseline(c.baseline, c.baseline_window, c.baseline_decay)
  with _config_errors("mode", **_same_names(step_lib.StepConfig)):
    clip = c.log_ratio_clip
    if isinstance(clip, bool):
      raise ValueError(f"log_ratio_clip: must be a number (0 = the dtype default "
                       f"of each divergence), got {clip!r}.")
    step = step_lib.StepConfig(
        divergence=divergence, baseline=baseline, mode=c.mode,
        ema_decay=c.ema_decay,
        log_ratio_clip=None if clip == 0 else clip,
        proposal_update_metric=c.proposal_update_metric,
        proposal_update_window=c.proposal_update_window,
        reuse_sampler_log_probs=c.reuse_sampler_log_probs)
  with _config_errors("learning_rate", **_same_names(optimizer_lib.OptimizerConfig)):
    optimizer = optimizer_lib.OptimizerConfig(
        learning_rate=c.learning_rate, num_steps=c.num_steps,
        lr_schedule=c.lr_schedule, warmup_steps=c.warmup_steps,
        adam_b1=c.adam_b1, adam_b2=c.adam_b2, weight_decay=c.weight_decay,
        max_grad_norm=c.max_grad_norm, grad_accum_steps=c.grad_accum_steps)

  model_fields = _same_names(models.ModelSpec, "model.")
  with _config_errors("model.kind", prefix="model.", **model_fields):
    model = models.ModelSpec(**c.model.to_dict())
  lora, export_hf = _describe_lora_and_export(c, model, model_fields)
  with _config_errors("tokenizer", tokenizer="tokenizer",
                      vocab_size="model.vocab_size"):
    tokenizer = model.tokenizer(c.tokenizer)
  with _config_errors("max_new_tokens", max_new_tokens="max_new_tokens",
                      temperature="temperature", top_k="top_k", top_p="top_p"):
    sampler = sampling.SamplerConfig(
        max_new_tokens=c.max_new_tokens, temperature=c.temperature,
        top_k=c.top_k, top_p=c.top_p, eos_id=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id)
  with _config_errors("prompts", prompts="prompts",
                      prompt_sampling="prompt_sampling",
                      chat_template="chat_template"):
    prompts = Prompts.encode(c.prompts, tokenizer, sampling_rule=c.prompt_sampling,
                             seed=c.seed, chat_template=c.chat_template)
  with _config_errors("model.path", **model_fields):
    check_positions(sampler.max_new_tokens, prompts.length, model.max_positions)
  with _config_errors("target.kind", prefix="target.",
                      **_same_names(targets_lib.TargetSpec, "target.")):
    target = targets_lib.TargetSpec(**c.target.to_dict())
    # Features that only fail on the real tokenizer (e.g. a word the toy
    # tokenizer cannot encode) fail here, not after the workdir is written.
    target.build(decode=tokenizer.batch_decode, encode=tokenizer.encode)

  with _config_errors("exact_metrics", exact_metrics="exact_metrics",
                      num_samples_md="num_samples_md", qrs_samples="qrs_samples",
                      allow_truncated_proposal="allow_truncated_proposal"):
    _values.boolean("exact_metrics", c.exact_metrics)
    _values.integer("num_samples_md", c.num_samples_md, minimum=0)
    _values.integer("qrs_samples", c.qrs_samples, minimum=0)
    _values.boolean("allow_truncated_proposal", c.allow_truncated_proposal)
  ground_truth = c.get("ground_truth", "")
  if ground_truth:
    with _config_errors("ground_truth"):
      targets_lib.features.from_spec(ground_truth, decode=tokenizer.batch_decode,
                                     encode=tokenizer.encode)
  preference = preference_data.describe(
      c, step=step, tokenizer=tokenizer, max_new_tokens=sampler.max_new_tokens,
      max_positions=model.max_positions)
  if c.exact_metrics:
    _check_exact_metrics(model, prompts, sampler.max_new_tokens)
  _check_proposal(sampler, step, target, c.allow_truncated_proposal)
  if c.num_samples_md * prompts.num_contexts > loop.eval_batch_size // 2:
    raise ConfigError(
        f"config.num_samples_md: {c.num_samples_md} samples for each of the "
        f"{prompts.num_contexts} prompt(s) need an evaluation of at least "
        f"{c.num_samples_md * prompts.num_contexts} samples of π, but "
        f"eval_batch_size {loop.eval_batch_size} holds {loop.eval_batch_size // 2} "
        f"(half are the base model's); lower num_samples_md or raise "
        f"eval_batch_size.")
  return RunSpec(loop=loop, step=step, optimizer=optimizer, sampler=sampler,
                 model=model, tokenizer=tokenizer, prompts=prompts, target=target,
                 exact_metrics=c.exact_metrics, num_samples_md=c.num_samples_md,
                 qrs_samples=c.qrs_samples,
                 config_json=c.to_json_best_effort(indent=2), lora=lora,
                 export_hf=export_hf, preference=preference,
                 ground_truth=ground_truth)


def _describe_lora_and_export(c, model: models.ModelSpec,
                              model_fields: dict[str, str]
                              ) -> tuple[lora_lib.LoRAConfig, bool]:
  """``config.lora`` (targets resolved for the model's family) and
  ``config.export_hf``, checked against the model."""
  lora_config = c.get("lora")
  export_hf = c.get("export_hf", False)
  with _config_errors("lora.rank", prefix="lora.",
                      **_same_names(lora_lib.LoRAConfig, "lora.")):
    lora = lora_lib.LoRAConfig(**(lora_config.to_dict() if lora_config else {}))
  family = None
  if lora.enabled or export_hf:
    with _config_errors("model.path", **model_fields):
      family = model.family
  if lora.enabled:
    with _config_errors("lora.rank", prefix="lora.",
                        **_same_names(lora_lib.LoRAConfig, "lora.")):
      lora = lora.for_family(family)
  if model.param_dtype == "float16" and not lora.enabled:
    raise ConfigError(
        "config.model.param_dtype: float16 weights are for a frozen base under "
        "LoRA (config.lora.rank > 0): full fine-tuning would apply every update "
        "to float16 weights without loss scaling. Use float32 or bfloat16.")
  with _config_errors("export_hf", export_hf="export_hf"):
    _values.boolean("export_hf", export_hf)
  if export_hf and family not in models.SUPPORTED_MODEL_TYPES:
    raise ConfigError(
        f"config.export_hf: Hugging Face export writes GPT-2 and Llama-family "
        f"models ({', '.join(models.SUPPORTED_MODEL_TYPES)}), not a {family} "
        f"model.")
  return lora, bool(export_hf)


def _check_divides(loop: loop_lib.LoopConfig, num_devices: int) -> None:
  """Each device of the mesh gets an equal share of every batch."""
  for field, rows in (("batch_size", loop.batch_size),
                      ("eval_batch_size", loop.eval_batch_size // 2)):
    if rows % num_devices:
      what = ("the evaluation's rows (half its samples: each row is sampled "
              "from π and from a)" if field == "eval_batch_size" else "its rows")
      raise ConfigError(
          f"config.{field}: {rows} {what} must divide evenly over the mesh's "
          f"{num_devices} devices (mesh_data x mesh_fsdp).")


def _check_proposal(sampler: sampling.SamplerConfig, step: step_lib.StepConfig,
                    target: targets_lib.TargetSpec, allow_truncated: bool) -> None:
  """Refuses proposals whose importance weights or comparisons cannot work.

  * A truncating proposal (top-k, top-p) draws nothing where q = 0 < π: the
    f-DPG gradient, Ẑ and every importance-sampled metric then miss π's mass
    there and are biased. Temperature alone is fine (π/q corrects it).
  * Offline DPG replaces q by π when π's divergence to the target is lower;
    under a hard constraint (p = 0 where it fails) a divergence with
    f'(∞) = ∞ (reverse KL) is +inf for both, and the comparison never
    succeeds: the proposal would silently never be updated.
  """
  if sampler.warping.top_k > 0 or sampler.warping.top_p < 1:
    if not allow_truncated:
      raise ConfigError(
          f"config.top_k / config.top_p: a truncated proposal (top_k="
          f"{sampler.warping.top_k}, top_p={sampler.warping.top_p}) never draws "
          f"the tokens it cuts, where π still has mass: the f-DPG gradient, Ẑ and "
          f"every importance-sampled metric are then biased. Use temperature "
          f"alone, or set config.allow_truncated_proposal=True to accept the "
          f"bias (the run then reports the mass it misses, truncated_mass).")
  if (step.offline and target.kind == "pointwise"
      and math.isinf(divergences.get(step.proposal_update_metric).f_prime_at_inf)):
    raise ConfigError(
        f"config.proposal_update_metric: {step.proposal_update_metric} is +inf for "
        f"both π and q whenever they put mass where a hard constraint fails "
        f"(p = 0 there), so π would never be found closer and the proposal never "
        f"updated; use one of tv, js, forward_kl.")


def check_positions(max_new_tokens: int, prompt_length: int,
                    limit: int | None) -> None:
  """Raises `ConfigError` when prompt + continuation exceed the positions.

  Args:
    max_new_tokens: N.
    prompt_length: P, tokens of the longest prompt (BOS included).
    limit: the model's position limit (None: no limit).
  """
  if limit is not None and prompt_length + max_new_tokens > limit:
    raise ConfigError(
        f"config.max_new_tokens: prompt length {prompt_length} (longest prompt, "
        f"BOS included) + max_new_tokens {max_new_tokens} = "
        f"{prompt_length + max_new_tokens} exceeds the model's positions "
        f"(n_positions = {limit}); lower max_new_tokens or use shorter prompts.")


def _check_exact_metrics(model: models.ModelSpec, prompts: Prompts,
                         max_new_tokens: int) -> None:
  if model.kind not in ("gpt2", "lstm"):
    raise ConfigError("config.exact_metrics: needs an enumerable toy space: "
                      "model.kind 'gpt2' or 'lstm' with a small "
                      f"model.vocab_size; got {model.kind!r}.")
  if prompts.is_conditional:
    raise ConfigError("config.exact_metrics: is only supported for "
                      "unconditional tasks (config.prompts empty).")
  size = enumeration.support_size(model.vocab_size, max_new_tokens)
  if size > enumeration.MAX_SUPPORT:
    raise ConfigError(
        f"config.exact_metrics: the space has {size} sequences (model.vocab_size"
        f"={model.vocab_size}, max_new_tokens={max_new_tokens}), more than "
        f"{enumeration.MAX_SUPPORT}: lower them or set exact_metrics=False.")


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
  if spec.ground_truth:  # reported as `alignment`: run.reward.GroundTruthTarget
    from fdiv_jax.run import reward  # pylint: disable=g-import-not-at-top
    target = reward.GroundTruthTarget(target, targets_lib.features.from_spec(
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
