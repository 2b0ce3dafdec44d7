"""Features φ(x) and constraints b(x) that targets are built from.

A feature is a small immutable record (:class:`Feature`): a name, a function
``fn(tokens, mask, context) -> f32[B]``, whether its values are boolean
(b(x) ∈ {0, 1}, usable as a pointwise constraint of Khalifa et al., ICLR 2021)
and the range its values lie in (used to reject impossible target moments).

Shapes, everywhere in this module:

* ``tokens``: int32 ``[B, N]``, the continuation x sampled from the policy or
  the proposal.
* ``mask``: bool ``[B, N]``, True on generated tokens up to and including EOS.
* ``context``: None, or ``{"prompts": int32 [B, P], "prompt_lengths": int32 [B]}``
  for conditional tasks (Korbak et al., ICML 2022).

Two kinds of feature:

* token-level features are pure ``jax.numpy`` and run inside ``jit``
  (:func:`contains_tokens`, :func:`contains_sequences`, :func:`count_tokens`,
  :func:`length`, ...);
* text features run on the host on decoded text. Each call is ONE batched
  ``jax.pure_callback`` over the whole batch, with a static result shape, so a
  jitted train step that uses them compiles once (:func:`text_feature`,
  :func:`word_list`, :func:`regex`, :func:`female`, :func:`sentiment`,
  :func:`offensive`, :func:`python_compiles`). They take a ``decode`` callable,
  ``decode(tokens np.int32[B, N], mask np.bool_[B, N]) -> list[str]``, e.g.
  ``tokenizer.batch_decode``.

A third kind: :func:`learned_reward`, the r(x) of a Bradley–Terry reward
model trained by ``python -m fdiv_jax.reward`` (pure JAX, its weights read
from the model directory at the first call).

Offline packages used by text features (no download at run time):
``vaderSentiment`` (lexicon sentiment scorer) and ``alt-profanity-check``
(linear classifier on scikit-learn, module ``profanity_check``).

Registry: ``get(name, **kwargs)`` builds a registered feature;
``from_spec(spec, **shared)`` builds one from a config entry (a name,
``"name:key=value,..."``, or a mapping with a ``"name"`` key and keyword
arguments; :func:`parse_spec` reads the string form).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Context = Mapping[str, Array] | None
FeatureFn = Callable[[Array, Array, Context], Array]
DecodeFn = Callable[[np.ndarray, np.ndarray], Sequence[str]]

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class Feature:
  """A named scalar function of a batch of samples.

  Attributes:
    name: the name reported with moments and in error messages.
    fn: ``fn(tokens [B, N], mask [B, N], context) -> [B]``; jittable.
    is_boolean: True iff the values are in {0, 1} (a constraint b(x)).
    value_range: ``(low, high)``, closed; the values lie in it. Target moments
      outside it are rejected.
  """

  name: str
  fn: FeatureFn
  is_boolean: bool = False
  value_range: tuple[float, float] = (-_INF, _INF)

  def __call__(self, tokens: Array, mask: Array,
               context: Context = None) -> Array:
    """Returns the feature values, float32 ``[B]``; checks the shape."""
    batch = tokens.shape[0]
    values = jnp.asarray(self.fn(tokens, mask, context))
    if values.shape != (batch,):
      raise ValueError(
          f"feature {self.name!r} returned shape {tuple(values.shape)}; "
          f"expected ({batch},) (one value per sample of the batch)")
    return values.astype(jnp.float32)


def stack(features: Sequence[Feature], tokens: Array, mask: Array,
          context: Context = None) -> Array:
  """Evaluates several features; returns float32 ``[B, K]``."""
  if not features:
    return jnp.zeros((tokens.shape[0], 0), jnp.float32)
  return jnp.stack([f(tokens, mask, context) for f in features], axis=-1)


# --------------------------------------------------------------------------
# Token-level features (pure JAX).
# --------------------------------------------------------------------------


def _as_ids(token_ids: int | Sequence[int], field: str) -> tuple[int, ...]:
  if isinstance(token_ids, (int, np.integer)):
    token_ids = (int(token_ids),)
  ids = tuple(int(t) for t in token_ids)
  if not ids:
    raise ValueError(f"{field}: needs at least one token id")
  return ids


def _is_any(tokens: Array, ids: tuple[int, ...]) -> Array:
  hit = jnp.zeros(tokens.shape, bool)
  for t in ids:
    hit = hit | (tokens == t)
  return hit


def contains_tokens(token_ids: int | Sequence[int],
                    name: str | None = None) -> Feature:
  """b(x) = 1 iff some generated token of x is in ``token_ids``."""
  ids = _as_ids(token_ids, "contains_tokens.token_ids")

  def fn(tokens, mask, context=None):
    del context
    return jnp.any(_is_any(tokens, ids) & mask, axis=-1)

  return Feature(name or f"contains_tokens{list(ids)}", fn, True, (0.0, 1.0))


def count_tokens(token_ids: int | Sequence[int], name: str | None = None,
                 max_count: float = _INF) -> Feature:
  """φ(x) = number of generated tokens of x that are in ``token_ids``.

  ``max_count`` (e.g. the maximum length N) only sets the value range.
  """
  ids = _as_ids(token_ids, "count_tokens.token_ids")

  def fn(tokens, mask, context=None):
    del context
    return jnp.sum(_is_any(tokens, ids) & mask, axis=-1)

  return Feature(name or f"count_tokens{list(ids)}", fn, False,
                 (0.0, float(max_count)))


def length(name: str = "length", max_length: float = _INF) -> Feature:
  """φ(x) = number of generated tokens |x| (EOS included), i.e. Σ mask."""

  def fn(tokens, mask, context=None):
    del tokens, context
    return jnp.sum(mask, axis=-1)

  return Feature(name, fn, False, (0.0, float(max_length)))


def _sequence_hits(tokens: Array, mask: Array, seq: tuple[int, ...]) -> Array:
  """bool [B, N]: True at t iff x[t : t+L] == seq, all inside the mask."""
  n = tokens.shape[-1]
  hit = jnp.ones(tokens.shape, bool)
  for j, t in enumerate(seq):
    shifted_tok = jnp.pad(tokens[:, j:], ((0, 0), (0, j)), constant_values=-1)
    shifted_mask = jnp.pad(mask[:, j:], ((0, 0), (0, j)))
    hit = hit & (shifted_tok == t) & shifted_mask
  if len(seq) > n:
    hit = jnp.zeros(tokens.shape, bool)
  return hit


def contains_sequences(sequences: Sequence[Sequence[int]],
                       name: str | None = None) -> Feature:
  """b(x) = 1 iff x contains one of the token sequences contiguously.

  Jittable: one shifted comparison per token of each sequence.
  """
  seqs = tuple(tuple(int(t) for t in s) for s in sequences)
  if not seqs or any(len(s) == 0 for s in seqs):
    raise ValueError(
        "contains_sequences.sequences: needs non-empty token sequences")

  def fn(tokens, mask, context=None):
    del context
    found = jnp.zeros(tokens.shape[:1], bool)
    for s in seqs:
      found = found | jnp.any(_sequence_hits(tokens, mask, s), axis=-1)
    return found

  return Feature(name or "contains_sequences", fn, True, (0.0, 1.0))


def contains_words(words: Sequence[str], encode: Callable[[str], Sequence[int]],
                   name: str | None = None) -> Feature:
  """b(x) = 1 iff x contains the token encoding of one of ``words``.

  Each word is encoded with ``encode`` (e.g. ``tokenizer.encode``); a word is
  matched as a contiguous token sequence, so this is jittable. With subword
  tokenizers a word can have several encodings (e.g. with a leading space);
  list each variant you want matched.
  """
  if isinstance(words, str):
    words = (words,)
  seqs = [tuple(int(t) for t in encode(w)) for w in words]
  return dataclasses.replace(contains_sequences(seqs),
                             name=name or "contains_words")


def ends_with(token_id: int, name: str | None = None) -> Feature:
  """b(x) = 1 iff the last generated token of x is ``token_id`` (e.g. EOS)."""

  def fn(tokens, mask, context=None):
    del context
    n = tokens.shape[-1]
    has_any = jnp.any(mask, axis=-1)
    last = n - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    last_tok = jnp.take_along_axis(tokens, last[:, None], axis=-1)[:, 0]
    return has_any & (last_tok == token_id)

  return Feature(name or f"ends_with[{token_id}]", fn, True, (0.0, 1.0))


# --------------------------------------------------------------------------
# Host-side text features: one batched pure_callback per call.
# --------------------------------------------------------------------------


def _prompt_mask(prompts: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
  return np.arange(prompts.shape[-1])[None, :] < prompt_lengths[:, None]


def text_feature(name: str, text_fn: Callable[[Sequence[str]], Sequence[float]],
                 decode: DecodeFn, *, is_boolean: bool = False,
                 value_range: tuple[float, float] = (-_INF, _INF),
                 with_prompt: bool = False) -> Feature:
  """Wraps a host function on decoded text as a jittable feature.

  Inside ``jit`` the feature is ONE ``jax.pure_callback`` with result
  float32 ``[B]``: the host decodes the batch with ``decode`` and calls
  ``text_fn(list_of_B_strings) -> B numbers`` once. Shapes are static, so a
  jitted function that uses it is traced and compiled once per input shape.

  Args:
    name: feature name.
    text_fn: batched host function on strings.
    decode: ``decode(tokens np[B, N], mask np[B, N]) -> list[str]``.
    is_boolean: True iff ``text_fn`` returns values in {0, 1}.
    value_range: closed range of the values.
    with_prompt: if True and a context is given, ``text_fn`` sees
      ``prompt + continuation`` (the prompt decoded with ``decode`` over its
      first ``prompt_lengths`` tokens).
  """
  if decode is None or not callable(decode):
    raise ValueError(
        f"feature {name!r}: needs decode=callable(tokens, mask) -> list[str], "
        "e.g. tokenizer.batch_decode")

  def host(tokens, mask, *prompt_args):
    tokens = np.asarray(tokens)
    mask = np.asarray(mask).astype(bool)
    texts = list(decode(tokens, mask))
    if prompt_args:
      prompts, lengths = (np.asarray(a) for a in prompt_args)
      prefixes = decode(prompts, _prompt_mask(prompts, lengths))
      texts = [p + t for p, t in zip(prefixes, texts)]
    values = np.asarray(text_fn(texts), dtype=np.float32)
    if values.shape != (tokens.shape[0],):
      raise ValueError(
          f"feature {name!r}: text function returned shape {values.shape}; "
          f"expected ({tokens.shape[0]},)")
    return values

  def fn(tokens, mask, context=None):
    args = [tokens, mask]
    if with_prompt and context is not None:
      args += [context["prompts"], context["prompt_lengths"]]
    out = jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32)
    return jax.pure_callback(host, out, *args, vmap_method="sequential")

  return Feature(name, fn, is_boolean, value_range)


def word_list(words: Sequence[str], decode: DecodeFn, name: str = "word_list",
              case_sensitive: bool = False) -> Feature:
  """b(x) = 1 iff the decoded text contains one of ``words`` as a whole word."""
  if isinstance(words, str):
    words = (words,)
  if not words:
    raise ValueError("word_list.words: needs at least one word")
  pattern = r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
  return regex(pattern, decode, name=name, case_sensitive=case_sensitive)


def regex(pattern: str, decode: DecodeFn, name: str = "regex",
          case_sensitive: bool = True) -> Feature:
  """b(x) = 1 iff ``re.search(pattern, text)`` finds a match."""
  try:
    compiled = re.compile(pattern, 0 if case_sensitive else re.IGNORECASE)
  except re.error as e:
    raise ValueError(f"regex.pattern: invalid regular expression: {e}") from e

  def text_fn(texts):
    return [float(compiled.search(t) is not None) for t in texts]

  return text_feature(name, text_fn, decode, is_boolean=True,
                      value_range=(0.0, 1.0))


_FEMALE = re.compile(r"\b(?:she|her|hers|herself)\b", re.IGNORECASE)
_MALE = re.compile(r"\b(?:he|him|his|himself)\b", re.IGNORECASE)


def female_score(text: str) -> float:
  """1.0 iff female pronouns outnumber male pronouns in ``text``."""
  return float(len(_FEMALE.findall(text)) > len(_MALE.findall(text)))


def female(decode: DecodeFn, name: str = "female") -> Feature:
  """b(x) = 1 iff x is about a woman, by pronoun counts.

  A text is about a woman when it has more of {she, her, hers, herself} than
  of {he, him, his, himself} (whole words, any case). This is the "50% of
  biographies are about women" feature of Khalifa et al. (ICLR 2021), used as
  a distributional constraint E_p[female] = 0.5.
  """
  return text_feature(name, lambda ts: [female_score(t) for t in ts], decode,
                      is_boolean=True, value_range=(0.0, 1.0))


@functools.lru_cache(maxsize=1)
def _vader():
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  return SentimentIntensityAnalyzer()


def sentiment_scores(texts: Sequence[str]) -> list[float]:
  """VADER compound sentiment in [-1, 1] (offline lexicon scorer)."""
  analyzer = _vader()
  return [analyzer.polarity_scores(t)["compound"] for t in texts]


def sentiment(decode: DecodeFn, name: str = "sentiment") -> Feature:
  """φ(x) = VADER compound sentiment of the decoded text, in [-1, 1]."""
  return text_feature(name, sentiment_scores, decode, value_range=(-1.0, 1.0))


def positive_sentiment(decode: DecodeFn, name: str = "positive_sentiment",
                       threshold: float = 0.05) -> Feature:
  """b(x) = 1 iff VADER compound sentiment ≥ ``threshold``."""

  def text_fn(texts):
    return [float(s >= threshold) for s in sentiment_scores(texts)]

  return text_feature(name, text_fn, decode, is_boolean=True,
                      value_range=(0.0, 1.0))


def offensive_probabilities(texts: Sequence[str]) -> list[float]:
  """Probability of offensive language from ``alt-profanity-check`` (offline)."""
  import profanity_check
  if not texts:
    return []
  return [float(p) for p in profanity_check.predict_prob(list(texts))]


def offensive(decode: DecodeFn, name: str = "offensive",
              threshold: float | None = 0.5) -> Feature:
  """Offensive language in the decoded text (``alt-profanity-check``).

  With ``threshold`` (default 0.5): b(x) = 1 iff P(offensive | x) ≥ threshold.
  With ``threshold=None``: φ(x) = P(offensive | x) ∈ [0, 1].
  """
  if threshold is None:
    return text_feature(name, offensive_probabilities, decode,
                        value_range=(0.0, 1.0))

  def text_fn(texts):
    return [float(p >= threshold) for p in offensive_probabilities(texts)]

  return text_feature(name, text_fn, decode, is_boolean=True,
                      value_range=(0.0, 1.0))


def compiles(source: str) -> bool:
  """True iff ``source`` is valid Python: ``compile(source, ..., "exec")``.

  The code is compiled, never executed.
  """
  try:
    compile(source, "<sample>", "exec")
  except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
    return False
  return True


def python_compiles(decode: DecodeFn, name: str = "python_compiles",
                    with_prompt: bool = True) -> Feature:
  """b(x) = 1 iff the code compiles with ``compile(src, "<sample>", "exec")``.

  For conditional code generation (Korbak et al., ICML 2022) ``src`` is
  prompt + continuation when a context is given and ``with_prompt`` is True.
  """
  return text_feature(name, lambda ts: [float(compiles(t)) for t in ts],
                      decode, is_boolean=True, value_range=(0.0, 1.0),
                      with_prompt=with_prompt)


# --------------------------------------------------------------------------
# A learned reward: a Bradley–Terry reward model trained by
# `python -m fdiv_jax.reward` (`fdiv_jax.run.reward`).
# --------------------------------------------------------------------------

REWARD_MODEL_CONFIG = "reward_model.json"
REWARD_MODEL_PARAMS = "params.msgpack"
REWARD_MODEL_FORMAT = "fdiv_jax.reward_model/1"


def read_reward_model_config(path: str) -> dict[str, Any]:
  """``path/reward_model.json`` of a reward model directory, checked.

  Raises:
    ValueError: ``"learned_reward.path: ..."`` naming the path: no such
      directory or files, or not a reward model of this format.
  """
  config_path = os.path.join(path, REWARD_MODEL_CONFIG)
  hint = ("train one with `python -m fdiv_jax.reward --config=configs/"
          "preference_pairs.py --workdir=DIR` and pass DIR/model")
  if not os.path.isfile(config_path):
    raise ValueError(f"learned_reward.path: no reward model at {path!r} (no "
                     f"{REWARD_MODEL_CONFIG}); {hint}.")
  if not os.path.isfile(os.path.join(path, REWARD_MODEL_PARAMS)):
    raise ValueError(f"learned_reward.path: {path!r} has no {REWARD_MODEL_PARAMS}.")
  try:
    with open(config_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"learned_reward.path: cannot read {config_path}: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != REWARD_MODEL_FORMAT:
    raise ValueError(f"learned_reward.path: {config_path} is not a reward model "
                     f"of format {REWARD_MODEL_FORMAT!r}.")
  return meta


@functools.lru_cache(maxsize=4)
def _load_reward_model(path: str, stamp: tuple):
  """(RewardModel, params, BOS id) of a reward model directory; cached by the
  path and the files' modification times (``stamp``)."""
  del stamp
  import flax.serialization  # pylint: disable=g-import-not-at-top
  from fdiv_jax.lm import models  # pylint: disable=g-import-not-at-top
  from fdiv_jax.targets import reward_model  # pylint: disable=g-import-not-at-top
  meta = read_reward_model_config(path)
  fields = dict(meta["backbone_config"])
  for key in ("dtype", "param_dtype"):
    fields[key] = jnp.dtype(fields[key]).type
  model = reward_model.RewardModel(models.GPT2LM(models.GPT2Config(**fields)))
  width = 1 + int(meta.get("max_new_tokens", 1))
  template = jax.eval_shape(lambda: model.init(  # shapes only, trace-safe
      jax.random.key(0), jnp.zeros((1, width), jnp.int32),
      jnp.ones((1, width), bool)))["params"]
  template = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), template)
  with open(os.path.join(path, REWARD_MODEL_PARAMS), "rb") as f:
    params = flax.serialization.from_bytes(template, f.read())
  # NumPy, not jax.Array: the first call may come while a jitted function is
  # traced, and a jnp array made there would be a tracer kept in the cache.
  return (model, jax.tree.map(np.asarray, params),
          int(meta["tokenizer"]["bos_id"]))


def load_reward_model(path: str):
  """``(RewardModel, params, bos_id)`` of a directory written by
  `fdiv_jax.run.reward.save_reward_model` (cached)."""
  path = os.path.abspath(path)
  read_reward_model_config(path)
  stamp = tuple(os.path.getmtime(os.path.join(path, f))
                for f in (REWARD_MODEL_CONFIG, REWARD_MODEL_PARAMS))
  return _load_reward_model(path, stamp)


def reward_model_rows(tokens: Array, mask: Array, context: Context,
                      bos_id: int) -> tuple[Array, Array]:
  """What a reward model scores: ``[BOS] + prompt + continuation``,
  right-packed (``[B, P + N]`` with a context, ``[B, 1 + N]`` without one,
  where the context's left-padded prompts start with BOS themselves)."""
  if context is None:
    bos = jnp.full((tokens.shape[0], 1), bos_id, tokens.dtype)
    return (jnp.concatenate([bos, tokens], axis=1),
            jnp.concatenate([jnp.ones((tokens.shape[0], 1), bool), mask], axis=1))
  prompts = jnp.asarray(context["prompts"]).astype(tokens.dtype)
  width = prompts.shape[1]
  start = width - jnp.asarray(context["prompt_lengths"])[:, None]
  valid = jnp.concatenate([jnp.arange(width)[None, :] >= start,
                           jnp.asarray(mask, bool)], axis=1)
  full = jnp.concatenate([prompts, tokens], axis=1)
  order = jnp.argsort(~valid, axis=1, stable=True)  # real tokens first
  return (jnp.take_along_axis(full, order, axis=1),
          jnp.take_along_axis(valid, order, axis=1))


def learned_reward(path: str, name: str = "learned_reward") -> Feature:
  """r(x) of a Bradley–Terry reward model trained by ``python -m fdiv_jax.reward``.

  ``path`` is the model directory the command writes (``<workdir>/model``:
  ``reward_model.json`` and ``params.msgpack``; relative paths are taken from
  the current directory). The directory is checked when the feature is built;
  the weights are read at the first call and closed over by the jitted
  function that uses it (a constant). The model scores ``[BOS] + prompt +
  continuation`` (the prompt from the context, when there is one), as it was
  trained. Use it as ``target.reward`` of a reward target,
  P(x) = a(x)·exp(r(x)/β): ``"learned_reward:path=workdir/reward/model"``.

  Raises:
    ValueError: ``"learned_reward.path: ..."`` when the directory holds no
      reward model (the message says how to train one).
  """
  path = os.path.abspath(path)
  read_reward_model_config(path)

  def fn(tokens, mask, context=None):
    model, params, bos_id = load_reward_model(path)
    rows, rows_mask = reward_model_rows(tokens, mask, context, bos_id)
    return model.apply({"params": params}, rows, rows_mask)

  return Feature(name, fn, False, (-_INF, _INF))


# --------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Feature]] = {
    "contains_tokens": contains_tokens,
    "contains_sequences": contains_sequences,
    "contains_words": contains_words,
    "count_tokens": count_tokens,
    "ends_with": ends_with,
    "length": length,
    "word_list": word_list,
    "regex": regex,
    "female": female,
    "sentiment": sentiment,
    "positive_sentiment": positive_sentiment,
    "offensive": offensive,
    "python_compiles": python_compiles,
    "learned_reward": learned_reward,
}


def names() -> tuple[str, ...]:
  """The registered feature names."""
  return tuple(sorted(_REGISTRY))


def register(name: str, factory: Callable[..., Feature]) -> None:
  """Registers ``factory(**kwargs) -> Feature`` under ``name``."""
  if name in _REGISTRY:
    raise ValueError(f"feature {name!r} is already registered")
  _REGISTRY[name] = factory


def _factory(name: str) -> Callable[..., Feature]:
  """The registered factory of ``name``: the one unknown-name check."""
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown feature {name!r}; valid names: {', '.join(names())}.")
  return _REGISTRY[name]


def get(name: str, **kwargs: Any) -> Feature:
  """Builds the registered feature ``name`` with keyword arguments.

  Raises:
    ValueError: unknown name (the message lists the valid ones), or an
      unknown / missing keyword argument (the message names it).
  """
  factory = _factory(name)
  params = inspect.signature(factory).parameters
  unknown = [k for k in kwargs if k not in params]
  if unknown:
    raise ValueError(
        f"feature {name!r}: unknown argument(s) {unknown}; accepted: "
        f"{list(params)}.")
  missing = [k for k, p in params.items()
             if p.default is inspect.Parameter.empty and k not in kwargs]
  if missing:
    raise ValueError(f"feature {name!r}: missing argument(s) {missing}.")
  return factory(**kwargs)


# --------------------------------------------------------------------------
# Feature specs.
# --------------------------------------------------------------------------


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_spec(spec: Any) -> dict[str, Any]:
  """A feature spec from a config as a mapping for :func:`from_spec`.

  Accepted forms:

  * a registry name, ``"sentiment"``;
  * ``"name:key=value,key=value"``: each value is a Python literal or else a
    plain string; ``a|b|c`` is the tuple of its parts. E.g.
    ``"word_list:words=love|life"`` → ``{"name": "word_list", "words":
    ("love", "life")}``, ``"contains_tokens:token_ids=1"`` → ``{...,
    "token_ids": 1}``. (Values containing ``,`` or ``|``, such as some regular
    expressions, need the mapping form.)
  * a mapping ``{"name": ..., **kwargs}`` (returned as a dict).

  The name is not looked up here (:func:`get` does that).

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


def from_spec(spec: str | Mapping[str, Any] | Feature, **shared: Any) -> Feature:
  """Builds a feature from a config entry.

  ``spec`` is anything :func:`parse_spec` accepts (a registered name,
  ``"name:key=value,..."`` or a mapping ``{"name": ..., **kwargs}``) or
  already a :class:`Feature` (returned as is). ``"label"`` renames the
  feature (the name reported with moments), since ``"name"`` is the registry
  name. ``shared`` arguments (typically ``decode`` and ``encode``) are passed
  to the factories that accept them, unless the spec sets them itself or
  they are None.

  Example: ``from_spec({"name": "count_tokens", "token_ids": [3],
  "label": "science"})``, ``from_spec("count_tokens:token_ids=3,label=science")``.

  Raises:
    ValueError: a malformed spec, an unknown name (the message lists the
      valid ones), or an unknown, missing or invalid argument.
  """
  if isinstance(spec, Feature):
    return spec
  kwargs = parse_spec(spec)
  name = kwargs.pop("name")
  label = kwargs.pop("label", None)
  params = inspect.signature(_factory(name)).parameters
  for key, value in shared.items():
    if key in params and key not in kwargs and value is not None:
      kwargs[key] = value
  feature = get(name, **kwargs)
  return dataclasses.replace(feature, name=label) if label else feature
