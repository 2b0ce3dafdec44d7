"""The prompts of a run and the batches the host feeds each step.

Unconditional generation has one prompt, a BOS token. Otherwise the task is
conditional (CDPG: one log Z per prompt): prompt i is ``[BOS] + encode(text)``,
or with a chat template ``encode(apply_chat_template(text))`` (the template
writes its own BOS, as ``transformers`` does), left-padded to the longest, and
a batch row gets prompt i by the sampling rule:

  "cycle"   row r of step s gets prompt (s · B + r) mod C, so every prompt is
            seen equally often;
  "random"  uniform draws with ``np.random.default_rng((seed, step))``.

Batches are deterministic in (seed, step), so every host of a multi-host run
builds the same global batch, and a resumed run the same batches as before.

`read_prompts(path)` reads prompts from a UTF-8 text file, one per line.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from fdiv_jax.core import _values
from fdiv_jax.lm import sampling
from fdiv_jax.train import state as state_lib

SAMPLING = ("cycle", "random")


def read_text_lines(path: str, *, what: str, unit: str, empty_line: str
                    ) -> Iterator[tuple[int, str]]:
  """(line number, text) of each line of a UTF-8 text file, 1-based.

  A BOM, the newline that ends the last line and a CR before each newline are
  dropped. Used by the prompts file and the preference JSONL files.

  Raises:
    ValueError: naming the file, and the line where there is one: the file
      cannot be read or holds no line (``"<what> file <path>: holds no
      <unit> ..."``), a line is not valid UTF-8, or is empty or blank
      (``"<path>:<n>: empty line; <empty_line>."``).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"{what} file {path}: cannot be read ({e.strerror or e}).") from e
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  lines = data.split(b"\n")
  if lines[-1] == b"":  # the newline that ends the last line
    lines.pop()
  if not lines:
    raise ValueError(f"{what} file {path}: holds no {unit} (it is empty); "
                     f"write one {unit} per line.")
  for number, raw in enumerate(lines, start=1):
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(
          f"{path}:{number}: invalid UTF-8 ({e.reason} at byte {e.start} of the "
          f"line: {raw[max(e.start - 8, 0):e.start + 8]!r}); {what} files are "
          f"UTF-8 text.") from e
    if not text.strip():
      raise ValueError(f"{path}:{number}: empty line; {empty_line}.")
    yield number, text


def read_prompts(path: str) -> tuple[str, ...]:
  """The prompts of a text file: one per line, in order.

  The file is UTF-8 (a byte-order mark is allowed); lines end with "\n" or
  "\r\n", which are not part of the prompt, and a final line without one is
  read too. Every line is a prompt: an empty or whitespace-only line is an
  error, not skipped, so that line i of the file is always prompt i - 1.

  Raises:
    ValueError: the file cannot be read, is not valid UTF-8, holds a NUL
      character, an empty line, or no line at all; the message names the file
      and, when there is one, the line (1-based).
  """
  prompts = []
  for number, text in read_text_lines(
      path, what="prompts", unit="prompt",
      empty_line="every line of a prompts file is a prompt (remove the line)"):
    if "\0" in text:
      raise ValueError(f"{path}:{number}: holds a NUL character; prompts files "
                       f"are text.")
    prompts.append(text)
  return tuple(prompts)


@dataclasses.dataclass(frozen=True, eq=False)
class Prompts:
  """Encoded prompts (build them with :meth:`encode`).

  Attributes:
    texts: the prompt texts, () for unconditional generation.
    tokens: int32 [C, P], ``[BOS] + encode(text)`` left-padded with the pad id
      (one BOS, [1, 1], when unconditional).
    lengths: int32 [C].
    sampling: "cycle" or "random" (module docstring).
    seed: seeds "random".
  """
  texts: tuple[str, ...]
  tokens: np.ndarray
  lengths: np.ndarray
  sampling: str = "cycle"
  seed: int = 0

  @classmethod
  def encode(cls, texts: Sequence[str], tokenizer, *, sampling_rule: str = "cycle",
             seed: int = 0, chat_template: bool = False) -> "Prompts":
    """Encodes `texts` with `tokenizer` (its BOS and pad ids); with
    `chat_template`, each text as one user turn of the tokenizer's chat
    template (`tokenization.HFTokenizer.apply_chat_template`), the
    assistant's turn opened.

    Raises:
      ValueError: "prompts: ..." for texts that are not a tuple of non-empty
        strings or that the tokenizer cannot encode; "chat_template: ..." for a
        tokenizer without a template (or one that fails); "prompt_sampling:
        ..." for an unknown rule.
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (tuple, list)):
      raise ValueError(f"prompts: must be a tuple of strings, got {texts!r}.")
    for i, text in enumerate(texts):
      if not isinstance(text, str) or not text:
        raise ValueError(f"prompts: entry {i} must be a non-empty string, got "
                         f"{text!r}.")
    _values.choice("prompt_sampling", sampling_rule, SAMPLING)
    _values.boolean("chat_template", chat_template)
    if chat_template:
      if not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError(f"chat_template: needs a Hugging Face tokenizer "
                         f"(tokenizer='hf'), not {type(tokenizer).__name__}.")
      try:
        texts_in = [tokenizer.apply_chat_template(t) for t in texts]
      except ValueError as e:
        raise ValueError(f"chat_template: {e}") from e
    try:
      if chat_template:
        ids = [tokenizer.encode(t) for t in texts_in]
      else:
        ids = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
    except ValueError as e:
      raise ValueError(f"prompts: {e}") from e
    tokens, lengths = sampling.pad_prompts(ids or [[tokenizer.bos_id]],
                                           tokenizer.pad_id)
    return cls(tuple(texts), tokens, lengths, sampling_rule, int(seed))

  @property
  def num_contexts(self) -> int:
    """C, the number of log Ẑ entries (1 when unconditional)."""
    return int(self.tokens.shape[0])

  @property
  def is_conditional(self) -> bool:
    return bool(self.texts)

  @property
  def length(self) -> int:
    """P, the padded prompt length (BOS included)."""
    return int(self.tokens.shape[1])

  def context_ids(self, step: int, batch_size: int, *,
                  cycle: bool = False) -> np.ndarray:
    """int32 [batch_size]: the prompt of each row at `step` (module docstring);
    `cycle` uses the "cycle" rule whatever the configured one (evaluations:
    every prompt gets its share of the samples)."""
    c = self.num_contexts
    if c == 1:
      return np.zeros((batch_size,), np.int32)
    if self.sampling == "random" and not cycle:
      rng = np.random.default_rng((self.seed, int(step)))
      return rng.integers(0, c, size=batch_size).astype(np.int32)
    start = (int(step) * batch_size) % c
    return ((start + np.arange(batch_size)) % c).astype(np.int32)

  def batch(self, step: int, batch_size: int, *,
            cycle: bool = False) -> state_lib.Batch:
    """The host batch of `step`: prompts int32 [B, P], their lengths [B] and
    context ids [B], as NumPy arrays (P is fixed, so the step compiles once).
    `cycle`: as in `context_ids`."""
    ids = self.context_ids(step, batch_size, cycle=cycle)
    return state_lib.Batch(prompts=self.tokens[ids],
                           prompt_lengths=self.lengths[ids], context_ids=ids)
