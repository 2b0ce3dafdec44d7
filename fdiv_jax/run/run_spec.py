"""From a run config to typed objects, once: ``describe(config) -> RunSpec``.

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
preference.*                        ``run.preference_spec.PreferenceSpec``
                                    (the data files read and checked)
==================================  ==========================================

Constructors raise ValueError (or TypeError) whose message starts with the
parameter at fault (``"top_p: must be in (0, 1] ..."``); ``describe`` turns it
into ``ConfigError("config.top_p: ...")``. What no constructor owns is checked
here: prompt plus continuation within the model's positions, the device count,
and what exact metrics need.

``build(spec) -> Task`` (``fdiv_jax.run.tasks``) then turns the spec into a
runnable task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator

import jax

from fdiv_jax import targets as targets_lib
from fdiv_jax.core import _values, baselines, divergences
from fdiv_jax.lm import enumeration, models, sampling
from fdiv_jax.lm.models import lora as lora_lib
from fdiv_jax.run import preference_spec
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
      ``run.preference_spec.PreferenceSpec``, its data read and checked), or
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
  preference = preference_spec.describe(
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
