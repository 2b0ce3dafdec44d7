"""GPT-2 architecture decoder with a functional KV cache.

Architecture (Radford et al. 2019): learned token and position embeddings,
``n_layer`` pre-LayerNorm blocks ``x += attn(ln_1(x)); x += mlp(ln_2(x))``,
a final LayerNorm ``ln_f`` and an output layer tied to the token embedding,
``logits = ln_f(x) @ wte.T``. The MLP is ``c_proj(gelu(c_fc(x)))`` with the tanh
approximation of GELU (Hugging Face's ``gelu_new``). There is no dropout: the
module is deterministic.

Parameter names follow Hugging Face's ``GPT2LMHeadModel`` (``wte``, ``wpe``,
``h_{i}/{ln_1,attn/c_attn,attn/c_proj,ln_2,mlp/c_fc,mlp/c_proj}``, ``ln_f``),
and Hugging Face's ``Conv1D`` weights ``[in, out]`` are Flax ``Dense`` kernels
as they are, which keeps ``fdiv_jax.lm.models.hf_import`` a renaming.

Dtypes: parameters are stored in ``param_dtype``, activations are computed in
``dtype`` (e.g. bfloat16); attention softmax and the output logits are always
float32.
"""

import dataclasses
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdiv_jax.lm.models import base
from fdiv_jax.lm.models import fusion_barrier

Array = jax.Array

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Size and numerics of a GPT-2 decoder (defaults: GPT-2 small, 124M).

  Attributes:
    vocab_size: V, number of tokens.
    n_positions: maximum sequence length (learned position table size).
    n_layer: number of transformer blocks.
    n_head: attention heads; ``n_embd`` must be divisible by it.
    n_embd: width D.
    n_inner: MLP hidden width; None means ``4 * n_embd``.
    activation: one of ``gelu_new`` (tanh GELU, GPT-2's), ``gelu``, ``relu``.
    layer_norm_epsilon: LayerNorm epsilon.
    initializer_range: std of the normal initialiser (residual output
      projections use ``initializer_range / sqrt(2 n_layer)``).
    dtype: activation dtype (float32 or bfloat16).
    param_dtype: parameter dtype.
  """
  vocab_size: int = 50257
  n_positions: int = 1024
  n_layer: int = 12
  n_head: int = 12
  n_embd: int = 768
  n_inner: Optional[int] = None
  activation: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} is not divisible by "
                       f"n_head={self.n_head}.")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"Unknown activation {self.activation!r}; expected one "
                       f"of {sorted(_ACTIVATIONS)}.")

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd


def _dense(config: GPT2Config, features: int, std: float, name: str):
  return nn.Dense(features, dtype=config.dtype, param_dtype=config.param_dtype,
                  kernel_init=nn.initializers.normal(std),
                  bias_init=nn.initializers.zeros, name=name)


def _layer_norm(config: GPT2Config, name: str):
  return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.dtype,
                      param_dtype=config.param_dtype, use_fast_variance=False,
                      name=name)


def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Masked multi-head attention, softmax in float32.

  ``out[b,t,h] = sum_s w[b,h,t,s] v[b,s,h]`` with
  ``w = softmax_s(q[b,t,h] . k[b,s,h] / sqrt(Dh))`` over the allowed keys.
  Masked scores are set to the most negative float32, so a row with no
  allowed key gives a finite (uniform) average instead of NaN.

  Keys and values are heads-major, the layout of the KV cache: a decode
  step's two matrix products then read the cache as it lies, where a
  [B, S, H, Dh] cache was transposed whole at every step (a copy of the cache
  per token, which made decoding 512 tokens ~1.5x slower per token than 32).

  Args:
    q: [B, T, H, Dh]. k, v: [B, H, S, Dh]. mask: bool [B, T, S].

  Returns:
    [B, T, H, Dh] in the dtype of ``v``.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum("bthd,bhsd->bhts", q, k,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bhsd->bthd", weights, v)


class CausalSelfAttention(nn.Module):
  """GPT-2 attention: fused QKV projection ``c_attn`` and output ``c_proj``."""
  config: GPT2Config

  def setup(self):
    cfg = self.config
    self.c_attn = _dense(cfg, 3 * cfg.n_embd, cfg.initializer_range, "c_attn")
    self.c_proj = _dense(cfg, cfg.n_embd,
                         cfg.initializer_range / math.sqrt(2 * cfg.n_layer),
                         "c_proj")

  def __call__(self, x: Array, mask: Array,
               kv_cache: Optional[Tuple[Array, Array]] = None,
               index: Optional[Array] = None):
    """Self-attention over ``x`` [B, T, D], or over the cache plus ``x``.

    Args:
      x: [B, T, D] activations.
      mask: bool [B, T, S], which keys each query may see (S = T without a
        cache, S = cache length with one).
      kv_cache: optional ``(k, v)``, each [B, H, S, Dh]; the new keys/values
        are written at columns ``index .. index + T - 1``.
      index: int32 scalar, the cache column of ``x[:, 0]``.

    Returns:
      ``(y [B, T, D], new_kv_cache or None)``.
    """
    cfg = self.config
    batch, length, _ = x.shape
    qkv = self.c_attn(x).reshape(batch, length, 3, cfg.n_head, cfg.head_dim)
    q = qkv[:, :, 0]
    k, v = qkv[:, :, 1].swapaxes(1, 2), qkv[:, :, 2].swapaxes(1, 2)
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype),
                                       (0, 0, index, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype),
                                       (0, 0, index, 0))
      kv_cache = (k, v)
    y = attend(q, k, v, mask).reshape(batch, length, cfg.n_embd)
    return self.c_proj(y), kv_cache


class MLP(nn.Module):
  """``c_proj(act(c_fc(x)))``."""
  config: GPT2Config

  def setup(self):
    cfg = self.config
    self.c_fc = _dense(cfg, cfg.inner_dim, cfg.initializer_range, "c_fc")
    self.c_proj = _dense(cfg, cfg.n_embd,
                         cfg.initializer_range / math.sqrt(2 * cfg.n_layer),
                         "c_proj")

  def __call__(self, x: Array) -> Array:
    return self.c_proj(_ACTIVATIONS[self.config.activation](self.c_fc(x)))


class Block(nn.Module):
  """Pre-LayerNorm residual block."""
  config: GPT2Config

  def setup(self):
    self.ln_1 = _layer_norm(self.config, "ln_1")
    self.attn = CausalSelfAttention(self.config, name="attn")
    self.ln_2 = _layer_norm(self.config, "ln_2")
    self.mlp = MLP(self.config, name="mlp")

  def __call__(self, x, mask, kv_cache=None, index=None):
    y, kv_cache = self.attn(self.ln_1(x), mask, kv_cache, index)
    x = x + y
    x = x + self.mlp(self.ln_2(x))
    return x, kv_cache


class GPT2LM(nn.Module):
  """GPT-2 language model implementing ``fdiv_jax.lm.models.base.LanguageModel``.

  ``apply(v, tokens [B, T], positions=None, attention_mask=None,
  return_hidden=False)`` returns float32 logits [B, T, V] (and the final
  hidden states [B, T, D] after ``ln_f`` when ``return_hidden``).

  The decode cache is a dict ``{"layers": ((k, v), ...), "mask", "index"}``
  with ``k, v`` of shape [B, H, S, Dh] in ``dtype``, ``mask`` bool [B, S]
  (which cache columns hold real tokens) and ``index`` int32 (next free
  column); see ``init_cache`` and ``decode``.
  """
  config: GPT2Config

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, embedding_init=init,
                        name="wte")
    self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype,
                        embedding_init=nn.initializers.normal(0.01),
                        name="wpe")
    self.h = [Block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]
    self.ln_f = _layer_norm(cfg, "ln_f")

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_positions(self) -> int:
    return self.config.n_positions

  def _embed(self, tokens, positions):
    return self.wte(tokens) + self.wpe(positions)

  def hidden_states(self, tokens: Array, positions: Optional[Array] = None,
                    attention_mask: Optional[Array] = None) -> Array:
    """Final hidden states (after ``ln_f``), [B, T, D] in ``dtype``."""
    base.check_length(tokens.shape[1], self.max_positions)
    if positions is None:
      positions = base.default_positions(tokens, attention_mask)
    length = tokens.shape[1]
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    x = self._embed(tokens, positions)
    for block in self.h:
      x, _ = block(x, mask)
      x = fusion_barrier.residual_barrier(x)
    return self.ln_f(x)

  def unembed(self, hidden: Array) -> Array:
    """Tied output layer: ``logits = hidden @ wte.T``, float32 [..., V]."""
    table = self.wte.embedding.astype(self.config.dtype)
    return jnp.einsum("...d,vd->...v", hidden.astype(self.config.dtype), table,
                      preferred_element_type=jnp.float32)

  def output_layer(self) -> Tuple[Array, None]:
    """``(kernel [V, D], None)`` with ``unembed(h) = h @ kernel.T`` (tied)."""
    return self.wte.embedding.astype(self.config.dtype), None

  def __call__(self, tokens: Array, positions: Optional[Array] = None,
               attention_mask: Optional[Array] = None,
               return_hidden: bool = False):
    hidden = self.hidden_states(tokens, positions, attention_mask)
    logits = self.unembed(hidden)
    return (logits, hidden) if return_hidden else logits

  def init_cache(self, batch_size: int, max_length: int):
    """Empty cache for ``batch_size`` rows of up to ``max_length`` tokens."""
    cfg = self.config
    return base.empty_kv_cache(batch_size, max_length, cfg.n_layer, cfg.n_head,
                               cfg.head_dim, cfg.dtype, self.max_positions)

  def decode(self, tokens: Array, positions: Array, attention_mask: Array,
             cache) -> Tuple[Array, Any]:
    """Appends ``tokens`` [B, T] at column ``cache["index"]``; see base.py.

    Query ``t`` sees cache columns ``s <= index + t`` whose ``mask`` is True.
    Writing past the end of the cache is not checked at run time (the sampler
    sizes the cache statically).

    Returns:
      ``(logits float32 [B, T, V], new_cache)``.
    """
    index = cache["index"]
    length = tokens.shape[1]
    key_mask, _, mask = base.decode_masks(cache, attention_mask, length)
    x = self._embed(tokens, positions)
    layers = []
    for block, kv in zip(self.h, cache["layers"]):
      x, kv = block(x, mask, kv, index)
      layers.append(kv)
    logits = self.unembed(self.ln_f(x))
    new_cache = {"layers": tuple(layers), "mask": key_mask,
                 "index": index + length}
    return logits, new_cache
