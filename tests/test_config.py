"""The config becomes typed objects once (`tasks.describe`): every validation error.

Each invalid case asserts that the `ConfigError` names its field
(``config.<field>: ...``) and, where there is a fixed set, the allowed values.
The checks themselves live in the constructors of the typed objects; these
tests pin that each one reaches the user under the config field's name.
"""

import jax
import pytest

from fdiv_jax import targets
from fdiv_jax.core import baselines, divergences
from fdiv_jax.lm import models, sampling
from fdiv_jax.run import config as config_lib
from fdiv_jax.run import tasks
from fdiv_jax.targets import features
from fdiv_jax.train import loop as loop_lib
from fdiv_jax.train import optimizer as optimizer_lib
from fdiv_jax.train import step as step_lib

ConfigError = config_lib.ConfigError
describe = tasks.describe


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
    assert isinstance(describe(c), tasks.RunSpec)


def test_describe_gives_typed_objects():
  c = _valid()
  c.divergence = "hellinger"
  c.temperature = 0.7
  c.baseline = "ema"
  c.log_ratio_clip = 0.0
  spec = describe(c)
  assert isinstance(spec.loop, loop_lib.LoopConfig)
  assert isinstance(spec.optimizer, optimizer_lib.OptimizerConfig)
  assert isinstance(spec.step, step_lib.StepConfig)
  assert spec.step.divergence == divergences.get("hellinger")
  assert spec.step.baseline == baselines.Baseline("ema", 10, 0.9)
  assert spec.step.log_ratio_clip is None        # 0 in the config = default
  assert isinstance(spec.model, models.ModelSpec)
  assert isinstance(spec.target, targets.TargetSpec)
  assert spec.sampler == sampling.SamplerConfig(
      max_new_tokens=32, temperature=0.7, eos_id=spec.tokenizer.eos_id,
      pad_id=spec.tokenizer.pad_id)
  assert spec.sampler.untempered().temperature == 1.0
  assert spec.optimizer.num_steps == spec.loop.num_steps == 200


@pytest.mark.parametrize("name", divergences.accepted_names())
def test_every_name_the_registry_accepts_is_accepted(name):
  c = _valid()
  c.divergence = name
  spec = describe(c)
  assert spec.step.divergence == divergences.get(
      name, **({"alpha": c.alpha} if divergences.ALIASES.get(name, name) == "alpha"
               else {}))


def test_mesh_larger_than_the_devices_is_a_config_error():
  c = _valid()
  c.mesh_data = 2 * jax.device_count()
  with pytest.raises(ConfigError, match=r"^config\.mesh_data: .*devices; "
                     rf"{jax.device_count()} available"):
    describe(c)
  c.mesh_data, c.mesh_fsdp = -1, jax.device_count() + 1
  with pytest.raises(ConfigError, match=r"^config\.mesh_fsdp: .*does not divide"):
    describe(c)


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
    (_valid, "baseline", "foo", "baseline", "valid kinds: none, moving_average"),
    (_valid, "baseline_decay", 1.0, "baseline_decay", "[0, 1)"),
    (_valid, "ema_decay", -0.1, "ema_decay", "[0, 1)"),
    (_valid, "log_ratio_clip", -1.0, "log_ratio_clip", "> 0"),
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
    (_valid, "model.n_head", 3, "model.n_head", "divide n_embd"),
    (_valid, "model.vocab_size", 100, "model.vocab_size", "byte tokenizer"),
    (_toy, "model.vocab_size", 30, "model.vocab_size", "[2, 27]"),
    (_valid, "tokenizer", "spm", "tokenizer", "byte, hf, toy"),
    (_valid, "tokenizer", "hf", "tokenizer", "kind='hf'"),
    # Prompts.
    (_valid, "prompts", ("ok", ""), "prompts", "non-empty string"),
    (_valid, "prompt_sampling", "shuffle", "prompt_sampling", "cycle, random"),
    (_toy, "prompts", ("aB",), "prompts", "letters a..z"),
    (_toy, "prompts", ("ad",), "prompts", "vocab_size 4"),
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
    describe(c)
  message = str(e.value)
  assert message.startswith(f"config.{named}: "), message
  assert text in message, message


def test_alpha_checked_only_for_alpha_divergence():
  c = _valid()
  c.alpha = 1.0
  describe(c)
  c.divergence = "alpha"
  with pytest.raises(ConfigError, match=r"^config\.alpha: "):
    describe(c)


def test_hf_model_needs_a_directory(tmp_path):
  c = _valid()
  c.model.kind = "hf"
  with pytest.raises(ConfigError, match=r"^config\.model\.path: .*local"):
    describe(c)
  c.model.path = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"^config\.model\.path: .*not a dir"):
    describe(c)
  c.model.path = str(tmp_path)
  c.tokenizer = "hf"
  with pytest.raises(ConfigError,
                     match=r"^config\.tokenizer: .*tokenizer\.json"):
    describe(c)
  c.tokenizer = "toy"
  with pytest.raises(ConfigError, match=r"^config\.tokenizer: 'toy' needs"):
    describe(c)


def test_pretrained_checkpoint_checked(tmp_path):
  c = _valid()
  c.model.kind = "pretrained"
  c.model.path = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"^config\.model\.path: .*not a dir"):
    describe(c)
  c.model.path = str(tmp_path)
  with pytest.raises(ConfigError, match=r"^config\.model\.path: no pretrained"):
    describe(c)
  (tmp_path / "config.json").write_text(
      '{"model_config": {"n_positions": 16}}')
  c.max_new_tokens = 15
  describe(c)
  c.max_new_tokens = 16
  with pytest.raises(ConfigError, match=r"^config\.max_new_tokens: .*= 16"):
    describe(c)
  c.max_new_tokens = 8
  c.tokenizer = "toy"
  with pytest.raises(ConfigError, match=r"^config\.tokenizer: .*byte-level"):
    describe(c)
  c.tokenizer = "byte"
  c.exact_metrics = True
  with pytest.raises(ConfigError, match=r"^config\.exact_metrics: .*toy"):
    describe(c)


def test_sequence_longer_than_positions_names_both_lengths():
  c = _valid()
  c.model.n_positions = 20
  c.prompts = ("hello world",)       # BOS + 11 bytes = 12 tokens.
  c.max_new_tokens = 8
  describe(c)
  c.max_new_tokens = 9
  with pytest.raises(ConfigError) as e:
    describe(c)
  message = str(e.value)
  assert message.startswith("config.max_new_tokens: ")
  assert "prompt length 12" in message and "max_new_tokens 9" in message
  assert "n_positions = 20" in message


def test_lstm_has_no_position_limit():
  c = _valid()
  c.model.kind = "lstm"
  c.max_new_tokens = 10_000
  describe(c)


def test_exact_metrics_needs_unconditional_small_space():
  c = _toy()
  c.exact_metrics = True
  describe(c)
  c.prompts = ("a",)
  with pytest.raises(ConfigError, match=r"^config\.exact_metrics: .*uncond"):
    describe(c)
  c.prompts = ()
  c.max_new_tokens = 20
  with pytest.raises(ConfigError, match=r"^config\.exact_metrics: .*sequences"):
    describe(c)


def test_fixed_lambdas_skip_fit_samples_check():
  c = _distributional()
  c.target.lambdas = (1.5,)
  c.target.fit_samples = 0
  describe(c)


def test_sized():
  c = config_lib.sized(_valid(), "tiny")
  assert (c.num_steps, c.batch_size, c.model.n_embd) == (3, 4, 16)
  describe(c)
  assert config_lib.sized(_valid(), "").num_steps == 200
  with pytest.raises(ValueError, match="default, tiny"):
    config_lib.sized(_valid(), "huge")


def test_batches_must_divide_over_the_mesh():
  loop = loop_lib.LoopConfig(num_steps=1, batch_size=12, eval_batch_size=16)
  tasks._check_divides(loop, 4)           # 12 rows and 8 evaluation rows
  with pytest.raises(ConfigError, match=r"^config\.batch_size: 12 .* 8 devices"):
    tasks._check_divides(loop, 8)
  loop = loop_lib.LoopConfig(num_steps=1, batch_size=8, eval_batch_size=12)
  with pytest.raises(ConfigError, match=r"^config\.eval_batch_size: 6 .*π and from a"):
    tasks._check_divides(loop, 4)


def test_eval_batch_size_must_be_even():
  c = _valid()
  c.eval_batch_size = 7
  with pytest.raises(ConfigError, match=r"^config\.eval_batch_size: must be even"):
    describe(c)


def test_samples_md_needs_enough_evaluation_samples():
  c = _valid()
  c.prompts = ("a b", "c d", "e f")
  c.num_samples_md = 8
  c.eval_batch_size = 32                  # 16 of π for 3 x 8 wanted
  with pytest.raises(ConfigError, match=r"^config\.num_samples_md: 8 .* 3 prompt"):
    describe(c)
  c.eval_batch_size = 48
  describe(c)


@pytest.mark.parametrize("field,value", [("top_k", 5), ("top_p", 0.9)])
def test_a_truncated_proposal_is_refused_unless_allowed(field, value):
  c = _set(_valid(), field, value)
  with pytest.raises(ConfigError) as e:
    describe(c)
  assert str(e.value).startswith("config.top_k / config.top_p: ")
  assert "biased" in str(e.value) and "allow_truncated_proposal" in str(e.value)
  c.allow_truncated_proposal = True
  describe(c)
  c = _set(_valid(), "temperature", 0.7)   # temperature alone: π/q corrects it
  describe(c)


def test_offline_comparison_on_an_infinite_metric_is_refused():
  c = _valid()                            # a pointwise (hard) constraint
  c.mode = "offline"
  c.proposal_update_metric = "reverse_kl"
  with pytest.raises(ConfigError, match=r"^config\.proposal_update_metric: "
                     r"reverse_kl is \+inf .* never updated"):
    describe(c)
  c.proposal_update_metric = "tv"
  describe(c)
  c = _reward()                           # full support: reverse KL is finite
  c.mode, c.proposal_update_metric = "offline", "reverse_kl"
  describe(c)


def test_misnamed_fields_and_values_name_the_field():
  c = _valid()
  c.model.unlock()
  c.model.n_layers = 3                    # not a ModelSpec field
  with pytest.raises(ConfigError, match=r"^config\.model\.n_layers: is not a field"):
    describe(c)
  c = _valid()
  c.unlock()
  c.mesh_data = None
  with pytest.raises(ConfigError, match=r"^config\.mesh_data: must be an integer"):
    describe(c)


def test_target_errors_with_the_real_tokenizer_are_config_errors():
  c = _toy()
  c.target.features = ("contains_words:words=Hello",)   # the toy tokenizer: a..z
  with pytest.raises(ConfigError, match=r"^config\.target\.features\[0\]: "):
    describe(c)
