"""A fusion barrier for the residual stream between transformer blocks.

``residual_barrier(x)`` is the identity, in value and in gradient. It exists for
XLA:CPU, whose fusion pass duplicates cheap element-wise producers into every
consumer. In the backward pass of a deep residual network the cotangent of the
residual stream is a chain of additions, one per block:

    g_l = g_{l+1} + (the block's branch gradient)_l,

and XLA:CPU fused that whole chain, from the last block down, into the
transposed copy of ``g_l`` that each weight-gradient matrix product reads: the
chain was recomputed once per block, O(L²) element-wise work over [B·T, D]
arrays (171 operands in the copy fusion of the first block of GPT-2 small).
Measured on GPT-2 small (12 blocks, batch 16 × 33 tokens, 2 CPU cores): those
fusions took 320 ms of a 1.19 s forward + backward pass; with a barrier after
every block they take 33 ms and the pass 0.85 s (the whole f-DPG step of the
``gpt2-small`` benchmark preset: 2.93 s → 2.58 s). ``GPT2LM.hidden_states``
fences every block. The Llama family (``DecoderLM``, RMSNorm) does not need
it: XLA:CPU fuses its backward block by block already (at most 9 operands per
fusion with or without a barrier, 12 blocks of Qwen2.5-0.5B's width).

``jax.lax.optimization_barrier`` would say this, but XLA:CPU removes it before
fusion, so on CPU the barrier is a conditional with two identity branches,
``lax.cond`` on a value XLA cannot know at compile time (whether the first
element is finite): a conditional is never fused through. Its cost is one
scalar test per block. On other platforms (whose fusion passes do not
duplicate this chain) it is a plain identity, so GPU and TPU programs are
unchanged.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _conditional_identity(x: Array) -> Array:
  first = x[(0,) * x.ndim]
  return jax.lax.cond(jnp.isfinite(first), lambda y: y, lambda y: y + 0, x)


def _fence(x: Array) -> Array:
  return jax.lax.platform_dependent(x, cpu=_conditional_identity,
                                    default=lambda y: y)


@jax.custom_vjp
def residual_barrier(x: Array) -> Array:
  """The identity on ``x`` (any shape and dtype), fenced against fusion on
  CPU in the forward and the backward pass (module docstring)."""
  return _fence(x)


def _forward(x):
  return _fence(x), None


def _backward(_, g):
  return (_fence(g),)


residual_barrier.defvjp(_forward, _backward)
