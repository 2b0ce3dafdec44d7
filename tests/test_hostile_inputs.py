"""Hostile inputs: each is a named error (or a skipped and counted update),
never a traceback from deep inside a library or a silently wrong run.

  - a tokenizer.json cut short, or with more ids than the embedding has rows;
  - a model.safetensors cut short (or a corrupt shard index);
  - a config.json of a model family the importer does not know;
  - a prompts file with invalid UTF-8 or an empty line (`prompts.read_prompts`);
  - a reward that is NaN or -inf for some samples;
  - a checkpoint written by another config (another divergence, another model
    size): `CheckpointError` on resume, nothing deleted;
  - a config override of the wrong type on the command line.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_task
from test_crash import compilation_cache, files_of  # noqa: F401  (a fixture)
from fdiv_jax import targets
from fdiv_jax.lm import models
from fdiv_jax.lm.models import hf_export
from fdiv_jax.run import config as config_lib
from fdiv_jax.run import prompts as prompts_lib
from fdiv_jax.run import tasks
from fdiv_jax.targets import features
from fdiv_jax.train import checkpoint
from fdiv_jax.train import loop as loop_lib
from fdiv_jax.train import sharding
from fdiv_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<|endoftext|>", "def", "f", "(", ")", ":", "return", "x", "#"]


def write_tokenizer(path, words):
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="#"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture
def hf_dir(tmp_path):
  """A tiny Hugging Face GPT-2 directory (no PyTorch): 9 embedding rows and a
  9-word tokenizer.json."""
  path = tmp_path / "gpt2"
  config = models.GPT2Config(vocab_size=len(WORDS), n_positions=16, n_layer=1,
                             n_head=2, n_embd=8)
  model = models.GPT2LM(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  hf_export.save_hf_checkpoint(model, params, str(path))
  write_tokenizer(str(path), WORDS)
  return path


def hf_config(path):
  c = config_lib.tiny(config_lib.base_config())
  c.model.kind = "hf"
  c.model.path = str(path)
  c.tokenizer = "hf"
  c.max_new_tokens = 4
  c.target.kind = "pointwise"
  c.target.features = ("contains_tokens:token_ids=1",)
  return c


def test_the_hf_directory_builds(hf_dir):
  task = tasks.build(tasks.describe(hf_config(hf_dir)))
  assert task.tokenizer.vocab_size == task.model.vocab_size == len(WORDS)


def test_a_truncated_tokenizer_json_is_a_config_error_naming_it(hf_dir):
  path = hf_dir / "tokenizer.json"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(config_lib.ConfigError,
                     match=rf"^config\.tokenizer: {path}: not a readable "
                           r"tokenizer\.json \(truncated or corrupt\?\)"):
    tasks.describe(hf_config(hf_dir))


def test_a_tokenizer_with_more_ids_than_embedding_rows_is_a_config_error(hf_dir):
  write_tokenizer(str(hf_dir), WORDS + ["extra", "words"])
  spec = tasks.describe(hf_config(hf_dir))
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.tokenizer: the tokenizer has 11 ids but the "
                           r"model only 9"):
    tasks.build(spec)


@pytest.mark.parametrize("keep", [0.5, 0.999, 8 / 5766, 0.0])
def test_a_truncated_safetensors_file_is_a_named_error(hf_dir, keep):
  path = hf_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(ValueError, match=rf"^{path}: not a readable safetensors "
                                       r"file, cut short or corrupt"):
    models.load_hf_checkpoint(str(hf_dir))
  # Through the main job's builder: the field that names the directory.
  spec = tasks.describe(hf_config(hf_dir))
  with pytest.raises(config_lib.ConfigError,
                     match=rf"^config\.model\.path: {path}: not a readable"):
    tasks.build(spec)


def test_a_corrupt_shard_index_is_a_named_error(hf_dir):
  (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00001.safetensors")
  index = hf_dir / "model.safetensors.index.json"
  index.write_text('{"metadata": {}, "weight_')
  with pytest.raises(ValueError, match=rf"^{index}: not a readable safetensors "
                                       r"index"):
    models.load_hf_checkpoint(str(hf_dir))


def test_a_config_json_of_another_family_is_a_named_error(hf_dir):
  config_path = hf_dir / "config.json"
  hf = json.loads(config_path.read_text())
  hf.update(model_type="bert", architectures=["BertForMaskedLM"])
  config_path.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=rf"^{config_path}: Checkpoint architecture "
                                       r"'bert' .*is not supported: model_type "
                                       r"must be one of gpt2, llama"):
    models.load_hf_checkpoint(str(hf_dir))


# --------------------------------------------------------------------------
# Prompts files.
# --------------------------------------------------------------------------


def test_read_prompts_reads_one_prompt_per_line(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_bytes("\ufeffdef f(x):\r\n  return x\nÉté\nlast".encode())
  assert prompts_lib.read_prompts(str(path)) == ("def f(x):", "  return x", "Été",
                                                 "last")


@pytest.mark.parametrize("content,line,message", [
    (b"good\n\xff\xfe bad\n", 2, "invalid UTF-8"),
    (b"good\n\xc3\n", 2, "invalid UTF-8"),             # a cut multi-byte char
    (b"first\n\nthird\n", 2, "empty line"),
    (b"first\n \t \n", 2, "empty line"),               # whitespace only
    (b"\n", 1, "empty line"),
    (b"a\x00b\n", 1, "holds a NUL character"),
])
def test_read_prompts_names_the_file_and_line(content, line, message, tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf"^{path}:{line}: {message}"):
    prompts_lib.read_prompts(str(path))


def test_read_prompts_refuses_an_empty_or_missing_file(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match=rf"prompts file {empty}: holds no prompt"):
    prompts_lib.read_prompts(str(empty))
  with pytest.raises(ValueError, match=rf"prompts file {tmp_path}/missing.txt: "
                                       r"cannot be read \(No such file"):
    prompts_lib.read_prompts(str(tmp_path / "missing.txt"))


# --------------------------------------------------------------------------
# Rewards that are not finite for some samples.
# --------------------------------------------------------------------------


def partly(value):
  """Reward 1 for samples with token 1, `value` for those with token 2 (but not
  1), 0 for the others: `value` hits some samples of every batch."""
  def fn(tokens, mask, context=None):
    del context
    has = lambda k: jnp.any((tokens == k) & mask, axis=-1)
    return jnp.where(has(1), 1.0, jnp.where(has(2), value, 0.0))
  return features.Feature("partly", fn)


def run_steps(task, config, num_steps):
  mesh = sharding.make_mesh()
  state = sharding.shard_state(toy_task.create_state(config, task), mesh)
  step_fn = sharding.jit_train_step(
      step_lib.make_train_step(config.step, task.model, task.target, task.sampler),
      state, mesh)
  batch = task.batch(0, config.batch_size)
  history = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def assert_state_finite(state, before_params=None):
  assert np.all(np.isfinite(np.asarray(state.log_partition.log_z)))
  assert np.all(np.isfinite(np.asarray(state.baseline_state.values)))
  for leaf in jax.tree.leaves(jax.device_get(state.params)):
    assert np.all(np.isfinite(leaf))
  if before_params is not None:
    jax.tree.map(np.testing.assert_array_equal, before_params,
                 jax.device_get(state.params))


def test_a_reward_nan_for_some_samples_skips_and_counts_the_update():
  config = toy_task.toy_config()
  task = toy_task.ToyTask(config, targets.RewardTarget(partly(jnp.nan), beta=1.0))
  state, history = run_steps(task, config, 3)
  # Every batch holds such samples: every update is skipped, and counted.
  assert [int(m["skipped_updates"]) for m in history] == [1, 2, 3]
  # The policy is untouched; the running Ẑ (from the finite samples) and the
  # baseline stay finite.
  assert_state_finite(state, before_params=jax.device_get(task.params))
  assert float(state.log_partition.count[0]) > 0


def test_a_reward_minus_inf_for_some_samples_is_p_equal_zero_there():
  """r = -inf is P(x) = 0, a hard zero of the target like a failed
  constraint: the updates go on, and everything stays finite."""
  config = toy_task.toy_config()
  task = toy_task.ToyTask(config, targets.RewardTarget(partly(-jnp.inf), beta=1.0))
  state, history = run_steps(task, config, 3)
  assert [int(m["skipped_updates"]) for m in history] == [0, 0, 0]
  assert all(np.isfinite(m["loss"]) for m in history)
  assert_state_finite(state)


# --------------------------------------------------------------------------
# A checkpoint written by another config.
# --------------------------------------------------------------------------


class WiderToyTask(toy_task.ToyTask):
  """The toy task with twice the model width."""

  def __post_init__(self):
    super().__post_init__()
    self.model = models.GPT2LM(models.GPT2Config(
        vocab_size=toy_task.VOCAB, n_positions=8, n_layer=1, n_head=2, n_embd=32))
    self.params = self.base_params = self.model.init(
        jax.random.PRNGKey(self.seed), jnp.zeros((1, 4), jnp.int32))["params"]


def train(workdir, num_steps, task_cls=toy_task.ToyTask, **overrides):
  config = toy_task.toy_config(checkpoint_every=2, **overrides)
  task = task_cls(config, toy_task.toy_target("reward"))
  return loop_lib.train(task, str(workdir), loop=config.loop, step=config.step,
                        optimizer=config.optimizer, num_steps=num_steps)


def test_a_checkpoint_of_another_config_is_refused_and_kept(tmp_path):
  train(tmp_path, 2, divergence="js")
  before = files_of(tmp_path / "checkpoints")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"Checkpoint step 2 in .* was written by a different "
                           r"run: divergence 'js' there, 'forward_kl' here\. "
                           r"Nothing was deleted"):
    train(tmp_path, 4, divergence="forward_kl")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"different run: params '[\d,]+ values in 16 arrays' "
                           r"there, '[\d,]+ values in 16 arrays' here"):
    train(tmp_path, 4, task_cls=WiderToyTask, divergence="js")
  assert files_of(tmp_path / "checkpoints") == before
  # The run it belongs to still resumes from it.
  assert train(tmp_path, 3, divergence="js").resumed_from == 2


# --------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------


def test_an_override_of_the_wrong_type_is_absls_error(tmp_path, subprocess_env):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  before = files_of(workdir)
  out = subprocess.run(
      [sys.executable, "-m", "fdiv_jax.main", "--config=configs/toy_exact.py",
       f"--workdir={workdir}", "--config.num_steps=abc"],
      cwd=ROOT, capture_output=True, text=True, env=subprocess_env, timeout=600,
      check=False)
  assert out.returncode == 1      # absl's exit code for a flag it cannot parse
  assert "FATAL Flags parsing error" in out.stderr, out.stderr[-2000:]
  assert "num_steps" in out.stderr and "abc" in out.stderr, out.stderr[-2000:]
  assert files_of(workdir) == before
