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
scalar test per block and direction; with the batch sharded over several CPU
devices, that first element lives on one of them, so each test is also a
one-value all-reduce (24 per step for GPT-2 small). On other platforms (whose
fusion passes do not duplicate this chain) it is a plain identity, so GPU and
TPU programs are unchanged. It is a ``custom_jvp`` whose tangent goes through
the same conditional: forward mode (``jvp``, ``jacfwd``) works, and reverse
mode gets the fence on the cotangent by transposition.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _conditional_identity(x: Array, value: Array) -> Array:
  """``value``, through a conditional on whether ``x``'s first element is
  finite (both branches the identity)."""
  first = x[(0,) * x.ndim]
  return jax.lax.cond(jnp.isfinite(first), lambda y: y, lambda y: y + 0, value)


def _fence(x: Array, value: Array) -> Array:
  return jax.lax.platform_dependent(x, value, cpu=_conditional_identity,
                                    default=lambda _, y: y)


@jax.custom_jvp
def residual_barrier(x: Array) -> Array:
  """The identity on ``x`` (any shape and dtype), fenced against fusion on
  CPU in the forward and the backward pass (module docstring)."""
  return _fence(x, x)


@residual_barrier.defjvp
def _jvp(primals, tangents):
  # The tangent goes through the same conditional, its predicate taken from
  # the primal, so the rule is linear in the tangent: reverse mode transposes
  # it into the same fence on the cotangent, and forward mode works too.
  (x,), (t,) = primals, tangents
  return _fence(x, x), _fence(x, t)
