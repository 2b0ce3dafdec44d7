"""The prompts of a run and the batches the host feeds each step.

Unconditional generation has one prompt, a BOS token. Otherwise the task is
conditional (CDPG: one log Z per prompt): prompt i is ``[BOS] + encode(text)``,
left-padded to the longest, and a batch row gets prompt i by the sampling rule:

  "cycle"   row r of step s gets prompt (s · B + r) mod C, so every prompt is
            seen equally often;
  "random"  uniform draws with ``np.random.default_rng((seed, step))``.

Batches are deterministic in (seed, step), so every host of a multi-host run
builds the same global batch, and a resumed run the same batches as before.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fdiv_jax.core import _values
from fdiv_jax.lm import sampling
from fdiv_jax.train import state as state_lib

SAMPLING = ("cycle", "random")


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
             seed: int = 0) -> "Prompts":
    """Encodes `texts` with `tokenizer` (its BOS and pad ids).

    Raises:
      ValueError: "prompts: ..." for texts that are not a tuple of non-empty
        strings or that the tokenizer cannot encode; "prompt_sampling: ..."
        for an unknown rule.
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (tuple, list)):
      raise ValueError(f"prompts: must be a tuple of strings, got {texts!r}.")
    for i, text in enumerate(texts):
      if not isinstance(text, str) or not text:
        raise ValueError(f"prompts: entry {i} must be a non-empty string, got "
                         f"{text!r}.")
    _values.choice("prompt_sampling", sampling_rule, SAMPLING)
    try:
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
