"""Exact answers on sample spaces small enough to enumerate.

With a vocabulary of V tokens (one of them EOS) and at most N new tokens, the
sequences a sampler can produce are: an EOS after n − 1 non-EOS tokens
(n = 1..N), or N non-EOS tokens (length-capped). Scoring all of them under a
model gives its exact distribution, so Z, every divergence, KL(π‖a) and every
moment has an exact value: `toy_exact` runs and the tests compare against them.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import divergences
from fdiv_jax.lm import scoring

Array = jax.Array

MAX_SUPPORT = 100_000  # Most sequences an exact-metrics run enumerates.


def support_size(vocab_size: int, max_new_tokens: int) -> int:
  """S = Σ_{n=1..N} (V−1)^(n−1) + (V−1)^N: continuations with one EOS.

  The number of rows of ``all_continuations(vocab_size, max_new_tokens,
  eos_id)`` with an EOS id, computed without enumerating them.
  """
  others = vocab_size - 1
  return sum(others ** (n - 1) for n in range(1, max_new_tokens + 1)) + (
      others ** max_new_tokens)


class Support(NamedTuple):
  """Every possible continuation, padded like `sampling.SampleOutput`."""
  tokens: np.ndarray   # int32 [S, N]
  mask: np.ndarray     # bool [S, N]


def all_continuations(vocab_size: int, max_new_tokens: int, eos_id: int | None,
                      pad_id: int = 0) -> Support:
  """Enumerates every continuation of at most `max_new_tokens` tokens.

  S = Σ_{n=1..N} (V−1)^(n−1) sequences ending in EOS plus (V−1)^N capped ones
  (V^N when there is no EOS).
  """
  others = [t for t in range(vocab_size) if t != eos_id]
  rows, masks = [], []
  if eos_id is not None:
    for n in range(1, max_new_tokens + 1):
      for prefix in itertools.product(others, repeat=n - 1):
        seq = list(prefix) + [eos_id]
        rows.append(seq + [pad_id] * (max_new_tokens - n))
        masks.append([True] * n + [False] * (max_new_tokens - n))
  for seq in itertools.product(others, repeat=max_new_tokens):
    rows.append(list(seq))
    masks.append([True] * max_new_tokens)
  return Support(np.asarray(rows, np.int32), np.asarray(masks, bool))


def log_probs(model, params, prompt: np.ndarray, support: Support,
              warping=None) -> Array:
  """[S] log-probability of every continuation of one prompt (a batched pass)."""
  s = support.tokens.shape[0]
  prompts = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32)[None], (s, len(prompt)))
  lengths = jnp.full((s,), len(prompt), jnp.int32)
  return scoring.sequence_log_probs(model, params, prompts, lengths,
                                    jnp.asarray(support.tokens),
                                    jnp.asarray(support.mask), warping)[1]


def context(prompt: np.ndarray, support: Support) -> dict[str, Array]:
  s = support.tokens.shape[0]
  return {"prompts": jnp.broadcast_to(jnp.asarray(prompt, jnp.int32)[None],
                                      (s, len(prompt))),
          "prompt_lengths": jnp.full((s,), len(prompt), jnp.int32)}


class ExactMetrics(NamedTuple):
  log_z: float
  divergences: dict[str, float]   # D(π‖p) by metric name: the four reported
                                  # ones and any `extra` divergence
  kl_from_base: float
  alignment: float                # E_π[alignment]
  target_alignment: float         # E_p[alignment]




def exact_metrics(model, params, base_params, target, prompt: np.ndarray,
                  support: Support, extra: Sequence[divergences.Divergence] = ()
                  ) -> ExactMetrics:
  """Exact Z, D(π‖p), KL(π‖a) and alignment by enumeration of `support`.

  `divergences` holds KL(p‖π), KL(π‖p), TV, JS and each of `extra` (e.g. the
  trained divergence), keyed by `Divergence.metric_name`.
  """
  log_pi = log_probs(model, params, prompt, support)
  log_a = log_probs(model, base_params, prompt, support)
  ctx = context(prompt, support)
  tokens, mask = jnp.asarray(support.tokens), jnp.asarray(support.mask)
  log_target = target.log_prob(tokens, mask, log_a, ctx)
  log_z = jax.scipy.special.logsumexp(log_target)
  log_p = log_target - log_z
  ds = [divergences.get(n) for n in divergences.STANDARD] + list(extra)
  divs = {d.metric_name: float(divergences.exact(d, log_pi, log_p)) for d in ds}
  align = target.alignment(tokens, mask, ctx)
  return ExactMetrics(
      log_z=float(log_z), divergences=divs,
      kl_from_base=float(divergences.exact("reverse_kl", log_pi, log_a)),
      alignment=float(jnp.sum(jnp.exp(log_pi) * align)),
      target_alignment=float(jnp.sum(jnp.exp(log_p) * align)))
