"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoints: logits parity
with transformers (CPU torch), half-precision and sharded files, named errors,
and export back to transformers."""

import copy
import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from fdiv_jax.lm import models
from fdiv_jax.lm import scoring

# Test-only dependencies, in the "dev" extra (CPU torch): a missing one is a
# failure, not a skip.
import torch  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order
import transformers  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order

V = 61
_SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=40,
              num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32, initializer_range=0.2)
# Each family with the options that distinguish it; initializer_range=0.2
# makes the logits O(1) and sensitive to every one of them.
FAMILIES = {
    # GQA (2 kv heads for 4 query heads), llama3 rope scaling, untied.
    "llama_gqa_llama3": lambda: transformers.LlamaConfig(
        **_SIZES, num_key_value_heads=2, rope_theta=500.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8}),
    # MQA (1 kv head), linear rope scaling, tied, attention and MLP biases.
    "llama_mqa_linear_tied": lambda: transformers.LlamaConfig(
        **_SIZES, num_key_value_heads=1, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Sliding window (4) shorter than the sequences.
    "mistral_window": lambda: transformers.MistralConfig(
        **_SIZES, num_key_value_heads=2, sliding_window=4),
    # q/k/v biases, yarn rope scaling.
    "qwen2_yarn": lambda: transformers.Qwen2Config(
        **_SIZES, num_key_value_heads=2,
        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 8}),
    # q/k norms, head_dim 16 != 32 / 4, tied, sliding window on layer 1.
    "qwen3_tied": lambda: transformers.Qwen3Config(
        **_SIZES, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
        max_window_layers=1),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (directory, transformers model), built on first use."""
  root = tmp_path_factory.mktemp("families")

  @functools.lru_cache(maxsize=None)
  def get(family):
    torch.manual_seed(len(family))
    hf_model = transformers.AutoModelForCausalLM.from_config(
        FAMILIES[family]()).eval()
    with torch.no_grad():  # Non-trivial norms and biases.
      for name, p in hf_model.named_parameters():
        if "norm" in name or name.endswith("bias"):
          p.add_(0.3 * torch.randn_like(p))
    path = root / family
    hf_model.save_pretrained(path)
    return str(path), hf_model

  return get


RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, V, size=(3, 20))
MASK = np.arange(20)[None, :] >= np.array([0, 5, 11])[:, None]
POSITIONS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)


def _hf_logits(hf_model, tokens=TOKENS, mask=MASK, positions=POSITIONS):
  with torch.no_grad():
    out = hf_model(torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def _logits(model, params, tokens=TOKENS, mask=MASK):
  return np.asarray(model.apply({"params": params},
                                jnp.asarray(tokens, jnp.int32),
                                attention_mask=jnp.asarray(mask)))


def _max_diff(a, b):
  return float(np.max(np.abs(a - b)[MASK]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_logits_match_transformers(checkpoints, family):
  path, hf_model = checkpoints(family)
  model, params = models.load_hf_checkpoint(path)
  assert isinstance(model, models.DecoderLM)
  assert model.config.source_path == os.path.abspath(path)
  assert (model.vocab_size, model.max_positions) == (V, 32)
  theirs = _hf_logits(hf_model)
  ours = _logits(model, params)
  assert ours.dtype == np.float32 and np.max(np.abs(theirs)) > 1.0
  diff = _max_diff(ours, theirs)
  assert diff <= 2e-4, (family, diff)
  # Continuation scores agree with transformers' log-softmax.
  prompts, lengths = TOKENS[:, :14], MASK[:, :14].sum(1)
  _, lp = scoring.sequence_log_probs(model, params, prompts, lengths,
                                     TOKENS[:, 14:], MASK[:, 14:])
  log_sm = torch.log_softmax(torch.tensor(theirs), -1).numpy()
  expected = [sum(log_sm[b, t - 1, TOKENS[b, t]] for t in range(14, 20))
              for b in range(3)]
  np.testing.assert_allclose(lp, expected, atol=2e-4)


def test_config_fields(checkpoints):
  model, _ = models.load_hf_checkpoint(checkpoints("qwen3_tied")[0])
  cfg = model.config
  assert (cfg.head_dim, cfg.num_key_value_heads, cfg.qk_norm,
          cfg.tie_word_embeddings, cfg.sliding_window, cfg.layer_types) == (
              16, 2, True, True, 5, ("full_attention", "sliding_attention"))
  model, _ = models.load_hf_checkpoint(checkpoints("llama_gqa_llama3")[0])
  assert model.config.rope_theta == 500.0
  assert model.config.rope_scaling_dict["rope_type"] == "llama3"
  spec = models.ModelSpec(kind="hf", path=checkpoints("mistral_window")[0])
  assert spec.max_positions == 32
  assert isinstance(spec.load()[0], models.DecoderLM)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(checkpoints, tmp_path, dtype):
  path, hf_model = checkpoints("qwen3_tied")
  _, params32 = models.load_hf_checkpoint(path)
  half = copy.deepcopy(hf_model).to(getattr(torch, dtype))
  half.save_pretrained(tmp_path)
  model, params = models.load_hf_checkpoint(str(tmp_path))
  rounded = jax.tree.map(lambda x: x.astype(dtype).astype(jnp.float32),
                         params32)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(rounded)):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  model16, params16 = models.load_hf_checkpoint(
      str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params16))
  ours = _logits(model16, params16)
  theirs = _hf_logits(hf_model)
  assert ours.dtype == np.float32
  assert _max_diff(ours, theirs) < 0.1 * np.max(np.abs(theirs))


def test_sharded_checkpoint(checkpoints, tmp_path):
  path, hf_model = checkpoints("llama_gqa_llama3")
  hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
             ) > 2
  _, params = models.load_hf_checkpoint(str(tmp_path))
  _, reference = models.load_hf_checkpoint(path)
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def _edited(src, dst, config=None, tensors=None):
  """A copy of checkpoint ``src`` with config.json keys changed and the
  tensors passed through ``tensors(dict) -> dict``."""
  shutil.copytree(src, dst)
  if config:
    with open(dst / "config.json") as f:
      values = json.load(f)
    values.update(config)
    with open(dst / "config.json", "w") as f:
      json.dump(values, f)
  if tensors:
    file = str(dst / "model.safetensors")
    st_numpy.save_file(tensors(st_numpy.load_file(file)), file,
                       metadata={"format": "pt"})
  return str(dst)


def test_named_errors(checkpoints, tmp_path):
  path, _ = checkpoints("llama_gqa_llama3")
  for other in ("gemma", "bert"):
    bad = _edited(path, tmp_path / other, config={"model_type": other})
    with pytest.raises(ValueError, match=f"'{other}'.*not supported.*llama"):
      models.load_hf_checkpoint(bad)
  name = "model.layers.1.mlp.up_proj.weight"
  missing = _edited(path, tmp_path / "missing", tensors=lambda t: {
      k: v for k, v in t.items() if k != name})
  with pytest.raises(ValueError, match=(
      rf"missing.model.safetensors: checkpoint has no tensor '{name}' "
      r"\(shape \(40, 32\)")):
    models.load_hf_checkpoint(missing)
  extra = _edited(path, tmp_path / "extra", tensors=lambda t: dict(
      t, **{"model.layers.0.mlp.extra.weight": np.zeros((2, 3), np.float32)}))
  with pytest.raises(ValueError, match=(
      r"extra.model.safetensors: tensor 'model.layers.0.mlp.extra.weight' "
      r"\(shape \(2, 3\)\) is unexpected")):
    models.load_hf_checkpoint(extra)
  wide = _edited(path, tmp_path / "wide", config={"intermediate_size": 48})
  with pytest.raises(ValueError, match=(
      r"wide.model.safetensors: Tensor 'model.layers.0.mlp.down_proj.weight' "
      r"has shape \(32, 40\), expected \(32, 48\)")):
    models.load_hf_checkpoint(wide)
  tied_path, _ = checkpoints("qwen3_tied")
  untied = _edited(tied_path, tmp_path / "untied", tensors=lambda t: dict(
      t, **{"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
  with pytest.raises(ValueError, match="'lm_head.weight'.*differs.*tied"):
    models.load_hf_checkpoint(untied)
  for i, (rope, match) in enumerate([({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
                      ({"rope_type": "default", "partial_rotary_factor": 0.5},
                       "partial_rotary_factor")]):
    bad = _edited(path, tmp_path / f"rope{i}",
                  config={"rope_parameters": dict(rope, rope_theta=1e4)})
    with pytest.raises(ValueError, match=match):
      models.load_hf_checkpoint(bad)


def test_old_config_format(checkpoints, tmp_path):
  """transformers 4's rope_theta + rope_scaling keys load like v5's
  rope_parameters."""
  path, hf_model = checkpoints("llama_gqa_llama3")
  with open(os.path.join(path, "config.json")) as f:
    rope = json.load(f)["rope_parameters"]
  old = _edited(path, tmp_path / "old", config={
      "rope_parameters": None, "rope_theta": rope.pop("rope_theta"),
      "rope_scaling": dict(rope, type=rope.pop("rope_type"))})
  model, params = models.load_hf_checkpoint(old)
  assert _max_diff(_logits(model, params), _hf_logits(hf_model)) <= 2e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_round_trip(checkpoints, tmp_path, family):
  path, _ = checkpoints(family)
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    f.write('{"stand-in": true}')  # Copied verbatim, never parsed here.
  model, params = models.load_hf_checkpoint(path)
  out = models.save_hf_checkpoint(model, params, str(tmp_path / "out"))
  for name in ("tokenizer.json", "generation_config.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  diff = _max_diff(_logits(model, params), _hf_logits(reloaded))
  assert diff <= 2e-4, (family, diff)
  again_model, again = models.load_hf_checkpoint(out)
  assert again_model.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_export_round_trip(checkpoints, tmp_path):
  path, _ = checkpoints("mistral_window")
  model, params = models.load_hf_checkpoint(path, dtype=jnp.bfloat16,
                                            param_dtype=jnp.bfloat16)
  out = models.save_hf_checkpoint(model, params, str(tmp_path))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  again_model, again = models.load_hf_checkpoint(
      out, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert again_model.config == model.config
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  model32 = models.DecoderLM(dataclasses.replace(
      model.config, dtype=jnp.float32, param_dtype=jnp.float32))
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  diff = _max_diff(_logits(model32, params32), _hf_logits(reloaded))
  assert diff <= 2e-4, diff


def test_export_refuses_what_the_family_cannot_express(checkpoints, tmp_path):
  model, params = models.load_hf_checkpoint(checkpoints("qwen2_yarn")[0])
  llama = models.DecoderLM(dataclasses.replace(model.config,
                                               model_type="llama"))
  with pytest.raises(ValueError, match="attention_bias != attention_out_bias"):
    models.save_hf_checkpoint(llama, params, str(tmp_path))
  with pytest.raises(ValueError, match="LSTMLM"):
    models.save_hf_checkpoint(models.LSTMLM(models.LSTMConfig(vocab_size=5)), {},
                              str(tmp_path))
