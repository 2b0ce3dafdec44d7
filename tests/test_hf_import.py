"""Hugging Face GPT-2 import and export: logits parity with transformers (CPU
torch). The Llama-family checkpoints are tested in test_hf_families.py."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.lm import models
from fdiv_jax.lm import scoring

# Test-only dependencies, in the "dev" extra (CPU torch==2.13.0): a missing one
# is a failure, not a skip.
import torch  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order
import transformers  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=97, n_positions=40, n_embd=32,
                                   n_layer=2, n_head=4)
  hf_model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # Non-trivial LayerNorm parameters and biases.
    for name, p in hf_model.named_parameters():
      if name.endswith("bias") or ".ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("gpt2")
  hf_model.save_pretrained(path)
  return str(path), hf_model


def _hf_logits(hf_model, tokens, **kwargs):
  with torch.no_grad():
    out = hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long),
                   **kwargs)
  return out.logits.numpy()


def test_logits_match_transformers(hf_checkpoint):
  path, hf_model = hf_checkpoint
  model, params = models.load_hf_checkpoint(path)
  assert isinstance(model, models.GPT2LM)
  assert (model.vocab_size, model.max_positions) == (97, 40)
  tokens = np.random.default_rng(0).integers(0, 97, size=(3, 40))
  ours = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32))
  assert ours.shape == (3, 40, 97) and ours.dtype == jnp.float32
  diff = np.max(np.abs(np.asarray(ours) - _hf_logits(hf_model, tokens)))
  assert diff <= 1e-4, diff


def test_left_padded_batch_matches_transformers(hf_checkpoint):
  path, hf_model = hf_checkpoint
  model, params = models.load_hf_checkpoint(path)
  tokens = np.random.default_rng(1).integers(0, 97, size=(2, 9))
  mask = np.ones((2, 9), bool)
  mask[1, :4] = False
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ours = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                     attention_mask=jnp.asarray(mask))
  theirs = _hf_logits(hf_model, tokens,
                      attention_mask=torch.tensor(mask.astype(np.int64)),
                      position_ids=torch.tensor(positions))
  diff = np.max(np.abs(np.asarray(ours) - theirs)[mask])
  assert diff <= 1e-4, diff
  # Sequence scores agree with transformers' log-softmax too.
  prompts, lengths = tokens[:, :5], mask[:, :5].sum(1)
  _, lp = scoring.sequence_log_probs(model, params, prompts, lengths,
                                     tokens[:, 5:], mask[:, 5:])
  log_sm = torch.log_softmax(torch.tensor(theirs), -1).numpy()
  expected = [sum(log_sm[b, t - 1, tokens[b, t]] for t in range(5, 9))
              for b in range(2)]
  np.testing.assert_allclose(lp, expected, atol=1e-4)


def test_bfloat16_import(hf_checkpoint):
  path, hf_model = hf_checkpoint
  model, params = models.load_hf_checkpoint(path, dtype=jnp.bfloat16,
                                            param_dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  tokens = np.random.default_rng(2).integers(0, 97, size=(2, 12))
  ours = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32))
  assert ours.dtype == jnp.float32
  assert np.max(np.abs(np.asarray(ours) - _hf_logits(hf_model, tokens))) < 0.1


def _edited_copy(src, dst, **changes):
  shutil.copytree(src, dst)
  with open(f"{dst}/config.json") as f:
    config = json.load(f)
  config.update(changes)
  with open(f"{dst}/config.json", "w") as f:
    json.dump(config, f)
  return str(dst)


def test_wrong_architecture_or_shape_is_a_clear_error(hf_checkpoint,
                                                      tmp_path):
  path, _ = hf_checkpoint
  bert = _edited_copy(path, tmp_path / "bert", model_type="bert")
  with pytest.raises(ValueError,
                     match="bert.config.json: .*'bert'.*not supported.*gpt2"):
    models.load_hf_checkpoint(bert)
  # A GPT-2 config relabelled as another supported family lacks its keys.
  llama = _edited_copy(path, tmp_path / "llama", model_type="llama")
  with pytest.raises(ValueError, match="llama.config.json: A llama config "
                     "needs hidden_size"):
    models.load_hf_checkpoint(llama)
  wide = _edited_copy(path, tmp_path / "wide", n_embd=64)
  with pytest.raises(ValueError, match=r"wide.model.safetensors: Tensor "
                     r"'transformer.h.0.attn.c_attn.bias' has shape \(96,\), "
                     r"expected \(192,\)"):
    models.load_hf_checkpoint(wide)
  deeper = _edited_copy(path, tmp_path / "deeper", n_layer=3)
  with pytest.raises(ValueError, match="no tensor 'transformer.h.2"):
    models.load_hf_checkpoint(deeper)
  shallower = _edited_copy(path, tmp_path / "shallower", n_layer=1)
  with pytest.raises(ValueError, match="tensor 'transformer.h.1.+unexpected"):
    models.load_hf_checkpoint(shallower)
  with pytest.raises(FileNotFoundError):
    models.load_hf_checkpoint(str(tmp_path))


def test_export_round_trip(hf_checkpoint, tmp_path):
  path, hf_model = hf_checkpoint
  model, params = models.load_hf_checkpoint(path)
  out = models.save_hf_checkpoint(model, params, str(tmp_path / "out"),
                                  source=path)
  assert os.path.isfile(os.path.join(out, "generation_config.json"))
  again_model, again = models.load_hf_checkpoint(out)
  assert again_model.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.random.default_rng(3).integers(0, 97, size=(2, 16))
  diff = np.max(np.abs(_hf_logits(reloaded, tokens)
                       - _hf_logits(hf_model, tokens)))
  assert diff <= 2e-4, diff
