"""Bradley–Terry reward model on synthetic preferences from a known reward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax import targets
from fdiv_jax.lm import models
from fdiv_jax.targets import reward_model as rm

V, N = 8, 10


class TinyBackbone(nn.Module):
  """Causal mean of token embeddings, with the LM call signature."""

  @nn.compact
  def __call__(self, tokens, return_hidden=False):
    emb = nn.Embed(V, 16)(tokens)
    hidden = jnp.cumsum(emb, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[:, None]
    logits = nn.Dense(V)(hidden)
    return (logits, hidden) if return_hidden else logits


def gpt2_backbone():
  return models.GPT2LM(models.GPT2Config(vocab_size=V, n_positions=N, n_layer=1,
                                         n_head=2, n_embd=32))


def true_reward(tokens, mask):
  """(#3 − #5) / |x|: the known reward the preferences come from."""
  n = mask.sum(-1)
  return (((tokens == 3) & mask).sum(-1) - ((tokens == 5) & mask).sum(-1)) / n


def sequences(rng, n):
  tokens = rng.integers(0, V, size=(n, N)).astype(np.int32)
  lengths = rng.integers(4, N + 1, size=n)
  mask = np.arange(N)[None, :] < lengths[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask


def preference_pairs(seed, n):
  """Pairs ordered by the true reward (ties dropped)."""
  rng = np.random.default_rng(seed)
  (t1, m1), (t2, m2) = sequences(rng, n), sequences(rng, n)
  r1, r2 = true_reward(t1, m1), true_reward(t2, m2)
  keep = r1 != r2
  first = (r1 > r2)[:, None]
  return {
      "chosen_tokens": np.where(first, t1, t2)[keep],
      "chosen_mask": np.where(first, m1, m2)[keep],
      "rejected_tokens": np.where(first, t2, t1)[keep],
      "rejected_mask": np.where(first, m2, m1)[keep],
  }


def test_bradley_terry_loss_and_last_position():
  r_c = jnp.array([2.0, -1.0, 0.0])
  r_r = jnp.array([0.0, 1.0, 0.0])
  expected = -np.mean(np.log(1 / (1 + np.exp(-(np.array(r_c) - np.array(r_r))))))
  np.testing.assert_allclose(rm.bradley_terry_loss(r_c, r_r), expected,
                             rtol=1e-6)
  # Large margins stay finite (log-sigmoid form).
  assert np.isfinite(rm.bradley_terry_loss(jnp.array([-1e4]), jnp.array([1e4])))
  np.testing.assert_allclose(rm.preference_accuracy(r_c, r_r), 1 / 3)
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]],
                   bool)
  np.testing.assert_array_equal(rm.last_position(mask), [1, 3, 3, 0])


@pytest.mark.parametrize("backbone", ["tiny", "gpt2"])
def test_learned_reward_orders_held_out_pairs(backbone):
  model = rm.RewardModel(TinyBackbone() if backbone == "tiny"
                         else gpt2_backbone())
  train_data = preference_pairs(0, 2000)
  test_data = preference_pairs(1, 600)
  params, history = rm.train(jax.random.PRNGKey(0), model, train_data,
                             num_steps=400, batch_size=64,
                             learning_rate=3e-3)
  assert history[-1]["loss"] < history[0]["loss"]
  r_c = model.apply({"params": params}, test_data["chosen_tokens"],
                    test_data["chosen_mask"])
  r_r = model.apply({"params": params}, test_data["rejected_tokens"],
                    test_data["rejected_mask"])
  accuracy = float(rm.preference_accuracy(r_c, r_r))
  print(f"BT held-out accuracy ({backbone}): {accuracy:.3f} on "
        f"{r_c.shape[0]} pairs")
  assert accuracy >= 0.9
  # As r(x) of a reward target.
  feat = rm.reward_feature(model, params)
  target = targets.RewardTarget(feat, beta=0.5)
  log_base = jnp.zeros(r_c.shape)
  log_p = jax.jit(target.log_prob)(test_data["chosen_tokens"],
                                   test_data["chosen_mask"], log_base)
  np.testing.assert_allclose(log_p, r_c / 0.5, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_reward():
  model = rm.RewardModel(gpt2_backbone())
  data = preference_pairs(2, 8)
  params = rm.init_params(jax.random.PRNGKey(1), model, data["chosen_tokens"],
                          data["chosen_mask"])
  params = jax.tree.map(lambda x: x + 0.1, params)  # Non-zero head.
  tokens, mask = data["chosen_tokens"], data["chosen_mask"]
  garbage = np.where(mask, tokens, 7).astype(np.int32)
  np.testing.assert_allclose(model.apply({"params": params}, tokens, mask),
                             model.apply({"params": params}, garbage, mask),
                             rtol=1e-5, atol=1e-6)


def test_bad_preference_data_names_the_field():
  model = rm.RewardModel(TinyBackbone())
  data = preference_pairs(0, 10)
  del data["rejected_mask"]
  with pytest.raises(ValueError, match="'rejected_mask'"):
    rm.train(jax.random.PRNGKey(0), model, data, num_steps=1, batch_size=2)
  data = preference_pairs(0, 10)
  data["chosen_mask"] = data["chosen_mask"][:, :3]
  with pytest.raises(ValueError, match="chosen_tokens.*chosen_mask"):
    rm.train(jax.random.PRNGKey(0), model, data, num_steps=1, batch_size=2)
