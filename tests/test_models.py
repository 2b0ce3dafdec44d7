"""The shared LanguageModel interface, for GPT2LM and LSTMLM alike."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.lm import models, output_layer

V = 11


def _make(kind, dtype=jnp.float32, param_dtype=None):
  param_dtype = dtype if param_dtype is None else param_dtype
  if kind == "gpt2":
    return models.GPT2LM(models.GPT2Config(
        vocab_size=V, n_positions=16, n_layer=2, n_head=2, n_embd=16,
        dtype=dtype, param_dtype=param_dtype))
  return models.LSTMLM(models.LSTMConfig(
      vocab_size=V, embed_dim=8, hidden_size=16, num_layers=2, dtype=dtype,
      param_dtype=param_dtype))


@functools.lru_cache(maxsize=None)
def _init(model):
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 2), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 2, params)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(model.apply, static_argnames=("return_hidden", "method"))


def _apply(model, params, *args, **kwargs):
  return _jitted_apply(model)({"params": params}, *args, **kwargs)


TOKENS = np.random.default_rng(0).integers(0, V, size=(3, 10)).astype(np.int32)
MASK = np.arange(10)[None, :] >= np.array([0, 3, 6])[:, None]


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
def test_interface_shapes_and_dtypes(kind):
  model = _make(kind)
  params = _init(model)
  assert isinstance(model, models.LanguageModel)
  assert model.vocab_size == V
  assert model.max_positions == (16 if kind == "gpt2" else None)
  logits, hidden = _apply(model, params, TOKENS, return_hidden=True)
  assert logits.shape == (3, 10, V) and logits.dtype == jnp.float32
  assert hidden.shape == (3, 10, 16)
  again = _apply(model, params, hidden, method="unembed")
  np.testing.assert_allclose(again, logits, atol=1e-6)
  np.testing.assert_allclose(
      _apply(model, params, TOKENS), logits, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
def test_cached_decoding_matches_full_forward(kind):
  model = _make(kind)
  params = _init(model)
  v = {"params": params}
  full = _apply(model, params, TOKENS, attention_mask=MASK)
  positions = models.base.default_positions(TOKENS, MASK)
  cache = model.init_cache(3, 12)
  decode = jax.jit(lambda t, p, m, c: model.apply(v, t, p, m, c,
                                                  method="decode"))
  chunks = [(0, 4)] + [(t, t + 1) for t in range(4, 10)]
  outs = []
  for lo, hi in chunks:
    logits, cache = decode(TOKENS[:, lo:hi], positions[:, lo:hi],
                           MASK[:, lo:hi], cache)
    outs.append(logits)
  cached = np.concatenate(outs, axis=1)
  assert int(cache["index"]) == 10
  err = np.max(np.abs(cached - np.asarray(full))[MASK])
  assert err <= 1e-5, err


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
def test_left_padding_and_causality(kind):
  model = _make(kind)
  params = _init(model)
  padded = _apply(model, params, TOKENS, attention_mask=MASK)
  for row, start in enumerate([0, 3, 6]):
    alone = _apply(model, params, TOKENS[row:row + 1, start:])
    np.testing.assert_allclose(padded[row, start:], alone[0], atol=1e-5)
  # Changing the pad tokens or a later token leaves earlier logits unchanged.
  changed = TOKENS.copy()
  changed[:, 7] = (changed[:, 7] + 1) % V
  changed[2, :6] = 0
  other = _apply(model, params, changed, attention_mask=MASK)
  np.testing.assert_allclose(np.asarray(other)[:, :7][MASK[:, :7]],
                             np.asarray(padded)[:, :7][MASK[:, :7]],
                             atol=1e-6)
  assert np.max(np.abs(other[:, 7:] - padded[:, 7:])) > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
def test_bfloat16_activations_give_float32_logits(kind):
  model32 = _make(kind)
  params = _init(model32)
  model16 = _make(kind, jnp.bfloat16)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  logits16 = _apply(model16, params16, TOKENS)
  logits32 = _apply(model32, params, TOKENS)
  assert logits16.dtype == jnp.float32
  assert 0 < np.max(np.abs(logits16 - logits32)) < 0.15
  lp = jax.nn.log_softmax(logits16)
  np.testing.assert_allclose(jnp.exp(lp).sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
@pytest.mark.parametrize("dtype,param_dtype", [
    (jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16)])
def test_output_layer_holds_the_weights_of_unembed(kind, dtype, param_dtype):
  """``output_layer()`` is what scoring multiplies by, chunk by chunk: it must
  give ``unembed``'s float32 logits exactly, whatever the dtypes."""
  model = _make(kind, dtype, param_dtype)
  params = jax.tree.map(lambda x: x.astype(param_dtype), _init(_make(kind)))
  hidden = _apply(model, params, TOKENS, method="hidden_states")
  kernel, bias = _apply(model, params, method="output_layer")
  logits = jnp.einsum("btd,vd->btv", hidden.astype(kernel.dtype), kernel,
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  want = _apply(model, params, hidden, method="unembed")
  assert logits.dtype == want.dtype == jnp.float32
  np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5)
  picked = output_layer.token_log_softmax(hidden, kernel, bias, TOKENS,
                                          chunk_size=4)
  np.testing.assert_allclose(
      picked, jnp.take_along_axis(jax.nn.log_softmax(want), TOKENS[..., None],
                                  axis=-1)[..., 0], rtol=0, atol=1e-5)


def test_gpt2_too_long_is_a_value_error():
  model = _make("gpt2")
  params = _init(model)
  tokens = jnp.zeros((1, 17), jnp.int32)
  with pytest.raises(ValueError, match=r"length 17 exceeds .*\(16\)"):
    model.apply({"params": params}, tokens)
  with pytest.raises(ValueError, match=r"length 20 exceeds .*\(16\)"):
    model.init_cache(2, 20)
  # The LSTM has no limit.
  lstm = _make("lstm")
  out = _apply(lstm, _init(lstm), jnp.zeros((1, 40), jnp.int32))
  assert out.shape == (1, 40, V)


def test_gpt2_sizes():
  def count(config):
    model = models.GPT2LM(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

  assert count(models.GPT2Config()) == 124_439_808  # GPT-2 small.
  reference = models.GPT2Config(n_positions=64, n_layer=2, n_head=4,
                                n_embd=128)
  assert count(reference) == 6_837_888
  tiny = models.GPT2Config(vocab_size=V, n_positions=16, n_layer=1, n_head=2,
                           n_embd=8)
  assert count(tiny) < 5_000
  with pytest.raises(ValueError, match="divisible"):
    models.GPT2Config(n_embd=10, n_head=4)
