"""Warping (exact values, ties at the cut-off) and sequence scoring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.lm import models
from fdiv_jax.lm import sampling
from fdiv_jax.lm import scoring


def _probs(logits, **warping):
  return np.exp(np.asarray(scoring.warped_log_softmax(
      jnp.asarray(logits, jnp.float32), scoring.Warping(**warping)),
                           np.float64))


def test_temperature():
  logits = np.array([1.0, 2.0, -0.5, 0.0])
  expected = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
  np.testing.assert_allclose(_probs(logits, temperature=0.5), expected,
                             rtol=1e-6)


def test_top_k_keeps_ties_at_the_cut_off():
  logits = np.array([2.0, 1.0, 1.0, 0.0, -1.0])
  probs = _probs(logits, top_k=2)
  kept = np.exp([2.0, 1.0, 1.0])
  np.testing.assert_allclose(probs, np.append(kept / kept.sum(), [0, 0]),
                             rtol=1e-6)
  np.testing.assert_allclose(_probs(logits, top_k=1), [1, 0, 0, 0, 0])
  np.testing.assert_allclose(_probs(logits, top_k=5), _probs(logits),
                             rtol=1e-6)


def test_top_p_exact_supports():
  base = np.array([0.5, 0.2, 0.2, 0.1])
  logits = np.log(base)
  # Mass strictly before each sorted token: 0, .5, .7, .9.
  np.testing.assert_allclose(_probs(logits, top_p=0.5), [1, 0, 0, 0])
  # .5 < .55: token 1 is kept, and token 2 ties with it at the cut-off.
  np.testing.assert_allclose(_probs(logits, top_p=0.55),
                             [5 / 9, 2 / 9, 2 / 9, 0], rtol=1e-6)
  np.testing.assert_allclose(_probs(logits, top_p=0.95), base, rtol=1e-6)
  # Order of the vocabulary does not matter.
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(_probs(logits[perm], top_p=0.55),
                             np.array([5 / 9, 2 / 9, 2 / 9, 0])[perm],
                             rtol=1e-6)


def test_top_k_then_top_p():
  logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
  # Top-2 renormalises to (4/7, 3/7); top-p 0.5 then keeps only token 0.
  np.testing.assert_allclose(_probs(logits, top_k=2, top_p=0.5), [1, 0, 0, 0])
  np.testing.assert_allclose(_probs(logits, top_k=2, top_p=0.6),
                             [4 / 7, 3 / 7, 0, 0], rtol=1e-6)
  # Temperature applies first: at τ = 2 the top token has mass < 0.5, so
  # top-p 0.5 keeps two tokens (at τ = 1 it keeps one).
  root = np.sqrt([0.4, 0.3])
  np.testing.assert_allclose(_probs(logits, temperature=2.0, top_p=0.5),
                             np.append(root / root.sum(), [0, 0]), rtol=1e-6)


def test_warping_accepts_sampler_config():
  config = sampling.SamplerConfig(max_new_tokens=3, temperature=0.8, top_k=2,
                                  top_p=0.9)
  assert scoring.as_warping(config) == scoring.Warping(0.8, 2, 0.9)
  assert scoring.as_warping(None) == scoring.Warping()


@functools.lru_cache(maxsize=None)
def _model():
  model = models.GPT2LM(models.GPT2Config(vocab_size=9, n_positions=16,
                                          n_layer=1, n_head=2, n_embd=16))
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 2), jnp.int32))["params"]
  return model, jax.tree.map(lambda x: 2 * x, params)


def _reference(model, params, prompt, continuation, warping):
  """Per-sequence, unpadded forward pass and a Python loop over tokens."""
  seq = jnp.asarray([list(prompt) + list(continuation)], jnp.int32)
  logits = model.apply({"params": params}, seq)[0]
  log_probs = scoring.warped_log_softmax(logits, warping)
  return [float(log_probs[len(prompt) + n - 1, tok])
          for n, tok in enumerate(continuation)]


@pytest.mark.parametrize("warping", [None, scoring.Warping(0.7, 4, 0.9)])
def test_sequence_log_probs_match_per_sequence_reference(warping):
  model, params = _model()
  prompt_lists = [[8], [8, 1, 2, 3], [8, 5]]
  continuations = [[1, 2, 3, 4, 0], [6, 7, 0, 0, 0], [2, 2, 2, 2, 2]]
  lengths_new = [5, 2, 4]
  prompts, lengths = sampling.pad_prompts(prompt_lists, pad_id=0)
  tokens = np.array(continuations, np.int32)
  mask = np.arange(5)[None, :] < np.array(lengths_new)[:, None]
  score = jax.jit(functools.partial(scoring.sequence_log_probs, model),
                  static_argnames="warping")
  token_lp, lp = score(params, prompts, lengths, tokens, mask,
                       warping=warping)
  assert token_lp.shape == (3, 5) and lp.shape == (3,)
  for b in range(3):
    ref = _reference(model, params, prompt_lists[b],
                     continuations[b][:lengths_new[b]], warping)
    np.testing.assert_allclose(token_lp[b, :lengths_new[b]], ref, atol=1e-5)
    assert np.all(np.asarray(token_lp)[b, lengths_new[b]:] == 0)
    np.testing.assert_allclose(lp[b], sum(ref), atol=1e-5)
  # Tokens under a False mask do not matter.
  other = np.where(mask, tokens, 5)
  _, lp_other = score(params, prompts, lengths, other, mask, warping=warping)
  np.testing.assert_array_equal(lp_other, lp)


def test_gradient_flows_and_masked_tokens_get_none():
  model, params = _model()
  prompts, lengths = sampling.pad_prompts([[8, 1], [8]], pad_id=0)
  tokens = np.array([[3, 4, 5], [6, 7, 1]], np.int32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)

  def total(p, tokens):
    return scoring.sequence_log_probs(model, p, prompts, lengths, tokens,
                                      mask)[1].sum()

  total = jax.jit(total)
  grads = jax.jit(jax.grad(total))(params, tokens)
  emb = np.asarray(grads["wte"]["embedding"])
  assert np.all(np.isfinite(emb)) and np.any(emb != 0)
  # Finite difference along one direction agrees with the gradient.
  direction = jax.tree.map(jnp.ones_like, params)
  eps = 1e-3
  plus = total(jax.tree.map(lambda p, d: p + eps * d, params, direction),
               tokens)
  minus = total(jax.tree.map(lambda p, d: p - eps * d, params, direction),
                tokens)
  directional = sum(float(jnp.sum(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose((plus - minus) / (2 * eps), directional,
                             rtol=2e-2)


def test_too_long_is_a_value_error():
  model, params = _model()
  prompts, lengths = sampling.pad_prompts([[8] * 10], pad_id=0)
  tokens = np.zeros((1, 7), np.int32)
  with pytest.raises(ValueError, match=r"17 exceeds .*\(16\)"):
    scoring.sequence_log_probs(model, params, prompts, lengths, tokens,
                               tokens > 0)


def _top_p_support_by_sort(z, top_p):
  """NumPy reference: sort, keep the prefix with preceding mass < p, ties."""
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-z, kind="stable")
  before = np.cumsum(probs[order]) - probs[order]
  threshold = z[order][max(int(np.sum(before < top_p)), 1) - 1]
  return z >= threshold


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_bisection_matches_sorting_reference(top_p):
  rng = np.random.default_rng(int(top_p * 1000))
  # Rounded logits: many ties, some exactly at the cut-off.
  z = np.round(rng.normal(size=(40, 300)) * 2, 1).astype(np.float32)
  warped = np.asarray(scoring.warp_logits(jnp.asarray(z),
                                          scoring.Warping(top_p=top_p)))
  for row in range(z.shape[0]):
    expected = _top_p_support_by_sort(z[row].astype(np.float64), top_p)
    np.testing.assert_array_equal(np.isfinite(warped[row]), expected)


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (7, 1.0), (150, 1.0),
                                         (20, 0.6), (299, 0.95)])
def test_top_k_bisection_matches_sorting_reference(top_k, top_p):
  rng = np.random.default_rng(top_k)
  z = np.round(rng.normal(size=(40, 300)) * 2, 1).astype(np.float32)
  warped = np.asarray(scoring.warp_logits(
      jnp.asarray(z), scoring.Warping(top_k=top_k, top_p=top_p)))
  for row in range(z.shape[0]):
    kth = np.sort(z[row])[::-1][top_k - 1]
    expected = z[row] >= kth  # Ties at the k-th value are kept.
    if top_p < 1.0:
      masked = np.where(expected, z[row], -np.inf).astype(np.float64)
      expected = _top_p_support_by_sort(masked, top_p) & expected
    np.testing.assert_array_equal(np.isfinite(warped[row]), expected)
