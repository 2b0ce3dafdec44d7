"""fdiv_jax: aligning language models with preferences by f-divergence minimisation.

The pure core (``divergences``, ``estimators``, ``losses``, ``baselines``) imports
nothing but JAX and NumPy. Everything that needs Flax, Optax or Orbax (models,
sampling, training) is imported lazily, on first attribute access, so that other
JAX projects can reuse the estimators without pulling those in.
"""

import importlib

from fdiv_jax import baselines, divergences, estimators, losses

__version__ = "0.1.0"

_LAZY_SUBMODULES = (
    "features",
    "metrics",
    "models",
    "output_layer",
    "qrs",
    "reward_model",
    "sampling",
    "scoring",
    "targets",
    "tokenization",
    "train",
)


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    module = importlib.import_module(f"fdiv_jax.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'fdiv_jax' has no attribute {name!r}")


__all__ = ["baselines", "divergences", "estimators", "losses", *_LAZY_SUBMODULES]
