"""fdiv_jax: aligning language models with preferences by f-divergence minimisation.

The package is layered; each layer imports only the ones above it here:

  core/     divergences, estimators, losses, preference,       JAX + NumPy only
            uncertainty, baselines, qrs                        (+ chex)
  lm/       models, tokenization, output_layer, scoring,      + Flax
            sampling, enumeration, pretrain
  targets/  target EBMs, features, λ fitting, reward model    the core (+ Flax for
                                                              the reward model)
  train/    f-DPG state, the jitted step, sharding,           + Optax, Orbax
            checkpoints, the host loop (typed objects only)
  run/      config, tasks, evaluation, reporting, metrics     + ml_collections
  main.py   ``python -m fdiv_jax.main --config=... --workdir=...``

The core is imported here eagerly (it is light); everything else on first
attribute access, so ``from fdiv_jax import divergences, estimators, losses``
pulls in neither Flax nor Optax. The short names of the flat layout of earlier
versions keep working as attributes: ``from fdiv_jax import models, sampling,
features, targets, train`` (the core modules also as ``import
fdiv_jax.divergences``). To import *from* a module, name it in its layer:
``from fdiv_jax.lm.models import GPT2LM``.
"""

import importlib
import sys

from fdiv_jax.core import (baselines, divergences, estimators, losses, preference,
                           qrs, uncertainty)

__version__ = "0.2.0"

# Public short name -> the module in its layer (imported on first access).
_LAZY_SUBMODULES = {
    "models": "fdiv_jax.lm.models",
    "tokenization": "fdiv_jax.lm.tokenization",
    "output_layer": "fdiv_jax.lm.output_layer",
    "scoring": "fdiv_jax.lm.scoring",
    "sampling": "fdiv_jax.lm.sampling",
    "enumeration": "fdiv_jax.lm.enumeration",
    "pretrain": "fdiv_jax.lm.pretrain",
    "targets": "fdiv_jax.targets",
    "features": "fdiv_jax.targets.features",
    "reward_model": "fdiv_jax.targets.reward_model",
    "train": "fdiv_jax.train",
    "config": "fdiv_jax.run.config",
    "metrics": "fdiv_jax.run.metrics",
}

for _name, _module in (("baselines", baselines), ("divergences", divergences),
                       ("estimators", estimators), ("losses", losses),
                       ("preference", preference), ("qrs", qrs),
                       ("uncertainty", uncertainty)):
  sys.modules.setdefault(f"fdiv_jax.{_name}", _module)


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    module = importlib.import_module(_LAZY_SUBMODULES[name])
    globals()[name] = module
    sys.modules.setdefault(f"fdiv_jax.{name}", module)
    return module
  raise AttributeError(f"module 'fdiv_jax' has no attribute {name!r}")


__all__ = ["baselines", "divergences", "estimators", "losses", "preference", "qrs",
           "uncertainty", *_LAZY_SUBMODULES]
