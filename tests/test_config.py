"""Tests for fdiv_jax.run.config: defaults, feature specs and every validation error.

Each invalid case asserts that the `ConfigError` names its field
(``config.<field>: ...``) and, where there is a fixed set, the allowed values.
"""

import pytest

from fdiv_jax.run import config as config_lib
from fdiv_jax.targets import features

ConfigError = config_lib.ConfigError


def _valid():
  """A valid config that needs no checkpoint: a small random GPT-2."""
  c = config_lib.base_config()
  c.model.kind = "gpt2"
  c.target.features = ("word_list:words=love|life",)
  return c


def _toy():
  c = _valid()
  c.tokenizer = "toy"
  c.model.vocab_size = 4
  c.max_new_tokens = 3
  c.target.features = ("contains_tokens:token_ids=1",)
  return c


def _distributional(c=None):
  c = c or _valid()
  c.target.kind = "distributional"
  c.target.features = ("female",)
  c.target.moments = (0.5,)
  return c


def _reward(c=None):
  c = c or _valid()
  c.target.kind = "reward"
  c.target.features = ()
  c.target.reward = "sentiment"
  return c


def _set(c, field, value):
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return c


def test_valid_configs_pass():
  for c in (_valid(), _toy(), _distributional(), _reward()):
    assert config_lib.validate(c) is c


# (make config, field set, value, field named in the error, text in it)
CASES = [
    (_valid, "seed", -1, "seed", ">= 0"),
    (_valid, "num_steps", 0, "num_steps", ">= 1"),
    (_valid, "batch_size", 0, "batch_size", ">= 1"),
    (_valid, "checkpoint_every", 0, "checkpoint_every", ">= 1"),
    (_valid, "eval_batch_size", -3, "eval_batch_size", ">= 1"),
    (_valid, "max_new_tokens", 0, "max_new_tokens", ">= 1"),
    (_valid, "top_k", -1, "top_k", ">= 0"),
    (_valid, "divergence", "foo", "divergence", "js"),
    (_valid, "mode", "batch", "mode", "online, offline"),
    (_valid, "baseline", "foo", "baseline", "must be one of"),
    (_valid, "baseline_decay", 1.0, "baseline_decay", "[0, 1)"),
    (_valid, "ema_decay", -0.1, "ema_decay", "[0, 1)"),
    (_valid, "log_ratio_clip", -1.0, "log_ratio_clip", ">= 0"),
    (_valid, "proposal_update_metric", "kl", "proposal_update_metric",
     "forward_kl, reverse_kl, tv, js"),
    (_valid, "learning_rate", 0.0, "learning_rate", "> 0"),
    (_valid, "learning_rate", float("nan"), "learning_rate", "finite"),
    (_valid, "lr_schedule", "step", "lr_schedule", "constant, cosine, linear"),
    (_valid, "adam_b1", 1.0, "adam_b1", "[0, 1)"),
    (_valid, "weight_decay", -1e-3, "weight_decay", ">= 0"),
    (_valid, "max_grad_norm", -1.0, "max_grad_norm", ">= 0"),
    (_valid, "temperature", 0.0, "temperature", "> 0"),
    (_valid, "top_p", 0.0, "top_p", "(0, 1]"),
    (_valid, "mesh_data", 0, "mesh_data", "-1"),
    (_valid, "mesh_fsdp", 0, "mesh_fsdp", ">= 1"),
    # Model and tokenizer.
    (_valid, "model.kind", "t5", "model.kind", "pretrained, gpt2, lstm, hf"),
    (_valid, "model.n_layer", 0, "model.n_layer", ">= 1"),
    (_valid, "model.n_positions", -1, "model.n_positions", ">= 1"),
    (_valid, "model.dtype", "float16", "model.dtype", "float32, bfloat16"),
    (_valid, "model.n_head", 3, "model.n_head", "divide model.n_embd"),
    (_valid, "model.vocab_size", 100, "model.vocab_size", "byte tokenizer"),
    (_toy, "model.vocab_size", 30, "model.vocab_size", "[2, 27]"),
    (_valid, "tokenizer", "spm", "tokenizer", "byte, hf, toy"),
    (_valid, "tokenizer", "hf", "tokenizer", "model.kind='hf'"),
    # Prompts.
    (_valid, "prompts", ("ok", ""), "prompts", "non-empty string"),
    (_valid, "prompt_sampling", "shuffle", "prompt_sampling", "cycle, random"),
    (_toy, "prompts", ("aB",), "prompts", "letters a..z"),
    (_toy, "prompts", ("ad",), "prompts", "model.vocab_size"),
    # Target.
    (_valid, "target.kind", "ranking", "target.kind",
     "pointwise, distributional, reward"),
    (_valid, "target.features", (), "target.features", "word_list"),
    (_valid, "target.features", ("no_such_feature",), "target.features[0]",
     "valid names: " + ", ".join(features.names())),
    (_valid, "target.features", ("word_list:colour=red",), "target.features[0]",
     "colour"),
    (_valid, "target.features", ("word_list:words",), "target.features[0]",
     "key=value"),
    (_valid, "target.features", ("word_list",), "target.features[0]",
     "missing argument"),
    (_valid, "target.features", ("regex:pattern=(",), "target.features[0]",
     "invalid regular expression"),
    (_valid, "target.features", ("word_list:words=a", "sentiment"),
     "target.features[1]", "not boolean"),
    (_valid, "target.moments", (0.5,), "target.moments", "distributional"),
    (_valid, "target.lambdas", (1.0,), "target.lambdas", "distributional"),
    (_valid, "target.reward", "sentiment", "target.reward", "reward target"),
    (_distributional, "target.moments", (0.5, 0.5), "target.moments",
     "one target moment per feature (1)"),
    (_distributional, "target.moments", (1.5,), "target.moments",
     "range (0.0, 1.0)"),
    (_distributional, "target.moments", (1.0,), "target.moments",
     "pointwise constraint"),
    (_distributional, "target.lambdas", (1.0, 2.0), "target.lambdas",
     "1 finite numbers"),
    (_distributional, "target.fit_samples", 8, "target.fit_samples", ">= 16"),
    (_reward, "target.beta", -1.0, "target.beta", "> 0"),
    (_reward, "target.beta", 0.0, "target.beta", "> 0"),
    (_reward, "target.reward", "", "target.reward", "sentiment"),
    (_reward, "target.reward", "sentimental", "target.reward", "valid names"),
    (_reward, "target.features", ("female",), "target.features", "unused"),
    # Exact metrics.
    (_valid, "exact_metrics", True, "exact_metrics", "sequences"),
]


@pytest.mark.parametrize("make, field, value, named, text", CASES,
                         ids=[f"{c[1]}={c[2]!r}" for c in CASES])
def test_invalid_field_is_named(make, field, value, named, text):
  c = _set(make(), field, value)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert message.startswith(f"config.{named}: "), message
  assert text in message, message


def test_alpha_checked_only_for_alpha_divergence():
  c = _valid()
  c.alpha = 1.0
  config_lib.validate(c)
  c.divergence = "alpha"
  with pytest.raises(ConfigError, match=r"^config\.alpha: "):
    config_lib.validate(c)


def test_hf_model_needs_a_directory(tmp_path):
  c = _valid()
  c.model.kind = "hf"
  with pytest.raises(ConfigError, match=r"^config\.model\.path: .*local"):
    config_lib.validate(c)
  c.model.path = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"^config\.model\.path: .*not a dir"):
    config_lib.validate(c)
  c.model.path = str(tmp_path)
  c.tokenizer = "hf"
  with pytest.raises(ConfigError,
                     match=r"^config\.tokenizer: .*tokenizer\.json"):
    config_lib.validate(c)
  c.tokenizer = "toy"
  with pytest.raises(ConfigError, match=r"^config\.tokenizer: 'toy' needs"):
    config_lib.validate(c)


def test_pretrained_checkpoint_checked(tmp_path):
  c = _valid()
  c.model.kind = "pretrained"
  c.model.path = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"^config\.model\.path: .*not a dir"):
    config_lib.validate(c)
  c.model.path = str(tmp_path)
  with pytest.raises(ConfigError, match=r"^config\.model\.path: no pretrained"):
    config_lib.validate(c)
  (tmp_path / "config.json").write_text(
      '{"model_config": {"n_positions": 16}}')
  c.max_new_tokens = 15
  config_lib.validate(c)
  c.max_new_tokens = 16
  with pytest.raises(ConfigError, match=r"^config\.max_new_tokens: .*= 16"):
    config_lib.validate(c)
  c.max_new_tokens = 8
  c.tokenizer = "toy"
  with pytest.raises(ConfigError, match=r"^config\.tokenizer: .*byte-level"):
    config_lib.validate(c)
  c.tokenizer = "byte"
  c.exact_metrics = True
  with pytest.raises(ConfigError, match=r"^config\.exact_metrics: .*toy"):
    config_lib.validate(c)


def test_sequence_longer_than_positions_names_both_lengths():
  c = _valid()
  c.model.n_positions = 20
  c.prompts = ("hello world",)       # BOS + 11 bytes = 12 tokens.
  c.max_new_tokens = 8
  config_lib.validate(c)
  c.max_new_tokens = 9
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert message.startswith("config.max_new_tokens: ")
  assert "prompt length 12" in message and "max_new_tokens 9" in message
  assert "model.n_positions = 20" in message


def test_lstm_has_no_position_limit():
  c = _valid()
  c.model.kind = "lstm"
  c.max_new_tokens = 10_000
  config_lib.validate(c)


def test_exact_metrics_needs_unconditional_small_space():
  c = _toy()
  c.exact_metrics = True
  config_lib.validate(c)
  c.prompts = ("a",)
  with pytest.raises(ConfigError, match=r"^config\.exact_metrics: .*uncond"):
    config_lib.validate(c)
  c.prompts = ()
  c.max_new_tokens = 20
  with pytest.raises(ConfigError, match=r"^config\.exact_metrics: .*sequences"):
    config_lib.validate(c)


def test_fixed_lambdas_skip_fit_samples_check():
  c = _distributional()
  c.target.lambdas = (1.5,)
  c.target.fit_samples = 0
  config_lib.validate(c)


def test_parse_feature_spec():
  parse = config_lib.parse_feature_spec
  assert parse("sentiment") == {"name": "sentiment"}
  assert parse("word_list:words=love|life,label=ll") == {
      "name": "word_list", "words": ("love", "life"), "label": "ll"}
  assert parse("contains_tokens:token_ids=1") == {
      "name": "contains_tokens", "token_ids": 1}
  assert parse("offensive:threshold=None") == {"name": "offensive",
                                               "threshold": None}
  assert parse({"name": "regex", "pattern": "a{1,3}"}) == {
      "name": "regex", "pattern": "a{1,3}"}
  for bad in ("", "word_list:words", {"words": "x"}, 3):
    with pytest.raises(ValueError):
      parse(bad)


def test_exact_support_size_matches_enumeration():
  # V = 4, N = 3: 1 + 3 + 9 sequences with EOS, 27 capped.
  assert config_lib.exact_support_size(4, 3) == 40


def test_sized():
  c = config_lib.sized(_valid(), "tiny")
  assert (c.num_steps, c.batch_size, c.model.n_embd) == (3, 4, 16)
  config_lib.validate(c)
  assert config_lib.sized(_valid(), "").num_steps == 200
  with pytest.raises(ValueError, match="default, tiny"):
    config_lib.sized(_valid(), "huge")
