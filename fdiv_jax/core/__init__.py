"""The pure f-divergence core: JAX and NumPy only (plus chex for shape checks).

``divergences`` (f and f' in log t, exact D_f on a finite support),
``estimators`` (importance-sampled log Z, D_f(π‖p), KL(π‖a), moments, ESS),
``losses`` (the f-DPG pseudo-reward, importance weight and surrogate),
``preference`` (offline preference losses from the same registry: f-DPO and
f-PO, also re-exported by ``losses``), ``uncertainty`` (estimates with their
standard errors, per context, from mixtures of proposals), ``baselines`` (variance-reducing
baselines as pure state updates) and ``qrs`` (quasi-rejection sampling).
Nothing here knows of models, configs or Flax: reuse it in any JAX project.
"""

# `losses` before `preference`: `losses` re-exports `preference`'s functions.
from fdiv_jax.core import (baselines, divergences, estimators, losses, preference,
                           qrs, uncertainty)

__all__ = ["baselines", "divergences", "estimators", "losses", "preference", "qrs",
           "uncertainty"]
