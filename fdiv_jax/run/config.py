"""The run configuration: every field, its default, and its validation.

Task configs in `configs/` start from `base_config()` and override what they
need; `validate(config)` checks every field before anything expensive starts and
raises `ConfigError` naming the field and the allowed values.
`fdiv_jax.run.tasks.build(config)` turns a validated config into the pieces of a
run (model, tokenizer, target, prompts).
"""

from __future__ import annotations

import ast
import json
import math
import os
from typing import Any, Mapping

import ml_collections

from fdiv_jax.core import baselines, divergences
from fdiv_jax.targets import features

MODES = ("online", "offline")
LR_SCHEDULES = ("constant", "cosine", "linear")
PROPOSAL_METRICS = ("forward_kl", "reverse_kl", "tv", "js")
TARGET_KINDS = ("pointwise", "distributional", "reward")
MODEL_KINDS = ("pretrained", "gpt2", "lstm", "hf")
TOKENIZERS = ("byte", "hf", "toy")
PROMPT_SAMPLING = ("cycle", "random")
DTYPES = ("float32", "bfloat16")
# The shipped demo checkpoint (`fdiv_jax.lm.pretrain.PRETRAINED_DIR`), named here
# without importing Flax so that `validate` stays cheap.
PRETRAINED_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
    "pretrained")
TOY_MAX_VOCAB = 27               # id 0 (BOS/EOS/pad) + the letters a..z
MAX_EXACT_SUPPORT = 100_000      # sequences enumerated by `exact_metrics`
MIN_FIT_SAMPLES = 16


class ConfigError(ValueError):
  """A config field has a value that is not allowed."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every task (a small CPU-sized run)."""
  c = ml_collections.ConfigDict()
  # Run.
  c.seed = 0
  c.num_steps = 200
  c.batch_size = 32
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.eval_every = 50
  c.eval_batch_size = 128
  c.log_every = 10
  c.num_samples_md = 8           # samples per model written to samples.md
  # Objective (f-DPG).
  c.divergence = "js"
  c.alpha = 0.5                  # only for divergence="alpha"
  c.mode = "online"              # or "offline" (DPG with a separate proposal)
  c.baseline = "moving_average"
  c.baseline_window = 10
  c.baseline_decay = 0.9
  c.log_ratio_clip = 0.0         # 0: the dtype default of losses.fdpg_loss
  c.ema_decay = 0.0              # Polyak averaging of the policy; 0 = off
  c.proposal_update_metric = "tv"
  c.proposal_update_window = 5
  # Online with an unwarped sampler (temperature 1, no top-k/top-p) q = π, so
  # the sampler's log q is log π and the step only differentiates it (one
  # vocabulary pass fewer). False rescores log π with a full forward pass, e.g.
  # with bfloat16 activations, where a cached decode and a full forward differ
  # by more than float32 rounding.
  c.reuse_sampler_log_probs = True
  # Optimiser.
  c.learning_rate = 1e-4
  c.lr_schedule = "constant"
  c.warmup_steps = 10
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.weight_decay = 0.0
  c.max_grad_norm = 1.0
  c.grad_accum_steps = 1
  # Proposal sampler.
  c.max_new_tokens = 32
  c.temperature = 1.0
  c.top_k = 0
  c.top_p = 1.0
  # Devices.
  c.mesh_data = -1               # -1: every device not used by fsdp
  c.mesh_fsdp = 1
  # Model (see `fdiv_jax.run.tasks`):
  #   "pretrained": the shipped byte-level demo model (`model.path` empty) or a
  #                 `fdiv_jax.lm.pretrain` checkpoint directory; its own sizes win.
  #   "gpt2"/"lstm": random init of the sizes below, seeded by `seed` (LSTM:
  #                 embedding and hidden width n_embd, n_layer layers).
  #   "hf":         a local Hugging Face GPT-2 directory (`model.path`, with
  #                 config.json + model.safetensors); its own sizes win.
  c.model = ml_collections.ConfigDict()
  c.model.kind = "pretrained"
  c.model.path = ""
  c.model.vocab_size = 260
  c.model.n_layer = 2
  c.model.n_head = 2
  c.model.n_embd = 64
  c.model.n_positions = 64
  c.model.dtype = "float32"
  # "byte" (`ByteTokenizer`), "hf" (tokenizer.json in `model.path`) or "toy"
  # (tiny vocabulary for enumerable spaces: id 0 = BOS/EOS/pad, ids 1..V-1
  # decode to the letters a, b, c, ...; V = model.vocab_size <= 27).
  c.tokenizer = "byte"
  # Prompts: one BOS token per row when empty (unconditional generation).
  # Otherwise the task is conditional (CDPG, one log Z per prompt): each prompt
  # is encoded as [BOS] + encode(text) and a batch row gets prompt i by
  # `prompt_sampling`: "cycle" (row r of step s: (s * batch + r) mod C) or
  # "random" (uniform, seeded by (seed, step)).
  c.prompts = ()
  c.prompt_sampling = "cycle"
  # Exact metrics by enumeration (toy spaces only): `tasks.Task.support`.
  c.exact_metrics = False
  # Target (see `fdiv_jax.run.tasks.target_config`). Feature specs are a registry
  # name from `fdiv_jax.targets.features.names()`, "name:key=value,key=value" (a value
  # "a|b" is the tuple ("a", "b"); values are Python literals or plain
  # strings), or a mapping {"name": ..., **kwargs}. E.g.
  # "word_list:words=love|life|time", "contains_tokens:token_ids=1".
  c.target = ml_collections.ConfigDict()
  c.target.kind = "pointwise"    # "pointwise", "distributional" or "reward"
  c.target.features = ()         # pointwise: boolean constraints b(x), all must
                                 # hold; distributional: features φ(x)
  c.target.moments = ()          # distributional: target moment μ̄ per feature
  c.target.lambdas = ()          # distributional: fixed λ (skips fitting)
  c.target.beta = 1.0            # reward: temperature β > 0
  c.target.reward = ""           # reward: one feature spec, e.g. "sentiment"
  c.target.fit_samples = 2048    # distributional: samples from a to fit λ
  return c


def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def _get(c, field: str):
  """`c.a.b` for field "a.b"."""
  value = c
  for part in field.split("."):
    value = value[part]
  return value


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _positive_int(c, field: str, allow_zero: bool = False):
  value = _get(c, field)
  low = 0 if allow_zero else 1
  if not _is_int(value) or value < low:
    _fail(field, f"must be an integer >= {low}, got {value!r}.")


def _choice(value, field: str, allowed):
  if value not in allowed:
    _fail(field, f"must be one of {', '.join(map(str, allowed))}; got {value!r}.")


def _in_unit(c, field: str, closed_high: bool = False, what: str = ""):
  value = _get(c, field)
  ok = _is_number(value) and 0.0 <= value and (
      value <= 1.0 if closed_high else value < 1.0)
  if not ok:
    _fail(field, f"must be in [0, 1{']' if closed_high else ')'}{what}, "
          f"got {value!r}.")


# --------------------------------------------------------------------------
# Feature specs.
# --------------------------------------------------------------------------

# Arguments `fdiv_jax.run.tasks` passes to every feature factory that takes them.
SHARED_FEATURE_ARGS = ("decode", "encode")


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_feature_spec(spec: Any) -> dict[str, Any]:
  """A feature spec from a config as a mapping for `features.from_spec`.

  Accepted forms:

  * a registry name, ``"sentiment"``;
  * ``"name:key=value,key=value"``: each value is a Python literal or else a
    plain string; ``a|b|c`` is the tuple of its parts. E.g.
    ``"word_list:words=love|life"`` → ``{"name": "word_list", "words":
    ("love", "life")}``, ``"contains_tokens:token_ids=1"`` → ``{...,
    "token_ids": 1}``. (Values containing ``,`` or ``|``, such as some regular
    expressions, need the mapping form.)
  * a mapping ``{"name": ..., **kwargs}`` (returned as a dict).

  Raises:
    ValueError: a malformed spec (the message says why).
  """
  if isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    if "name" not in spec:
      raise ValueError(f"feature spec {spec!r} has no 'name' key")
    return spec
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(
        f"feature spec {spec!r} is not a non-empty string or a mapping")
  name, _, args = spec.partition(":")
  out: dict[str, Any] = {"name": name.strip()}
  if args.strip():
    for item in args.split(","):
      key, eq, value = item.partition("=")
      if not eq or not key.strip():
        raise ValueError(
            f"feature spec {spec!r}: argument {item!r} is not key=value")
      parts = [_literal(v.strip()) for v in value.split("|")]
      out[key.strip()] = tuple(parts) if "|" in value else parts[0]
  return out


def _dummy_decode(tokens, mask):
  del mask
  return [""] * len(tokens)


def _dummy_encode(text: str):
  return list(text.encode("utf-8"))


def check_feature(spec: Any, field: str) -> features.Feature:
  """Builds a feature spec with stand-in decode/encode (cheap: no model).

  Returns the `features.Feature` (for its `is_boolean` and `value_range`);
  raises `ConfigError` naming `field` for an unknown name (listing the valid
  ones), an unknown or missing argument, or an invalid argument value.
  """
  try:
    parsed = parse_feature_spec(spec)
  except ValueError as e:
    _fail(field, str(e))
  name = parsed["name"]
  if name not in features.names():
    _fail(field, f"unknown feature {name!r}; valid names: "
          f"{', '.join(features.names())}.")
  try:
    return features.from_spec(parsed, decode=_dummy_decode,
                              encode=_dummy_encode)
  except (ValueError, TypeError) as e:
    _fail(field, f"feature spec {spec!r}: {e}")


def _as_tuple(c, field: str) -> tuple:
  value = _get(c, field)
  if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
    _fail(field, f"must be a tuple, got {value!r}.")
  return tuple(value)


# --------------------------------------------------------------------------
# Model, tokenizer and prompts.
# --------------------------------------------------------------------------


def _read_json(path: str, field: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    _fail(field, f"no {what} at {path!r}.")
  except (OSError, ValueError) as e:
    _fail(field, f"cannot read {what} {path!r}: {e}")


def model_max_positions(c) -> int | None:
  """The model's position limit, read cheaply (no weights); None = no limit.

  ``pretrained``: ``model_config.n_positions`` of the checkpoint's
  config.json; ``hf``: ``n_positions`` (or ``n_ctx``) of its config.json;
  ``gpt2``: ``model.n_positions``; ``lstm``: None.
  """
  kind = c.model.kind
  if kind == "gpt2":
    return c.model.n_positions
  if kind == "lstm":
    return None
  if kind == "pretrained":
    path = os.path.join(c.model.path or PRETRAINED_DIR, "config.json")
    meta = _read_json(path, "model.path", "pretrained checkpoint (config.json; "
                      "train one with `python -m fdiv_jax.lm.pretrain --out=DIR`)")
    return int(meta["model_config"]["n_positions"])
  meta = _read_json(os.path.join(c.model.path, "config.json"), "model.path",
                    "Hugging Face config.json")
  limit = meta.get("n_positions", meta.get("n_ctx"))
  return None if limit is None else int(limit)


def toy_encode(text: str) -> list[int]:
  """The toy tokenizer's encoding: "a" → 1, "b" → 2, ... (see base_config)."""
  ids = []
  for ch in text:
    if not "a" <= ch <= "z":
      raise ValueError(f"the toy tokenizer only encodes the letters a..z, "
                       f"got {ch!r} in {text!r}")
    ids.append(ord(ch) - ord("a") + 1)
  return ids


def _prompt_token_length(c, text: str) -> int | None:
  """1 (BOS) + encoded length of a prompt, when cheap to know; else None."""
  if c.tokenizer == "byte":
    return 1 + len(text.encode("utf-8"))
  if c.tokenizer == "toy":
    try:
      ids = toy_encode(text)
    except ValueError as e:
      _fail("prompts", str(e))
    if ids and max(ids) >= c.model.vocab_size:
      _fail("prompts", f"prompt {text!r} uses toy token {max(ids)}, outside "
            f"model.vocab_size={c.model.vocab_size}.")
    return 1 + len(ids)
  return None


def check_positions(max_new_tokens: int, prompt_length: int,
                    limit: int | None) -> None:
  """Raises `ConfigError` when prompt + continuation exceed the positions.

  Args:
    max_new_tokens: N, `config.max_new_tokens`.
    prompt_length: P, tokens of the longest prompt (BOS included).
    limit: `model.n_positions` (None: no limit).
  """
  if limit is not None and prompt_length + max_new_tokens > limit:
    _fail("max_new_tokens", f"prompt length {prompt_length} (longest prompt, "
          f"BOS included) + max_new_tokens {max_new_tokens} = "
          f"{prompt_length + max_new_tokens} exceeds the model's positions "
          f"(model.n_positions = {limit}); lower max_new_tokens or use shorter "
          "prompts.")


def exact_support_size(vocab_size: int, max_new_tokens: int) -> int:
  """S = Σ_{n=1..N} (V−1)^(n−1) + (V−1)^N: continuations with one EOS."""
  others = vocab_size - 1
  return sum(others ** (n - 1) for n in range(1, max_new_tokens + 1)) + (
      others ** max_new_tokens)


def _validate_model(c):
  _choice(c.model.kind, "model.kind", MODEL_KINDS)
  _choice(c.tokenizer, "tokenizer", TOKENIZERS)
  if not isinstance(c.model.path, str):
    _fail("model.path", f"must be a string, got {c.model.path!r}.")
  for field in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
    _positive_int(c, f"model.{field}")
  _choice(c.model.dtype, "model.dtype", DTYPES)
  kind = c.model.kind
  if kind == "hf":
    if not c.model.path:
      _fail("model.path", "must name a local Hugging Face GPT-2 directory when "
            "model.kind='hf'.")
    if not os.path.isdir(c.model.path):
      _fail("model.path", f"{c.model.path!r} is not a directory.")
  elif kind == "pretrained" and c.model.path and not os.path.isdir(
      c.model.path):
    _fail("model.path", f"{c.model.path!r} is not a directory (leave it empty "
          "for the shipped demo model).")
  if c.tokenizer == "hf":
    if kind != "hf":
      _fail("tokenizer", "'hf' reads tokenizer.json from the Hugging Face "
            f"model directory, so it needs model.kind='hf' (got {kind!r}).")
    if not os.path.isfile(os.path.join(c.model.path, "tokenizer.json")):
      _fail("tokenizer", f"'hf' needs {c.model.path}/tokenizer.json.")
  if kind == "pretrained" and c.tokenizer != "byte":
    _fail("tokenizer", "the pretrained demo model is byte-level: use "
          f"tokenizer='byte' (got {c.tokenizer!r}).")
  if kind == "gpt2" and c.model.n_embd % c.model.n_head:
    _fail("model.n_head", f"must divide model.n_embd={c.model.n_embd}, got "
          f"{c.model.n_head}.")
  if kind in ("gpt2", "lstm"):
    if c.tokenizer == "toy" and not 2 <= c.model.vocab_size <= TOY_MAX_VOCAB:
      _fail("model.vocab_size", f"must be in [2, {TOY_MAX_VOCAB}] with the toy "
            f"tokenizer, got {c.model.vocab_size}.")
    if c.tokenizer == "byte":
      from fdiv_jax.lm import tokenization  # pylint: disable=g-import-not-at-top
      needed = tokenization.ByteTokenizer().vocab_size
      if c.model.vocab_size < needed:
        _fail("model.vocab_size", f"must be >= {needed} (the byte tokenizer's "
              f"vocabulary), got {c.model.vocab_size}.")
  elif c.tokenizer == "toy":
    _fail("tokenizer", "'toy' needs a randomly initialised model "
          f"(model.kind='gpt2' or 'lstm'), got model.kind={kind!r}.")


def _validate_prompts(c):
  prompts = _as_tuple(c, "prompts")
  for i, p in enumerate(prompts):
    if not isinstance(p, str) or not p:
      _fail("prompts", f"entry {i} must be a non-empty string, got {p!r}.")
  _choice(c.prompt_sampling, "prompt_sampling", PROMPT_SAMPLING)
  lengths = [_prompt_token_length(c, p) for p in prompts] or [1]
  if None not in lengths:
    check_positions(c.max_new_tokens, max(lengths), model_max_positions(c))
  elif c.model.kind != "hf":
    model_max_positions(c)  # Checks the checkpoint is there.
  if c.exact_metrics:
    if c.model.kind not in ("gpt2", "lstm"):
      _fail("exact_metrics", "needs an enumerable toy space: model.kind 'gpt2' "
            f"or 'lstm' with a small model.vocab_size; got {c.model.kind!r}.")
    if prompts:
      _fail("exact_metrics", "is only supported for unconditional tasks "
            "(config.prompts empty).")
    size = exact_support_size(c.model.vocab_size, c.max_new_tokens)
    if size > MAX_EXACT_SUPPORT:
      _fail("exact_metrics", f"the space has {size} sequences (model.vocab_size"
            f"={c.model.vocab_size}, max_new_tokens={c.max_new_tokens}), more "
            f"than {MAX_EXACT_SUPPORT}: lower them or set exact_metrics=False.")


# --------------------------------------------------------------------------
# Target.
# --------------------------------------------------------------------------


def _validate_target(c):
  t = c.target
  _choice(t.kind, "target.kind", TARGET_KINDS)
  specs = _as_tuple(c, "target.features")
  moments = _as_tuple(c, "target.moments")
  lambdas = _as_tuple(c, "target.lambdas")
  if t.kind != "distributional":
    for field, value in (("moments", moments), ("lambdas", lambdas)):
      if value:
        _fail(f"target.{field}", f"is only used by a distributional target; "
              f"leave it empty for target.kind={t.kind!r} (got {value!r}).")
  if t.kind == "reward":
    beta = t.beta
    if not (_is_number(beta) and beta > 0):
      _fail("target.beta", f"must be a finite number > 0, got {beta!r}.")
    if not t.reward:
      _fail("target.reward", "a reward target needs a reward feature spec, "
            f"one of: {', '.join(features.names())}.")
    if specs:
      _fail("target.features", "is unused by a reward target (the reward is "
            f"target.reward); leave it empty (got {specs!r}).")
    check_feature(t.reward, "target.reward")
    return
  if t.reward:
    _fail("target.reward", f"is only used by a reward target; leave it empty "
          f"for target.kind={t.kind!r}.")
  if not specs:
    _fail("target.features", f"a {t.kind} target needs at least one feature, "
          f"one of: {', '.join(features.names())}.")
  feats = [check_feature(s, f"target.features[{i}]")
           for i, s in enumerate(specs)]
  if t.kind == "pointwise":
    for i, f in enumerate(feats):
      if not f.is_boolean:
        _fail(f"target.features[{i}]", f"feature {f.name!r} is not boolean, so "
              "it cannot be a pointwise constraint; use target.kind="
              "'distributional' or 'reward'.")
    return
  if len(moments) != len(feats):
    _fail("target.moments", f"needs one target moment per feature "
          f"({len(feats)}), got {len(moments)}.")
  for i, (f, m) in enumerate(zip(feats, moments)):
    lo, hi = f.value_range
    if not _is_number(m):
      _fail("target.moments", f"entry {i} must be a finite number, got {m!r}.")
    if not lo < m < hi:
      _fail("target.moments", f"moment {m} of feature {f.name!r} must lie "
            f"strictly inside its range ({lo}, {hi}); at the boundary λ is "
            "infinite (use a pointwise constraint for a feature that must "
            "always hold).")
  if lambdas:
    if len(lambdas) != len(feats) or not all(_is_number(x) for x in lambdas):
      _fail("target.lambdas", f"must be empty (fit λ) or {len(feats)} finite "
            f"numbers, got {lambdas!r}.")
  elif not _is_int(t.fit_samples) or t.fit_samples < MIN_FIT_SAMPLES:
    _fail("target.fit_samples", f"must be an integer >= {MIN_FIT_SAMPLES}, "
          f"got {t.fit_samples!r}.")


# --------------------------------------------------------------------------
# Everything.
# --------------------------------------------------------------------------


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; returns the config unchanged or raises `ConfigError`.

  Cheap: no model or tokenizer is loaded (at most a checkpoint's config.json
  is read to learn its position limit). Messages name the field
  (``config.<field>: ...``) and the allowed values.
  """
  if not _is_int(c.seed) or c.seed < 0:
    _fail("seed", f"must be an integer >= 0, got {c.seed!r}.")
  for field in ("num_steps", "batch_size", "checkpoint_every", "keep_checkpoints",
                "eval_every", "eval_batch_size", "log_every", "max_new_tokens",
                "grad_accum_steps", "baseline_window", "proposal_update_window"):
    _positive_int(c, field)
  for field in ("warmup_steps", "top_k", "num_samples_md"):
    _positive_int(c, field, allow_zero=True)
  valid_divs = list(divergences.NAMES) + ["kl", "rkl"]
  _choice(c.divergence, "divergence", valid_divs)
  if c.divergence == "alpha":
    if not _is_number(c.alpha):
      _fail("alpha", f"must be a finite number, got {c.alpha!r}.")
    try:
      divergences.get("alpha", alpha=c.alpha)
    except ValueError as e:
      _fail("alpha", str(e))
  _choice(c.mode, "mode", MODES)
  _choice(c.baseline, "baseline", baselines.KINDS)
  _in_unit(c, "baseline_decay")
  _in_unit(c, "ema_decay", what=" (0 = off)")
  if not _is_number(c.log_ratio_clip) or c.log_ratio_clip < 0:
    _fail("log_ratio_clip", f"must be >= 0 (0 = default), got {c.log_ratio_clip!r}.")
  _choice(c.proposal_update_metric, "proposal_update_metric", PROPOSAL_METRICS)
  if not isinstance(c.reuse_sampler_log_probs, bool):
    _fail("reuse_sampler_log_probs",
          f"must be True or False, got {c.reuse_sampler_log_probs!r}.")
  if not (_is_number(c.learning_rate) and c.learning_rate > 0):
    _fail("learning_rate", f"must be a finite number > 0, got {c.learning_rate!r}.")
  _choice(c.lr_schedule, "lr_schedule", LR_SCHEDULES)
  for field in ("adam_b1", "adam_b2"):
    _in_unit(c, field)
  if not _is_number(c.weight_decay) or c.weight_decay < 0:
    _fail("weight_decay", f"must be >= 0, got {c.weight_decay!r}.")
  if not _is_number(c.max_grad_norm) or c.max_grad_norm < 0:
    _fail("max_grad_norm", f"must be >= 0 (0 = no clipping), got {c.max_grad_norm!r}.")
  if not (_is_number(c.temperature) and c.temperature > 0):
    _fail("temperature", f"must be a finite number > 0, got {c.temperature!r}.")
  if not (_is_number(c.top_p) and 0.0 < c.top_p <= 1.0):
    _fail("top_p", f"must be in (0, 1] (1 = off), got {c.top_p!r}.")
  if not _is_int(c.mesh_data) or (c.mesh_data != -1 and c.mesh_data < 1):
    _fail("mesh_data", f"must be >= 1, or -1 for all devices; got {c.mesh_data!r}.")
  _positive_int(c, "mesh_fsdp")
  _validate_model(c)
  _validate_target(c)
  _validate_prompts(c)
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a task config in place for tests (a few steps in seconds).

  Every config in `configs/` applies it for ``--config=configs/X.py:tiny``:
  3 steps of batch 4, at most 8 new tokens, evaluation and checkpoints every
  2 steps, 64 samples to fit λ, and (randomly initialised models only) one
  layer of width 16. The pretrained and Hugging Face models keep their size.
  """
  c.num_steps = 3
  c.batch_size = 4
  c.eval_batch_size = 8
  c.eval_every = 2
  c.checkpoint_every = 2
  c.log_every = 1
  c.warmup_steps = 0
  c.num_samples_md = 2
  c.max_new_tokens = min(c.max_new_tokens, 8)
  c.target.fit_samples = min(c.target.fit_samples, 64)
  if c.model.kind in ("gpt2", "lstm") and c.tokenizer != "toy":
    c.model.n_layer = 1
    c.model.n_head = 2
    c.model.n_embd = 16
  return c


SIZES = ("default", "tiny")


def sized(c: ml_collections.ConfigDict,
          size: str | None) -> ml_collections.ConfigDict:
  """Applies a size suffix of ``--config=configs/X.py:SIZE`` ("" = default)."""
  size = size or "default"
  if size not in SIZES:
    raise ValueError(f"config size {size!r}: must be one of {', '.join(SIZES)} "
                     "(e.g. --config=configs/quickstart.py:tiny).")
  return tiny(c) if size == "tiny" else c
