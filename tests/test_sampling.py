"""Sampler exactness: log q equals rescoring, all sequence probabilities sum
to 1, empirical frequencies match them, EOS/padding semantics, one compile."""

import functools
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fdiv_jax.lm import models
from fdiv_jax.lm import sampling
from fdiv_jax.lm import scoring

EOS = 4
PAD = 0
BOS = 3

WARPINGS = {
    "plain": dict(),
    "tempered": dict(temperature=0.7),
    "top_k": dict(top_k=3),
    "top_p": dict(top_p=0.8),
    "top_k_top_p": dict(temperature=1.3, top_k=4, top_p=0.7),
}


def _tiny_gpt2(vocab, scale):
  model = models.GPT2LM(models.GPT2Config(
      vocab_size=vocab, n_positions=24, n_layer=1, n_head=2, n_embd=16))
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 2), jnp.int32))
  params = jax.tree.map(lambda x: x * scale, params["params"])
  return model, params


def _tiny_lstm(vocab, scale):
  model = models.LSTMLM(models.LSTMConfig(
      vocab_size=vocab, embed_dim=8, hidden_size=16, num_layers=2))
  params = jax.jit(model.init)(jax.random.key(1),
                               jnp.zeros((1, 2), jnp.int32))
  params = jax.tree.map(lambda x: x * scale, params["params"])
  return model, params


@functools.lru_cache(maxsize=None)
def _model(kind, vocab, scale):
  return {"gpt2": _tiny_gpt2, "lstm": _tiny_lstm}[kind](vocab, scale)


@functools.lru_cache(maxsize=None)
def _sampler(model, config):
  return sampling.make_sampler(model, config)


@functools.lru_cache(maxsize=None)
def _jit_scorer(model):
  return jax.jit(functools.partial(scoring.sequence_log_probs, model),
                 static_argnames="warping")


def _ragged_prompts():
  rng = np.random.default_rng(0)
  lists = [[BOS] + list(rng.integers(0, EOS, size=n)) for n in
           [0, 3, 1, 5, 2, 0, 4, 1]]
  return sampling.pad_prompts(lists, PAD)


@pytest.mark.parametrize(
    "kind,name", [("gpt2", name) for name in WARPINGS if name != "top_k_top_p"]
    + [("lstm", "top_k_top_p")])
def test_log_q_equals_rescoring(kind, name):
  model, params = _model(kind, 8, 2.0)
  prompts, lengths = _ragged_prompts()
  config = sampling.SamplerConfig(max_new_tokens=10, eos_id=EOS, pad_id=PAD,
                                  **WARPINGS[name])
  out = _sampler(model, config)(params, jax.random.key(7), prompts, lengths)
  token_lp, lp = _jit_scorer(model)(params, prompts, lengths, out.tokens,
                                    out.mask, warping=config.warping)
  np.testing.assert_allclose(out.log_q, lp, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out.token_log_q, token_lp, atol=1e-5, rtol=0)
  assert np.all(np.isfinite(out.log_q)) and np.all(out.log_q <= 0)


def _check_eos_layout(out, config):
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  assert tokens.dtype == np.int32 and mask.dtype == bool
  assert out.token_log_q.dtype == jnp.float32 and out.lengths.dtype == jnp.int32
  for row in range(tokens.shape[0]):
    length = int(out.lengths[row])
    assert mask[row].tolist() == [True] * length + [False] * (
        tokens.shape[1] - length)
    eos_at = np.flatnonzero(tokens[row, :length] == config.eos_id)
    if length < tokens.shape[1]:
      assert eos_at.tolist() == [length - 1]
    else:
      assert eos_at.size == 0 or eos_at.tolist() == [length - 1]
    assert np.all(tokens[row, length:] == config.pad_id)
    assert np.all(np.asarray(out.token_log_q)[row, length:] == 0.0)
  np.testing.assert_allclose(out.log_q, out.token_log_q.sum(-1), atol=1e-6)


def test_eos_padding_and_lengths():
  model, params = _model("gpt2", 8, 2.0)
  prompts, lengths = _ragged_prompts()
  config = sampling.SamplerConfig(max_new_tokens=12, eos_id=EOS, pad_id=7)
  out = sampling.make_sampler(model, config)(params, jax.random.key(3),
                                             prompts, lengths)
  _check_eos_layout(out, config)
  assert out.tokens.shape == (8, 12)
  # Both outcomes occur in this batch: EOS-terminated and length-capped.
  assert 0 < int(np.sum(out.lengths < 12)) < 8
  # No EOS id: every row runs to max_new_tokens.
  no_eos = sampling.SamplerConfig(max_new_tokens=5, pad_id=PAD)
  out = sampling.make_sampler(model, no_eos)(params, jax.random.key(3),
                                             prompts, lengths)
  assert np.all(out.lengths == 5) and np.all(out.mask)


def test_cached_and_uncached_samplers_agree():
  model, params = _model("gpt2", 8, 2.0)
  prompts, lengths = _ragged_prompts()
  config = sampling.SamplerConfig(max_new_tokens=10, eos_id=EOS, pad_id=PAD,
                                  **WARPINGS["top_k"])
  cached = _sampler(model, config)(params, jax.random.key(5), prompts,
                                   lengths)
  uncached = sampling.make_sampler(model, config, use_cache=False)(
      params, jax.random.key(5), prompts, lengths)
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  np.testing.assert_allclose(cached.log_q, uncached.log_q, atol=1e-5)


def test_segment_ends_cover_the_new_tokens_in_few_segments():
  assert sampling._segment_ends(32) == (32,)
  assert sampling._segment_ends(64) == (64,)
  assert sampling._segment_ends(512) == (128, 256, 384, 512)
  for n in (1, 63, 65, 200, 1000, 4097):
    ends = sampling._segment_ends(n)
    assert ends[-1] == n and len(ends) <= sampling._MAX_SEGMENTS
    assert all(b > a for a, b in zip(ends, ends[1:]))


@pytest.mark.parametrize("kind", ["gpt2", "lstm", "decoder"])
def test_a_cache_grown_in_segments_samples_as_one_full_cache(kind, monkeypatch):
  """The cache grows between loop segments (copied into a longer one); a
  model whose cache does not grow (the LSTM) keeps its state. log q equals a
  full-forward rescoring of the drawn tokens (a cache that lost its columns
  would condition later tokens on nothing and fail it)."""
  if kind == "decoder":
    model = models.DecoderLM(models.DecoderConfig(
        vocab_size=8, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=24))
    params = jax.tree.map(lambda x: 2.0 * x, jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
  else:
    model, params = _model(kind, 8, 2.0)
  monkeypatch.setattr(sampling, "_MIN_SEGMENT", 4)
  assert sampling._segment_ends(10) == (4, 8, 10)
  prompts, lengths = _ragged_prompts()
  config = sampling.SamplerConfig(max_new_tokens=10, eos_id=None, pad_id=PAD)
  cached = sampling.make_sampler(model, config)(
      params, jax.random.key(5), prompts, lengths)
  token_lp, lp = _jit_scorer(model)(params, prompts, lengths, cached.tokens,
                                    cached.mask, warping=config.warping)
  np.testing.assert_allclose(cached.token_log_q, token_lp, atol=1e-5, rtol=0)
  np.testing.assert_allclose(cached.log_q, lp, atol=1e-5, rtol=0)


def _enumerate(vocab, num_new):
  """All continuations: EOS-terminated ones and length-capped ones."""
  words = [t for t in range(vocab) if t != EOS]
  seqs = [p + (EOS,) for n in range(num_new)
          for p in itertools.product(words, repeat=n)]
  seqs += list(itertools.product(words, repeat=num_new))
  tokens = np.full((len(seqs), num_new), PAD, np.int32)
  mask = np.zeros((len(seqs), num_new), bool)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    mask[i, :len(s)] = True
  return tokens, mask


def _exact_probs(model, params, warping, tokens, mask):
  prompts = np.full((tokens.shape[0], 1), BOS, np.int32)
  lengths = np.ones(tokens.shape[0], np.int32)
  _, lp = _jit_scorer(model)(params, prompts, lengths, tokens, mask,
                             warping=warping)
  return np.exp(np.asarray(lp, np.float64))


@pytest.mark.parametrize("name", list(WARPINGS))
def test_all_sequences_sum_to_one(name):
  model, params = _model("gpt2", 5, 3.0)
  tokens, mask = _enumerate(5, 4)
  assert tokens.shape[0] == 1 + 4 + 16 + 64 + 256
  probs = _exact_probs(model, params, scoring.Warping(**WARPINGS[name]),
                       tokens, mask)
  assert abs(probs.sum() - 1.0) <= 1e-6
  if name in ("top_k", "top_p"):
    assert np.sum(probs == 0.0) > 0  # Truncation removes sequences.


def _chi_square(counts, expected):
  keep = expected >= 5
  obs = np.append(counts[keep], counts[~keep].sum())
  exp = np.append(expected[keep], expected[~keep].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("name", ["plain", "top_p"])
def test_empirical_frequencies_match(name):
  model, params = _model("gpt2", 5, 3.0)
  tokens, mask = _enumerate(5, 4)
  warping = scoring.Warping(**WARPINGS[name])
  probs = _exact_probs(model, params, warping, tokens, mask)
  index = {tuple(t[m]): i for i, (t, m) in enumerate(zip(tokens, mask))}
  num = 20000
  config = sampling.SamplerConfig(max_new_tokens=4, eos_id=EOS, pad_id=PAD,
                                  **WARPINGS[name])
  prompts = np.full((num, 1), BOS, np.int32)
  out = sampling.make_sampler(model, config)(
      params, jax.random.key(11), prompts, np.ones(num, np.int32))
  ids = np.array([index[tuple(t[m])] for t, m in
                  zip(np.asarray(out.tokens), np.asarray(out.mask))])
  np.testing.assert_allclose(np.exp(out.log_q), probs[ids], rtol=1e-4)
  counts = np.bincount(ids, minlength=len(probs)).astype(float)
  assert counts[probs == 0].sum() == 0
  p_value = _chi_square(counts, probs * num)
  assert p_value > 1e-3, p_value
  # Power check: the same samples reject a slightly different distribution.
  wrong = _exact_probs(model, params, scoring.Warping(
      temperature=1.15 * warping.temperature, top_p=warping.top_p),
                       tokens, mask)
  assert _chi_square(counts, wrong * num) < 1e-6


def test_compiled_once_per_shape(caplog):
  model, params = _model("gpt2", 8, 2.0)
  prompts, lengths = _ragged_prompts()
  config = sampling.SamplerConfig(max_new_tokens=5, top_p=0.9, eos_id=EOS)
  sampler = sampling.make_sampler(model, config)
  params2 = jax.tree.map(lambda x: x * 1.1, params)
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    a = sampler(params, jax.random.key(0), prompts, lengths)
    b = sampler(params2, jax.random.key(1), prompts[::-1], lengths[::-1])
    sampler(params, jax.random.key(2), prompts, lengths)
  compiles = [r for r in caplog.records
              if "Compiling jit(jitted_sample)" in r.getMessage()]
  assert len(compiles) == 1
  assert not np.array_equal(a.tokens, b.tokens)
  # A new prompt width is a new shape: exactly one more compile.
  caplog.clear()
  wide, wide_lengths = sampling.pad_prompts([[BOS], [BOS, 1]], PAD, length=4)
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    sampler(params, jax.random.key(0), wide, wide_lengths)
    sampler(params, jax.random.key(1), wide, wide_lengths)
  compiles = [r for r in caplog.records
              if "Compiling jit(jitted_sample)" in r.getMessage()]
  assert len(compiles) == 1


def test_traceable_inside_outer_jit_with_grad():
  """The train-step pattern: sample, then differentiate the rescoring."""
  model, params = _model("gpt2", 8, 2.0)
  prompts, lengths = _ragged_prompts()
  config = sampling.SamplerConfig(max_new_tokens=10, eos_id=EOS, pad_id=PAD,
                                  **WARPINGS["top_k"])

  @jax.jit
  def step(params, rng):
    out = sampling.sample(model, params, rng, prompts, lengths, config)
    tokens = jax.lax.stop_gradient(out.tokens)

    def objective(p):
      _, lp = scoring.sequence_log_probs(model, p, prompts, lengths, tokens,
                                         out.mask)
      return jnp.mean(lp)

    value, grads = jax.value_and_grad(objective)(params)
    return out, value, grads

  out, value, grads = step(params, jax.random.key(4))
  direct = _sampler(model, config)(params, jax.random.key(4), prompts,
                                   lengths)
  np.testing.assert_array_equal(out.tokens, direct.tokens)
  assert np.isfinite(value)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(g != 0) for g in leaves)


def test_length_limit_error_and_config_validation():
  model, params = _model("gpt2", 8, 2.0)
  prompts, lengths = sampling.pad_prompts([[BOS, 1, 2, 3, 1]], PAD)
  config = sampling.SamplerConfig(max_new_tokens=20, eos_id=EOS)
  with pytest.raises(ValueError, match=r"25 exceeds .*\(24\)"):
    sampling.sample(model, params, jax.random.key(0), prompts, lengths, config)
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplerConfig(max_new_tokens=3, temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplerConfig(max_new_tokens=3, top_p=0.0)
  with pytest.raises(ValueError, match="at least one token"):
    sampling.pad_prompts([[1], []], PAD)


def test_pad_prompts_left_pads():
  prompts, lengths = sampling.pad_prompts([[5, 6], [7], [1, 2, 3]], pad_id=9)
  np.testing.assert_array_equal(prompts, [[9, 5, 6], [9, 9, 7], [1, 2, 3]])
  np.testing.assert_array_equal(lengths, [2, 1, 3])
  assert prompts.dtype == np.int32 and lengths.dtype == np.int32


def test_categorical_matches_probabilities():
  """Two-level inverse CDF: odd V (padded last block), zero-mass tokens."""
  probs = np.array([0.1, 0.0, 0.3, 0.05, 0.0, 0.25, 0.2, 0.0, 0.1, 0.0, 0.0])
  num = 100_000
  log_probs = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32),
                                       (num, probs.size)))
  draws = np.asarray(jax.jit(sampling.categorical)(jax.random.key(0),
                                                   log_probs))
  counts = np.bincount(draws, minlength=probs.size)
  assert counts.size == probs.size and counts[probs == 0].sum() == 0
  support = probs > 0
  p_value = stats.chisquare(counts[support], probs[support] * num).pvalue
  assert p_value > 1e-3, p_value
  shifted = np.roll(probs[support], 1)
  assert stats.chisquare(counts[support], shifted * num).pvalue < 1e-6


def test_categorical_reports_the_exact_log_probability_of_its_draw():
  rng = np.random.default_rng(5)
  logits = np.concatenate([rng.normal(size=(64, 997)) * 4,
                           np.full((64, 3), -np.inf)], axis=1)
  logits[:, 10] += 200.0  # A shift the normaliser must absorb.
  index, log_prob = jax.jit(sampling.categorical_with_log_prob)(
      jax.random.key(3), jnp.asarray(logits, jnp.float32))
  z = logits.astype(np.float64)
  top = z.max(axis=1, keepdims=True)
  exact = z - top - np.log(np.exp(z - top).sum(axis=1, keepdims=True))
  want = exact[np.arange(64), np.asarray(index)]
  assert np.all(np.isfinite(want))
  np.testing.assert_allclose(log_prob, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_gradient_from_the_samplers_log_q_equals_a_rescoring(kind, temperature):
  """On-policy scoring: the sampler's log q as the value of log π, only the
  gradient computed; it must equal the gradient of a full rescoring."""
  model, params = _model(kind, 11, 3.0)
  prompts, lengths = _ragged_prompts()
  config = sampling.SamplerConfig(max_new_tokens=6, temperature=temperature,
                                  eos_id=EOS, pad_id=PAD)
  out = _sampler(model, config)(params, jax.random.key(4), prompts, lengths)
  weights = jnp.linspace(-1.0, 2.0, prompts.shape[0])

  def objective(p, known):
    token_log_p, log_p = scoring.sequence_log_probs(
        model, p, prompts, lengths, out.tokens, out.mask, config.warping,
        known_token_log_probs=out.token_log_q if known else None)
    return jnp.sum(weights * log_p), token_log_p

  (_, fast), fast_grads = jax.jit(jax.value_and_grad(objective, has_aux=True),
                                  static_argnums=1)(params, True)
  (_, full), full_grads = jax.jit(jax.value_and_grad(objective, has_aux=True),
                                  static_argnums=1)(params, False)
  np.testing.assert_array_equal(fast, out.token_log_q)
  np.testing.assert_allclose(fast, full, atol=5e-6)
  for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(full_grads)):
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-5 * max(1.0, float(jnp.abs(want).max())))


def test_known_log_probs_refuse_truncated_warping():
  model, params = _model("gpt2", 11, 1.0)
  prompts, lengths = _ragged_prompts()
  tokens = jnp.zeros((prompts.shape[0], 2), jnp.int32)
  with pytest.raises(ValueError, match="top-k / top-p"):
    scoring.sequence_log_probs(model, params, prompts, lengths, tokens,
                               tokens >= 0, scoring.Warping(top_k=3),
                               known_token_log_probs=jnp.zeros(tokens.shape))


@pytest.mark.parametrize("warp", [dict(top_k=2), dict(top_p=0.6),
                                  dict(top_k=3, temperature=0.7)])
def test_truncating_sampler_reports_the_mass_it_cannot_draw(warp):
  """dropped_mass is the untempered model's mass outside the kept tokens at
  every sampled step, checked against the full distribution."""
  model = models.GPT2LM(models.GPT2Config(vocab_size=7, n_positions=16, n_layer=1,
                                          n_head=2, n_embd=16))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  prompts, lengths = sampling.pad_prompts([[0], [0, 3]], pad_id=0)
  config = sampling.SamplerConfig(max_new_tokens=5, eos_id=None, pad_id=0, **warp)
  out = sampling.sample(model, params, jax.random.PRNGKey(1), prompts, lengths,
                        config)
  assert out.dropped_mass.shape == out.tokens.shape
  plain = sampling.sample(model, params, jax.random.PRNGKey(1), prompts, lengths,
                          sampling.SamplerConfig(max_new_tokens=5, pad_id=0))
  assert plain.dropped_mass is None
  for row in range(2):
    full = jnp.concatenate([jnp.asarray(prompts[row, -lengths[row]:]),
                            out.tokens[row]])[None]
    logits = model.apply({"params": params}, full)[0]
    start = int(lengths[row]) - 1
    for n in range(5):
      step_logits = logits[start + n]
      kept = scoring.warp_logits(step_logits[None], config.warping)[0] > -jnp.inf
      want = float(jnp.sum(jnp.where(kept, 0.0, jax.nn.softmax(step_logits))))
      assert float(out.dropped_mass[row, n]) == pytest.approx(want, abs=2e-6)
      assert want > 0 or bool(jnp.all(kept))
