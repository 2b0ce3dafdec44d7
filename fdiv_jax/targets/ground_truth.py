"""A target that reports a ground-truth rule as its alignment.

`GroundTruthTarget(target, ground_truth)` trains like ``target`` (its P, energy,
Z) but every evaluation reports ``ground_truth`` b(x) as ``alignment``: for a
run whose target is not the thing it should achieve, e.g. RLHF with a learned
reward r (P = a·exp(r/β)) where the pairs were labelled by a known rule b, or
offline preference training judged by the rule its data came from.
``config.ground_truth`` sets it (`run.tasks.build`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from fdiv_jax.targets import features as features_lib


@dataclasses.dataclass(frozen=True)
class GroundTruthTarget:
  """``target`` (its P, energy, Z) reporting ``ground_truth`` as its alignment.

  For a run whose target is not the thing it should achieve, e.g. RLHF with
  a learned reward r (P = a·exp(r/β)) where the pairs were labelled by a
  known rule b: ``alignment`` is b(x), so every evaluation reports
  E_π[b] ± its error; ``feature_values`` are the target's (r, as
  ``moment/<name>``) then b. Training is unchanged: ``log_prob`` and
  ``log_energy`` are the target's.
  """
  target: Any
  ground_truth: features_lib.Feature
  is_conditional = False

  @property
  def feature_names(self) -> tuple[str, ...]:
    return (*self.target.feature_names, self.ground_truth.name)

  def feature_values(self, tokens, mask, context=None):
    return jnp.concatenate([self.target.feature_values(tokens, mask, context),
                            self.ground_truth(tokens, mask, context)[:, None]],
                           axis=-1)

  def log_energy(self, tokens, mask, context=None):
    return self.target.log_energy(tokens, mask, context)

  def log_prob(self, tokens, mask, log_base, context=None):
    return self.target.log_prob(tokens, mask, log_base, context)

  def alignment(self, tokens, mask, context=None):
    return self.ground_truth(tokens, mask, context)
