"""Which base model a run starts from, described cheaply and loaded on demand.

`ModelSpec` names a model (the shipped demo checkpoint, a `fdiv_jax.lm.pretrain`
checkpoint, a random GPT-2 or LSTM of given sizes, or a local Hugging Face
directory) and checks the description when constructed, without loading any
weights. `max_positions` reads at most a `config.json`; `load(seed)` builds the
model and its parameters; `tokenizer(name)` the matching tokenizer.

===========  ==========================================================
kind         what `load` gives
===========  ==========================================================
pretrained   `pretrain.load_pretrained(path or the shipped
             fdiv_jax/data/pretrained)`: byte-level GPT-2, its own sizes
gpt2         `GPT2LM` of (vocab_size, n_positions, n_layer, n_head,
             n_embd), random init
lstm         `LSTMLM`: embedding and hidden width n_embd, n_layer layers,
             random init
hf           `load_hf_checkpoint(path)`: its own sizes and family (gpt2,
             llama, mistral, qwen2, qwen3)
===========  ==========================================================

Numerics: `dtype` is the activation dtype (float32 or bfloat16);
`param_dtype` the dtype the weights are stored in (float32, bfloat16, or
float16, which the run layer allows only for a frozen base under LoRA). Logits,
log-softmax, log-probabilities and everything f-DPG computes from them stay
float32 whatever the two (`fdiv_jax.lm.output_layer`). Full fine-tuning with
bfloat16 parameters rounds every update to bfloat16 (an update below ~2^-8 of
a weight is lost): use LoRA, or float32 parameters. `remat` rematerialises each
decoder block in the backward pass (the Llama family; GPT-2 has no remat).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from fdiv_jax.core import _values

KINDS = ("pretrained", "gpt2", "lstm", "hf")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                "float16": jnp.float16}
TOKENIZERS = ("byte", "hf", "toy")
# The shipped demo checkpoint (`fdiv_jax.lm.pretrain.PRETRAINED_DIR`), named here
# without importing the pretraining code.
PRETRAINED_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "data", "pretrained")


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise ValueError(f"path: no {what} at {path!r}.") from e
  except (OSError, ValueError) as e:
    raise ValueError(f"path: cannot read {what} {path!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A base model a(x), by kind (see the module docstring).

  Attributes:
    kind: one of `KINDS`.
    path: the checkpoint directory ("pretrained": empty for the shipped demo
      model; "hf": required).
    vocab_size, n_layer, n_head, n_embd, n_positions: sizes of a randomly
      initialised "gpt2" / "lstm" (a checkpoint's own sizes win).
    dtype: the activation dtype, one of `DTYPES`.
    param_dtype: the dtype of the stored weights, one of `PARAM_DTYPES`.
    remat: rematerialise each block in the backward pass (kind "hf" of the
      Llama family only).
  """
  kind: str = "pretrained"
  path: str = ""
  vocab_size: int = 260
  n_layer: int = 2
  n_head: int = 2
  n_embd: int = 64
  n_positions: int = 64
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    _values.choice("kind", self.kind, KINDS)
    if not isinstance(self.path, str):
      raise ValueError(f"path: must be a string, got {self.path!r}.")
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions"):
      _values.integer(name, getattr(self, name), minimum=1)
    _values.choice("dtype", self.dtype, tuple(DTYPES))
    _values.choice("param_dtype", self.param_dtype, tuple(PARAM_DTYPES))
    _values.boolean("remat", self.remat)
    if self.kind == "hf":
      if not self.path:
        raise ValueError("path: must name a local Hugging Face model directory "
                         "when kind='hf'.")
      if not os.path.isdir(self.path):
        raise ValueError(f"path: {self.path!r} is not a directory.")
    elif self.kind == "pretrained" and self.path and not os.path.isdir(self.path):
      raise ValueError(f"path: {self.path!r} is not a directory (leave it empty "
                       "for the shipped demo model).")
    if self.kind == "gpt2" and self.n_embd % self.n_head:
      raise ValueError(f"n_head: must divide n_embd={self.n_embd}, got "
                       f"{self.n_head}.")
    if self.remat and self.family not in ("llama", "mistral", "qwen2", "qwen3"):
      raise ValueError(f"remat: rematerialisation is implemented for the Llama "
                       f"family (kind 'hf' of llama, mistral, qwen2, qwen3), not "
                       f"a {self.family} model.")

  @property
  def family(self) -> str:
    """"gpt2" (kinds pretrained and gpt2), "lstm", or for kind "hf" the
    checkpoint's `model_type` (read from config.json, no weights)."""
    if self.kind in ("pretrained", "gpt2"):
      return "gpt2"
    if self.kind == "lstm":
      return "lstm"
    meta = _read_json(os.path.join(self.path, "config.json"),
                      "Hugging Face config.json")
    return str(meta.get("model_type"))

  @property
  def max_positions(self) -> int | None:
    """The model's position limit, read cheaply (no weights); None = no limit."""
    if self.kind == "gpt2":
      return self.n_positions
    if self.kind == "lstm":
      return None
    if self.kind == "pretrained":
      meta = _read_json(
          os.path.join(self.path or PRETRAINED_DIR, "config.json"),
          "pretrained checkpoint (config.json; train one with "
          "`python -m fdiv_jax.lm.pretrain --out=DIR`)")
      return int(meta["model_config"]["n_positions"])
    meta = _read_json(os.path.join(self.path, "config.json"),
                      "Hugging Face config.json")
    for key in ("n_positions", "n_ctx", "max_position_embeddings"):
      if meta.get(key) is not None:
        return int(meta[key])
    return None

  def tokenizer(self, name: str):
    """The tokenizer `name` ("byte", "hf" or "toy") for this model.

    Raises:
      ValueError: "tokenizer: ..." for a name that does not fit the model
        kind, "vocab_size: ..." for a vocabulary that the tokenizer's ids do
        not fit.
    """
    from fdiv_jax.lm import tokenization  # pylint: disable=g-import-not-at-top
    _values.choice("tokenizer", name, TOKENIZERS)
    if self.kind == "pretrained" and name != "byte":
      raise ValueError(f"tokenizer: the pretrained demo model is byte-level: use "
                       f"tokenizer='byte' (got {name!r}).")
    if name == "hf":
      if self.kind != "hf":
        raise ValueError("tokenizer: 'hf' reads tokenizer.json from the Hugging "
                         f"Face model directory, so it needs kind='hf' (got "
                         f"{self.kind!r}).")
      path = os.path.join(self.path, "tokenizer.json")
      if not os.path.isfile(path):
        raise ValueError(f"tokenizer: 'hf' needs {path}.")
      # With the EOS ids of generation_config.json and the chat template of
      # tokenizer_config.json, when the directory has them.
      return tokenization.HFTokenizer.from_directory(self.path)
    if name == "toy":
      if self.kind not in ("gpt2", "lstm"):
        raise ValueError("tokenizer: 'toy' needs a randomly initialised model "
                         f"(kind 'gpt2' or 'lstm'), got kind={self.kind!r}.")
      if not 2 <= self.vocab_size <= tokenization.TOY_MAX_VOCAB:
        raise ValueError(f"vocab_size: must be in [2, "
                         f"{tokenization.TOY_MAX_VOCAB}] with the toy tokenizer, "
                         f"got {self.vocab_size}.")
      return tokenization.ToyTokenizer(self.vocab_size)
    tokenizer = tokenization.ByteTokenizer()
    if self.kind in ("gpt2", "lstm") and self.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"vocab_size: must be >= {tokenizer.vocab_size} (the byte "
                       f"tokenizer's vocabulary), got {self.vocab_size}.")
    return tokenizer

  def load(self, seed: int = 0) -> tuple[Any, Any]:
    """`(model, params)`; random inits use the key fold_in(PRNGKey(seed), 1)."""
    from fdiv_jax.lm import models  # pylint: disable=g-import-not-at-top
    dtype = DTYPES[self.dtype]
    param_dtype = PARAM_DTYPES[self.param_dtype]
    if self.kind == "pretrained":
      from fdiv_jax.lm import pretrain  # pylint: disable=g-import-not-at-top
      model, params, _ = pretrain.load_pretrained(self.path or PRETRAINED_DIR)
      if (model.config.dtype, model.config.param_dtype) != (dtype, param_dtype):
        model = models.GPT2LM(dataclasses.replace(
            model.config, dtype=dtype, param_dtype=param_dtype))
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
      return model, params
    if self.kind == "hf":
      model, params = models.load_hf_checkpoint(self.path, dtype=dtype,
                                                param_dtype=param_dtype)
      if self.remat:
        model = type(model)(dataclasses.replace(model.config, remat=True))
      return model, params
    if self.kind == "gpt2":
      model = models.GPT2LM(models.GPT2Config(
          vocab_size=self.vocab_size, n_positions=self.n_positions,
          n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
          dtype=dtype, param_dtype=param_dtype))
    else:
      model = models.LSTMLM(models.LSTMConfig(
          vocab_size=self.vocab_size, embed_dim=self.n_embd,
          hidden_size=self.n_embd, num_layers=self.n_layer, dtype=dtype,
          param_dtype=param_dtype))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    return model, params
