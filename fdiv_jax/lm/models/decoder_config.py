"""A Llama-family decoder's hyper-parameters (``DecoderConfig``, Hugging Face's
``config.json`` field names, checked when built) and the rotary frequencies
they define (``rope_frequencies``: ``default``, ``linear``, ``llama3`` and
``yarn`` scaling, in float32 as transformers computes them).

The model itself is in ``decoder.py``; ``hf_import`` builds a ``DecoderConfig``
from a checkpoint's ``config.json`` and ``hf_export`` writes one back.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

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
