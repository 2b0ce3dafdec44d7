"""Tokenizers with one small interface: a built-in byte tokenizer, the toy
tokenizer of enumerable spaces, and Hugging Face ``tokenizer.json`` files
(through the ``tokenizers`` library).

Interface (every class): ``vocab_size``, ``eos_id``, ``pad_id``, ``bos_id``,
``eos_ids`` (every id that ends a sample, ``eos_id`` first),
``encode(text) -> list[int]`` (no special tokens added),
``decode(ids) -> str`` (special tokens dropped) and
``batch_decode(tokens [B, N], mask [B, N]) -> list[str]`` (the layout of
``fdiv_jax.lm.sampling.SampleOutput``: only ``mask``-ed tokens, EOS dropped).

A Hugging Face model directory (``HFTokenizer.from_directory``) adds what its
other files say: the EOS ids of ``generation_config.json`` (one id or a list,
e.g. Llama 3's ``[128001, 128008, 128009]``) and the chat template of
``tokenizer_config.json``, rendered with jinja2 as ``transformers``'
``apply_chat_template`` renders it (``HFTokenizer.apply_chat_template``).
"""

import json
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np


class _BatchDecodeMixin:
  """``batch_decode`` in terms of ``decode``; ``eos_ids`` = (eos_id,)."""

  @property
  def eos_ids(self) -> Tuple[int, ...]:
    return (self.eos_id,)

  def batch_decode(self, tokens: np.ndarray, mask: Optional[np.ndarray] = None,
                   ) -> List[str]:
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask)
    return [self.decode(row[m].tolist()) for row, m in zip(tokens, mask)]


class ByteTokenizer(_BatchDecodeMixin):
  """UTF-8 bytes as tokens 0..255, then pad = 256, bos = 257, eos = 258.

  ``vocab_size`` is 259. Decoding replaces invalid UTF-8 (a sampled byte
  string need not be valid) with U+FFFD.
  """
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str) -> List[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


TOY_MAX_VOCAB = 27  # Id 0 (BOS/EOS/pad) + the letters a..z.


class ToyTokenizer(_BatchDecodeMixin):
  """Tokenizer of the enumerable toy spaces: ids 0..V-1, V <= 27.

  Id 0 is BOS, EOS and pad at once (GPT-2's ``<|endoftext|>`` convention);
  ids 1..V-1 are the letters "a", "b", ...: "a" → 1, "b" → 2, ...

  Attributes:
    vocab_size: V, in [2, ``TOY_MAX_VOCAB``].
  """

  bos_id = eos_id = pad_id = 0

  def __init__(self, vocab_size: int):
    if (not isinstance(vocab_size, (int, np.integer))
        or isinstance(vocab_size, bool)
        or not 2 <= vocab_size <= TOY_MAX_VOCAB):
      raise ValueError(f"vocab_size: must be an integer in [2, "
                       f"{TOY_MAX_VOCAB}], got {vocab_size!r}.")
    self.vocab_size = int(vocab_size)

  def _letters(self) -> str:
    """The letters this vocabulary encodes, e.g. "a..c"."""
    last = chr(ord("a") + self.vocab_size - 2)
    return "a" if last == "a" else f"a..{last}"

  def encode(self, text: str) -> List[int]:
    """"a" → 1, "b" → 2, ...; raises ValueError for any other character."""
    ids = []
    for ch in text:
      if not "a" <= ch <= "z":
        raise ValueError(
            f"the toy tokenizer only encodes the letters a..z (vocab_size "
            f"{self.vocab_size}: {self._letters()}); got {ch!r} in {text!r}.")
      token_id = ord(ch) - ord("a") + 1
      if token_id >= self.vocab_size:
        raise ValueError(
            f"the toy tokenizer with vocab_size {self.vocab_size} encodes "
            f"only {self._letters()} (ids 1..{self.vocab_size - 1}); got "
            f"{ch!r} (id {token_id}) in {text!r}.")
      ids.append(token_id)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """The letters of ids 1..V-1; id 0 (special) and others are dropped."""
    return "".join(chr(ord("a") + int(i) - 1) for i in ids
                   if 0 < int(i) < self.vocab_size)


_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<s>", "<bos>", "<|bos|>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class HFTokenizer(_BatchDecodeMixin):
  """A Hugging Face ``tokenizers.Tokenizer`` behind the common interface.

  Special tokens are looked up by name; when ``bos``/``pad`` do not exist the
  EOS token stands in for them (GPT-2's convention: ``<|endoftext|>`` is all
  three).
  """

  def __init__(self, tokenizer, eos_token: Optional[str] = None,
               bos_token: Optional[str] = None,
               pad_token: Optional[str] = None,
               extra_eos_ids: Sequence[int] = (),
               chat_template: Optional[str] = None,
               template_tokens: Optional[dict] = None):
    """Args as ``from_file``; ``extra_eos_ids`` also end a sample;
    ``chat_template`` (a jinja2 source) and ``template_tokens`` (e.g.
    ``{"bos_token": "<s>"}``, the names the template may use) as
    ``from_directory`` reads them."""
    self._tok = tokenizer
    self.eos_id = self._find(eos_token, _EOS_NAMES, "EOS")
    self.bos_id = self._find(bos_token, _BOS_NAMES, "BOS", self.eos_id)
    self.pad_id = self._find(pad_token, _PAD_NAMES, "pad", self.eos_id)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    extra = []
    for token_id in extra_eos_ids:
      if (not isinstance(token_id, int) or isinstance(token_id, bool)
          or not 0 <= token_id < self.vocab_size):
        raise ValueError(f"EOS id {token_id!r} is not an id of the tokenizer "
                         f"(vocabulary of {self.vocab_size}).")
      if token_id != self.eos_id and token_id not in extra:
        extra.append(token_id)
    self._eos_ids = (self.eos_id, *extra)
    self.chat_template = chat_template
    self._template_tokens = dict(template_tokens or {})
    self._special = {self.bos_id, self.pad_id, *self._eos_ids}

  @property
  def eos_ids(self) -> Tuple[int, ...]:
    """``eos_id`` and the other EOS ids of ``generation_config.json``."""
    return self._eos_ids

  @classmethod
  def from_file(cls, path: str, **special_tokens) -> "HFTokenizer":
    """Loads a ``tokenizer.json``; keywords as in ``__init__``.

    Raises:
      ValueError: the file is missing, truncated or not a tokenizer (the
        message names it), or a special token is not in it.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      # The library raises a bare Exception (a Rust error) for a bad file.
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - reported with the path
      raise ValueError(f"{path}: not a readable tokenizer.json (truncated or "
                       f"corrupt?): {e}") from e
    return cls(tokenizer, **special_tokens)

  @classmethod
  def from_directory(cls, path: str, **special_tokens) -> "HFTokenizer":
    """The tokenizer of a Hugging Face model directory: ``tokenizer.json``,
    with the EOS ids of ``generation_config.json`` (``eos_token_id``: an id
    or a list), and the chat template and the BOS, EOS and pad tokens named by
    ``tokenizer_config.json`` (keywords as ``from_file`` take precedence),
    when those files exist. A template given as a list of named templates
    uses the one named "default".

    Raises:
      ValueError: a file is unreadable or not JSON, an EOS id is not an id of
        the tokenizer, or ``chat_template`` is neither a string nor a list of
        named templates; the message names the file.
    """
    extra_eos, template, names = (), None, {}
    generation = _read_json(os.path.join(path, "generation_config.json"))
    if generation is not None:
      eos = generation.get("eos_token_id")
      extra_eos = () if eos is None else (
          tuple(eos) if isinstance(eos, list) else (eos,))
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    if config is not None:
      template = _chat_template(config.get("chat_template"), path)
      for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": ...}
          value = value.get("content")
        if isinstance(value, str):
          names[key] = value
    for key in ("eos_token", "bos_token", "pad_token"):  # the names it gives
      if key in names:
        special_tokens.setdefault(key, names[key])
    tokenizer = cls.from_file(os.path.join(path, "tokenizer.json"),
                              **special_tokens)
    try:
      return cls(tokenizer._tok, extra_eos_ids=extra_eos,  # pylint: disable=protected-access
                 chat_template=template, template_tokens=names,
                 **special_tokens)
    except ValueError as e:
      raise ValueError(f"{os.path.join(path, 'generation_config.json')}: "
                       f"{e}") from e

  def apply_chat_template(self, text: str) -> str:
    """``text`` as one user message in the chat template, followed by the
    prompt of the assistant's reply (``add_generation_prompt=True``), as
    ``transformers``' ``apply_chat_template(..., tokenize=False)`` renders it.

    Raises:
      ValueError: the tokenizer has no chat template, or the template raises
        (``raise_exception`` in its source).
    """
    if self.chat_template is None:
      raise ValueError("the tokenizer has no chat template (no "
                       "chat_template in tokenizer_config.json).")
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      return _compile_template(self.chat_template).render(
          messages=[{"role": "user", "content": text}],
          add_generation_prompt=True, **self._template_tokens)
    except jinja2.TemplateError as e:
      raise ValueError(f"the chat template failed on {text!r}: {e}") from e

  def _find(self, name: Optional[str], candidates: Sequence[str], what: str,
            default: Optional[int] = None) -> int:
    names = (name,) if name is not None else candidates
    for n in names:
      token_id = self._tok.token_to_id(n)
      if token_id is not None:
        return token_id
    if default is not None and name is None:
      return default
    raise ValueError(f"No {what} token in the tokenizer (looked for "
                     f"{list(names)}); pass {what.lower()}_token=...")

  def encode(self, text: str) -> List[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if int(i) not in self._special]
    return self._tok.decode(ids, skip_special_tokens=True)


def _read_json(path: str) -> Optional[dict]:
  """The JSON object in ``path``, or None when there is no such file."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON file: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: holds {type(value).__name__}, not a JSON "
                     f"object.")
  return value


def _chat_template(value, path: str) -> Optional[str]:
  """The template source of ``tokenizer_config.json``'s ``chat_template``:
  a string, or the "default" of a list of ``{"name", "template"}``."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value
             if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
      return named["default"]
  raise ValueError(f"{os.path.join(path, 'tokenizer_config.json')}: "
                   f"chat_template must be a string or a list of named "
                   f"templates with a 'default', got {value!r:.80}.")


def _compile_template(source: str):
  """A jinja2 template in the environment ``transformers`` renders chat
  templates in: sandboxed, ``trim_blocks`` and ``lstrip_blocks``, loop
  controls, ``raise_exception`` and a ``tojson`` that keeps non-ASCII text."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None,
             sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  def strftime_now(format_string):
    import datetime  # pylint: disable=g-import-not-at-top
    return datetime.datetime.now().strftime(format_string)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)
