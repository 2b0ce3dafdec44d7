"""LoRA: low-rank adapters on the projections of a frozen GPT-2 or Llama-family model.

Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, ICLR 2022.
Each adapted projection ``y = x W (+ b)`` (a Flax ``Dense``, kernel W [in, out])
becomes

    y = x W (+ b) + (α / r) · (x A) B,     A [in, r],  B [r, out],

with W frozen and only A and B trained. In Hugging Face / PEFT notation (Linear
weights [out, in]) this is ``W_hf + (α/r) · B_hf A_hf`` with ``A_hf = Aᵀ``,
``B_hf = Bᵀ``. B starts at zero, so the adapted model *is* the base model at
step 0 (exactly: the adapter adds an exact 0); A starts uniform in
±1/sqrt(in) (PEFT's Kaiming-uniform default).

Design. ``LoRALM(base, lora)`` wraps an unmodified ``GPT2LM`` / ``DecoderLM``
and implements the same ``LanguageModel`` interface, so the sampler, the
scorer and the train step use it unchanged. Its parameters are two subtrees:

    {"base": <the base model's parameters>, "lora": <adapters>}

where the adapters mirror the base tree down to each adapted projection,
``{"layers_0": {"self_attn": {"q_proj": {"lora_a": A, "lora_b": B}}}, ...}``.
``apply`` runs the base model with Flax's ``nn.intercept_methods``: every call
of an adapted ``Dense`` gets the low-rank term added. With ``"lora": None`` it
runs the base model alone. So one copy of the frozen weights serves both the
policy π = base + adapters and the base model a of the f-DPG target:

    policy_params(model, base_params, adapters)  -> {"base": ..., "lora": adapters}
    base_model_params(model, base_params)        -> {"base": ..., "lora": None}

(both return their argument unchanged for a plain model, so code written for
full fine-tuning works for both). The train state holds ``params`` = the
adapters and ``base_params`` = the frozen weights (``fdiv_jax.train.state``);
only the adapters get gradients and optimiser state.

Targets name ``Dense`` modules by their last path components: ``"q_proj"``
adapts every layer's q_proj, ``"attn/c_proj"`` only GPT-2's attention output
(not ``mlp/c_proj``). The defaults are ``("q_proj", "v_proj")`` for the
Llama family and ``("c_attn",)`` (the fused q/k/v projection) for GPT-2, as in
the paper.

Dtypes: adapters are float32 whatever the base's ``param_dtype``; the
low-rank term is computed in the layer's activation dtype and added to its
output. ``merge`` folds the adapters into the kernels, ``W + (α/r)·A B`` in
float32 arithmetic, cast back to W's dtype: a plain model for export
(``save_hf_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import _values
from fdiv_jax.lm.models import decoder
from fdiv_jax.lm.models import gpt2

Array = jax.Array

# The projections (Dense modules) of each family's blocks; a target is one of
# them or its last component ("c_proj" adapts both of GPT-2's).
PROJECTIONS = {
    "gpt2": ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"),
    "decoder": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                "mlp/down_proj"),
}
DEFAULT_TARGETS = {"gpt2": ("c_attn",), "decoder": ("q_proj", "v_proj")}


def family(model_type: str) -> Optional[str]:
  """"gpt2" or "decoder" for a model type (``gpt2``, ``llama``, ``mistral``,
  ``qwen2``, ``qwen3``, or a model object), None for anything else."""
  if isinstance(model_type, gpt2.GPT2LM):
    return "gpt2"
  if isinstance(model_type, decoder.DecoderLM):
    return "decoder"
  if model_type == "gpt2":
    return "gpt2"
  if model_type in decoder.MODEL_TYPES:
    return "decoder"
  return None


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which projections get adapters, of what rank and scale.

  Attributes:
    rank: r, the adapters' rank; 0 = no LoRA (full fine-tuning).
    alpha: α > 0; the low-rank term is scaled by α / r.
    targets: the adapted ``Dense`` modules by name (module docstring); empty
      = the family's default (``DEFAULT_TARGETS``), filled in by
      ``for_family``.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: Tuple[str, ...] = ()

  def __post_init__(self):
    _values.integer("rank", self.rank, minimum=0, note=" (0 = no LoRA)")
    _values.real("alpha", self.alpha, low=0.0, low_open=True)
    targets = self.targets
    if isinstance(targets, str):
      targets = (targets,)
    try:
      targets = tuple(targets)
    except TypeError:
      raise ValueError(f"targets: must be a sequence of module names, got "
                       f"{self.targets!r}.") from None
    for i, t in enumerate(targets):
      if not isinstance(t, str) or not t or t.startswith("/") or t.endswith("/"):
        raise ValueError(f"targets[{i}]: must be a module name such as 'q_proj' "
                         f"or 'attn/c_proj', got {t!r}.")
    if len(set(targets)) != len(targets):
      raise ValueError(f"targets: names a module twice: {targets}.")
    object.__setattr__(self, "targets", targets)
    object.__setattr__(self, "alpha", float(self.alpha))

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """α / r (the factor of the low-rank term)."""
    return self.alpha / self.rank if self.rank else 0.0

  def for_family(self, model_type: str) -> "LoRAConfig":
    """The config with the default targets of ``model_type``'s family filled
    in and every target checked against the family's projections.

    Raises:
      ValueError: "targets: ..." for a name that is no projection of the
        family, "rank: ..." for a model without supported projections (LSTM).
    """
    fam = family(model_type)
    if fam is None:
      raise ValueError(f"rank: LoRA adapts the projections of GPT-2 and "
                       f"Llama-family models (gpt2, {', '.join(decoder.MODEL_TYPES)}); "
                       f"got a {model_type!r} model. Use rank=0.")
    targets = self.targets or DEFAULT_TARGETS[fam]
    known = PROJECTIONS[fam]
    for i, t in enumerate(targets):
      if not any(p == t or p.endswith("/" + t) for p in known):
        names = sorted({p.split("/")[-1] for p in known})
        raise ValueError(
            f"targets[{i}]: {t!r} is no projection of a {model_type} model; "
            f"its projections are {', '.join(names)} (or by path: "
            f"{', '.join(known)}).")
    return dataclasses.replace(self, targets=tuple(targets))

  def matches(self, module_path: Sequence[str]) -> bool:
    """Whether the ``Dense`` module at ``module_path`` is adapted."""
    for t in self.targets:
      parts = tuple(t.split("/"))
      if tuple(module_path[-len(parts):]) == parts:
        return True
    return False


def _adapted_kernels(config: LoRAConfig, base_params) -> list:
  """[(module path, kernel)] of the Dense kernels that ``config`` adapts."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(base_params)[0]:
    keys = tuple(getattr(p, "key", None) for p in path)
    if keys[-1] == "kernel" and len(np.shape(leaf)) == 2 and config.matches(
        keys[:-1]):
      out.append((keys[:-1], leaf))
  return out


def _set(tree: dict, path: Sequence[str], value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def init_adapters(config: LoRAConfig, base_params, rng: Array) -> dict:
  """Adapters for every kernel of ``base_params`` that ``config`` targets.

  A [in, r] ~ U(±1/sqrt(in)) (adapter i uses ``fold_in(rng, i)``, in tree
  order), B [r, out] = 0, both float32.

  Raises:
    ValueError: "targets: ..." when a target matches no kernel of the model.
  """
  if not config.enabled:
    raise ValueError("rank: init_adapters needs rank >= 1.")
  kernels = _adapted_kernels(config, base_params)
  for t in config.targets:
    single = LoRAConfig(rank=config.rank, alpha=config.alpha, targets=(t,))
    if not any(single.matches(path) for path, _ in kernels):
      dense = sorted({"/".join(p[-2:]) for p in _dense_paths(base_params)})
      raise ValueError(f"targets: {t!r} matches no projection of the model; its "
                       f"projections are {', '.join(dense)}.")
  adapters: dict = {}
  for i, (path, kernel) in enumerate(kernels):
    fan_in, fan_out = np.shape(kernel)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, config.rank),
                           jnp.float32, -bound, bound)
    _set(adapters, path, {"lora_a": a,
                          "lora_b": jnp.zeros((config.rank, fan_out), jnp.float32)})
  return adapters


def _dense_paths(base_params) -> list:
  return [tuple(getattr(p, "key", None) for p in path)[:-1]
          for path, leaf in jax.tree_util.tree_flatten_with_path(base_params)[0]
          if getattr(path[-1], "key", None) == "kernel" and len(np.shape(leaf)) == 2]


def _lookup(tree, path):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _interceptor(adapters, scale: float):
  """Adds ``scale · (x A) B`` to every adapted Dense's output."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    adapter = _lookup(adapters, module.path)
    if adapter is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    (x,) = args
    dtype = y.dtype
    h = jnp.einsum("...i,ir->...r", x.astype(dtype),
                   adapter["lora_a"].astype(dtype))
    delta = jnp.einsum("...r,ro->...o", h, adapter["lora_b"].astype(dtype))
    return y + (delta * jnp.asarray(scale, dtype)).astype(dtype)

  return intercept


@dataclasses.dataclass(frozen=True)
class LoRALM:
  """A frozen ``GPT2LM`` / ``DecoderLM`` plus LoRA adapters (module docstring).

  Implements ``fdiv_jax.lm.models.base.LanguageModel`` through ``apply``:
  ``model.apply({"params": {"base": base_params, "lora": adapters}}, ...,
  method=...)`` with the base model's methods; ``"lora": None`` is the base
  model alone.

  Attributes:
    base: the wrapped model.
    lora: the adapters' config (targets resolved, rank >= 1).
    base_path: where the base weights come from (a Hugging Face directory,
      ...), the name a checkpoint records for them.
  """
  base: Any
  lora: LoRAConfig
  base_path: str = ""

  def __post_init__(self):
    if family(self.base) is None:
      raise ValueError(f"base: LoRA wraps a GPT2LM or DecoderLM, not "
                       f"{type(self.base).__name__}.")
    if not self.lora.enabled:
      raise ValueError("rank: a LoRALM needs rank >= 1.")

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size

  @property
  def max_positions(self):
    return self.base.max_positions

  def init_cache(self, batch_size: int, max_length: int):
    return self.base.init_cache(batch_size, max_length)

  def init(self, rng, *args, **kwargs):
    """``{"params": {"base": random base, "lora": fresh adapters}}``."""
    base_rng, lora_rng = jax.random.split(rng)
    base = self.base.init(base_rng, *args, **kwargs)["params"]
    return {"params": {"base": base,
                       "lora": init_adapters(self.lora, base, lora_rng)}}

  def apply(self, variables, *args, method=None, **kwargs):
    """The base model's ``apply`` with the adapters of ``variables``."""
    params = variables["params"]
    adapters = params.get("lora")
    run = lambda: self.base.apply({"params": params["base"]}, *args,
                                  method=method, **kwargs)
    if adapters is None:
      return run()
    with nn.intercept_methods(_interceptor(adapters, self.lora.scale)):
      return run()

  def _unbound(self, *args, **kwargs):
    raise TypeError("LoRALM methods run through model.apply(variables, ..., "
                    "method='...').")

  decode = hidden_states = unembed = output_layer = _unbound


def is_lora(model) -> bool:
  return isinstance(model, LoRALM)


def policy_params(model, base_params, params):
  """The ``params`` of ``model.apply`` for the policy: ``params`` for a plain
  model, ``{"base": base_params, "lora": params}`` for a ``LoRALM``."""
  if is_lora(model):
    return {"base": base_params, "lora": params}
  return params


def base_model_params(model, base_params):
  """The ``params`` of ``model.apply`` for the base model a: ``base_params``,
  or ``{"base": base_params, "lora": None}`` for a ``LoRALM``."""
  if is_lora(model):
    return {"base": base_params, "lora": None}
  return base_params


def to_host(tree):
  """NumPy copies of a pytree's arrays, gathered from every process when an
  array is sharded over several hosts."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def merge(model, base_params, params) -> Tuple[Any, Any]:
  """The policy as a plain model: ``(base model, merged parameters)``.

  For a ``LoRALM`` every adapted kernel becomes ``W + (α/r)·A B`` (float32
  arithmetic on the host, cast to W's dtype); for a plain model ``params``
  are the policy already. The result (NumPy arrays) is what
  ``save_hf_checkpoint`` writes.
  """
  if not is_lora(model):
    return model, to_host(params)
  merged = to_host(base_params)
  adapters = to_host(params)
  for path, kernel in _adapted_kernels(model.lora, merged):
    adapter = _lookup(adapters, path)
    delta = adapter["lora_a"].astype(np.float32) @ adapter["lora_b"].astype(
        np.float32)
    value = kernel.astype(np.float32) + np.float32(model.lora.scale) * delta
    _set(merged, path + ("kernel",), value.astype(kernel.dtype))
  return model.base, merged


def fingerprint(params) -> str:
  """``"sha256:<hex>"`` of a parameter tree: every leaf's path, dtype, shape
  and bytes, in tree order. Equal trees (same weights in the same dtypes)
  have equal fingerprints, wherever they were loaded from."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.ascontiguousarray(to_host(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{value.dtype.name}{value.shape}".encode())
    digest.update(value.tobytes())
  return "sha256:" + digest.hexdigest()


def num_params(tree) -> int:
  """Number of scalars in a pytree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
