"""LoRA (`models.lora`): π = a while B = 0, only the adapters train, the merged
export matches the adapted policy in transformers, adapter-only checkpoints
tied to their base weights, and FSDP over 8 simulated devices.

Run as a script (`python tests/test_lora.py`, with 8 simulated CPU devices)
it prints the multi-device comparison as one JSON line; the test below starts
it in a fresh process, as tests/test_sharding.py does.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

if __name__ == "__main__":  # the multi-device script: set before JAX starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from fdiv_jax import targets  # noqa: E402
from fdiv_jax.lm import models, sampling, scoring  # noqa: E402
from fdiv_jax.lm.models import lora  # noqa: E402
from fdiv_jax.run import config as config_lib  # noqa: E402
from fdiv_jax.run import tasks  # noqa: E402
from fdiv_jax.targets import features  # noqa: E402
from fdiv_jax.train import checkpoint, sharding  # noqa: E402
from fdiv_jax.train import optimizer as optimizer_lib  # noqa: E402
from fdiv_jax.train import state as state_lib  # noqa: E402
from fdiv_jax.train import step as step_lib  # noqa: E402

V = 32
# Qwen2-like: q/k/v biases, 4 query heads sharing 2 key/value heads. Width 64
# and rank 16 make A [64, 16] big enough (1024 values) to be split by FSDP.
DECODER = models.DecoderConfig(
    vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    attention_bias=True, model_type="qwen2", initializer_range=0.2)
GPT2 = models.GPT2Config(vocab_size=V, n_positions=32, n_layer=1, n_head=2,
                         n_embd=32, initializer_range=0.2)
RANK = 16
SAMPLER = sampling.SamplerConfig(max_new_tokens=4, eos_id=0, pad_id=0)
STEP = step_lib.StepConfig(divergence="js")
OPTIMIZER = optimizer_lib.OptimizerConfig(learning_rate=3e-2, warmup_steps=0)
TOKENS = np.random.default_rng(0).integers(1, V, size=(3, 12))
MASK = np.arange(12)[None, :] >= np.array([0, 3, 6])[:, None]


def _base(config, seed=0):
  model = (models.DecoderLM(config) if isinstance(config, models.DecoderConfig)
           else models.GPT2LM(config))
  params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
  return model, params


def _lora(config=DECODER, rank=RANK, targets_=(), seed=0):
  """(LoRALM, frozen base params, fresh adapters)."""
  base, base_params = _base(config, seed)
  family = "gpt2" if isinstance(config, models.GPT2Config) else config.model_type
  cfg = models.LoRAConfig(rank=rank, alpha=32.0, targets=targets_).for_family(family)
  adapters = lora.init_adapters(cfg, base_params, jax.random.key(seed + 100))
  return models.LoRALM(base, cfg, base_path=f"random-{seed}"), base_params, adapters


def _trained(adapters, seed=7):
  """The adapters with B drawn at random, as after some training."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      0.2 * jax.random.normal(k, x.shape)
      if jax.tree_util.keystr(p).endswith("['lora_b']") else x
      for k, (p, x) in zip(keys, leaves)])


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(model, params):
  return model.apply({"params": params}, jnp.asarray(TOKENS, jnp.int32),
                     attention_mask=jnp.asarray(MASK))


def _logits(model, params):
  return np.asarray(_jit_logits(model, params))


def _batch(n=8):
  return state_lib.Batch(jnp.ones((n, 1), jnp.int32), jnp.ones((n,), jnp.int32),
                         jnp.zeros((n,), jnp.int32))


def _target():
  # About two samples in three contain one of these tokens: a real gradient.
  return targets.RewardTarget(
      features.contains_tokens(tuple(range(2, 10)), name="low"), beta=1 / 3)


@pytest.mark.parametrize("config", [DECODER, GPT2], ids=["qwen2", "gpt2"])
def test_zero_b_gives_the_base_model_exactly(config):
  model, base_params, adapters = _lora(config)
  base_model = model.base
  names = {"/".join(k.key for k in path[-3:-1])
           for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
  assert names == ({"self_attn/q_proj", "self_attn/v_proj"}
                   if config is DECODER else {"attn/c_attn"})
  policy = lora.policy_params(model, base_params, adapters)
  prompts, lengths = TOKENS[:, :6], MASK[:, :6].sum(1)

  @functools.partial(jax.jit, static_argnums=0)
  def outputs(m, params):
    """Logits, scored continuations, and (decoder) samples drawn with the KV
    cache from one key (the train step samples GPT-2 with LoRA too)."""
    logits = m.apply({"params": params}, jnp.asarray(TOKENS, jnp.int32),
                     attention_mask=jnp.asarray(MASK))
    scored = scoring.sequence_log_probs(m, params, prompts, lengths,
                                        TOKENS[:, 6:], MASK[:, 6:])[0]
    if config is not DECODER:
      return logits, scored
    drawn = sampling.sample(m, params, jax.random.key(3), prompts, lengths, SAMPLER)
    return logits, scored, drawn.tokens, drawn.log_q

  for ours, theirs in zip(outputs(model, policy), outputs(base_model, base_params)):
    np.testing.assert_array_equal(ours, theirs)
  # Without adapters the wrapper is the base model; with trained ones it is not.
  np.testing.assert_array_equal(
      _logits(model, lora.base_model_params(model, base_params)),
      _logits(base_model, base_params))
  moved = lora.policy_params(model, base_params, _trained(adapters))
  assert np.max(np.abs(_logits(model, moved) - _logits(base_model, base_params))) > 0.1


def test_steps_train_the_adapters_only_on_one_bfloat16_base():
  """Two train steps with a bfloat16 base (weights and activations): the base
  stays bit-identical and is the caller's one copy; parameters and optimiser
  moments are the float32 adapters only; log-probabilities, importance
  weights and metrics are float32."""
  config = dataclasses.replace(DECODER, dtype=jnp.bfloat16,
                               param_dtype=jnp.bfloat16)
  model, base_params, adapters = _lora(config)
  assert {x.dtype for x in jax.tree.leaves(base_params)} == {jnp.dtype(jnp.bfloat16)}
  policy = lora.policy_params(model, base_params, _trained(adapters))
  token_lp, lp = jax.jit(scoring.sequence_log_probs, static_argnums=0)(
      model, policy, TOKENS[:, :6], MASK[:, :6].sum(1), TOKENS[:, 6:], MASK[:, 6:])
  assert token_lp.dtype == lp.dtype == jnp.float32
  before = jax.device_get(base_params)
  mesh = sharding.make_mesh(1, 1)
  state = state_lib.create_state(model, adapters, step_config=STEP,
                                 optimizer=OPTIMIZER, base_params=base_params)
  state = sharding.shard_state(state, mesh)
  assert state.frozen_base == state_lib.FrozenBase(
      "random-0", lora.fingerprint(base_params))
  # One copy of the base: the state holds the caller's buffers, not a copy.
  pointer = lambda tree: [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]
  assert pointer(state.base_params) == pointer(base_params)
  step_config = dataclasses.replace(STEP, reuse_sampler_log_probs=False)
  step = sharding.jit_train_step(
      step_lib.make_train_step(step_config, model, _target(), SAMPLER), state, mesh)
  for _ in range(2):
    state, metrics = step(state, _batch())
  assert int(state.step) == 2
  for key in ("loss", "js", "kl_from_base", "importance_weight_mean", "grad_norm"):
    assert metrics[key].dtype == jnp.float32 and np.isfinite(metrics[key]), key
  assert float(metrics["grad_norm"]) > 0
  # The base is bit-identical, still the caller's arrays (never donated).
  assert pointer(state.base_params) == pointer(base_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(base_params), before)
  # The parameters and every optimiser moment are the adapters' shapes only.
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  assert shapes(state.params) == shapes(adapters)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 2]
  assert sorted(map(np.shape, moments)) == sorted(
      map(np.shape, jax.tree.leaves(adapters) * 2))
  assert lora.num_params(moments) == 2 * lora.num_params(adapters)
  b = [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
       if jax.tree_util.keystr(p).endswith("['lora_b']")]
  assert all(np.any(x != 0) for x in b)  # B moved off zero: π ≠ a now


@pytest.mark.parametrize("config", [DECODER, GPT2], ids=["qwen2", "gpt2"])
def test_merged_export_matches_the_lora_policy(config, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  targets_ = ("q_proj", "v_proj", "down_proj") if config is DECODER else (
      "c_attn", "mlp/c_proj")
  model, base_params, adapters = _lora(config, targets_=targets_)
  adapters = _trained(adapters)
  ours = _logits(model, lora.policy_params(model, base_params, adapters))
  plain, merged = lora.merge(model, base_params, adapters)
  assert plain is model.base
  np.testing.assert_allclose(_logits(plain, merged), ours, atol=2e-5)
  out = models.save_hf_checkpoint(plain, merged, str(tmp_path / "export"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(TOKENS), attention_mask=torch.tensor(MASK.astype(np.int64)),
                position_ids=torch.tensor(np.maximum(np.cumsum(MASK, 1) - 1, 0))
                ).logits.numpy()
  diff = float(np.max(np.abs(ours - theirs)[MASK]))
  assert diff <= 2e-4, diff
  assert float(np.max(np.abs(ours - _logits(model.base, base_params)))) > 0.1


def test_checkpoints_hold_the_adapters_and_name_their_base(tmp_path):
  model, base_params, adapters = _lora()
  make = lambda m, p, b: sharding.shard_state(state_lib.create_state(
      m, p, step_config=STEP, optimizer=OPTIMIZER, base_params=b),
      sharding.make_mesh(1, 1))
  state = make(model, _trained(adapters), base_params)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "lora"))
  ckpt.save(1, state, force=True)
  full_state = make(model.base, base_params, None)  # full fine-tuning
  full = checkpoint.Checkpointer(str(tmp_path / "full"))
  full.save(1, full_state, force=True)
  size = lambda d: sum(os.path.getsize(os.path.join(r, f))
                       for r, _, fs in os.walk(tmp_path / d) for f in fs)
  # Adapters + Adam moments (3 x 9.7k values) vs policy + base + moments (4 x 59k).
  assert lora.num_params(adapters) < 0.2 * lora.num_params(base_params)
  assert size("lora") < 0.35 * size("full"), (size("lora"), size("full"))
  restored = ckpt.restore(checkpoint.abstract_like(make(model, adapters, base_params)))
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)
  assert restored.frozen_base == state.frozen_base
  # Other base weights (another seed), full fine-tuning over LoRA and back.
  other_model, other_base, other_adapters = _lora(seed=1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"LoRA adapters of other base weights: 'random-0'"):
    ckpt.restore(checkpoint.abstract_like(make(other_model, other_adapters,
                                               other_base)))
  with pytest.raises(checkpoint.CheckpointError, match="config.lora.rank = 0"):
    ckpt.restore(checkpoint.abstract_like(full_state))
  with pytest.raises(checkpoint.CheckpointError, match="holds a full fine-tuning state"):
    full.restore(checkpoint.abstract_like(state))
  ckpt.close()
  full.close()


def test_config_fields_are_checked_and_named(tmp_path):
  c = config_lib.base_config()
  c.model.kind, c.model.n_embd = "gpt2", 16
  c.target.features = ("contains_tokens:token_ids=3",)
  c.lora.rank = 4
  spec = tasks.describe(c)
  assert spec.lora == models.LoRAConfig(4, 16.0, ("c_attn",))
  task = tasks.build(spec)
  assert isinstance(task.model, models.LoRALM) and task.model.lora == spec.lora
  assert set(task.params["h_0"]["attn"]["c_attn"]) == {"lora_a", "lora_b"}
  assert task.model.base_path == "a random gpt2 init (seed 0)"
  for field, value, message in [
      ("lora.rank", -1, "config.lora.rank: must be an integer >= 0"),
      ("lora.alpha", 0.0, "config.lora.alpha: must be"),
      ("lora.targets", ("q_proj",), "config.lora.targets[0]: 'q_proj' is no "
       "projection of a gpt2 model"),
      ("model.param_dtype", "float64", "config.model.param_dtype: must be one of"),
      ("model.remat", True, "config.model.remat: rematerialisation is implemented "
       "for the Llama family")]:
    bad = config_lib.base_config()
    bad.model.kind, bad.lora.rank = "gpt2", 4
    bad.target.features = ("contains_tokens:token_ids=3",)
    parent, key = field.split(".")
    bad[parent][key] = value
    with pytest.raises(config_lib.ConfigError) as e:
      tasks.describe(bad)
    assert str(e.value).startswith(message), e.value
  bad.model.remat, bad.model.param_dtype, bad.lora.rank = False, "float16", 0
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.param_dtype: "
                     "float16 weights are for a frozen base under LoRA"):
    tasks.describe(bad)
  bad.model.kind, bad.model.param_dtype, bad.export_hf = "lstm", "float32", True
  with pytest.raises(config_lib.ConfigError, match=r"^config\.export_hf: .*lstm"):
    tasks.describe(bad)
  bad.export_hf, bad.lora.rank = False, 2
  with pytest.raises(config_lib.ConfigError, match=r"^config\.lora\.rank: LoRA adapts"):
    tasks.describe(bad)


# --------------------------------------------------------------------------
# 8 simulated devices (this file as a script) against one.
# --------------------------------------------------------------------------


def _steps(rank, data, fsdp, num_steps=2):
  """Two steps on a (data, fsdp) mesh with plain SGD: Adam would turn the
  float rounding of directions whose gradient is 0 in exact arithmetic (a
  k_proj bias: the softmax over keys ignores it) into ±lr updates."""
  if rank:
    model, base_params, params = _lora(rank=rank)
  else:
    model, params = _base(DECODER)
    base_params = None
  mesh = sharding.make_mesh(data, fsdp)
  state = sharding.shard_state(state_lib.create_state(
      model, params, step_config=STEP,
      optimizer=optax.apply_if_finite(optax.sgd(0.3), 5),
      base_params=base_params), mesh)
  step = sharding.jit_train_step(
      step_lib.make_train_step(STEP, model, _target(), SAMPLER), state, mesh)
  shardings = sharding.state_shardings(state, mesh)
  split = lambda tree: sum(1 for s in jax.tree.leaves(tree)
                           if any(a is not None for a in s.spec))
  for i in range(num_steps):
    state, metrics = step(state, sharding.shard_batch(_batch(), mesh))
  devices = {d for x in jax.tree.leaves(state.params) for d in x.devices()}
  return (jax.device_get(state.params), float(metrics["loss"]), len(devices),
          split(shardings.params), split(shardings.base_params))


def _multidevice_main():
  """LoRA on the decoder, data 2 x fsdp 4 against one device: the frozen base
  and the large adapter matrices split over fsdp, the batch over all 8."""
  assert jax.device_count() == 8, jax.device_count()
  reference, ref_loss, _, _, _ = _steps(RANK, 1, 1)
  params, loss, used, split_params, split_base = _steps(RANK, 2, 4)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), reference, params)
  print(json.dumps({
      "max_abs_diff": max(jax.tree.leaves(diffs)), "loss_diff": abs(loss - ref_loss),
      "devices_used": used, "sharded_param_leaves": split_params,
      "sharded_base_leaves": split_base}))


def test_fsdp_splits_the_decoder_and_the_adapters():
  """`sharding._leaf_spec` on the decoder's and LoRA's leaves (fsdp = 4): every
  array of 1024 values or more is split along its largest dimension that 4
  divides; smaller ones (biases, norms, a small B) are replicated."""
  model, base_params, adapters = _lora()
  spec = lambda x: tuple(sharding._leaf_spec(x, 4))  # pylint: disable=protected-access
  specs = {jax.tree_util.keystr(p): spec(x) for p, x in
           jax.tree_util.tree_flatten_with_path({"base": base_params,
                                                 "lora": adapters})[0]}
  fsdp = sharding.FSDP
  expected = {
      "['base']['embed_tokens']['embedding']": (None, fsdp),   # [32, 64]
      "['base']['lm_head']": (None, fsdp),                     # [32, 64]
      "['base']['layers_0']['mlp']['gate_proj']['kernel']": (None, fsdp),  # [64, 96]
      "['base']['layers_0']['mlp']['down_proj']['kernel']": (fsdp, None),  # [96, 64]
      "['base']['layers_0']['self_attn']['k_proj']['kernel']": (fsdp, None),  # [64, 32]
      "['base']['layers_0']['self_attn']['k_proj']['bias']": (),
      "['base']['layers_0']['input_layernorm']['scale']": (),
      "['lora']['layers_0']['self_attn']['q_proj']['lora_a']": (fsdp, None),  # [64, 16]
      "['lora']['layers_0']['self_attn']['q_proj']['lora_b']": (None, fsdp),  # [16, 64]
      "['lora']['layers_0']['self_attn']['v_proj']['lora_b']": (),  # [16, 32]: 512
  }
  assert {k: specs[k] for k in expected} == expected
  # No dimension of an adapter (64, 32, 16) divides over 3 devices: replicated.
  assert all(tuple(sharding._leaf_spec(x, 3)) == ()  # pylint: disable=protected-access
             for x in jax.tree.leaves(adapters))


def test_eight_devices_with_fsdp_match_one(subprocess_env):
  env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, os.path.abspath(__file__)],
                       capture_output=True, text=True, env=env, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["devices_used"] == 8, r
  assert r["max_abs_diff"] <= 1e-5 and r["loss_diff"] <= 1e-5, r
  # FSDP split the adapters' large matrices and the frozen base's weights.
  assert r["sharded_param_leaves"] == 3 and r["sharded_base_leaves"] == 9, r


if __name__ == "__main__":
  _multidevice_main()
