"""Targets built from a description (a mapping, e.g. part of a run config)."""

from __future__ import annotations

from typing import Any, Mapping

from fdiv_jax.targets import ebms
from fdiv_jax.targets import features as features_lib
from fdiv_jax.targets.ebms import (ConditionalTarget, DistributionalTarget,
                                   PointwiseTarget, ProductTarget, RewardTarget)

# --------------------------------------------------------------------------
# Targets from a config.
# --------------------------------------------------------------------------

_KINDS = ("pointwise", "distributional", "reward", "product", "conditional")


def from_config(cfg: Mapping[str, Any], **shared: Any):
  """Builds a target from a config mapping (or ``ml_collections.ConfigDict``).

  ``shared`` (e.g. ``decode=tokenizer.batch_decode``,
  ``encode=tokenizer.encode``) is passed to the features that accept it.
  Forms (features as in ``features.from_spec``)::

    {"kind": "pointwise", "features": ["python_compiles"]}
    {"kind": "distributional", "features": ["female"], "moments": [0.5],
     "lambdas": None}
    {"kind": "reward", "feature": "sentiment", "beta": 0.1}
    {"kind": "product", "factors": [<target>, ...], "alignment_index": 0}
    {"kind": "conditional", "target": <target>}
  """
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  cfg = dict(cfg)
  kind = cfg.get("kind")
  if kind not in _KINDS:
    raise ValueError(
        f"target config field 'kind': {kind!r} is not one of {_KINDS}")

  def feats(key):
    if key not in cfg:
      raise ValueError(f"{kind} target config: missing field {key!r}")
    specs = cfg[key]
    if isinstance(specs, (str, Mapping)):
      specs = [specs]
    return tuple(features_lib.from_spec(s, **shared) for s in specs)

  if kind == "pointwise":
    return PointwiseTarget(feats("features"))
  if kind == "distributional":
    if "moments" not in cfg:
      raise ValueError("distributional target config: missing field 'moments'")
    return DistributionalTarget(feats("features"), cfg["moments"],
                                cfg.get("lambdas"))
  if kind == "reward":
    if "beta" not in cfg:
      raise ValueError("reward target config: missing field 'beta'")
    (reward,) = feats("feature")
    return RewardTarget(reward, cfg["beta"])
  if kind == "product":
    factors = tuple(from_config(f, **shared) for f in cfg.get("factors", ()))
    return ProductTarget(factors, cfg.get("alignment_index", 0))
  if "target" not in cfg:
    raise ValueError("conditional target config: missing field 'target'")
  return ConditionalTarget(from_config(cfg["target"], **shared))
