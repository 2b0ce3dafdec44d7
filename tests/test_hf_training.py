"""The main job on Hugging Face checkpoints (`--config.model.kind=hf
--config.tokenizer=hf`): two f-DPG steps through `fdiv_jax.run.experiment.run`
for a tiny Llama, Qwen2, Mistral (sliding window shorter than prompt + new
tokens) and Qwen3 (q/k norms), LoRA on and off; `export_hf` writes the
evaluated policy (EMA, LoRA merged) that transformers loads with the same
logits. One step then a resumed second equals two straight steps bit for bit,
checked once with LoRA (Llama) and once without (Qwen2): resuming does not
depend on the family, and each resume check costs two more runs of the main
job."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fdiv_jax.lm import models
from fdiv_jax.lm.models import lora
from fdiv_jax.run import config as config_lib
from fdiv_jax.run import experiment
from fdiv_jax.train import checkpoint

# Test-only dependencies (the "dev" extra, CPU torch).
import tokenizers  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order
import torch  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order
import transformers  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order

WORDS = ["<s>", "</s>", "<pad>"] + (
    "the a cat dog sat ran on mat and love life big small red blue".split())
_SIZES = dict(vocab_size=24, hidden_size=32, intermediate_size=48,
              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=32, initializer_range=0.2, bos_token_id=0,
              eos_token_id=1, pad_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**_SIZES),
    "qwen2": lambda: transformers.Qwen2Config(**_SIZES, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_SIZES, sliding_window=3),
    "qwen3": lambda: transformers.Qwen3Config(**_SIZES, head_dim=16),
}
RANK = 4
# (family, rank, resume): every family runs two steps and exports; resume is
# checked for LoRA on and off.
CASES = [("llama", RANK, True), ("llama", 0, False), ("qwen2", 0, True),
         ("qwen2", RANK, False), ("mistral", RANK, False), ("qwen3", 0, False)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> a Hugging Face directory: config.json, model.safetensors,
  generation_config.json and a word-level tokenizer.json."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for family, make in FAMILIES.items():
    path = str(root / family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make()).eval()
    model.save_pretrained(path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    out[family] = path
  return out


def _config(path, rank, num_steps):
  c = config_lib.base_config()
  c.model.kind, c.model.path, c.tokenizer = "hf", path, "hf"
  # A token-level constraint: no host callback, so the persistent compilation
  # cache serves the second and third run of each test.
  c.target.features = ("contains_tokens:token_ids=5|6",)
  config_lib.tiny(c)
  c.num_steps = num_steps
  c.max_new_tokens = 4
  c.eval_every = 100
  c.checkpoint_every = 1
  c.learning_rate = 3e-2
  c.lora.rank = rank
  c.ema_decay = 0.5 if rank else 0.0   # the export is the EMA when there is one
  c.model.remat = bool(rank)           # rematerialised blocks, under LoRA
  c.export_hf = True
  return c


def _checkpoint(workdir, step=2):
  return ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "default"))


def _hf_logits(path, tokens, mask):
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
                 ).logits.numpy()


@pytest.mark.parametrize(
    "family,rank,resume", CASES,
    ids=[f"{f}-{'lora' if r else 'full'}{'-resume' if x else ''}"
         for f, r, x in CASES])
def test_two_steps_resume_and_export(checkpoints, family, rank, resume, tmp_path):
  path = checkpoints[family]
  straight = experiment.run(_config(path, rank, 2), str(tmp_path / "straight"))
  assert straight["step"] == 2
  a = _checkpoint(tmp_path / "straight")
  if resume:
    first = experiment.run(_config(path, rank, 1), str(tmp_path / "split"))
    resumed = experiment.run(_config(path, rank, 2), str(tmp_path / "split"))
    assert (first["step"], resumed["step"]) == (1, 2)
    # Resume: the whole state at step 2 is the straight run's, bit for bit.
    b = _checkpoint(tmp_path / "split")
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (p, x), (_, y) in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))
    assert straight["alignment"] == resumed["alignment"]
  if rank and resume:
    # Resuming with another α (same shapes) is another run: refused by name.
    other = _config(path, rank, 3)
    other.lora.alpha = 8.0
    with pytest.raises(checkpoint.CheckpointError, match=r"different run: lora "):
      experiment.run(other, str(tmp_path / "split"))
  # A LoRA checkpoint holds adapters, not the base weights.
  base_model, base_params = models.load_hf_checkpoint(path)
  if rank:
    assert not jax.tree.leaves(a.get("base_params"))
    assert lora.num_params(a["params"]) < 0.25 * lora.num_params(base_params)
  else:
    assert lora.num_params(a["base_params"]) == lora.num_params(base_params)

  # Export: the evaluated policy (EMA under LoRA), loadable by transformers.
  export = straight["export"]
  assert export == str(tmp_path / "straight" / "export")
  for name in ("config.json", "model.safetensors", "tokenizer.json",
               "generation_config.json"):
    assert os.path.isfile(os.path.join(export, name)), name
  evaluated = a["ema_params"] if rank else a["params"]
  if rank:
    cfg = models.LoRAConfig(RANK, 16.0).for_family(family)
    model = models.LoRALM(base_model, cfg)
    params = lora.policy_params(model, base_params, evaluated)
  else:
    model, params = base_model, evaluated
  tokens = np.random.default_rng(1).integers(0, len(WORDS), size=(2, 10))
  mask = np.arange(10)[None, :] >= np.array([0, 4])[:, None]
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens),
                                attention_mask=jnp.asarray(mask)))
  diff = float(np.max(np.abs(ours - _hf_logits(export, tokens, mask))[mask]))
  assert diff <= 2e-4, (family, rank, diff)
  before = np.asarray(base_model.apply({"params": base_params}, jnp.asarray(tokens),
                                       attention_mask=jnp.asarray(mask)))
  assert float(np.max(np.abs(ours - before)[mask])) > 1e-3  # it was trained
