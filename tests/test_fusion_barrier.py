"""The residual-stream fusion barrier: an identity that keeps XLA:CPU from
recomputing the backward residual chain once per block (O(L²) work)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.lm import models
from fdiv_jax.lm.models import fusion_barrier

LAYERS = 12


def _gpt2():
  return models.GPT2LM(models.GPT2Config(vocab_size=64, n_positions=16,
                                         n_layer=LAYERS, n_head=2, n_embd=32))


def _loss_and_params(model):
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]

  def loss(p):
    hidden = model.apply({"params": p}, tokens, method="hidden_states")
    return jnp.sum(jnp.sin(hidden))
  return loss, params


def _compiled_gradient(loss, params):
  """(compiled value_and_grad of ``loss``, operands of its largest fusion)."""
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  largest = max(m.group(1).count("%") for m in re.finditer(
      r"= \S+ fusion\((.*?)\), kind=", compiled.as_text()))
  return compiled, largest


def test_identity_in_value_and_gradient():
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 7))
  np.testing.assert_array_equal(fusion_barrier.residual_barrier(x), x)
  w = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  grad = jax.grad(lambda y: jnp.sum(w * fusion_barrier.residual_barrier(y)))(x)
  np.testing.assert_array_equal(grad, w)
  # Forward mode too (a custom_jvp, not a custom_vjp).
  primal, tangent = jax.jvp(fusion_barrier.residual_barrier, (x,), (w,))
  np.testing.assert_array_equal(primal, x)
  np.testing.assert_array_equal(tangent, w)
  # A non-finite first element takes the other (identity) branch.
  x = x.at[0, 0, 0].set(jnp.nan)
  np.testing.assert_array_equal(jax.jit(fusion_barrier.residual_barrier)(x), x)


def test_gpt2_equals_its_unfenced_self_without_the_quadratic_fusion(
    monkeypatch):
  loss, params = _loss_and_params(_gpt2())
  fenced, fenced_largest = _compiled_gradient(loss, params)
  monkeypatch.setattr(fusion_barrier, "residual_barrier", lambda x: x)
  plain, plain_largest = _compiled_gradient(loss, params)
  value, grad = fenced(params)
  plain_value, plain_grad = plain(params)
  np.testing.assert_allclose(value, plain_value, rtol=1e-6)
  # Equal up to float32 rounding: the residual cotangent is a sum over
  # blocks, which the two programs associate differently.
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(plain_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(b))))
  if jax.default_backend() == "cpu":
    # Without the barrier XLA:CPU fuses the whole chain of residual cotangent
    # additions into each block's weight-gradient operand: the largest fusion
    # of a 12-block GPT-2 reads 229 operands; with it, 19 (a block's worth).
    # (The Llama family's RMSNorm blocks are fused block by block either way:
    # 9 operands at most, with or without, so DecoderLM has no barrier.)
    assert fenced_largest < 50, fenced_largest
    assert plain_largest > 3 * fenced_largest, (fenced_largest, plain_largest)
