"""LSTM language model (the small recurrent LM of the seed experiments).

``embed -> num_layers stacked LSTMs -> Dense(V)``: with ``e_t = E[x_t]`` and
per layer ``(c_t, h_t) = LSTM((c_{t-1}, h_{t-1}), input_t)``, the next-token
logits are ``W h_t^{top} + b``. Positions are implicit (the recurrence), so
``positions`` is accepted and ignored and ``max_positions`` is None.

Padding: where ``attention_mask`` is False the state is carried through
unchanged, so left padding (or padding anywhere) does not affect real tokens.
The decode cache is the recurrent state, so cached decoding runs the very same
scan as a full forward pass and gives identical logits.
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  """Size and numerics of an ``LSTMLM``.

  Attributes:
    vocab_size: V.
    embed_dim: token embedding width E.
    hidden_size: LSTM state width H (also the width of ``hidden``).
    num_layers: stacked LSTM layers.
    dtype: activation / state dtype; the output logits are float32.
    param_dtype: parameter dtype.
  """
  vocab_size: int
  embed_dim: int = 64
  hidden_size: int = 128
  num_layers: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class _MaskedLSTMStep(nn.Module):
  """One time step of one layer; keeps the state where the mask is False."""
  features: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, carry, inputs):
    x, keep = inputs
    cell = nn.OptimizedLSTMCell(self.features, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="cell")
    new_carry, _ = cell(carry, x)
    carry = jax.tree.map(
        lambda new, old: jnp.where(keep[:, None], new, old).astype(old.dtype),
        new_carry, carry)
    return carry, carry[1]


_ScanLSTM = nn.scan(_MaskedLSTMStep, variable_broadcast="params",
                    split_rngs={"params": False}, in_axes=1, out_axes=1)


class LSTMLM(nn.Module):
  """LSTM language model implementing ``fdiv_jax.lm.models.base.LanguageModel``.

  The decode cache is ``{"c": (c_1, ...), "h": (h_1, ...), "index"}`` with
  ``c_l, h_l`` of shape [B, H] in ``dtype``; ``init_cache`` ignores
  ``max_length`` (the state does not grow).
  """
  config: LSTMConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype,
                          embedding_init=nn.initializers.normal(0.1))
    self.layers = [
        _ScanLSTM(cfg.hidden_size, cfg.dtype, cfg.param_dtype,
                  name=f"lstm_{i}") for i in range(cfg.num_layers)
    ]
    self.out = nn.Dense(cfg.vocab_size, dtype=jnp.float32,
                        param_dtype=cfg.param_dtype)

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_positions(self) -> Optional[int]:
    return None

  def init_cache(self, batch_size: int, max_length: int = 0):
    """Zero recurrent state for ``batch_size`` rows."""
    del max_length
    cfg = self.config
    zeros = lambda: jnp.zeros((batch_size, cfg.hidden_size), cfg.dtype)
    return {"c": tuple(zeros() for _ in range(cfg.num_layers)),
            "h": tuple(zeros() for _ in range(cfg.num_layers)),
            "index": jnp.zeros((), jnp.int32)}

  def _run(self, tokens, attention_mask, cache):
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, dtype=bool)
    keep = attention_mask.astype(bool)
    x = self.embed(tokens)
    cs, hs = [], []
    for layer, c, h in zip(self.layers, cache["c"], cache["h"]):
      (c, h), x = layer((c, h), (x, keep))
      cs.append(c)
      hs.append(h)
    new_cache = {"c": tuple(cs), "h": tuple(hs),
                 "index": cache["index"] + tokens.shape[1]}
    return x, new_cache

  def hidden_states(self, tokens: Array, positions: Optional[Array] = None,
                    attention_mask: Optional[Array] = None) -> Array:
    """Top-layer LSTM outputs ``h_t``, [B, T, H] in ``dtype``."""
    del positions
    cache = self.init_cache(tokens.shape[0])
    hidden, _ = self._run(tokens, attention_mask, cache)
    return hidden

  def unembed(self, hidden: Array) -> Array:
    """``logits = W h + b``, float32 [..., V]."""
    return self.out(hidden.astype(jnp.float32))

  def output_layer(self) -> Tuple[Array, Array]:
    """``(kernel [V, H], bias [V])`` with ``unembed(h) = h @ kernel.T + bias``,
    float32 like ``unembed`` whatever ``param_dtype``."""
    params = self.out.variables["params"]
    return (params["kernel"].T.astype(jnp.float32),
            params["bias"].astype(jnp.float32))

  def __call__(self, tokens: Array, positions: Optional[Array] = None,
               attention_mask: Optional[Array] = None,
               return_hidden: bool = False):
    hidden = self.hidden_states(tokens, positions, attention_mask)
    logits = self.unembed(hidden)
    return (logits, hidden) if return_hidden else logits

  def decode(self, tokens: Array, positions: Array, attention_mask: Array,
             cache) -> Tuple[Array, Any]:
    """Runs the recurrence from ``cache`` over ``tokens`` [B, T]."""
    del positions
    hidden, cache = self._run(tokens, attention_mask, cache)
    return self.unembed(hidden), cache
