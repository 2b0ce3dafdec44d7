"""From a run config to the concrete pieces of an f-DPG run.

``build(config) -> Task`` validates the config (``config.validate``), then
builds, in this order:

1. the base model a(x) and its tokenizer (``config.model``,
   ``config.tokenizer``):

   ===========  ==========================================================
   model.kind   what is loaded
   ===========  ==========================================================
   pretrained   ``pretrain.load_pretrained(model.path or the shipped
                fdiv_jax/data/pretrained)``: byte-level GPT-2, its sizes
   gpt2         ``GPT2LM`` of ``model.{vocab_size, n_positions, n_layer,
                n_head, n_embd}``, random init
   lstm         ``LSTMLM``: embedding and hidden width ``model.n_embd``,
                ``model.n_layer`` layers, random init
   hf           ``models.load_hf_checkpoint(model.path)``: its sizes
   ===========  ==========================================================

   Random inits use the key ``fold_in(PRNGKey(seed), 1)`` (the train state's
   RNG is ``PRNGKey(seed)``). ``model.dtype`` sets the activation dtype.
   Tokenizers: ``byte`` (``ByteTokenizer``), ``hf`` (``model.path/
   tokenizer.json``) or ``toy`` (:class:`ToyTokenizer`).

2. the prompts: each ``[BOS] + tokenizer.encode(text)``, left-padded to the
   longest, ``prompt_tokens`` int32 ``[C, P]``; one BOS token (C = 1) when
   ``config.prompts`` is empty. P + ``max_new_tokens`` must fit the model's
   positions (``ConfigError`` naming ``max_new_tokens`` otherwise).

3. the target p(x) ∝ P(x) from ``config.target`` (:func:`target_config` maps
   the fields onto ``targets.from_config``), features built with
   ``decode=tokenizer.batch_decode`` and ``encode=tokenizer.encode``; a
   distributional target without ``target.lambdas`` gets λ fitted on
   ``target.fit_samples`` samples from a (:func:`fit_distributional`); with
   prompts the target is wrapped in ``targets.ConditionalTarget`` (CDPG, one
   Z_c per prompt).

4. the proposal's ``SamplerConfig`` (``max_new_tokens``, ``temperature``,
   ``top_k``, ``top_p``, the tokenizer's EOS and pad ids) and, when
   ``config.exact_metrics``, the enumerated support of the toy space.

The initial policy ``params`` is a copy of ``base_params`` (separate buffers,
so donating one never invalidates the other).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.run import config as config_lib
from fdiv_jax.lm import enumeration
from fdiv_jax.lm import models
from fdiv_jax.lm import sampling
from fdiv_jax import targets as targets_lib
from fdiv_jax.lm import tokenization
from fdiv_jax.train import state as state_lib

ConfigError = config_lib.ConfigError


class ToyTokenizer:
  """Tokenizer of the enumerable toy spaces: ids 0..V-1.

  Id 0 is BOS, EOS and pad at once (GPT-2's ``<|endoftext|>`` convention);
  ids 1..V-1 are the letters "a", "b", ... (V <= 27). Same interface as
  ``fdiv_jax.lm.tokenization``: ``vocab_size``, ``bos_id``, ``eos_id``,
  ``pad_id``, ``encode``, ``decode``, ``batch_decode``.
  """

  bos_id = eos_id = pad_id = 0

  def __init__(self, vocab_size: int):
    if not 2 <= vocab_size <= config_lib.TOY_MAX_VOCAB:
      raise ValueError(f"ToyTokenizer: vocab_size must be in [2, "
                       f"{config_lib.TOY_MAX_VOCAB}], got {vocab_size}")
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    ids = config_lib.toy_encode(text)
    if ids and max(ids) >= self.vocab_size:
      raise ValueError(f"ToyTokenizer: {text!r} needs ids up to {max(ids)}, "
                       f"vocab_size is {self.vocab_size}")
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(chr(ord("a") + int(i) - 1) for i in ids
                   if 0 < int(i) < self.vocab_size)

  def batch_decode(self, tokens: np.ndarray,
                   mask: np.ndarray | None = None) -> list[str]:
    """Decodes ``tokens`` [B, N] over ``mask`` [B, N] (special ids dropped)."""
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask)
    return [self.decode(row[m].tolist()) for row, m in zip(tokens, mask)]


@dataclasses.dataclass
class Task:
  """The pieces of one run, built by :func:`build`.

  Attributes:
    config: the validated config it was built from.
    model: the language model (``models.base.LanguageModel``), shared by the
      policy π, the base model a and the proposal q.
    params: the initial policy π_θ0 (a copy of ``base_params``).
    base_params: the base model a(x).
    tokenizer: ``encode``/``decode``/``batch_decode`` and the special ids.
    target: the EBM (``targets``); a ``ConditionalTarget`` when prompted,
      with λ fitted for a distributional one.
    sampler: the proposal's ``sampling.SamplerConfig``.
    num_contexts: C, the number of log Ẑ entries (prompts; 1 if none).
    prompt_texts: the prompts, or () for unconditional generation.
    prompt_tokens: int32 ``[C, P]``, ``[BOS] + encode(text)`` left-padded with
      ``tokenizer.pad_id`` (one BOS, ``[1, 1]``, when unconditional).
    prompt_lengths: int32 ``[C]``.
    lambda_fit: ``targets.LambdaFit`` of a fitted distributional target, else
      None.
    support: ``enumeration.Support`` of every continuation when
      ``config.exact_metrics`` (toy spaces), else None.
  """

  config: Any
  model: Any
  params: Any
  base_params: Any
  tokenizer: Any
  target: Any
  sampler: sampling.SamplerConfig
  num_contexts: int
  prompt_texts: tuple[str, ...]
  prompt_tokens: np.ndarray
  prompt_lengths: np.ndarray
  lambda_fit: targets_lib.LambdaFit | None = None
  support: enumeration.Support | None = None

  @property
  def is_conditional(self) -> bool:
    return bool(self.prompt_texts)

  @property
  def exact_prompt(self) -> np.ndarray:
    """int32 ``[P]``: the prompt of exact metrics (a BOS token)."""
    return self.prompt_tokens[0, -int(self.prompt_lengths[0]):]

  def context_ids(self, step: int, batch_size: int) -> np.ndarray:
    """int32 ``[batch_size]``: the prompt of each row at ``step``.

    ``config.prompt_sampling``: "cycle" gives row r of step s the prompt
    (s · batch_size + r) mod C, so every prompt is seen equally often;
    "random" draws them uniformly with ``np.random.default_rng((seed,
    step))``. All zeros when unconditional. Deterministic in (seed, step).
    """
    c = self.num_contexts
    if c == 1:
      return np.zeros((batch_size,), np.int32)
    if self.config.prompt_sampling == "random":
      rng = np.random.default_rng((int(self.config.seed), int(step)))
      return rng.integers(0, c, size=batch_size).astype(np.int32)
    start = (int(step) * batch_size) % c
    return ((start + np.arange(batch_size)) % c).astype(np.int32)

  def batch(self, step: int, batch_size: int) -> state_lib.Batch:
    """The host batch of ``step``: prompts, their lengths and context ids.

    Returns:
      ``Batch(prompts int32 [B, P], prompt_lengths int32 [B],
      context_ids int32 [B])`` as NumPy arrays (P is fixed for the run, so
      the jitted step compiles once).
    """
    ids = self.context_ids(step, batch_size)
    return state_lib.Batch(prompts=self.prompt_tokens[ids],
                           prompt_lengths=self.prompt_lengths[ids],
                           context_ids=ids)

  def exact(self, params, base_params=None) -> enumeration.ExactMetrics:
    """Exact metrics of π = ``params`` by enumeration (toy spaces).

    ``base_params`` defaults to ``self.base_params`` (pass the state's copy
    when the train step donated the original buffers).
    """
    if self.support is None:
      raise ValueError("Task.exact: the task has no enumerated support; set "
                       "config.exact_metrics=True on a toy space")
    return enumeration.exact_metrics(
        self.model, params,
        self.base_params if base_params is None else base_params,
        self.target, self.exact_prompt, self.support)


# --------------------------------------------------------------------------
# Model and tokenizer.
# --------------------------------------------------------------------------


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_tokenizer(config):
  """The tokenizer named by ``config.tokenizer``."""
  if config.tokenizer == "byte":
    return tokenization.ByteTokenizer()
  if config.tokenizer == "toy":
    return ToyTokenizer(config.model.vocab_size)
  return tokenization.HFTokenizer.from_file(
      f"{config.model.path}/tokenizer.json")


def build_model(config) -> tuple[Any, Any, Any]:
  """``(model, base_params, tokenizer)`` for ``config.model`` (module doc)."""
  m = config.model
  dtype = _dtype(m.dtype)
  if m.kind == "pretrained":
    from fdiv_jax.lm import pretrain  # pylint: disable=g-import-not-at-top
    model, params, tokenizer = pretrain.load_pretrained(
        m.path or config_lib.PRETRAINED_DIR)
    if model.config.dtype != dtype:
      model = models.GPT2LM(dataclasses.replace(model.config, dtype=dtype))
    return model, params, tokenizer
  if m.kind == "hf":
    model, params = models.load_hf_checkpoint(m.path, dtype=dtype)
    return model, params, build_tokenizer(config)
  if m.kind == "gpt2":
    model = models.GPT2LM(models.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.n_positions, n_layer=m.n_layer,
        n_head=m.n_head, n_embd=m.n_embd, dtype=dtype))
  else:
    model = models.LSTMLM(models.LSTMConfig(
        vocab_size=m.vocab_size, embed_dim=m.n_embd, hidden_size=m.n_embd,
        num_layers=m.n_layer, dtype=dtype))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
  return model, params, build_tokenizer(config)


def encode_prompts(texts: Sequence[str], tokenizer) -> tuple[np.ndarray,
                                                             np.ndarray]:
  """``[BOS] + encode(text)`` per prompt, left-padded (one BOS if no texts).

  Returns:
    ``(prompt_tokens int32 [C, P], prompt_lengths int32 [C])``.
  """
  ids = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
  return sampling.pad_prompts(ids or [[tokenizer.bos_id]], tokenizer.pad_id)


# --------------------------------------------------------------------------
# Target.
# --------------------------------------------------------------------------


def target_config(config) -> dict[str, Any]:
  """``config.target`` as a ``targets.from_config`` mapping (unconditional).

  ==============  =====================================================
  target.kind     mapping
  ==============  =====================================================
  pointwise       {"kind": "pointwise", "features": target.features}
  distributional  {"kind": "distributional", "features": target.features,
                  "moments": target.moments, "lambdas": target.lambdas
                  or None}
  reward          {"kind": "reward", "feature": target.reward,
                  "beta": target.beta}
  ==============  =====================================================

  Feature specs are parsed by ``config.parse_feature_spec``.
  """
  t = config.target
  specs = [config_lib.parse_feature_spec(s) for s in t.features]
  if t.kind == "pointwise":
    return {"kind": "pointwise", "features": specs}
  if t.kind == "distributional":
    return {"kind": "distributional", "features": specs,
            "moments": [float(m) for m in t.moments],
            "lambdas": [float(x) for x in t.lambdas] or None}
  return {"kind": "reward",
          "feature": config_lib.parse_feature_spec(t.reward),
          "beta": float(t.beta)}


def fit_distributional(target: targets_lib.DistributionalTarget, model,
                       params, prompt_tokens: np.ndarray,
                       prompt_lengths: np.ndarray, max_new_tokens: int,
                       eos_id: int, pad_id: int, num_samples: int,
                       chunk_size: int, rng: jax.Array
                       ) -> tuple[targets_lib.DistributionalTarget,
                                  targets_lib.LambdaFit]:
  """Fits λ on samples x ~ a(·|c) (GDC: q = a, so log q = log a).

  Draws ``ceil(num_samples / chunk_size)`` chunks of ``chunk_size`` rows
  (untempered sampler, prompts cycled over the C prompts), then calls
  ``target.fit``. With several prompts the moments are pooled over the
  samples of every prompt (one λ shared by all contexts).

  Raises:
    ConfigError (``target.moments``): the samples never reach the target
      moment (e.g. the feature never occurs): the message suggests more
      ``target.fit_samples``.
  """
  sampler = sampling.SamplerConfig(max_new_tokens=max_new_tokens,
                                   eos_id=eos_id, pad_id=pad_id)
  draw = sampling.make_sampler(model, sampler)
  num_chunks = max(1, math.ceil(num_samples / chunk_size))
  rows = np.arange(num_chunks * chunk_size) % prompt_tokens.shape[0]
  outs = []
  for i in range(num_chunks):
    ids = rows[i * chunk_size:(i + 1) * chunk_size]
    out = draw(params, jax.random.fold_in(rng, i), prompt_tokens[ids],
               prompt_lengths[ids])
    outs.append(jax.device_get((out.tokens, out.mask, out.log_q)))
  tokens, mask, log_q = (np.concatenate(x) for x in zip(*outs))
  context = {"prompts": prompt_tokens[rows], "prompt_lengths":
             prompt_lengths[rows]}
  try:
    return target.fit(tokens, mask, log_q, log_q, context)
  except ValueError as e:
    raise ConfigError(
        f"config.target.moments: λ cannot be fitted on {len(rows)} samples "
        f"of the base model: {e}. Raise config.target.fit_samples, or set "
        "config.target.lambdas.") from e


# --------------------------------------------------------------------------
# Everything.
# --------------------------------------------------------------------------


def build(config) -> Task:
  """Validates ``config`` and builds its :class:`Task` (module docstring).

  Raises:
    ConfigError: an invalid field, prompts plus ``max_new_tokens`` longer than
      the model's positions, or a distributional target whose λ cannot be
      fitted.
  """
  config_lib.validate(config)
  model, base_params, tokenizer = build_model(config)
  if tokenizer.vocab_size > model.vocab_size:
    raise ConfigError(
        f"config.tokenizer: the tokenizer has {tokenizer.vocab_size} ids but "
        f"the model only {model.vocab_size} (model.vocab_size).")
  texts = tuple(config.prompts)
  prompt_tokens, prompt_lengths = encode_prompts(texts, tokenizer)
  config_lib.check_positions(config.max_new_tokens, prompt_tokens.shape[1],
                             model.max_positions)

  target = targets_lib.from_config(target_config(config),
                                   decode=tokenizer.batch_decode,
                                   encode=tokenizer.encode)
  lambda_fit = None
  if (isinstance(target, targets_lib.DistributionalTarget)
      and target.lambdas is None):
    target, lambda_fit = fit_distributional(
        target, model, base_params, prompt_tokens, prompt_lengths,
        config.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
        config.target.fit_samples,
        min(config.target.fit_samples, config.eval_batch_size),
        jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
  if texts:
    target = targets_lib.ConditionalTarget(target)

  sampler = sampling.SamplerConfig(
      max_new_tokens=int(config.max_new_tokens),
      temperature=float(config.temperature), top_k=int(config.top_k),
      top_p=float(config.top_p), eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id)
  support = None
  if config.exact_metrics:
    support = enumeration.all_continuations(
        model.vocab_size, config.max_new_tokens, tokenizer.eos_id,
        tokenizer.pad_id)
  return Task(
      config=config, model=model,
      params=jax.tree.map(jnp.array, base_params), base_params=base_params,
      tokenizer=tokenizer, target=target, sampler=sampler,
      num_contexts=len(texts) or 1, prompt_texts=texts,
      prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
      lambda_fit=lambda_fit, support=support)
