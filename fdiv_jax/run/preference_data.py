"""Preference data from local JSONL files: pairs and ranked lists.

Two formats, one JSON object per line (UTF-8; extra keys are ignored):

  pairs  {"prompt": str, "chosen": str, "rejected": str}
         chosen ≻ rejected (f-DPO, the Bradley–Terry reward model);
  lists  {"prompt": str, "responses": [str, ...], "rewards": [number, ...]}
         K >= 2 responses with a scalar reward each (f-PO); K may vary from
         row to row (shorter lists are padded and masked).

The prompt may be empty (unconditional generation); a response may not. A
row that breaks the format is an error naming the file and the line
(1-based): ``ValueError("pairs.jsonl:17: 'rejected' is missing ...")``:
invalid UTF-8 or JSON, a blank line, a line that is not an object, a missing
or mistyped field, an empty response, a NUL character, a non-finite reward,
rewards and responses of different lengths, chosen equal to rejected. An
unreadable or empty file names the file.

Tokenisation (`encode_pairs`, `encode_lists`), for a tokenizer with the
library's interface and the run's ``max_new_tokens`` N:

  prompt    [BOS] + encode(prompt), left-padded to the longest (as
            `run.prompts.Prompts`: the unconditional prompt is [BOS]);
  response  (encode(text) + [EOS])[:N], right-padded, masked.

That is exactly what the sampler draws: a continuation that ended within N
tokens ends with EOS, a longer one is its first N tokens without EOS. So
log π(response | prompt) of the training data and of fresh samples are the
same quantity (`scoring.sequence_log_probs` on these arrays).

`write_pairs` / `write_lists` write the formats (the shipped data is made
by `fdiv_jax/data/make_preferences.py`); `shipped(name)` is the path of a
shipped file. A run config's ``preference`` section is checked by
`run.preference_spec.describe`. This module imports only NumPy and the
standard library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Iterator, Sequence

import numpy as np

from fdiv_jax.run.prompts import read_text_lines

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "data")
# The shipped preference set (`fdiv_jax/data/make_preferences.py`).
SHIPPED = {
    "pairs_train": "preference_pairs.train.jsonl",
    "pairs_test": "preference_pairs.test.jsonl",
    "lists_train": "preference_lists.train.jsonl",
    "lists_test": "preference_lists.test.jsonl",
    "stats": "preferences.json",
}
FORMATS = ("pairs", "lists")


def shipped(name: str) -> str:
  """The absolute path of a shipped file: a key of `SHIPPED` or a file name."""
  return os.path.join(DATA_DIR, SHIPPED.get(name, name))


@dataclasses.dataclass(frozen=True)
class PairData:
  """Preference pairs, one entry per row: ``chosen[i]`` ≻ ``rejected[i]``."""
  path: str
  prompts: tuple[str, ...]
  chosen: tuple[str, ...]
  rejected: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class ListData:
  """Ranked lists: ``responses[i]`` (K_i >= 2 texts) with ``rewards[i]``."""
  path: str
  prompts: tuple[str, ...]
  responses: tuple[tuple[str, ...], ...]
  rewards: tuple[tuple[float, ...], ...]

  def __len__(self) -> int:
    return len(self.prompts)

  @property
  def max_responses(self) -> int:
    return max(len(r) for r in self.responses)


def _rows(path: str, what: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each line of a JSONL file; errors name both."""
  for number, text in read_text_lines(
      path, what=what, unit="row",
      empty_line="every line is one JSON object (remove the line)"):
    where = f"{path}:{number}"
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from e
    if not isinstance(row, dict):
      raise ValueError(f"{where}: a row must be a JSON object, got "
                       f"{type(row).__name__}.")
    yield number, row


def _field(where: str, row: dict, key: str, fields: Sequence[str]) -> Any:
  if key not in row:
    raise ValueError(f"{where}: {key!r} is missing; a row has "
                     f"{', '.join(repr(f) for f in fields)}.")
  return row[key]


def _text(where: str, key: str, value: Any, *, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    raise ValueError(f"{where}: {key!r} must be a string, got "
                     f"{type(value).__name__}.")
  if not allow_empty and not value:
    raise ValueError(f"{where}: {key!r} is empty; a response needs at least one "
                     f"character.")
  if "\0" in value:
    raise ValueError(f"{where}: {key!r} holds a NUL character.")
  return value


def read_pairs(path: str) -> PairData:
  """The pairs of a JSONL file (module docstring).

  Raises:
    ValueError: naming the file and line of the first bad row.
  """
  fields = ("prompt", "chosen", "rejected")
  prompts, chosen, rejected = [], [], []
  for number, row in _rows(path, "pairs"):
    where = f"{path}:{number}"
    prompt = _text(where, "prompt", _field(where, row, "prompt", fields),
                   allow_empty=True)
    good = _text(where, "chosen", _field(where, row, "chosen", fields))
    bad = _text(where, "rejected", _field(where, row, "rejected", fields))
    if good == bad:
      raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text; a "
                       f"pair must compare two responses.")
    prompts.append(prompt)
    chosen.append(good)
    rejected.append(bad)
  return PairData(path, tuple(prompts), tuple(chosen), tuple(rejected))


def read_lists(path: str) -> ListData:
  """The ranked lists of a JSONL file (module docstring).

  Raises:
    ValueError: naming the file and line of the first bad row.
  """
  fields = ("prompt", "responses", "rewards")
  prompts, responses, rewards = [], [], []
  for number, row in _rows(path, "lists"):
    where = f"{path}:{number}"
    prompt = _text(where, "prompt", _field(where, row, "prompt", fields),
                   allow_empty=True)
    texts = _field(where, row, "responses", fields)
    values = _field(where, row, "rewards", fields)
    if not isinstance(texts, list) or len(texts) < 2:
      raise ValueError(f"{where}: 'responses' must be a list of at least 2 "
                       f"strings, got {texts!r:.80}.")
    texts = tuple(_text(where, f"responses[{i}]", t) for i, t in enumerate(texts))
    if not isinstance(values, list) or len(values) != len(texts):
      raise ValueError(f"{where}: 'rewards' must be a list of {len(texts)} numbers "
                       f"(one per response), got {values!r:.80}.")
    for i, v in enumerate(values):
      if (not isinstance(v, numbers.Real) or isinstance(v, bool)
          or not math.isfinite(v)):
        raise ValueError(f"{where}: 'rewards[{i}]' must be a finite number, got "
                         f"{v!r}.")
    prompts.append(prompt)
    responses.append(texts)
    rewards.append(tuple(float(v) for v in values))
  return ListData(path, tuple(prompts), tuple(responses), tuple(rewards))


def read(path: str, data_format: str) -> PairData | ListData:
  """`read_pairs` or `read_lists` by ``data_format`` ("pairs" or "lists")."""
  if data_format not in FORMATS:
    raise ValueError(f"data_format: must be one of {', '.join(FORMATS)}; got "
                     f"{data_format!r}.")
  return read_pairs(path) if data_format == "pairs" else read_lists(path)


def _write(path: str, rows: Sequence[dict]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


def write_pairs(path: str, prompts: Sequence[str], chosen: Sequence[str],
                rejected: Sequence[str]) -> str:
  """Writes pairs as JSONL (keys in the order prompt, chosen, rejected)."""
  return _write(path, [{"prompt": p, "chosen": c, "rejected": r}
                       for p, c, r in zip(prompts, chosen, rejected, strict=True)])


def write_lists(path: str, prompts: Sequence[str],
                responses: Sequence[Sequence[str]],
                rewards: Sequence[Sequence[float]]) -> str:
  """Writes ranked lists as JSONL."""
  return _write(path, [{"prompt": p, "responses": list(t), "rewards": list(r)}
                       for p, t, r in zip(prompts, responses, rewards, strict=True)])


# ----------------------------------------------------------------------------
# Tokenisation.


def encode_prompts(prompts: Sequence[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """int32 ``[n, P]`` left-padded ``[BOS] + encode(prompt)`` and lengths ``[n]``."""
  ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
  lengths = np.array([len(x) for x in ids], np.int32)
  width = int(lengths.max())
  out = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  for row, x in enumerate(ids):
    out[row, width - len(x):] = x
  return out, lengths


def encode_responses(texts: Sequence[str], tokenizer,
                     max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
  """``(tokens int32 [n, N], mask bool [n, N], number cut at N)``:
  ``(encode(text) + [EOS])[:N]``, right-padded with the pad id."""
  n = int(max_new_tokens)
  tokens = np.full((len(texts), n), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), n), bool)
  cut = 0
  for row, text in enumerate(texts):
    ids = [*tokenizer.encode(text), tokenizer.eos_id]
    cut += len(ids) > n
    ids = ids[:n]
    tokens[row, :len(ids)] = ids
    mask[row, :len(ids)] = True
  return tokens, mask, cut


def encode_pairs(data: PairData, tokenizer, max_new_tokens: int) -> dict[str, Any]:
  """NumPy arrays of the pairs: ``prompts [n, P]``, ``prompt_lengths [n]``,
  ``chosen_tokens``/``chosen_mask``/``rejected_tokens``/``rejected_mask``
  ``[n, N]``, and ``num_cut`` (responses cut at N)."""
  prompts, lengths = encode_prompts(data.prompts, tokenizer)
  chosen, chosen_mask, cut_c = encode_responses(data.chosen, tokenizer, max_new_tokens)
  rejected, rejected_mask, cut_r = encode_responses(data.rejected, tokenizer,
                                                    max_new_tokens)
  return {"prompts": prompts, "prompt_lengths": lengths,
          "chosen_tokens": chosen, "chosen_mask": chosen_mask,
          "rejected_tokens": rejected, "rejected_mask": rejected_mask,
          "num_cut": cut_c + cut_r}


def encode_lists(data: ListData, tokenizer, max_new_tokens: int,
                 num_responses: int | None = None) -> dict[str, Any]:
  """NumPy arrays of the lists, K = ``num_responses`` (default the longest
  list): ``prompts [n, P]``, ``prompt_lengths [n]``, ``tokens``/``mask``
  ``[n, K, N]``, ``response_mask [n, K]`` (False on padding responses),
  ``rewards [n, K]`` float32 (0 on padding) and ``num_cut``."""
  k = data.max_responses if num_responses is None else int(num_responses)
  if k < data.max_responses:
    raise ValueError(f"num_responses: {k} is fewer than the longest list of "
                     f"{data.path} ({data.max_responses}).")
  n = len(data)
  prompts, lengths = encode_prompts(data.prompts, tokenizer)
  tokens = np.full((n, k, max_new_tokens), tokenizer.pad_id, np.int32)
  mask = np.zeros((n, k, max_new_tokens), bool)
  response_mask = np.zeros((n, k), bool)
  rewards = np.zeros((n, k), np.float32)
  cut = 0
  for i, (texts, values) in enumerate(zip(data.responses, data.rewards)):
    t, m, c = encode_responses(texts, tokenizer, max_new_tokens)
    tokens[i, :len(texts)], mask[i, :len(texts)] = t, m
    response_mask[i, :len(texts)] = True
    rewards[i, :len(texts)] = values
    cut += c
  return {"prompts": prompts, "prompt_lengths": lengths, "tokens": tokens,
          "mask": mask, "response_mask": response_mask, "rewards": rewards,
          "num_cut": cut}


def longest_prompt(data: PairData | ListData, tokenizer) -> int:
  """P: tokens of the longest prompt, BOS included."""
  return 1 + max(len(tokenizer.encode(p)) for p in data.prompts)


def file_digest(path: str) -> str:
  """The first 16 hex digits of the SHA-256 of a file (checkpoints record it)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def batch_indices(num_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """int64 ``[batch_size]``: the rows of training step ``step``.

  Epoch e visits the rows in the order ``default_rng((seed, e)).permutation``;
  step s takes positions s·B .. s·B + B − 1 of the concatenated epochs. So the
  batches depend only on (seed, step): every host builds the same one, and a
  resumed run the same as before.
  """
  if num_rows < 1 or batch_size < 1:
    raise ValueError(f"batch_indices: {num_rows} rows, batch size {batch_size}.")
  out = []
  position = int(step) * int(batch_size)
  while len(out) < batch_size:
    epoch, offset = divmod(position, num_rows)
    order = np.random.default_rng((int(seed), int(epoch))).permutation(num_rows)
    take = min(batch_size - len(out), num_rows - offset)
    out.extend(order[offset:offset + take].tolist())
    position += take
  return np.asarray(out, np.int64)


def chunks(num_rows: int, chunk_size: int):
  """``(indices [chunk_size], weights [chunk_size])`` covering 0..num_rows − 1
  in order; the last chunk is padded with row 0 at weight 0, so that every
  chunk has one shape."""
  for start in range(0, num_rows, chunk_size):
    idx = np.arange(start, start + chunk_size)
    real = idx < num_rows
    yield np.where(real, idx, 0), real.astype(np.float32)
