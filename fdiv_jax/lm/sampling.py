"""Batched ancestral sampling with a KV cache, returning the exact log q.

For each row b, with left-padded prompt c_b, the sampler draws
``x_n ~ q(. | c_b, x_<n) = warp(model(c_b, x_<n))`` (temperature, top-k, top-p
as in ``fdiv_jax.lm.scoring``) until EOS or ``max_new_tokens``, and returns
``token_log_q[b, n] = log q(x_n | c_b, x_<n)``, the log-probability under the
very distribution the token was drawn from (``softmax`` of the same
``scoring.warp_logits``, normalised by the sums the draw itself makes).
Hence ``log_q[b] = sum_n token_log_q[b, n]`` is the exact log-probability of
the whole continuation, EOS included, and a length-capped continuation (no
EOS within ``max_new_tokens``) has the probability of its tokens.

Layout (shared with ``scoring.sequence_log_probs``):

* prompts are LEFT-padded: ``prompts`` int32 [B, P], the real tokens of row b
  in the last ``prompt_lengths[b]`` columns (``pad_prompts`` builds them).
  Every prompt must hold at least one token; unconditional generation uses a
  one-token BOS prompt. Position ids restart at 0 on each row's first token.
* continuations are [B, N] with N = ``max_new_tokens``: ``tokens`` (pad_id
  after EOS), ``mask`` (True up to and including EOS), ``token_log_q``
  (0 where mask is False), ``log_q`` [B] and ``lengths`` [B].

The model is driven through ``fdiv_jax.lm.models.base.LanguageModel``: one
``decode`` call prefills the cache with the prompts, then each step decodes
the previous token (all rows write the same cache column, which left padding
makes possible). The loop is a ``lax.while_loop`` that stops early once every
row has emitted EOS.
"""

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import _values
from fdiv_jax.lm import scoring
from fdiv_jax.lm.models import base

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampling settings (hashable; close over it or mark it static).

  Attributes:
    max_new_tokens: N, the number of generated tokens at most.
    temperature: τ > 0.
    top_k: 0 = off.
    top_p: 1 = off.
    eos_id: end-of-sequence token, or a tuple of them (any one ends a
      sample, e.g. the ``eos_token_id`` list of a ``generation_config.json``;
      a one-id tuple or list becomes that id); None = always generate N
      tokens.
    pad_id: token written after EOS.
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: Optional[Union[int, Tuple[int, ...]]] = None
  pad_id: int = 0

  def __post_init__(self):
    _values.integer("max_new_tokens", self.max_new_tokens, minimum=1)
    if isinstance(self.eos_id, (list, tuple)):
      ids = tuple(self.eos_id)
      if not ids or not all(isinstance(i, (int, np.integer))
                            and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_id: must be an id or a non-empty tuple of ids, "
                         f"got {self.eos_id!r}.")
      ids = tuple(int(i) for i in ids)
      object.__setattr__(self, "eos_id", ids[0] if len(ids) == 1 else ids)
    self.warping  # Validates temperature, top_k and top_p.

  @property
  def warping(self) -> scoring.Warping:
    return scoring.Warping(self.temperature, self.top_k, self.top_p)

  @property
  def truncates(self) -> bool:
    """Top-k or top-p: q = 0 on tokens where the model has mass."""
    return self.top_k > 0 or self.top_p < 1.0

  def untempered(self) -> "SamplerConfig":
    """The same lengths and special ids without warping: samples of the model
    itself (what evaluation measures), temperature 1, no top-k, no top-p."""
    return dataclasses.replace(self, temperature=1.0, top_k=0, top_p=1.0)


class SampleOutput(NamedTuple):
  """Sampled continuations (B rows, N = max_new_tokens columns).

  Attributes:
    tokens: int32 [B, N]; pad_id after EOS.
    mask: bool [B, N]; True for generated tokens up to and including EOS.
    token_log_q: float32 [B, N]; log q of each token, 0 where mask is False.
    log_q: float32 [B]; ``token_log_q.sum(-1)``.
    lengths: int32 [B]; ``mask.sum(-1)``.
    dropped_mass: float32 [B, N] when the sampler truncates (top-k, top-p):
      the mass of the untempered model outside the kept tokens at each step,
      the probability π would have put where q cannot go (0 off the mask);
      None otherwise.
  """
  tokens: Array
  mask: Array
  token_log_q: Array
  log_q: Array
  lengths: Array
  dropped_mass: Optional[Array] = None


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into ``(prompts int32 [B, P], lengths int32 [B])``.

  Args:
    prompts: B non-empty token lists.
    pad_id: filler for the left padding.
    length: P; defaults to the longest prompt.
  """
  lengths = np.array([len(p) for p in prompts], dtype=np.int32)
  if lengths.size == 0 or lengths.min() < 1:
    raise ValueError("Every prompt needs at least one token (use a BOS token "
                     "for unconditional generation).")
  width = int(lengths.max()) if length is None else length
  if lengths.max() > width:
    raise ValueError(f"Prompt of length {lengths.max()} exceeds length "
                     f"{width}.")
  out = np.full((len(prompts), width), pad_id, dtype=np.int32)
  for row, prompt in enumerate(prompts):
    out[row, width - len(prompt):] = prompt
  return out, lengths


def _first_above(cumulative: Array, target: Array, positive: Array) -> Array:
  """First index i with ``cumulative[i] > target``, clamped to the last index
  with positive mass (guards the ``target == total`` rounding case)."""
  count = jnp.sum(cumulative <= target[..., None], axis=-1)
  last = cumulative.shape[-1] - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
  return jnp.minimum(count, last)


def categorical_with_log_prob(rng: Array, logits: Array) -> Tuple[Array, Array]:
  """Draws one index per row from ``softmax(logits)``, with its log-probability.

  Two-level inverse-CDF sampling, exact up to float32 rounding of partial
  sums: the V probabilities are grouped into about sqrt(V) blocks; a block
  is drawn with probability proportional to its mass (uniform ``u1``), then
  a token within it proportionally to its probability (uniform ``u2``). So
  ``P(i) = (m_b / M) (p_i / m_b) = p_i / M``. Two uniforms per row instead of
  V Gumbel variates, and the cumulative sums are short, so rounding stays at
  the level of a block of about sqrt(V) terms. Tokens with logit -inf are
  never drawn.

  The log-probability of the drawn index, ``logits[i] − logsumexp(logits)``,
  reuses the block masses: ``logsumexp = max + log M``, so no separate
  log-softmax pass over the vocabulary is made.

  Args:
    rng: PRNG key.
    logits: float32 [B, V], unnormalised log-probabilities; -inf allowed (at
      least one finite per row).

  Returns:
    ``(index int32 [B], log_prob float32 [B])``.
  """
  batch, vocab = logits.shape
  block = max(1, int(round(vocab ** 0.5)))
  num_blocks = -(-vocab // block)
  row_max = jnp.max(logits, axis=-1)
  probs = jnp.exp(logits - row_max[:, None])
  probs = jnp.pad(probs, ((0, 0), (0, num_blocks * block - vocab)))
  probs = probs.reshape(batch, num_blocks, block)
  block_mass = jnp.sum(probs, axis=-1)
  key_block, key_token = jax.random.split(rng)
  cum_blocks = jnp.cumsum(block_mass, axis=-1)
  u1 = jax.random.uniform(key_block, (batch,)) * cum_blocks[:, -1]
  chosen = _first_above(cum_blocks, u1, block_mass > 0)
  row = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]
  cum_row = jnp.cumsum(row, axis=-1)
  u2 = jax.random.uniform(key_token, (batch,)) * cum_row[:, -1]
  within = _first_above(cum_row, u2, row > 0)
  index = (chosen * block + within).astype(jnp.int32)
  picked = jnp.take_along_axis(logits, index[:, None], axis=-1)[:, 0]
  log_prob = picked - row_max - jnp.log(jnp.sum(block_mass, axis=-1))
  return index, log_prob


def categorical(rng: Array, logits: Array) -> Array:
  """The index drawn by ``categorical_with_log_prob`` (int32 [B])."""
  return categorical_with_log_prob(rng, logits)[0]


class _State(NamedTuple):
  step: Array          # int32 scalar: the column being sampled.
  logits: Array        # float32 [B, V]: next-token logits for that column.
  cache: object        # model cache (or None when uncached).
  done: Array          # bool [B]: EOS already emitted.
  tokens: Array
  mask: Array
  token_log_q: Array
  dropped_mass: Optional[Array] = None   # [B, N] when the sampler truncates


def _draw(state: _State, rng: Array, config: SamplerConfig):
  """Samples column ``state.step``; returns (state, fed token, fed mask)."""
  warped = scoring.warp_logits(state.logits, config.warping)
  token, token_log_q = categorical_with_log_prob(
      jax.random.fold_in(rng, state.step), warped)
  active = ~state.done
  if state.dropped_mass is not None:
    # π's mass outside q's support: 1 − Σ_kept softmax(logits), in log space.
    logits = state.logits.astype(jnp.float32)
    log_all = jax.nn.logsumexp(logits, axis=-1)
    log_kept = jax.nn.logsumexp(jnp.where(warped > -jnp.inf, logits, -jnp.inf),
                                axis=-1)
    dropped = jnp.where(active, -jnp.expm1(log_kept - log_all), 0.0)
    state = state._replace(dropped_mass=jax.lax.dynamic_update_slice(
        state.dropped_mass, dropped[:, None], (0, state.step)))
  token = jnp.where(active, token, config.pad_id)
  token_log_q = jnp.where(active, token_log_q, 0.0)
  done = state.done
  if isinstance(config.eos_id, tuple):
    done = done | jnp.isin(token, jnp.asarray(config.eos_id, jnp.int32))
  elif config.eos_id is not None:
    done = done | (token == config.eos_id)
  column = (0, state.step)
  state = state._replace(
      done=done,
      tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], column),
      mask=jax.lax.dynamic_update_slice(state.mask, active[:, None], column),
      token_log_q=jax.lax.dynamic_update_slice(
          state.token_log_q, token_log_q[:, None], column))
  return state, token, active


# A decode step attends over every column of the cache (unwritten ones are
# masked, not skipped), so its attention costs O(cache length). The loop runs
# in at most _MAX_SEGMENTS segments of at least _MIN_SEGMENT steps, each with
# a cache just long enough for it: the mean attended length is about
# (1/2 + 1/(2·segments)) of prompt + new tokens instead of all of it, for a few
# more compiled loop bodies. benchmarks/decode.py measures the effect.
_MIN_SEGMENT = 64
_MAX_SEGMENTS = 4


def _segment_ends(num_new: int) -> Tuple[int, ...]:
  """The new-token count at the end of each segment of the decode loop
  (static), the last one ``num_new``: e.g. (32,) for 32, (128, 256, 384, 512)
  for 512."""
  size = max(_MIN_SEGMENT, -(-num_new // _MAX_SEGMENTS))
  return tuple(range(size, num_new, size)) + (num_new,)


def _grow_cache(cache, empty):
  """``cache`` copied into the start of ``empty``, a longer cache of the same
  model (``init_cache`` with a larger ``max_length``): leaves whose shape does
  not depend on the length (the index, an LSTM's state) are kept as they are;
  the others are the prefix of the longer ones along their length axis."""
  def grow(old, new):
    if old.shape == new.shape:
      return old
    return jax.lax.dynamic_update_slice(new, old.astype(new.dtype),
                                        (0,) * old.ndim)
  return jax.tree.map(grow, cache, empty)


def sample(model, params, rng: Array, prompts: Array, prompt_lengths: Array,
           config: SamplerConfig, *, use_cache: bool = True) -> SampleOutput:
  """Ancestral sampling of ``config.max_new_tokens`` tokens per prompt.

  Pure and traceable inside an outer ``jax.jit`` (with ``model`` and
  ``config`` static). Cost per step with the cache: one ``decode`` of one
  token per row plus O(V) warping (O(V log V) only when top_p < 1 without
  top_k). The cache is sized to prompt + new tokens, never to the model's
  maximum positions, and grows with the loop (``_segment_ends``), so the
  attention of a step reads about as many columns as have been written.

  Args:
    model: a ``fdiv_jax.lm.models.base.LanguageModel``.
    params: its parameters.
    rng: a PRNG key.
    prompts: int32 [B, P], left-padded (see module docstring).
    prompt_lengths: int32 [B], each in [1, P].
    config: ``SamplerConfig``.
    use_cache: False recomputes a full forward pass over the whole buffer at
      every step (a slow reference, same samples up to float rounding).

  Returns:
    ``SampleOutput`` with N = ``config.max_new_tokens`` columns.

  Raises:
    ValueError: ``P + N`` exceeds ``model.max_positions``.
  """
  batch, num_prompt = prompts.shape
  num_new = config.max_new_tokens
  total = num_prompt + num_new
  base.check_length(total, model.max_positions, "prompt + max_new_tokens")
  prompts = jnp.asarray(prompts, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  prompt_valid = scoring.prompt_mask(prompts, prompt_lengths)
  variables = {"params": params}

  def next_logits_uncached(state: _State) -> Array:
    full = jnp.concatenate([prompts, state.tokens], axis=1)
    valid = jnp.concatenate([prompt_valid, state.mask], axis=1)
    hidden = model.apply(variables, full, base.default_positions(full, valid),
                         valid, method="hidden_states")
    hidden = jax.lax.dynamic_index_in_dim(hidden, num_prompt + state.step,
                                          axis=1, keepdims=False)
    return model.apply(variables, hidden, method="unembed")

  # Cache columns per segment of the loop (see _segment_ends); the last
  # segment's cache holds exactly prompt + new tokens.
  ends = _segment_ends(num_new) if use_cache else (num_new,)
  if use_cache:
    cache = model.init_cache(batch, num_prompt + ends[0])
    logits, cache = model.apply(
        variables, prompts, base.default_positions(prompts, prompt_valid),
        prompt_valid, cache, method="decode")
    logits = logits[:, -1]
  else:
    cache = None
    logits = None

  state = _State(
      step=jnp.zeros((), jnp.int32), logits=logits, cache=cache,
      done=jnp.zeros((batch,), bool),
      tokens=jnp.full((batch, num_new), config.pad_id, jnp.int32),
      mask=jnp.zeros((batch, num_new), bool),
      token_log_q=jnp.zeros((batch, num_new), jnp.float32),
      dropped_mass=(jnp.zeros((batch, num_new), jnp.float32)
                    if config.truncates else None))
  if not use_cache:
    state = state._replace(step=jnp.array(-1, jnp.int32))
    state = state._replace(logits=next_logits_uncached(state),
                           step=jnp.zeros((), jnp.int32))

  def body(state: _State) -> _State:
    state, token, active = _draw(state, rng, config)
    if use_cache:
      positions = prompt_lengths + state.step
      logits, cache = model.apply(variables, token[:, None],
                                  positions[:, None], active[:, None],
                                  state.cache, method="decode")
      logits = logits[:, 0]
    else:
      cache = None
      logits = next_logits_uncached(state)
    return state._replace(step=state.step + 1, logits=logits, cache=cache)

  for i, end in enumerate(ends):
    if i > 0:
      state = state._replace(cache=_grow_cache(
          state.cache, model.init_cache(batch, num_prompt + end)))
    last = min(end, num_new - 1)  # step s writes cache column P + s

    def cond(state: _State, last=last) -> Array:
      return (state.step < last) & ~jnp.all(state.done)

    state = jax.lax.while_loop(cond, body, state)
  # The last column needs no decode after it (a finished batch samples pads).
  state, _, _ = _draw(state, rng, config)
  return SampleOutput(tokens=state.tokens, mask=state.mask,
                      token_log_q=state.token_log_q,
                      log_q=state.token_log_q.sum(axis=-1),
                      lengths=state.mask.sum(axis=-1).astype(jnp.int32),
                      dropped_mass=state.dropped_mass)


def make_sampler(model, config: SamplerConfig, *, use_cache: bool = True):
  """Jitted ``(params, rng, prompts, prompt_lengths) -> SampleOutput``.

  Compiled once per (params structure, prompts shape); later calls with the
  same shapes reuse the executable. The KV cache and the loop state are
  created inside the compiled function and updated in place by XLA's while
  loop (no buffer crosses the host boundary), which is what donating them
  would achieve; the arguments are not donated, so the caller's params, key
  and prompts stay valid.
  """

  def jitted_sample(params, rng, prompts, prompt_lengths):
    return sample(model, params, rng, prompts, prompt_lengths, config,
                  use_cache=use_cache)

  return jax.jit(jitted_sample)
