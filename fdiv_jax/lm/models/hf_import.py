"""Import of local Hugging Face checkpoints, without PyTorch.

Supported families (``config.json``'s ``model_type``, ``SUPPORTED_MODEL_TYPES``):

* ``gpt2``: ``GPT2LM`` (``GPT2Config``), tied output layer.
* ``llama``: ``DecoderLM`` (``DecoderConfig``); GQA / MQA, ``attention_bias``,
  ``mlp_bias``, tied or untied output layer.
* ``mistral``: ``DecoderLM`` with the sliding window on every layer.
* ``qwen2``: ``DecoderLM`` with q/k/v biases (and ``use_sliding_window`` /
  ``layer_types``).
* ``qwen3``: ``DecoderLM`` with per-head q/k RMSNorms and its own ``head_dim``.

Rotary scaling (``rope_parameters``, or the older ``rope_theta`` +
``rope_scaling``) of type default, ``linear``, ``llama3`` or ``yarn``; other
types (``dynamic``, ``longrope``, ...), partial rotary embeddings and other
families (Gemma, Phi, BERT, ...) are refused.

A checkpoint directory is what ``save_pretrained`` writes: ``config.json``
plus ``model.safetensors``, or shards listed in ``model.safetensors.index.json``.
Tensors (float32, float16 or bfloat16; bfloat16 through ``ml_dtypes``) are
read one at a time with ``safetensors`` in its NumPy mode, renamed to Flax
parameters (Linear weights transposed to Dense kernels for ``DecoderLM``;
GPT-2's ``Conv1D`` weights are already [in, out]) and cast to
``param_dtype``. Every parameter must come from a tensor of the right shape and
every tensor must be used: a missing tensor, an unexpected one or a shape
mismatch is a ``ValueError`` naming the file, the tensor and the shapes.
Non-persistent buffers of older checkpoints (GPT-2's ``attn.bias`` /
``attn.masked_bias``, rotary ``inv_freq``) are skipped.
"""

import contextlib
import json
import os
import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  pylint: disable=unused-import  (registers bfloat16 with NumPy)
import numpy as np
from safetensors import safe_open

from fdiv_jax.lm.models import decoder
from fdiv_jax.lm.models import gpt2

SUPPORTED_MODEL_TYPES = ("gpt2",) + decoder.MODEL_TYPES
_UNSUPPORTED_TRUE = ("add_cross_attention", "scale_attn_by_inverse_layer_idx")
# Buffers (not parameters) that older checkpoints saved; skipped.
_GPT2_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_DECODER_BUFFERS = re.compile(r"rotary_emb\.inv_freq$")
# Class defaults of transformers' configs for keys a config.json may omit.
_DECODER_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "head_dim": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "head_dim": None},
    "qwen2": {"max_position_embeddings": 32768, "head_dim": None},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
}


def _read_config(path: str) -> Dict[str, Any]:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No config.json in checkpoint directory {path!r}.")
  with open(config_path) as f:
    return json.load(f)


def _unsupported(hf: Dict[str, Any]) -> ValueError:
  model_type = hf.get("model_type")
  return ValueError(
      f"Checkpoint architecture {model_type!r} (architectures="
      f"{hf.get('architectures')}) is not supported: model_type must be one "
      f"of {', '.join(SUPPORTED_MODEL_TYPES)}.")


def gpt2_config_from_hf(hf: Dict[str, Any], dtype=jnp.float32,
                        param_dtype=jnp.float32) -> gpt2.GPT2Config:
  """``GPT2Config`` from a Hugging Face GPT-2 ``config.json`` dict.

  Raises:
    ValueError: not a GPT-2 config, or options GPT2LM does not implement
      (cross-attention, layer-index attention scaling, unscaled attention,
      untied output embeddings).
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise _unsupported(hf)
  if model_type != "gpt2":
    raise ValueError(f"model_type {model_type!r} is not GPT-2 (use "
                     "config_from_hf).")
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


def _rope_from_hf(hf: Dict[str, Any]) -> Tuple[float, Optional[dict]]:
  """(rope_theta, rope_scaling or None) from either config format: v4's
  ``rope_theta`` + ``rope_scaling`` or v5's ``rope_parameters`` (which
  ``rope_scaling`` overrides, as transformers does)."""
  params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise ValueError(f"Per-layer-type rope parameters {params} are not "
                     "supported.")
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  partial = params.pop("partial_rotary_factor",
                       hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise ValueError(f"partial_rotary_factor={partial} is not supported.")
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  if rope_type not in decoder.ROPE_TYPES:
    raise ValueError(f"rope type {rope_type!r} is not supported (supported: "
                     f"{sorted(decoder.ROPE_TYPES)}).")
  if rope_type == "default":
    return theta, None
  if (rope_type in ("llama3", "yarn")
      and params.get("original_max_position_embeddings") is None):
    params["original_max_position_embeddings"] = hf.get(
        "original_max_position_embeddings", hf["max_position_embeddings"])
  return theta, dict(params, rope_type=rope_type)


def decoder_config_from_hf(hf: Dict[str, Any], dtype=jnp.float32,
                           param_dtype=jnp.float32,
                           source_path: Optional[str] = None,
                           ) -> decoder.DecoderConfig:
  """``DecoderConfig`` from a Llama / Mistral / Qwen2 / Qwen3 ``config.json``.

  Raises:
    ValueError: another family, or options ``DecoderLM`` does not implement
      (rope types other than default / linear / llama3 / yarn, partial
      rotary embeddings, per-layer rope parameters).
  """
  model_type = hf.get("model_type")
  if model_type not in decoder.MODEL_TYPES:
    raise _unsupported(hf)
  required = ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads")
  absent = [key for key in required if hf.get(key) is None]
  if absent:
    raise ValueError(f"A {model_type} config needs {', '.join(absent)}.")
  defaults = _DECODER_DEFAULTS[model_type]
  hf = dict(hf)
  hf.setdefault("max_position_embeddings", defaults["max_position_embeddings"])
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or defaults["head_dim"]
  if head_dim is None:
    head_dim = hf["hidden_size"] // heads
  theta, scaling = _rope_from_hf(hf)
  bias = bool(hf.get("attention_bias", False))
  kwargs = dict(attention_bias=bias, attention_out_bias=bias,
                mlp_bias=bool(hf.get("mlp_bias", False)))
  window, layer_types = None, None
  if model_type == "mistral":
    kwargs = dict(attention_bias=False, attention_out_bias=False)
    window = hf.get("sliding_window")
  elif model_type in ("qwen2", "qwen3"):
    if model_type == "qwen2":
      kwargs = dict(attention_bias=True, attention_out_bias=False)
    else:
      kwargs = dict(attention_bias=bias, attention_out_bias=bias,
                    qk_norm=True)
    if hf.get("use_sliding_window", False):
      window = hf.get("sliding_window")
    if window is not None:
      layers = hf["num_hidden_layers"]
      layer_types = hf.get("layer_types") or [
          "sliding_attention" if i >= hf.get("max_window_layers", 28)
          else "full_attention" for i in range(layers)]
  return decoder.DecoderConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      max_position_embeddings=hf["max_position_embeddings"],
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      hidden_act=hf.get("hidden_act", "silu"), rope_theta=theta,
      rope_scaling=scaling,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_window=window, layer_types=layer_types,
      initializer_range=hf.get("initializer_range", 0.02),
      model_type=model_type, dtype=dtype, param_dtype=param_dtype,
      source_path=source_path, **kwargs)


def config_from_hf(hf: Dict[str, Any], dtype=jnp.float32,
                   param_dtype=jnp.float32):
  """``GPT2Config`` or ``DecoderConfig`` from a ``config.json`` dict,
  by its ``model_type`` (``SUPPORTED_MODEL_TYPES``).

  Raises:
    ValueError: another family, or options the models do not implement.
  """
  if hf.get("model_type") == "gpt2":
    return gpt2_config_from_hf(hf, dtype, param_dtype)
  return decoder_config_from_hf(hf, dtype, param_dtype)


class _Tensors:
  """The tensors of a checkpoint directory, read lazily, one at a time.

  ``names`` maps each tensor name (with ``prefix`` stripped) to
  ``(name in the file, file path)``.
  """

  def __init__(self, path: str, stack: contextlib.ExitStack, prefix: str):
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
      files = {None: single}
      self.where = single
    elif os.path.isfile(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a readable safetensors index (a JSON "
                         f"object with a 'weight_map'): {e!r}") from e
      files = {name: os.path.join(path, shard)
               for name, shard in weight_map.items()}
      self.where = index
    else:
      raise FileNotFoundError(
          f"No model.safetensors (or model.safetensors.index.json) in "
          f"{path!r}; PyTorch .bin checkpoints are not read (save with "
          "safe_serialization).")
    self._handles = {}
    for file in sorted(set(files.values())):
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{self.where} names shard {file!r}, which "
                                "does not exist.")
      try:
        self._handles[file] = stack.enter_context(safe_open(file, "np"))
      except Exception as e:  # safetensors.SafetensorError, OSError
        raise ValueError(
            f"{file}: not a readable safetensors file, cut short or corrupt "
            f"({type(e).__name__}: {e}); download or export it again."
        ) from e
    self.names = {}
    for file, handle in self._handles.items():
      for name in handle.keys():
        stripped = name[len(prefix):] if name.startswith(prefix) else name
        self.names[stripped] = (name, file)

  def shape(self, name: str) -> Tuple[int, ...]:
    full, file = self.names[name]
    return tuple(self._handles[file].get_slice(full).get_shape())

  def read(self, name: str) -> np.ndarray:
    full, file = self.names[name]
    try:
      return self._handles[file].get_tensor(full)
    except Exception as e:  # safetensors.SafetensorError, OSError
      raise ValueError(f"{file}: cannot read tensor {full!r} ({type(e).__name__}: "
                       f"{e}); the file is corrupt.") from e

  def describe(self, name: str, word: str = "tensor") -> str:
    full, file = self.names[name]
    return f"{file}: {word} {full!r}"


def _convert(tensors: _Tensors, shapes, hf_name: Callable, what: str,
             skip: re.Pattern, prefix: str):
  """Flax params (``shapes``' tree) from ``tensors``; ``hf_name(path) ->
  (name, transpose)``. Every tensor but ``skip``'d buffers must be used."""
  used = set()

  def convert(path, leaf):
    flax_path = tuple(p.key for p in path)
    name, transpose = hf_name(flax_path)
    expected = tuple(leaf.shape[::-1] if transpose else leaf.shape)
    if name not in tensors.names:
      raise ValueError(
          f"{tensors.where}: checkpoint has no tensor "
          f"{name if name.startswith('lm_head') else prefix + name!r} "
          f"(shape {expected}, needed for parameter {'/'.join(flax_path)} of "
          f"the {what} described by config.json); it has "
          f"{len(tensors.names)} tensors.")
    shape = tensors.shape(name)
    if shape != expected:
      raise ValueError(
          f"{tensors.describe(name, 'Tensor')} has shape "
          f"{shape}, expected {expected} for the {what} described by "
          "config.json.")
    used.add(name)
    value = tensors.read(name)
    if transpose:
      value = value.T
    return jnp.asarray(np.asarray(value).astype(leaf.dtype))

  params = jax.tree_util.tree_map_with_path(convert, shapes)
  for name in sorted(tensors.names):
    if name not in used and not skip.search(name):
      raise ValueError(
          f"{tensors.describe(name)} (shape {tensors.shape(name)}) is "
          f"unexpected: it is no parameter of the {what} described by "
          "config.json.")
  return params


def _check_tied(tensors: _Tensors, head: str, embedding: str):
  """A saved output layer of a tied model must equal the embedding; it is
  then dropped from ``tensors``."""
  if head in tensors.names and embedding in tensors.names:
    same = (tensors.shape(head) == tensors.shape(embedding)
            and np.array_equal(tensors.read(head), tensors.read(embedding)))
    if not same:
      raise ValueError(
          f"{tensors.describe(head)} (shape {tensors.shape(head)}) differs "
          f"from {tensors.describe(embedding)} (shape "
          f"{tensors.shape(embedding)}) although the output layer is tied "
          "(tie_word_embeddings): untied output layers are not supported "
          "for this config.")
    del tensors.names[head]


def _gpt2_name(flax_path: Tuple[str, ...]) -> Tuple[str, bool]:
  """GPT2LM parameter path -> (Hugging Face name without 'transformer.',
  transpose)."""
  *modules, leaf = flax_path
  parts = []
  for m in modules:
    parts.extend(m.split("_", 1) if m.startswith("h_") else [m])
  hf_leaf = {"embedding": "weight", "kernel": "weight", "scale": "weight",
             "bias": "bias"}[leaf]
  return ".".join(parts + [hf_leaf]), False


def _decoder_name(flax_path: Tuple[str, ...]) -> Tuple[str, bool]:
  """DecoderLM parameter path -> (Hugging Face name without 'model.',
  transpose). ``lm_head`` lives outside 'model.' and is named in full."""
  if flax_path == ("lm_head",):
    return "lm_head.weight", False
  *modules, leaf = flax_path
  parts = []
  for m in modules:
    parts.extend(m.split("_", 1) if m.startswith("layers_") else [m])
  hf_leaf = {"embedding": "weight", "kernel": "weight", "scale": "weight",
             "bias": "bias"}[leaf]
  return ".".join(parts + [hf_leaf]), leaf == "kernel"


def gpt2_hf_name(flax_path: Tuple[str, ...]) -> str:
  """Full Hugging Face tensor name of a ``GPT2LM`` parameter path."""
  return "transformer." + _gpt2_name(flax_path)[0]


def decoder_hf_name(flax_path: Tuple[str, ...]) -> Tuple[str, bool]:
  """(full Hugging Face tensor name, transposed?) of a ``DecoderLM`` path."""
  name, transpose = _decoder_name(flax_path)
  return (name if flax_path == ("lm_head",) else "model." + name), transpose


def load_hf_checkpoint(path: str, dtype=jnp.float32, param_dtype=jnp.float32,
                       ) -> Tuple[Any, Dict[str, Any]]:
  """Loads a local Hugging Face checkpoint directory (see module docstring).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or shards
      and ``model.safetensors.index.json``).
    dtype: activation dtype of the returned model.
    param_dtype: dtype of the returned parameters.

  Returns:
    ``(model, params)``: a ``GPT2LM`` or a ``DecoderLM`` (whose
    ``config.source_path`` is ``path``, for ``save_hf_checkpoint``) with
    ``model.apply({"params": params}, tokens)`` giving float32 logits
    [B, T, V] equal to transformers' up to float rounding.

  Raises:
    FileNotFoundError: missing files. ValueError: an unsupported family or
    option, or tensors that do not match ``config.json``.
  """
  hf = _read_config(path)
  model_type = hf.get("model_type")
  try:
    if model_type == "gpt2":
      config = gpt2_config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
      model = gpt2.GPT2LM(config)
      prefix, names, skip = "transformer.", _gpt2_name, _GPT2_BUFFERS
    else:
      config = decoder_config_from_hf(hf, dtype=dtype,
                                      param_dtype=param_dtype,
                                      source_path=os.path.abspath(path))
      model = decoder.DecoderLM(config)
      prefix, names, skip = "model.", _decoder_name, _DECODER_BUFFERS
  except (ValueError, KeyError, TypeError) as e:
    message = (e.args[0] if isinstance(e, ValueError) else
               f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else
               f"bad value ({e})")
    raise ValueError(
        f"{os.path.join(path, 'config.json')}: {message}") from e
  head = "lm_head.weight"
  embedding = "wte.weight" if model_type == "gpt2" else "embed_tokens.weight"
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 1), jnp.int32))["params"]
  what = f"{model_type} model"
  with contextlib.ExitStack() as stack:
    tensors = _Tensors(path, stack, prefix)
    if model_type == "gpt2" or config.tie_word_embeddings:
      _check_tied(tensors, head, embedding)
    params = _convert(tensors, shapes, names, what, skip, prefix)
  return model, params
