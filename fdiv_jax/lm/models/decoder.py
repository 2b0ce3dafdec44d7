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

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.lm.models import base

Array = jax.Array

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
# rope_type -> the keys its rope_scaling may hold (besides rope_type).
ROPE_TYPES = {
    "default": {"rope_theta"},
    "linear": {"rope_theta", "factor"},
    "llama3": {"rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"rope_theta", "factor", "original_max_position_embeddings",
             "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
}
LAYER_TYPES = ("full_attention", "sliding_attention")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _freeze(value):
  """Hashable copy of a JSON-like value (dicts -> sorted item tuples)."""
  if isinstance(value, Mapping):
    return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Size and numerics of a Llama-family decoder (Hugging Face field names).

  Attributes:
    vocab_size: V, number of tokens.
    hidden_size: width D of the residual stream.
    intermediate_size: SwiGLU hidden width.
    num_hidden_layers: number of blocks.
    num_attention_heads: query heads H.
    num_key_value_heads: key/value heads (None = H; 1 = multi-query); must
      divide H.
    head_dim: width of each head (None = hidden_size // H).
    max_position_embeddings: position limit (``max_positions``).
    rms_norm_eps: RMSNorm epsilon (all norms, q/k norms included).
    hidden_act: the gate activation, ``silu`` for SwiGLU.
    rope_theta: rotary base.
    rope_scaling: None, or a mapping with ``rope_type`` (or ``type``) one of
      ``linear``, ``llama3``, ``yarn`` (or ``default``) and its parameters, as
      in a Hugging Face config (stored as a sorted tuple of items so that the
      config stays hashable; ``rope_scaling_dict`` gives the dict back).
    attention_bias: biases on q_proj, k_proj and v_proj (Llama's
      ``attention_bias``, Qwen2's always-on biases).
    attention_out_bias: bias on o_proj (Llama's ``attention_bias``, not
      Qwen2).
    mlp_bias: biases on the three MLP projections (Llama's ``mlp_bias``).
    qk_norm: per-head RMSNorm of q and k before the rotation (Qwen3).
    tie_word_embeddings: the output layer is the token embedding.
    sliding_window: window of the sliding-attention layers (None = none).
    layer_types: per layer ``"full_attention"`` or ``"sliding_attention"``;
      None = every layer slides when ``sliding_window`` is set.
    initializer_range: std of the normal initialiser (random init only).
    model_type: the Hugging Face family this config is exported as
      (``llama``, ``mistral``, ``qwen2``, ``qwen3``).
    remat: rematerialise each block in the backward pass (``nn.remat``):
      less activation memory, one more forward pass per block.
    dtype: activation dtype (float32, bfloat16 or float16).
    param_dtype: parameter dtype.
    source_path: the Hugging Face directory it was loaded from, if any (not
      compared or hashed); ``save_hf_checkpoint`` copies the tokenizer and
      generation files from it.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  sliding_window: Optional[int] = None
  layer_types: Optional[Tuple[str, ...]] = None
  initializer_range: float = 0.02
  model_type: str = "llama"
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  source_path: Optional[str] = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
            f"hidden_size={self.hidden_size} is not divisible by "
            f"num_attention_heads={self.num_attention_heads}; give head_dim.")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (rotary "
                       "embeddings rotate pairs).")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_key_value_heads={self.num_key_value_heads} must divide "
          f"num_attention_heads={self.num_attention_heads}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"Unknown hidden_act {self.hidden_act!r}; expected one "
                       f"of {sorted(_ACTIVATIONS)}.")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not one of "
                       f"{MODEL_TYPES}.")
    scaling = self.rope_scaling
    if isinstance(scaling, tuple):
      scaling = dict(scaling)
    if scaling is not None:
      scaling = dict(scaling)
      rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
      if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {sorted(ROPE_TYPES)}).")
      if "rope_theta" in scaling:
        set_("rope_theta", float(scaling.pop("rope_theta")))
      extra = set(scaling) - ROPE_TYPES[rope_type]
      if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_scaling partial_rotary_factor != 1 is not "
                         "supported.")
      scaling.pop("partial_rotary_factor", None)
      extra.discard("partial_rotary_factor")
      if extra:
        raise ValueError(f"rope_scaling of type {rope_type!r} has unknown keys "
                         f"{sorted(extra)}.")
      if rope_type != "default" and "factor" not in scaling:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs 'factor'.")
      if rope_type == "llama3":
        missing = ROPE_TYPES["llama3"] - set(scaling) - {"rope_theta"}
        missing.discard("original_max_position_embeddings")
        if missing:
          raise ValueError(f"rope_scaling of type 'llama3' needs {sorted(missing)}.")
      if rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings",
                           self.max_position_embeddings)
      scaling = None if rope_type == "default" else _freeze(
          dict(scaling, rope_type=rope_type))
    set_("rope_scaling", scaling)
    if self.layer_types is not None:
      types = tuple(self.layer_types)
      if len(types) != self.num_hidden_layers or not set(types) <= set(
          LAYER_TYPES):
        raise ValueError(f"layer_types must be {self.num_hidden_layers} of "
                         f"{LAYER_TYPES}, got {self.layer_types!r}.")
      set_("layer_types", types)
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}.")

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    """``rope_scaling`` as a dict (with ``rope_type``), or None."""
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_attention_heads // self.num_key_value_heads

  def sliding(self, layer: int) -> bool:
    """Whether ``layer`` uses the sliding window."""
    if self.sliding_window is None:
      return False
    return (self.layer_types is None
            or self.layer_types[layer] == "sliding_attention")


def rope_frequencies(config: DecoderConfig) -> Tuple[np.ndarray, float]:
  """``(inv_freq float32 [head_dim / 2], attention_scaling)`` as transformers'
  ``ROPE_INIT_FUNCTIONS`` compute them (float32 arithmetic)."""
  dim = config.head_dim
  f32 = np.float32
  base_ = f32(config.rope_theta)
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
  inv_freq = (f32(1.0) / np.power(base_, exponents)).astype(f32)
  scaling = config.rope_scaling_dict
  if scaling is None:
    return inv_freq, 1.0
  rope_type = scaling["rope_type"]
  factor = scaling["factor"]
  if rope_type == "linear":
    return (inv_freq / f32(factor)).astype(f32), 1.0
  if rope_type == "llama3":
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32), 1.0
  # yarn
  original = scaling["original_max_position_embeddings"]
  attention_factor = scaling.get("attention_factor")
  mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

  def get_mscale(scale, m=1):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = float(get_mscale(factor, mscale)
                               / get_mscale(factor, mscale_all_dim))
    else:
      attention_factor = get_mscale(factor)
  beta_fast = scaling.get("beta_fast") or 32
  beta_slow = scaling.get("beta_slow") or 1

  def correction_dim(rotations):
    return (dim * math.log(original / (rotations * 2 * math.pi))
            / (2 * math.log(config.rope_theta)))

  lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
  if scaling.get("truncate", True):
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  if lo == hi:
    hi += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(lo)) / f32(hi - lo),
                 0, 1).astype(f32)
  extrapolation = 1 - ramp
  pos_freqs = np.power(base_, np.arange(0, dim, 2).astype(f32) / f32(dim))
  inv_extra = (f32(1.0) / pos_freqs).astype(f32)
  inv_inter = (f32(1.0) / (f32(factor) * pos_freqs)).astype(f32)
  inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
  return inv_freq.astype(f32), float(attention_factor)


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
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k,
                      preferred_element_type=jnp.float32) * (dim ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", weights, v)
  return out.reshape(batch, length, heads, dim)


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
    base.check_length(max_length, self.max_positions, "cache")
    cfg = self.config
    shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.head_dim)
    layers = tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
                   for _ in range(cfg.num_hidden_layers))
    return {"layers": layers,
            "mask": jnp.zeros((batch_size, max_length), dtype=bool),
            "index": jnp.zeros((), dtype=jnp.int32)}

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
    cache_len = cache["mask"].shape[1]
    key_mask = jax.lax.dynamic_update_slice(
        cache["mask"], attention_mask.astype(bool), (0, index))
    query_cols = index + jnp.arange(length)
    key_cols = jnp.arange(cache_len)
    mask = key_cols[None, :] <= query_cols[:, None]
    mask = mask[None] & key_mask[:, None, :]
    cos, sin = rotary_cos_sin(self.config, positions)
    hidden, layers = self._run_blocks(
        self.embed_tokens(tokens), self._masks(mask, query_cols, key_cols),
        cos, sin, cache["layers"], index)
    logits = self.unembed(hidden)
    return logits, {"layers": layers, "mask": key_mask,
                    "index": index + length}
