"""The interface every language model in ``fdiv_jax`` implements.

The sampler (``fdiv_jax.lm.sampling``), the scorer (``fdiv_jax.lm.scoring``) and the
train step code against this protocol only, so they work unchanged with
``GPT2LM`` and ``LSTMLM``.

Conventions (B = batch, T = tokens in this call, V = vocabulary, D = width):

* ``tokens``: int32 [B, T].
* ``attention_mask``: bool [B, T], True for real tokens, False for padding.
  Padding may appear anywhere; the library left-pads prompts (see
  ``fdiv_jax.lm.sampling.pad_prompts``). Padded positions never influence real
  positions; their own outputs are finite but meaningless.
* ``positions``: int32 [B, T], the position id of each token. When omitted,
  ``positions = max(cumsum(attention_mask) - 1, 0)`` (so a left-padded row
  starts at position 0 on its first real token), or ``arange(T)`` when
  ``attention_mask`` is omitted too.
* logits are always float32, whatever the activation dtype, so log-probability
  arithmetic downstream is float32 (or float64 under ``jax.enable_x64``).

Methods (call them through ``model.apply({"params": params}, ..., method=...)``
except ``init_cache``, which needs no parameters)::

  model.apply(v, tokens, positions=None, attention_mask=None,
              return_hidden=False)
      -> logits float32 [B, T, V]  (or (logits, hidden [B, T, D]))

  model.init_cache(batch_size, max_length) -> cache
      A pytree of zero-filled arrays, called on the unbound module. The cache
      holds up to ``max_length`` tokens (prompt plus generated ones). The
      caches of two lengths have the same structure and dtypes, and a leaf
      either does not depend on the length or grows along one axis, the
      shorter cache's columns being the first of the longer one's (the
      sampler grows its cache as it decodes).

  model.apply(v, tokens, positions, attention_mask, cache, method="decode")
      -> (logits float32 [B, T, V], new_cache)
      Appends T tokens (same column for every row) to the cache and returns
      their next-token logits, conditioned on everything already in the cache.
      Running ``decode`` over a sequence in chunks (a prefill of P tokens, then
      one token at a time) gives the same logits as one full forward pass over
      it with the same ``positions`` and ``attention_mask``. It is pure and
      jittable; the cache is a value, never a Flax collection.

  model.apply(v, tokens, positions=None, attention_mask=None,
              method="hidden_states") -> hidden [B, T, D]
  model.apply(v, hidden, method="unembed") -> logits float32 [..., V]
      The two halves of ``__call__``: scoring uses them to form logits only
      for the positions it needs.

  model.apply(v, method="output_layer") -> (kernel [V, D], bias [V] or None)
      The weights of ``unembed``: ``unembed(h) = h @ kernel.T + bias`` in
      float32. Scoring passes them to ``fdiv_jax.lm.output_layer`` so that the
      [B, N, V] logits are never written.

Properties: ``vocab_size`` (int) and ``max_positions`` (int, or None when the
model has no position limit). Inputs longer than ``max_positions`` raise a
``ValueError`` naming the length and the limit.
"""

from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import jax
import jax.numpy as jnp

Array = jax.Array
Cache = Any


@runtime_checkable
class LanguageModel(Protocol):
  """Structural type of an ``fdiv_jax`` language model (module docstring)."""

  @property
  def vocab_size(self) -> int:
    ...

  @property
  def max_positions(self) -> Optional[int]:
    ...

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    ...

  def decode(self, tokens: Array, positions: Array, attention_mask: Array,
             cache: Cache) -> Tuple[Array, Cache]:
    ...

  def hidden_states(self, tokens: Array, positions: Optional[Array] = None,
                    attention_mask: Optional[Array] = None) -> Array:
    ...

  def unembed(self, hidden: Array) -> Array:
    ...

  def output_layer(self) -> Tuple[Array, Optional[Array]]:
    ...


def default_positions(tokens: Array, attention_mask: Optional[Array]) -> Array:
  """Position ids: ``max(cumsum(mask) - 1, 0)``, or ``arange(T)`` with no mask.

  Args:
    tokens: int32 [B, T].
    attention_mask: bool [B, T] or None.

  Returns:
    int32 [B, T].
  """
  batch, length = tokens.shape
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                            (batch, length))
  counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1)
  return jnp.maximum(counts - 1, 0)


def check_length(length: int, limit: Optional[int], what: str = "sequence"):
  """Raises ValueError if a static length exceeds the model's position limit."""
  if limit is not None and length > limit:
    raise ValueError(
        f"{what} length {length} exceeds the model's maximum number of "
        f"positions ({limit}).")


def empty_kv_cache(batch_size: int, max_length: int, num_layers: int,
                   kv_heads: int, head_dim: int, dtype, limit: Optional[int]):
  """The zero cache of an attention model, heads-major (what ``init_cache``
  returns for GPT-2 and the Llama family).

  ``{"layers": ((k, v) [B, KV, S, Dh] per layer), "mask": bool [B, S],
  "index": int32 []}`` with S = ``max_length``: keys/values in the layout both
  attention products read directly (no transpose of the cache per decode
  step), which grows along S as the sampler requires (module docstring).

  Raises:
    ValueError: ``max_length`` exceeds ``limit``, the model's positions.
  """
  check_length(max_length, limit, "cache")
  shape = (batch_size, kv_heads, max_length, head_dim)
  layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(num_layers))
  return {"layers": layers,
          "mask": jnp.zeros((batch_size, max_length), dtype=bool),
          "index": jnp.zeros((), dtype=jnp.int32)}


def decode_masks(cache, attention_mask: Array, length: int
                 ) -> Tuple[Array, Array, Array]:
  """The masks of a ``decode`` call appending ``length`` tokens at
  ``cache["index"]``.

  Returns:
    ``(key_mask bool [B, S]`` (the cache's mask with ``attention_mask``
    written at the new columns), ``query_cols int32 [T]`` (the cache columns
    of the new tokens), ``mask bool [B, T, S]``: query t sees column s iff
    ``s <= index + t`` and ``key_mask[s]``).
  """
  index = cache["index"]
  key_mask = jax.lax.dynamic_update_slice(
      cache["mask"], attention_mask.astype(bool), (0, index))
  query_cols = index + jnp.arange(length)
  causal = jnp.arange(key_mask.shape[1])[None, :] <= query_cols[:, None]
  return key_mask, query_cols, causal[None] & key_mask[:, None, :]
