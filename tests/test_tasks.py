"""Tests for fdiv_jax.run.tasks: `describe` then `build` on every config in
configs/ (tiny sizes, no training), batches, λ fitting, exact-metric support and
build-time errors.

Configs on the shipped pretrained model are built on it when the checkpoint is
there, else on a tiny random GPT-2 (same target and prompts).
"""

import importlib.util
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax import targets
from fdiv_jax.core import divergences
from fdiv_jax.lm import enumeration
from fdiv_jax.lm import models
from fdiv_jax.lm import pretrain
from fdiv_jax.lm import sampling
from fdiv_jax.lm import tokenization
from fdiv_jax.run import config as config_lib
from fdiv_jax.run import tasks
from fdiv_jax.train import state as state_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")
CONFIG_NAMES = ("quickstart", "pointwise_word", "distributional_balance",
                "sentiment_rlhf", "code_compilable", "toy_exact")
# Trained from preference data or a learned reward (which needs a trained
# reward model): run end to end by tests/test_preference_train.py.
PREFERENCE_CONFIG_NAMES = ("preference_pairs", "preference_lists",
                           "rlhf_learned_reward")


def load_config(name: str, size: str = "tiny"):
  """`configs/<name>.py`'s get_config(size), loaded as config_flags does."""
  spec = importlib.util.spec_from_file_location(
      f"config_{name}", os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(size)


def tiny_config(name: str):
  return load_config(name)


def build(config):
  """The task of `config`, through the typed run description."""
  return tasks.build(tasks.describe(config))


def test_every_config_file_is_tested():
  found = {f[:-3] for f in os.listdir(CONFIG_DIR)
           if f.endswith(".py") and not f.startswith("_")}
  assert found == set(CONFIG_NAMES) | set(PREFERENCE_CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_defaults(name):
  c = load_config(name, "")
  assert c.divergence in divergences.accepted_names()
  for field in ("num_steps", "batch_size", "learning_rate", "seed",
                "checkpoint_every"):
    assert field in c
  tasks.describe(c)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_build_tiny(name):
  c = tiny_config(name)
  task = build(c)
  tok = task.tokenizer
  # Sampler: the proposal's settings with the tokenizer's special ids.
  assert task.sampler == sampling.SamplerConfig(
      max_new_tokens=c.max_new_tokens, temperature=c.temperature,
      top_k=c.top_k, top_p=c.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id)
  # Policy starts at the base model, in separate buffers.
  for p, b in zip(jax.tree.leaves(task.params),
                  jax.tree.leaves(task.base_params)):
    assert p is not b
    np.testing.assert_array_equal(p, b)
  assert task.target.feature_names
  # Prompts and contexts.
  conditional = bool(c.prompts)
  assert task.prompts.is_conditional == conditional
  assert isinstance(task.target, targets.ConditionalTarget) == conditional
  assert task.num_contexts == (len(c.prompts) if conditional else 1)
  assert task.prompts.texts == tuple(c.prompts)
  assert task.prompts.tokens.shape[0] == task.num_contexts
  for i, length in enumerate(task.prompts.lengths):
    row = task.prompts.tokens[i, -length:]
    assert row[0] == tok.bos_id
    if conditional:
      assert tok.decode(row[1:].tolist()) == c.prompts[i]
  if task.model.max_positions is not None:
    assert (task.prompts.tokens.shape[1] + c.max_new_tokens
            <= task.model.max_positions)
  # Batches: static shapes, deterministic in (seed, step).
  batch = task.batch(3, c.batch_size)
  assert isinstance(batch, state_lib.Batch)
  assert batch.prompts.shape == (c.batch_size, task.prompts.tokens.shape[1])
  assert batch.prompts.dtype == np.int32
  assert batch.prompt_lengths.shape == batch.context_ids.shape == (
      c.batch_size,)
  again = task.batch(3, c.batch_size)
  for x, y in zip(jax.tree.leaves(batch), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(batch.prompts,
                                task.prompts.tokens[batch.context_ids])
  if not conditional:
    np.testing.assert_array_equal(batch.context_ids, 0)
    np.testing.assert_array_equal(batch.prompts, tok.bos_id)
  # The target scores continuations given the batch's context.
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, tok.vocab_size, (c.batch_size, c.max_new_tokens))
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  context = {"prompts": batch.prompts, "prompt_lengths": batch.prompt_lengths}
  log_p = task.target.log_prob(tokens, mask, jnp.zeros(c.batch_size), context)
  assert log_p.shape == (c.batch_size,)
  assert not np.any(np.isnan(np.asarray(log_p)))
  assert (task.support is not None) == bool(c.exact_metrics)


def test_quickstart_uses_the_shipped_model():
  task = build(load_config("quickstart"))
  assert type(task.tokenizer).__name__ == "ByteTokenizer"
  assert task.model.vocab_size >= task.tokenizer.vocab_size


def test_cycled_contexts_cover_every_prompt():
  c = tiny_config("code_compilable")
  task = build(c)
  num = task.num_contexts
  ids = np.concatenate([task.batch(s, 3).context_ids for s in range(num)])
  np.testing.assert_array_equal(np.bincount(ids, minlength=num), 3)
  np.testing.assert_array_equal(task.batch(0, num).context_ids, np.arange(num))


def test_random_contexts_are_seeded_by_step():
  c = tiny_config("code_compilable")
  c.prompt_sampling = "random"
  task = build(c)
  a, b = task.batch(5, 64).context_ids, task.batch(6, 64).context_ids
  np.testing.assert_array_equal(a, task.batch(5, 64).context_ids)
  assert not np.array_equal(a, b)
  assert 0 <= a.min() and a.max() < task.num_contexts
  c.seed = 1
  assert not np.array_equal(a, build(c).batch(5, 64).context_ids)


def test_toy_exact_support_and_metrics():
  task = build(load_config("toy_exact"))
  assert task.support.tokens.shape == (40, 3)
  np.testing.assert_array_equal(task.prompts.tokens[0, -1:], [0])
  assert task.tokenizer.batch_decode(np.array([[1, 2, 0]]),
                                     np.array([[1, 1, 1]], bool)) == ["ab"]
  m = task.exact(task.params)
  assert abs(m.kl_from_base) < 1e-5            # π = a at the start.
  assert all(np.isfinite(v) for v in m.divergences.values())
  assert m.target_alignment > m.alignment       # p favours token 1.


def _toy_distributional(moment=0.6, fit_samples=2048):
  c = load_config("toy_exact")
  c.target.kind = "distributional"
  c.target.reward = ""
  c.target.features = ("contains_tokens:token_ids=1",)
  c.target.moments = (moment,)
  c.target.fit_samples = fit_samples
  c.eval_batch_size = 512
  return c


def test_lambda_fit_matches_exact_moment():
  task = build(_toy_distributional())
  fit = task.lambda_fit
  assert fit.converged and fit.num_samples == 2048
  assert task.target.lambdas == pytest.approx(tuple(fit.lambdas))
  # E_p[φ] under p ∝ a·exp(λφ), by enumeration of the 40 sequences.
  support = task.support
  log_a = enumeration.log_probs(task.model, task.base_params,
                                task.prompts.tokens[0, -1:], support)
  phi = task.target.feature_values(jnp.asarray(support.tokens),
                                   jnp.asarray(support.mask))[:, 0]
  p = jax.nn.softmax(log_a + fit.lambdas[0] * phi)
  base_moment = float(jnp.sum(jnp.exp(log_a) * phi))
  assert base_moment < 0.6 and fit.lambdas[0] > 0
  assert float(jnp.sum(p * phi)) == pytest.approx(0.6, abs=0.05)


def test_fixed_lambdas_skip_the_fit():
  c = _toy_distributional()
  c.target.lambdas = (0.7,)
  task = build(c)
  assert task.lambda_fit is None and task.target.lambdas == (0.7,)


def test_unreachable_moment_names_the_field():
  c = tiny_config("pointwise_word")
  c.model.kind = "gpt2"
  config_lib.tiny(c)
  c.target.kind = "distributional"
  c.target.features = ("word_list:words=zzzqqq",)   # Never sampled.
  c.target.moments = (0.5,)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", targets.LambdaFitWarning)
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config\.target\.moments: .*fit_samples"):
      build(c)


def test_too_long_sequences_fail_at_build():
  c = tiny_config("code_compilable")
  c.model.kind = "gpt2"
  c.model.n_positions = 24
  with pytest.raises(config_lib.ConfigError) as e:
    build(c)
  assert str(e.value).startswith("config.max_new_tokens: ")
  assert "n_positions = 24" in str(e.value)


def test_lstm_builds():
  c = tiny_config("sentiment_rlhf")
  c.model.kind = "lstm"
  c.max_new_tokens = 300                         # No position limit.
  task = build(c)
  assert task.model.max_positions is None


def _write_hf_checkpoint(path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  words = ["<|endoftext|>", "def", "f", "(", ")", ":", "return", "x", "#"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="#"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(path, "tokenizer.json"))
  torch.manual_seed(0)
  # The EOS id of generation_config.json must be an id of the tokenizer (the
  # GPT2Config default, 50256, is not one of these 9).
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=len(words), n_positions=12, n_embd=16, n_layer=1, n_head=2,
      bos_token_id=0, eos_token_id=0))
  model.save_pretrained(path)


def test_hf_model_and_tokenizer(tmp_path):
  _write_hf_checkpoint(str(tmp_path))
  c = load_config("code_compilable")
  c.model.kind = "hf"
  c.model.path = str(tmp_path)
  c.tokenizer = "hf"
  c.prompts = ("def f ( x ) :", "return x")
  c.max_new_tokens = 6                     # 1 + 6 prompt tokens + 6 > 12.
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.max_new_tokens: prompt length 7"):
    build(c)
  c.max_new_tokens = 5
  task = build(c)
  assert task.tokenizer.eos_id == task.tokenizer.bos_id == 0
  np.testing.assert_array_equal(task.prompts.tokens[1], [0, 0, 0, 0, 0, 6, 7])
  assert task.num_contexts == 2


def test_pretrained_kind_loads_a_checkpoint_directory(tmp_path):
  tok = tokenization.ByteTokenizer()
  config = models.GPT2Config(vocab_size=tok.vocab_size, n_positions=16,
                             n_layer=1, n_head=2, n_embd=16)
  params = models.GPT2LM(config).init(jax.random.key(0),
                                      jnp.zeros((1, 1), jnp.int32))["params"]
  pretrain.save_pretrained(str(tmp_path), config, params, tok)
  c = load_config("quickstart")
  c.model.path = str(tmp_path)
  task = build(c)
  assert task.model.config == config
  assert isinstance(task.tokenizer, tokenization.ByteTokenizer)
  np.testing.assert_array_equal(jax.tree.leaves(task.base_params)[0],
                                jax.tree.leaves(params)[0])
  c.max_new_tokens = 16                         # BOS + 16 > 16 positions.
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.max_new_tokens: .*n_positions = 16"):
    build(c)
