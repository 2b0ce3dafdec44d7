"""Log-probabilities of given continuations, under any model and warping.

f-DPG needs, for every sampled continuation x of a prompt c, log π(x|c) (the
policy, differentiated), log a(x|c) (the base model) and log q(x|c) (the
proposal that generated it, with the sampler's warping). All three come from
``sequence_log_probs``: one batched forward pass over ``prompt + continuation``.

Warping (applied to float32 logits in this order, as Hugging Face does):

1. temperature τ: ``z = logits / τ``;
2. top-k (k > 0): keep tokens with ``z >= z_(k)``, the k-th largest value
   (ties at the cut-off are all kept, so the support can exceed k);
3. top-p (p < 1): on ``π_k = softmax(z restricted to the top-k support)``,
   sort descending and keep the smallest prefix whose mass reaches p, i.e.
   sorted token j is kept iff the mass strictly before it is ``< p``; then keep
   every token whose value is ``>=`` the last kept one (ties again kept).
   Equivalently the cut-off is ``max{τ : mass of {z >= τ} >= p}``, which is
   how it is found (without sorting; see ``warp_logits``).

The warped distribution is ``softmax(z)`` on the kept support and exactly 0
elsewhere (log-prob -inf). The sampler (``fdiv_jax.lm.sampling``) draws from
``softmax(warp_logits(...))`` and reports its log-probabilities, so its log q
and a rescoring here agree up to float rounding of the two forward passes.
"""

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from fdiv_jax.core import _values
from fdiv_jax.lm import output_layer
from fdiv_jax.lm.models import base

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Warping:
  """Temperature / top-k / top-p warping of next-token distributions.

  Attributes:
    temperature: τ > 0; logits are divided by it.
    top_k: keep the k most likely tokens (ties kept); 0 = off.
    top_p: nucleus mass in (0, 1]; 1 = off.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    _values.real("temperature", self.temperature, low=0.0, low_open=True)
    _values.integer("top_k", self.top_k, minimum=0, note=" (0 = off)")
    _values.real("top_p", self.top_p, low=0.0, high=1.0, low_open=True,
                 note=" (1 = off)")


def as_warping(warping: Any) -> Warping:
  """None -> untempered; a ``Warping``; or anything with ``temperature``,
  ``top_k`` and ``top_p`` attributes (e.g. a ``SamplerConfig``)."""
  if warping is None:
    return Warping()
  if isinstance(warping, Warping):
    return warping
  return Warping(float(warping.temperature), int(warping.top_k),
                 float(warping.top_p))


def _ordered_keys(x: Array) -> Array:
  """Monotone map float32 -> uint32: ``x < y`` iff ``key(x) < key(y)``.

  -0.0 is mapped to the key of +0.0, so ``x == y`` iff ``key(x) == key(y)``
  (NaN excluded).
  """
  x = x.astype(jnp.float32)
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  sign = jnp.uint32(0x80000000)
  return jnp.where(bits >= sign, ~bits, bits | sign)


def _max_threshold(keys: Array, weights: Array, target: float) -> Array:
  """``max{τ : sum_{i: keys_i >= τ} weights_i >= target}`` (uint32 [..., 1]).

  Exact bisection over the 2^32 ordered float32 keys: 32 passes of O(V) and
  no sort of the vocabulary (XLA's CPU top-k becomes a full sort, ~50x slower
  at V = 50257). Requires ``sum(weights) >= target`` and ``weights >= 0``.
  The maximiser is always one of the ``keys_i``: the sum only changes there.
  """
  lo = jnp.min(keys, axis=-1, keepdims=True)  # Sum at lo is the total.
  hi = jnp.max(keys, axis=-1, keepdims=True) + 1  # Sum at hi is 0.

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    total = jnp.sum(jnp.where(keys >= mid, weights, 0.0), axis=-1,
                    keepdims=True)
    ok = total >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return lo


def warp_logits(logits: Array, warping: Any = None) -> Array:
  """Warped logits: ``logits / τ`` on the kept support, -inf elsewhere.

  Both cut-offs are found by exact bisection on the float32 order
  (``_max_threshold``): the k-th largest value is
  ``max{τ : #{z >= τ} >= k}`` and the nucleus cut-off is
  ``max{τ : mass of {z >= τ} >= p}``. Nothing is sorted, and nothing extra is
  computed when top_k = 0 and top_p = 1.

  Args:
    logits: float [..., V].
    warping: see ``as_warping``.

  Returns:
    float32 [..., V]; ``softmax`` of it is the warped distribution.
  """
  w = as_warping(warping)
  z = logits.astype(jnp.float32)
  if w.temperature != 1.0:
    z = z / w.temperature
  vocab = z.shape[-1]
  neg_inf = jnp.array(-jnp.inf, z.dtype)
  if 0 < w.top_k < vocab:
    keys = _ordered_keys(z)
    kth = _max_threshold(keys, jnp.ones_like(z), float(w.top_k))
    z = jnp.where(keys >= kth, z, neg_inf)
  if w.top_p < 1.0:
    keys = _ordered_keys(z)
    probs = jnp.exp(z - jax.nn.logsumexp(z, axis=-1, keepdims=True))
    cut = _max_threshold(keys, probs, w.top_p)
    z = jnp.where(keys >= cut, z, neg_inf)
  return z


def warped_log_softmax(logits: Array, warping: Any = None) -> Array:
  """``log_softmax(warp_logits(logits))``: float32 [..., V], -inf off support.
  """
  return jax.nn.log_softmax(warp_logits(logits, warping), axis=-1)


def prompt_mask(prompts: Array, prompt_lengths: Array) -> Array:
  """bool [B, P]: True on the real tokens of left-padded prompts."""
  width = prompts.shape[1]
  start = width - jnp.asarray(prompt_lengths, jnp.int32)
  return jnp.arange(width)[None, :] >= start[:, None]


def sequence_log_probs(model, params, prompts: Array, prompt_lengths: Array,
                       tokens: Array, mask: Array, warping: Any = None,
                       known_token_log_probs: Optional[Array] = None,
                       ) -> Tuple[Array, Array]:
  """log-probabilities of continuations given left-padded prompts.

  ``token_log_probs[b, n] = log w(tokens[b, n] | prompt_b, tokens[b, :n])``
  for ``mask[b, n]`` and 0 elsewhere, where ``w`` is the model's next-token
  distribution after ``warping`` (see module docstring), and
  ``log_probs[b] = sum_n token_log_probs[b, n]``. A token outside the warped
  support gets -inf. One forward pass over the [B, P + N] concatenation; only
  the N predicting positions are projected to the vocabulary.
  Differentiable w.r.t. ``params``.

  Args:
    model: a ``fdiv_jax.lm.models.base.LanguageModel``.
    params: its parameters.
    prompts: int32 [B, P], left-padded (see ``sampling.pad_prompts``).
    prompt_lengths: int32 [B], each >= 1.
    tokens: int32 [B, N] continuations (``SampleOutput.tokens``).
    mask: bool [B, N], True on scored tokens (``SampleOutput.mask``).
    warping: None (untempered: for π and a), a ``Warping`` or the sampler's
      ``SamplerConfig`` (for q).
    known_token_log_probs: optional float32 [B, N], these very log-probabilities
      as already computed by the sampler that drew ``tokens`` from this model
      with this warping (``SampleOutput.token_log_q``; on-policy f-DPG). They
      are returned as they are, and only the gradient is computed
      (``output_layer.known_token_log_softmax``): the forward pass makes no
      vocabulary pass. Not with top-k / top-p truncation.

  Returns:
    ``(token_log_probs float32 [B, N], log_probs float32 [B])``.
  """
  num_prompt = prompts.shape[1]
  num_new = tokens.shape[1]
  base.check_length(num_prompt + num_new, model.max_positions,
                    "prompt + continuation")
  mask = jnp.asarray(mask).astype(bool)
  full = jnp.concatenate([prompts, tokens], axis=1).astype(jnp.int32)
  valid = jnp.concatenate([prompt_mask(prompts, prompt_lengths), mask], axis=1)
  positions = base.default_positions(full, valid)
  variables = {"params": params}
  hidden = model.apply(variables, full, positions, valid,
                       method="hidden_states")
  hidden = hidden[:, num_prompt - 1:num_prompt + num_new - 1]
  w = as_warping(warping)
  truncated = w.top_k > 0 or w.top_p < 1.0
  if known_token_log_probs is not None and truncated:
    raise ValueError("known_token_log_probs needs a warping without top-k / "
                     f"top-p truncation; got {w}.")
  if not truncated:
    # log softmax(z)[x] = z[x] − logsumexp(z), with the logsumexp merged over
    # vocabulary chunks (fdiv_jax.lm.output_layer): the [B, N, V] logits are
    # never written (3x faster forward at V = 50257). With known values only
    # the gradient is computed.
    kernel, bias = model.apply(variables, method="output_layer")
    if known_token_log_probs is None:
      picked = output_layer.token_log_softmax(hidden, kernel, bias, tokens,
                                              temperature=w.temperature)
    else:
      picked = output_layer.known_token_log_softmax(
          hidden, kernel, bias, tokens, known_token_log_probs, mask,
          temperature=w.temperature)
  else:
    logits = model.apply(variables, hidden, method="unembed")
    picked = jnp.take_along_axis(warped_log_softmax(logits, w),
                                 tokens[..., None].astype(jnp.int32),
                                 axis=-1)[..., 0]
  token_log_probs = jnp.where(mask, picked, 0.0)
  return token_log_probs, token_log_probs.sum(axis=-1)
