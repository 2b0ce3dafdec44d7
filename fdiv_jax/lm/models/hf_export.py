"""Export of ``GPT2LM`` and ``DecoderLM`` parameters as Hugging Face checkpoints.

``save_hf_checkpoint(model, params, path)`` writes ``model.safetensors`` and
``config.json`` such that ``transformers.AutoModelForCausalLM.from_pretrained``
loads the model with the same logits, and ``load_hf_checkpoint`` loads the
parameters back bit-identically. Tensors keep the dtype of the parameters
(float32, bfloat16, float16); Dense kernels are transposed back to Linear
weights; a tied output layer is not written (transformers ties it on load).
The tokenizer and generation files of ``source`` (the directory the model was
loaded from) are copied next to them. No PyTorch is needed.
"""

import json
import os
import shutil
from typing import Any, Dict, Optional

import jax
import ml_dtypes  # noqa: F401  pylint: disable=unused-import  (bfloat16 in NumPy)
import numpy as np
from safetensors import numpy as st_numpy

from fdiv_jax.lm.models import decoder
from fdiv_jax.lm.models import gpt2
from fdiv_jax.lm.models import hf_import

# Copied from ``source`` when present (config.json is written, not copied).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Keys of a source config.json that the written config always replaces or
# drops (stale rope / dtype / window descriptions).
_REPLACED = ("rope_scaling", "rope_parameters", "rope_theta", "dtype",
             "torch_dtype", "sliding_window", "use_sliding_window",
             "layer_types", "max_window_layers", "head_dim",
             "partial_rotary_factor", "n_ctx")


def _dtype_name(params) -> str:
  dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
  for name in ("float32", "bfloat16", "float16", "float64"):
    if np.dtype(name) in dtypes:
      return name
  return "float32"


def _gpt2_config(cfg: gpt2.GPT2Config) -> Dict[str, Any]:
  return {
      "model_type": "gpt2", "vocab_size": cfg.vocab_size,
      "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
      "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
      "activation_function": cfg.activation,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_range": cfg.initializer_range,
      "tie_word_embeddings": True, "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
      "reorder_and_upcast_attn": False,
  }


def _decoder_config(cfg: decoder.DecoderConfig) -> Dict[str, Any]:
  """The ``config.json`` keys of a ``DecoderConfig`` for its ``model_type``.

  Raises:
    ValueError: the config uses an option its ``model_type`` cannot express.
  """
  family = cfg.model_type
  problems = []
  if family != "qwen3" and cfg.qk_norm:
    problems.append("qk_norm (only qwen3)")
  if family == "qwen3" and not cfg.qk_norm:
    problems.append("qk_norm=False (qwen3 always normalises q and k)")
  if family in ("llama", "qwen3") and (cfg.attention_bias
                                       != cfg.attention_out_bias):
    problems.append("attention_bias != attention_out_bias (one "
                    "attention_bias flag)")
  if family == "mistral" and (cfg.attention_bias or cfg.attention_out_bias):
    problems.append("attention biases")
  if family == "qwen2" and not (cfg.attention_bias
                                and not cfg.attention_out_bias):
    problems.append("qwen2 has q/k/v biases and no o_proj bias")
  if family != "llama" and cfg.mlp_bias:
    problems.append("mlp_bias (only llama)")
  if family == "llama" and cfg.sliding_window is not None:
    problems.append("sliding_window (not llama)")
  if family == "mistral" and cfg.layer_types is not None and (
      "full_attention" in cfg.layer_types and cfg.sliding_window is not None):
    problems.append("per-layer sliding windows (mistral slides on every "
                    "layer)")
  if problems:
    raise ValueError(f"A DecoderConfig with model_type={family!r} cannot be "
                     f"exported with {', '.join(problems)}.")
  out = {
      "model_type": family, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": cfg.hidden_act,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "initializer_range": cfg.initializer_range,
  }
  # Both config formats: transformers 4 reads rope_theta / rope_scaling,
  # transformers 5 rope_parameters (and converts the former).
  scaling = cfg.rope_scaling_dict
  out["rope_theta"] = cfg.rope_theta
  out["rope_scaling"] = scaling
  out["rope_parameters"] = dict(scaling or {"rope_type": "default"},
                                rope_theta=cfg.rope_theta)
  if family in ("llama", "qwen3"):
    out["attention_bias"] = cfg.attention_bias
  if family == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  if family == "mistral":
    out["sliding_window"] = cfg.sliding_window
  if family in ("qwen2", "qwen3"):
    window = cfg.sliding_window
    out["use_sliding_window"] = window is not None
    out["sliding_window"] = window
    types = ["sliding_attention" if cfg.sliding(i) else "full_attention"
             for i in range(cfg.num_hidden_layers)]
    out["layer_types"] = types
    first = types.index("sliding_attention") if window is not None else len(
        types)
    if all(t == "sliding_attention" for t in types[first:]):
      out["max_window_layers"] = first
  return out


def _tensors(model, params) -> Dict[str, np.ndarray]:
  """Hugging Face tensor name -> NumPy array (C-contiguous)."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    flax_path = tuple(p.key for p in path)
    if isinstance(model, gpt2.GPT2LM):
      name, transpose = hf_import.gpt2_hf_name(flax_path), False
    else:
      name, transpose = hf_import.decoder_hf_name(flax_path)
    value = np.asarray(jax.device_get(value))
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  return out


def save_hf_checkpoint(model, params, path: str, *,
                       source: Optional[str] = None) -> str:
  """Writes ``model`` and ``params`` as a Hugging Face checkpoint directory.

  Args:
    model: a ``GPT2LM`` or ``DecoderLM``.
    params: its parameters (each tensor keeps its dtype; config.json's
      ``dtype`` is float32 if any parameter is, else bfloat16 or float16).
    path: the directory to write (created if needed; ``model.safetensors``,
      ``config.json`` and copied files are overwritten).
    source: a Hugging Face directory whose tokenizer and generation files
      (``COPIED_FILES``) are copied, and whose ``config.json`` of the same
      family provides the keys this module does not manage (token ids,
      ...). None: a ``DecoderLM`` loaded by ``load_hf_checkpoint`` uses the
      directory it was loaded from (``config.source_path``), when it still
      exists; a ``GPT2LM`` copies nothing.

  Returns:
    ``path``.

  Raises:
    ValueError: an unsupported model, a config its ``model_type`` cannot
    express, or a ``path`` holding a sharded checkpoint (whose index would
    shadow the written file). FileNotFoundError: ``source`` is not a
    directory.
  """
  if isinstance(model, gpt2.GPT2LM):
    config = _gpt2_config(model.config)
  elif isinstance(model, decoder.DecoderLM):
    config = _decoder_config(model.config)
    if source is None and model.config.source_path and os.path.isdir(
        model.config.source_path):
      source = model.config.source_path
  else:
    raise ValueError(f"save_hf_checkpoint supports GPT2LM and DecoderLM, not "
                     f"{type(model).__name__}.")
  if source is not None and not os.path.isdir(source):
    raise FileNotFoundError(f"source {source!r} is not a directory.")
  os.makedirs(path, exist_ok=True)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    raise ValueError(f"{path!r} holds a sharded checkpoint ({index}); write "
                     "to another directory.")
  family = config["model_type"]
  merged = {}
  source_config = os.path.join(source, "config.json") if source else None
  if source_config and os.path.isfile(source_config):
    with open(source_config) as f:
      original = json.load(f)
    if original.get("model_type") == family:
      merged = {k: v for k, v in original.items() if k not in _REPLACED}
  merged.update(config)
  merged["architectures"] = [_ARCHITECTURES[family]]
  merged["dtype"] = _dtype_name(params)
  st_numpy.save_file(_tensors(model, params),
                     os.path.join(path, "model.safetensors"),
                     metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
  if source is not None:
    for name in COPIED_FILES:
      src, dst = os.path.join(source, name), os.path.join(path, name)
      if os.path.isfile(src) and not (os.path.exists(dst)
                                      and os.path.samefile(src, dst)):
        shutil.copyfile(src, dst)
  return path
