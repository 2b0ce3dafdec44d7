"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) with a functional KV cache.

Architecture (as Hugging Face's ``LlamaForCausalLM`` and its relatives
implement it): a token embedding, ``num_hidden_layers`` pre-norm blocks
``x += o_proj(attn(input_layernorm(x))); x += mlp(post_attention_layernorm(x))``,
a final RMSNorm ``norm`` and an output layer ``lm_head`` (or the token
embedding when ``tie_word_embeddings``). The pieces:

* RMSNorm: ``w * (x / sqrt(mean(x²) + eps))``, normalised in float32 and cast
  back to the activation dtype before the scale (Hugging Face's order).
* SwiGLU MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))`` with
  ``act = silu`` (``hidden_act``).
* Attention with ``num_attention_heads`` query heads of width ``head_dim``
  (possibly ≠ hidden_size / heads, as in Qwen3) sharing
  ``num_key_value_heads`` key/value heads (grouped-query; 1 = multi-query):
  query head h reads key/value head ``h // (heads / kv_heads)``. Optional
  q/k/v biases (Qwen2), an optional o_proj bias (Llama's ``attention_bias``,
  Qwen3), optional per-head RMSNorms of q and k before the rotation (Qwen3).
  Softmax in float32, scores scaled by ``head_dim ** -0.5``.
* Rotary position embeddings on the position ids given (so left-padded rows
  start at position 0), in Hugging Face's "rotate half" layout:
  ``x cos θ + rotate_half(x) sin θ`` with ``θ = position * inv_freq``;
  ``inv_freq`` from ``rope_theta`` and ``rope_scaling`` of type ``default``,
  ``linear``, ``llama3`` or ``yarn`` (``rope_frequencies``), computed in
  float32 as transformers does.
* Sliding-window attention (Mistral, Qwen2/3 with ``use_sliding_window``): on
  the layers whose ``layer_types`` entry is ``"sliding_attention"``, query
  column i sees key columns ``j`` with ``i - sliding_window < j <= i``. As in
  transformers the window counts columns (padding included), and a sequence
  no longer than the window is unaffected. The cache is not a rolling
  buffer: it holds every column (memory grows with ``max_length``).

There is no dropout. Parameter names follow Hugging Face's (``embed_tokens``,
``layers_{i}/{input_layernorm, self_attn/{q,k,v,o}_proj, self_attn/{q,k}_norm,
post_attention_layernorm, mlp/{gate,up,down}_proj}``, ``norm``, ``lm_head``);
Dense kernels are Hugging Face's ``weight`` transposed ([in, out]) and
``lm_head`` keeps Hugging Face's [V, D] layout (see ``hf_import`` /
``hf_export``).

Dtypes: parameters are stored in ``param_dtype``, activations are computed in
``dtype`` (e.g. bfloat16); normalisation statistics, rotary angles, the
attention softmax and the output logits are float32.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdiv_jax.lm.models import base
# The hyper-parameters and the rotary frequencies (decoder_config.py),
# re-exported: `decoder.DecoderConfig`, `decoder.MODEL_TYPES`, ...
from fdiv_jax.lm.models.decoder_config import (  # noqa: F401
    _ACTIVATIONS, LAYER_TYPES, MODEL_TYPES, ROPE_TYPES, DecoderConfig,
    rope_frequencies)

Array = jax.Array


def rotary_cos_sin(config: DecoderConfig, positions: Array
                   ) -> Tuple[Array, Array]:
  """``cos, sin`` [B, T, head_dim] of the rotation at ``positions`` [B, T],
  computed in float32 and cast to ``config.dtype``."""
  inv_freq, scale = rope_frequencies(config)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return ((jnp.cos(emb) * scale).astype(config.dtype),
          (jnp.sin(emb) * scale).astype(config.dtype))


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """``x cos + rotate_half(x) sin`` for x [B, T, heads, Dh], cos/sin [B, T, Dh]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


class RMSNorm(nn.Module):
  """``scale * (x / sqrt(mean(x²) + eps))`` over the last axis."""
  features: int
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (self.features,),
                       self.param_dtype)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * h.astype(self.dtype)


def _dense(cfg: DecoderConfig, features: int, use_bias: bool, name: str):
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype,
                  kernel_init=nn.initializers.normal(cfg.initializer_range),
                  bias_init=nn.initializers.zeros, name=name)


def _norm(cfg: DecoderConfig, features: int, name: str):
  return RMSNorm(features, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype,
                 name=name)


def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Grouped-query attention, softmax in float32.

  Args:
    q: [B, T, H, Dh]. k, v: [B, KV, S, Dh], heads-major as the KV cache
      (see ``gpt2.attend``), with KV dividing H (query head h reads key/value
      head ``h // (H / KV)``). mask: bool [B, T, S].

  Returns:
    [B, T, H, Dh] in the dtype of ``v``. A query with no allowed key gets a
    finite (uniform) average.
  """
  batch, length, heads, dim = q.shape
  kv_heads = k.shape[1]
  groups = heads // kv_heads
  # The queries of each key/value head as one block of G·T rows, [B, KV, G·T,
  # Dh], so that both products are plain batched matrix products with the
  # cache as the right operand (as in gpt2.attend). Written as one einsum
  # over q [B, T, KV, G, Dh] ("btkgd,bksd->bkgts"), XLA's CPU backend made
  # the cache the left operand, giving scores [B, KV, S, G] that it then
  # transposed to [.., G, S] and back for the second product: a decode step
  # cost twice what reading the cache costs (benchmarks/decode.py).
  q = q.reshape(batch, length, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * length, dim)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k,
                      preferred_element_type=jnp.float32) * (dim ** -0.5)
  scores = scores.reshape(batch, kv_heads, groups, length, -1)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  weights = weights.reshape(batch, kv_heads, groups * length, -1)
  out = jnp.einsum("bkqs,bksd->bkqd", weights, v)
  out = out.reshape(batch, kv_heads, groups, length, dim)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)


class Attention(nn.Module):
  """q/k/v/o projections, optional q/k norms, rotary embeddings, GQA."""
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    heads, kv, dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim)
    self.q_proj = _dense(cfg, heads * dim, cfg.attention_bias, "q_proj")
    self.k_proj = _dense(cfg, kv * dim, cfg.attention_bias, "k_proj")
    self.v_proj = _dense(cfg, kv * dim, cfg.attention_bias, "v_proj")
    self.o_proj = _dense(cfg, cfg.hidden_size, cfg.attention_out_bias,
                         "o_proj")
    if cfg.qk_norm:
      self.q_norm = _norm(cfg, dim, "q_norm")
      self.k_norm = _norm(cfg, dim, "k_norm")

  def __call__(self, x, mask, cos, sin, kv_cache=None, index=None):
    """See ``Block``; returns ``(y [B, T, D], new_kv_cache or None)``."""
    cfg = self.config
    batch, length, _ = x.shape
    shape = (batch, length, -1, cfg.head_dim)
    q = self.q_proj(x).reshape(shape)
    k = self.k_proj(x).reshape(shape)
    v = self.v_proj(x).reshape(shape)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # heads-major, as the cache
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype),
                                       (0, 0, index, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype),
                                       (0, 0, index, 0))
      kv_cache = (k, v)
    y = attend(q, k, v, mask).reshape(batch, length, -1)
    return self.o_proj(y), kv_cache


class MLP(nn.Module):
  """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.gate_proj = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias,
                            "gate_proj")
    self.up_proj = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")
    self.down_proj = _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")

  def __call__(self, x: Array) -> Array:
    act = _ACTIVATIONS[self.config.hidden_act]
    return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
  """Pre-RMSNorm residual block."""
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.input_layernorm = _norm(cfg, cfg.hidden_size, "input_layernorm")
    self.self_attn = Attention(cfg, name="self_attn")
    self.post_attention_layernorm = _norm(cfg, cfg.hidden_size,
                                          "post_attention_layernorm")
    self.mlp = MLP(cfg, name="mlp")

  def __call__(self, x, mask, cos, sin, kv_cache=None, index=None):
    """One block.

    Args:
      x: [B, T, D]. mask: bool [B, T, S], the keys each query may see.
      cos, sin: [B, T, head_dim] rotation of the T new tokens.
      kv_cache: optional ``(k, v)`` [B, KV, S, Dh]; the new keys (rotated) and
        values are written at columns ``index .. index + T - 1``.
      index: int32 scalar, the cache column of ``x[:, 0]``.

    Returns:
      ``(x [B, T, D], new_kv_cache or None)``.
    """
    y, kv_cache = self.self_attn(self.input_layernorm(x), mask, cos, sin,
                                 kv_cache, index)
    x = x + y
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, kv_cache


class DecoderLM(nn.Module):
  """Llama-family LM implementing ``fdiv_jax.lm.models.base.LanguageModel``.

  ``apply(v, tokens [B, T], positions=None, attention_mask=None,
  return_hidden=False)`` returns float32 logits [B, T, V] (and the final
  hidden states [B, T, D] after ``norm`` when ``return_hidden``).

  The decode cache is a dict ``{"layers": ((k, v), ...), "mask", "index"}``
  with ``k, v`` of shape [B, KV, S, Dh] in ``dtype`` (keys stored after the
  rotation), ``mask`` bool [B, S] (which columns hold real tokens) and
  ``index`` int32 (next free column), as in ``GPT2LM``.
  """
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 embedding_init=init, name="embed_tokens")
    block = nn.remat(Block) if cfg.remat else Block
    self.layers = [block(cfg, name=f"layers_{i}")
                   for i in range(cfg.num_hidden_layers)]
    self.norm = _norm(cfg, cfg.hidden_size, "norm")
    if not cfg.tie_word_embeddings:
      # Hugging Face's lm_head.weight layout, [V, D].
      self.lm_head = self.param("lm_head", init,
                                (cfg.vocab_size, cfg.hidden_size),
                                cfg.param_dtype)

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_positions(self) -> int:
    return self.config.max_position_embeddings

  def _masks(self, causal: Array, query_cols: Array, key_cols: Array):
    """(full mask, sliding mask or None), each bool [B, T, S]."""
    window = self.config.sliding_window
    if window is None:
      return causal, None
    near = (query_cols[:, None] - key_cols[None, :]) < window
    return causal, causal & near[None]

  def _run_blocks(self, x, masks, cos, sin, caches=None, index=None):
    full, sliding = masks
    new_caches = []
    for i, block in enumerate(self.layers):
      mask = sliding if self.config.sliding(i) else full
      kv = None if caches is None else caches[i]
      x, kv = block(x, mask, cos, sin, kv, index)
      new_caches.append(kv)
    return self.norm(x), tuple(new_caches)

  def hidden_states(self, tokens: Array, positions: Optional[Array] = None,
                    attention_mask: Optional[Array] = None) -> Array:
    """Final hidden states (after ``norm``), [B, T, D] in ``dtype``."""
    base.check_length(tokens.shape[1], self.max_positions)
    if positions is None:
      positions = base.default_positions(tokens, attention_mask)
    length = tokens.shape[1]
    cols = jnp.arange(length)
    mask = (cols[None, :] <= cols[:, None])[None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    cos, sin = rotary_cos_sin(self.config, positions)
    hidden, _ = self._run_blocks(self.embed_tokens(tokens),
                                 self._masks(mask, cols, cols), cos, sin)
    return hidden

  def output_layer(self) -> Tuple[Array, None]:
    """``(kernel [V, D], None)`` with ``unembed(h) = h @ kernel.T``."""
    table = (self.embed_tokens.embedding if self.config.tie_word_embeddings
             else self.lm_head)
    return table.astype(self.config.dtype), None

  def unembed(self, hidden: Array) -> Array:
    """``logits = hidden @ kernel.T``, float32 [..., V]."""
    table, _ = self.output_layer()
    return jnp.einsum("...d,vd->...v", hidden.astype(self.config.dtype), table,
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens: Array, positions: Optional[Array] = None,
               attention_mask: Optional[Array] = None,
               return_hidden: bool = False):
    hidden = self.hidden_states(tokens, positions, attention_mask)
    logits = self.unembed(hidden)
    return (logits, hidden) if return_hidden else logits

  def init_cache(self, batch_size: int, max_length: int):
    """Empty cache for ``batch_size`` rows of up to ``max_length`` tokens."""
    cfg = self.config
    return base.empty_kv_cache(batch_size, max_length, cfg.num_hidden_layers,
                               cfg.num_key_value_heads, cfg.head_dim, cfg.dtype,
                               self.max_positions)

  def decode(self, tokens: Array, positions: Array, attention_mask: Array,
             cache) -> Tuple[Array, Any]:
    """Appends ``tokens`` [B, T] at column ``cache["index"]``; see base.py.

    Query ``t`` sees cache columns ``s <= index + t`` whose ``mask`` is True
    (and ``s > index + t - sliding_window`` on sliding layers). Writing past
    the end of the cache is not checked at run time (the sampler sizes the
    cache statically).

    Returns:
      ``(logits float32 [B, T, V], new_cache)``.
    """
    index = cache["index"]
    length = tokens.shape[1]
    key_mask, query_cols, mask = base.decode_masks(cache, attention_mask, length)
    key_cols = jnp.arange(key_mask.shape[1])
    cos, sin = rotary_cos_sin(self.config, positions)
    hidden, layers = self._run_blocks(
        self.embed_tokens(tokens), self._masks(mask, query_cols, key_cols),
        cos, sin, cache["layers"], index)
    logits = self.unembed(hidden)
    return logits, {"layers": layers, "mask": key_mask,
                    "index": index + length}
