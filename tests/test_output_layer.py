"""The chunked output layer against the exact log-softmax and its gradient.

The exact values are those of the dense formula ``log_softmax((h W^T + b)/τ)``
evaluated in float64; the chunked version is checked in float64 (to 1e-12:
the only difference is the order of a sum) and in float32 (to float32
rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.lm import output_layer


def _problem(vocab, width=6, shape=(3, 5), bias=True, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(*shape, width)), dtype)
  kernel = jnp.asarray(rng.normal(size=(vocab, width)), dtype)
  b = jnp.asarray(rng.normal(size=(vocab,)), dtype) if bias else None
  tokens = jnp.asarray(rng.integers(0, vocab, size=shape), jnp.int32)
  upstream = jnp.asarray(rng.normal(size=shape), dtype)
  return hidden, kernel, b, tokens, upstream


def _dense(hidden, kernel, bias, tokens, temperature):
  z = hidden @ kernel.T
  if bias is not None:
    z = z + bias
  log_p = jax.nn.log_softmax(z / temperature, axis=-1)
  return jnp.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0]


def _grads(fn, hidden, kernel, bias, upstream):
  args = (hidden, kernel) if bias is None else (hidden, kernel, bias)

  def objective(*args):
    return jnp.sum(upstream * fn(*args))

  return jax.grad(objective, argnums=tuple(range(len(args))))(*args)


# Vocabularies below, at and above the chunk size, with and without a rest.
CASES = [(5, 16), (16, 16), (37, 16), (64, 16), (37, 1), (37, 100)]


@pytest.mark.parametrize("vocab,chunk", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_dense_formula_in_float64(
    vocab, chunk, bias, temperature):
  with jax.enable_x64(True):
    hidden, kernel, b, tokens, upstream = _problem(vocab, bias=bias,
                                                   dtype=jnp.float64)
    def chunked(h, w, bb=None):
      return output_layer.token_log_softmax(h, w, bb, tokens,
                                            temperature=temperature,
                                            chunk_size=chunk)
    def dense(h, w, bb=None):
      return _dense(h, w, bb, tokens, temperature)
    got = chunked(hidden, kernel, b)
    want = dense(hidden, kernel, b)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    for g, w in zip(_grads(chunked, hidden, kernel, b, upstream),
                    _grads(dense, hidden, kernel, b, upstream)):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vocab,chunk", [(37, 16), (1000, 256)])
def test_float32_matches_float64_exact_values_to_rounding(vocab, chunk):
  hidden, kernel, b, tokens, upstream = _problem(vocab, width=16, seed=1)
  got = jax.jit(lambda h, w, bb: output_layer.token_log_softmax(
      h, w, bb, tokens, chunk_size=chunk))(hidden, kernel, b)
  got_grads = _grads(lambda h, w, bb: output_layer.token_log_softmax(
      h, w, bb, tokens, chunk_size=chunk), hidden, kernel, b, upstream)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(x, jnp.float64) for x in (hidden, kernel, b)]
    want = _dense(*args64, tokens, 1.0)
    want_grads = _grads(lambda h, w, bb: _dense(h, w, bb, tokens, 1.0),
                        *args64, jnp.asarray(upstream, jnp.float64))
  assert got.dtype == jnp.float32
  # |log p| is up to ~30 here; float32 carries ~7 digits.
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_huge_logits_neither_overflow_nor_lose_the_gradient():
  hidden, kernel, _, tokens, upstream = _problem(40, seed=2)
  kernel = kernel.at[7].set(kernel[7] * 1e4)  # z[7] ~ 1e4: exp overflows.
  tokens = tokens.at[0, 0].set(7)

  def chunked(h, w):
    return output_layer.token_log_softmax(h, w, None, tokens, chunk_size=16)

  got = chunked(hidden, kernel)
  grads = _grads(chunked, hidden, kernel, None, upstream)
  assert np.all(np.isfinite(got)) and all(np.all(np.isfinite(g)) for g in grads)
  with jax.enable_x64(True):
    want = _dense(jnp.asarray(hidden, jnp.float64),
                  jnp.asarray(kernel, jnp.float64), None, tokens, 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def test_known_log_probs_give_the_same_gradient_without_a_forward_pass():
  with jax.enable_x64(True):
    hidden, kernel, b, tokens, upstream = _problem(37, dtype=jnp.float64)
    mask = jnp.asarray(np.random.default_rng(3).random(tokens.shape) < 0.7)
    exact = _dense(hidden, kernel, b, tokens, 0.7)

    def known(h, w, bb):
      return output_layer.known_token_log_softmax(
          h, w, bb, tokens, exact, mask, temperature=0.7, chunk_size=16)

    def dense(h, w, bb):
      return jnp.where(mask, _dense(h, w, bb, tokens, 0.7), 0.0)

    np.testing.assert_array_equal(known(hidden, kernel, b),
                                  jnp.where(mask, exact, 0.0))
    for g, w in zip(_grads(known, hidden, kernel, b, upstream),
                    _grads(dense, hidden, kernel, b, upstream)):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


def test_known_log_probs_ignore_whatever_lies_off_the_mask():
  hidden, kernel, b, tokens, upstream = _problem(37, seed=4)
  mask = jnp.ones(tokens.shape, bool).at[:, -2:].set(False)
  exact = _dense(hidden, kernel, b, tokens, 1.0)
  # Off the mask: a pad whose "known" log-prob is 0 and hidden states that
  # would overflow exp() if they were used.
  garbage = jnp.where(mask, exact, 0.0)
  wild = hidden.at[:, -2:].set(1e3)

  def known(h, w, bb):
    return output_layer.known_token_log_softmax(h, w, bb, tokens, garbage,
                                                mask, chunk_size=16)

  grads = _grads(known, wild, kernel, b, upstream)
  want = _grads(lambda h, w, bb: jnp.where(mask, _dense(h, w, bb, tokens, 1.0),
                                           0.0), hidden, kernel, b, upstream)
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(grads[0][:, -2:], 0.0)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_bad_arguments_name_the_field():
  hidden, kernel, b, tokens, _ = _problem(10)
  with pytest.raises(ValueError, match="temperature"):
    output_layer.token_log_softmax(hidden, kernel, b, tokens, temperature=0.0)
  with pytest.raises(ValueError, match="chunk_size"):
    output_layer.token_log_softmax(hidden, kernel, b, tokens, chunk_size=0)
  with pytest.raises(ValueError, match="leading axes"):
    output_layer.token_log_softmax(hidden[:, :2], kernel, b, tokens)


def test_a_whole_chunk_of_impossible_tokens_is_handled_exactly():
  """Logits of -inf (masked-out vocabulary entries) for an entire chunk: the
  running max is -inf there, which must not turn the merge into NaN."""
  with jax.enable_x64(True):
    hidden, kernel, b, tokens, upstream = _problem(40, dtype=jnp.float64)
    b = b.at[:16].set(-jnp.inf)
    tokens = jnp.where(tokens < 16, tokens + 16, tokens)

    def chunked(h, w, bb):
      return output_layer.token_log_softmax(h, w, bb, tokens, chunk_size=16)

    def dense(h, w, bb):
      return _dense(h, w, bb, tokens, 1.0)

    np.testing.assert_allclose(chunked(hidden, kernel, b),
                               dense(hidden, kernel, b), rtol=0, atol=1e-12)
    got = _grads(chunked, hidden, kernel, b, upstream)
    want = _grads(dense, hidden, kernel, b, upstream)
    for g, w in zip(got[:2], want[:2]):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[2][16:], want[2][16:], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got[2][:16], 0.0)
