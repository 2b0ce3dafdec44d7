"""DecoderLM (Llama / Mistral / Qwen2 / Qwen3 family) behind the shared
LanguageModel interface: cache, output layer, sampler, dtypes, remat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.lm import models, output_layer, sampling, scoring
from fdiv_jax.lm.models import decoder

V = 29
# GQA, llama3 rope, a sliding window (5) shorter than the sequences, untied.
GQA = models.DecoderConfig(
    vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
    rope_theta=500.0, initializer_range=0.2, sliding_window=5,
    layer_types=("sliding_attention", "full_attention"), model_type="qwen2",
    attention_bias=True,
    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8})
# MQA, q/k norms, head_dim (16) != hidden / heads (8), tied, linear rope.
QWEN3 = models.DecoderConfig(
    vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, head_dim=16,
    max_position_embeddings=24, qk_norm=True, tie_word_embeddings=True,
    initializer_range=0.2, model_type="qwen3",
    rope_scaling={"type": "linear", "factor": 2.0})
CONFIGS = {"gqa": GQA, "qwen3": QWEN3}


@functools.lru_cache(maxsize=None)
def _init(config):
  model = models.DecoderLM(config)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 2), jnp.int32))["params"]
  # Non-trivial norm scales.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 1.5 - 0.2 if p[-1].key == "scale" else x, params)
  return model, params


TOKENS = np.random.default_rng(0).integers(0, V, size=(3, 12)).astype(np.int32)
MASK = np.arange(12)[None, :] >= np.array([0, 3, 7])[:, None]


def test_config_is_hashable_and_checked():
  assert hash(GQA) == hash(dataclasses.replace(GQA))
  assert GQA.rope_scaling_dict["rope_type"] == "llama3"
  assert QWEN3.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  assert (GQA.head_dim, GQA.num_groups, QWEN3.num_groups) == (8, 2, 4)
  assert [GQA.sliding(i) for i in range(2)] == [True, False]
  for bad, match in [(dict(num_key_value_heads=3), "must divide"),
                     (dict(rope_scaling={"rope_type": "dynamic",
                                         "factor": 2.0}), "not supported"),
                     (dict(head_dim=7), "even"),
                     (dict(layer_types=("full_attention",)), "layer_types"),
                     (dict(rope_scaling={"rope_type": "linear"}), "factor")]:
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(GQA, **bad)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_interface_and_output_layer(name):
  model, params = _init(CONFIGS[name])
  assert isinstance(model, models.LanguageModel)
  assert (model.vocab_size, model.max_positions) == (V, 24)
  v = {"params": params}
  logits, hidden = model.apply(v, TOKENS, attention_mask=MASK,
                               return_hidden=True)
  assert logits.shape == (3, 12, V) and logits.dtype == jnp.float32
  assert hidden.shape == (3, 12, 32)
  np.testing.assert_allclose(model.apply(v, hidden, method="unembed"), logits,
                             atol=1e-6)
  kernel, bias = model.apply(v, method="output_layer")
  assert kernel.shape == (V, 32) and bias is None
  np.testing.assert_allclose(hidden @ kernel.T, logits, atol=1e-5)
  # The chunked scorer reproduces log_softmax(unembed(h)).
  picked = output_layer.token_log_softmax(hidden, kernel, bias, TOKENS,
                                          chunk_size=8)
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                 TOKENS[..., None], -1)[..., 0]
  np.testing.assert_allclose(picked, expected, atol=1e-5)
  if name == "qwen3":
    assert "lm_head" not in params
    np.testing.assert_array_equal(kernel, params["embed_tokens"]["embedding"])
  with pytest.raises(ValueError, match="exceeds"):
    model.apply(v, jnp.zeros((1, 25), jnp.int32))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_matches_full_forward(name):
  model, params = _init(CONFIGS[name])
  v = {"params": params}
  full = model.apply(v, TOKENS, attention_mask=MASK)
  positions = models.base.default_positions(TOKENS, MASK)
  cache = model.init_cache(3, 14)
  decode = jax.jit(lambda t, p, m, c: model.apply(v, t, p, m, c,
                                                  method="decode"))
  outs = []
  for lo, hi in [(0, 4)] + [(t, t + 1) for t in range(4, 12)]:
    logits, cache = decode(TOKENS[:, lo:hi], positions[:, lo:hi],
                           MASK[:, lo:hi], cache)
    outs.append(logits)
  assert int(cache["index"]) == 12
  assert cache["layers"][0][0].shape == (3, model.config.num_key_value_heads, 14,
                                         model.config.head_dim)
  err = np.max(np.abs(np.concatenate(outs, 1) - np.asarray(full))[MASK])
  assert err < 1e-5, err


def test_positions_are_the_rotary_positions():
  """A left-padded row scores like the same row unpadded (position ids
  restart at 0 on the first real token); rotary attention sees relative
  positions only: a constant shift of the ids changes nothing, stretching
  them does."""
  model, params = _init(GQA)
  v = {"params": params}
  padded = model.apply(v, TOKENS, attention_mask=MASK)
  alone = model.apply(v, TOKENS[2:, 7:])
  np.testing.assert_allclose(padded[2, 7:], alone[0], atol=1e-5)
  shifted = model.apply(v, TOKENS[2:, 7:], positions=jnp.arange(5)[None] + 3)
  np.testing.assert_allclose(shifted, alone, atol=1e-4)
  stretched = model.apply(v, TOKENS[2:, 7:], positions=jnp.arange(5)[None] * 2)
  assert np.max(np.abs(stretched - alone)) > 1e-2


@pytest.mark.parametrize("name,top_k", [("gqa", 7), ("qwen3", 0)])
def test_sampler_log_q_is_exact(name, top_k):
  """Cached sampling then a full-forward rescoring (through ``unembed`` with
  top-k, through ``output_layer`` without)."""
  model, params = _init(CONFIGS[name])
  prompts, lengths = sampling.pad_prompts([[1], [3, 4, 5, 6], [7, 8]],
                                          pad_id=0)
  config = sampling.SamplerConfig(max_new_tokens=9, temperature=0.8,
                                  top_k=top_k, eos_id=2, pad_id=0)
  out = jax.jit(functools.partial(sampling.sample, model, config=config))(
      params, jax.random.key(1), prompts, lengths)
  _, log_q = scoring.sequence_log_probs(model, params, prompts, lengths,
                                        out.tokens, out.mask, config)
  np.testing.assert_allclose(out.log_q, log_q, atol=1e-4)
  assert np.all(np.isfinite(out.log_q)) and out.mask.sum() > 9


def test_bfloat16_activations_and_params():
  _, params = _init(GQA)
  cfg = dataclasses.replace(GQA, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = models.DecoderLM(cfg)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  v = {"params": params16}
  logits, hidden = model.apply(v, TOKENS, attention_mask=MASK,
                               return_hidden=True)
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  reference = models.DecoderLM(GQA).apply({"params": params}, TOKENS,
                                          attention_mask=MASK)
  scale = np.max(np.abs(np.asarray(reference)))
  assert np.max(np.abs(logits - reference)[MASK]) < 0.05 * scale
  cache = model.init_cache(3, 12)
  assert cache["layers"][0][0].dtype == jnp.bfloat16
  positions = models.base.default_positions(TOKENS, MASK)
  cached, _ = model.apply(v, TOKENS, positions, MASK, cache, method="decode")
  np.testing.assert_allclose(np.asarray(cached)[MASK],
                             np.asarray(logits)[MASK], atol=0.02 * scale)


def test_remat_gives_the_same_values_and_gradients():
  model, params = _init(QWEN3)
  remat = models.DecoderLM(dataclasses.replace(QWEN3, remat=True))
  positions = models.base.default_positions(TOKENS, MASK)

  def loss(m, p):
    return jnp.mean(jax.nn.log_softmax(
        m.apply({"params": p}, TOKENS, attention_mask=MASK))[..., 0])

  @jax.jit
  def run(p):
    return [(jax.value_and_grad(functools.partial(loss, m))(p),
             m.apply({"params": p}, TOKENS, positions, MASK,
                     m.init_cache(3, 12), method="decode")[0])
            for m in (model, remat)]

  ((plain_value, plain_grad), plain_decoded), ((value, grad), decoded) = run(
      params)
  np.testing.assert_allclose(value, plain_value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(plain_grad)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(decoded, plain_decoded, atol=1e-6)


def test_rope_frequencies():
  plain = dataclasses.replace(GQA, rope_scaling=None)
  inv_freq, scale = decoder.rope_frequencies(plain)
  np.testing.assert_allclose(inv_freq, 500.0 ** (-np.arange(0, 8, 2) / 8),
                             rtol=1e-6)
  assert scale == 1.0
  linear, _ = decoder.rope_frequencies(dataclasses.replace(
      plain, rope_scaling={"rope_type": "linear", "factor": 4.0}))
  np.testing.assert_allclose(linear, inv_freq / 4, rtol=1e-6)
  llama3, _ = decoder.rope_frequencies(GQA)
  # Wavelengths above original / low_freq_factor = 8 are divided by the
  # factor, those between 8 / high_freq_factor = 2 and 8 interpolated.
  assert llama3[-1] == pytest.approx(inv_freq[-1] / 4)
  assert inv_freq[0] / 4 < llama3[0] < inv_freq[0]
