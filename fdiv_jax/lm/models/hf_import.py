"""Import of local Hugging Face GPT-2 checkpoints, without PyTorch.

A checkpoint directory is what ``GPT2LMHeadModel.save_pretrained`` writes:
``config.json`` plus ``model.safetensors`` (or sharded
``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json``).
The tensors are read with ``safetensors.numpy`` and renamed to ``GPT2LM``
parameters; Hugging Face's ``Conv1D`` weights are ``[in, out]``, which is the
layout of a Flax ``Dense`` kernel, so no transposes are needed.
"""

import json
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy

from fdiv_jax.lm.models import gpt2

_UNSUPPORTED_TRUE = ("add_cross_attention", "scale_attn_by_inverse_layer_idx")


def _read_config(path: str) -> Dict[str, Any]:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No config.json in checkpoint directory {path!r}.")
  with open(config_path) as f:
    return json.load(f)


def config_from_hf(hf: Dict[str, Any], dtype=jnp.float32,
                   param_dtype=jnp.float32) -> gpt2.GPT2Config:
  """``GPT2Config`` from a Hugging Face GPT-2 ``config.json`` dict.

  Raises:
    ValueError: the config is not a GPT-2 model, or uses options GPT2LM does
      not implement (cross-attention, layer-index attention scaling, unscaled
      attention, untied output embeddings).
  """
  model_type = hf.get("model_type")
  if model_type != "gpt2":
    raise ValueError(f"Checkpoint architecture {model_type!r} "
                     f"(architectures={hf.get('architectures')}) is not "
                     "supported: only GPT-2 ('model_type': 'gpt2') can be "
                     "imported.")
  for key in _UNSUPPORTED_TRUE:
    if hf.get(key, False):
      raise ValueError(f"GPT-2 checkpoint option {key}=True is not supported.")
  if not hf.get("scale_attn_weights", True):
    raise ValueError("GPT-2 checkpoint option scale_attn_weights=False is not "
                     "supported.")
  if not hf.get("tie_word_embeddings", True):
    raise ValueError("GPT-2 checkpoints with untied output embeddings are not "
                     "supported.")
  return gpt2.GPT2Config(
      vocab_size=hf["vocab_size"], n_positions=hf["n_positions"],
      n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
      n_inner=hf.get("n_inner"),
      activation=hf.get("activation_function", "gelu_new"),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      dtype=dtype, param_dtype=param_dtype)


def _read_tensors(path: str) -> Dict[str, np.ndarray]:
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return st_numpy.load_file(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(st_numpy.load_file(os.path.join(path, shard)))
    return tensors
  raise FileNotFoundError(
      f"No model.safetensors (or model.safetensors.index.json) in {path!r}; "
      "PyTorch .bin checkpoints are not read (save with safe_serialization).")


def _hf_name(flax_path: Tuple[str, ...]) -> str:
  """Flax parameter path -> Hugging Face tensor name (no 'transformer.')."""
  *modules, leaf = flax_path
  parts = []
  for m in modules:
    parts.extend(m.split("_", 1) if m.startswith("h_") else [m])
  hf_leaf = {"embedding": "weight", "kernel": "weight", "scale": "weight",
             "bias": "bias"}[leaf]
  return ".".join(parts + [hf_leaf])


def convert_params(tensors: Dict[str, np.ndarray], config: gpt2.GPT2Config,
                   ) -> Dict[str, Any]:
  """Renames Hugging Face GPT-2 tensors to ``GPT2LM`` params (``param_dtype``).

  Raises:
    ValueError: a tensor is missing, has the wrong shape, or an output layer
      differs from the token embedding.
  """
  model = gpt2.GPT2LM(config)
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  stripped = {}
  for name, value in tensors.items():
    prefix = "transformer."
    stripped[name[len(prefix):] if name.startswith(prefix) else name] = value
  lm_head = stripped.pop("lm_head.weight", None)
  if lm_head is not None and "wte.weight" in stripped:
    if lm_head.shape != stripped["wte.weight"].shape or not np.array_equal(
        lm_head, stripped["wte.weight"]):
      raise ValueError("lm_head.weight differs from transformer.wte.weight: "
                       "untied output layers are not supported.")

  def convert(path, leaf_shape):
    flax_path = tuple(p.key for p in path)
    name = _hf_name(flax_path)
    if name not in stripped:
      raise ValueError(f"Checkpoint has no tensor {name!r} (needed for "
                       f"parameter {'/'.join(flax_path)}).")
    value = stripped[name]
    if tuple(value.shape) != tuple(leaf_shape.shape):
      raise ValueError(f"Tensor {name!r} has shape {tuple(value.shape)}, "
                       f"expected {tuple(leaf_shape.shape)} for the config "
                       f"{config}.")
    return np.asarray(value).astype(leaf_shape.dtype)

  return jax.tree_util.tree_map_with_path(convert, shapes)


def load_hf_checkpoint(path: str, dtype=jnp.float32, param_dtype=jnp.float32,
                       ) -> Tuple[gpt2.GPT2LM, Dict[str, Any]]:
  """Loads a local Hugging Face GPT-2 checkpoint directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors``.
    dtype: activation dtype of the returned model.
    param_dtype: dtype of the returned parameters.

  Returns:
    ``(model, params)`` with ``model.apply({"params": params}, tokens)`` giving
    float32 logits [B, T, V] equal to Hugging Face's (up to float rounding).

  Raises:
    FileNotFoundError: missing files. ValueError: not a GPT-2 checkpoint, or
    tensors that do not match ``config.json``.
  """
  config = config_from_hf(_read_config(path), dtype=dtype,
                          param_dtype=param_dtype)
  params = convert_params(_read_tensors(path), config)
  params = jax.tree.map(jnp.asarray, params)
  return gpt2.GPT2LM(config), params
