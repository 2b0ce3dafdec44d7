"""Tokenizers with one small interface: a built-in byte tokenizer, the toy
tokenizer of enumerable spaces, and Hugging Face ``tokenizer.json`` files
(through the ``tokenizers`` library).

Interface (every class): ``vocab_size``, ``eos_id``, ``pad_id``, ``bos_id``,
``encode(text) -> list[int]`` (no special tokens added),
``decode(ids) -> str`` (special tokens dropped) and
``batch_decode(tokens [B, N], mask [B, N]) -> list[str]`` (the layout of
``fdiv_jax.lm.sampling.SampleOutput``: only ``mask``-ed tokens, EOS dropped).
"""

from typing import Iterable, List, Optional, Sequence

import numpy as np


class _BatchDecodeMixin:
  """``batch_decode`` in terms of ``decode``."""

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
               pad_token: Optional[str] = None):
    self._tok = tokenizer
    self.eos_id = self._find(eos_token, _EOS_NAMES, "EOS")
    self.bos_id = self._find(bos_token, _BOS_NAMES, "BOS", self.eos_id)
    self.pad_id = self._find(pad_token, _PAD_NAMES, "pad", self.eos_id)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self._special = {self.eos_id, self.bos_id, self.pad_id}

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
