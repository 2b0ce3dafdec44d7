"""Targets built from a description: plain values or a config mapping.

:class:`TargetSpec` describes an unconditional target (pointwise,
distributional or reward) with plain values, e.g. the ``target`` section of a
run config. Constructing one is cheap (no model, no tokenizer) and checks
everything a config can get wrong; :meth:`TargetSpec.build` then returns the
target with features built on a real tokenizer's ``decode``/``encode``.

Where each check lives:

* the spec itself (this module): the kind, which fields the kind uses, that a
  reward target names a reward, and ``fit_samples``;
* :mod:`fdiv_jax.targets.features`: feature specs (``parse_spec``), feature
  names (``get``/``from_spec``) and each factory's arguments;
* the target classes of :mod:`fdiv_jax.targets.ebms`: pointwise features are
  boolean, one finite moment per feature strictly inside its range, λ finite
  and one per feature, β finite and > 0.

Every error is a ValueError (or TypeError) whose message starts with the
spec field it is about, e.g. ``"features[1]: feature 'sentiment' is not
boolean, ..."`` or ``"beta: must be a finite number > 0, got -1.0."``; a run
config prefixes ``config.target.``.

:func:`from_config` builds any target, products and conditional ones
included, from a mapping, on the same constructors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fdiv_jax.core import _values
from fdiv_jax.targets import features as features_lib
from fdiv_jax.targets.ebms import (ConditionalTarget, DistributionalTarget,
                                   PointwiseTarget, ProductTarget, RewardTarget)

KINDS = ("pointwise", "distributional", "reward")
MIN_FIT_SAMPLES = 16

# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _stand_in_decode(tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """A decode for checking feature specs without a tokenizer."""
  del mask
  return [""] * len(tokens)


def _stand_in_encode(text: str) -> list[int]:
  """An encode for checking feature specs without a tokenizer (bytes)."""
  return list(text.encode("utf-8"))


_STAND_INS = {"decode": _stand_in_decode, "encode": _stand_in_encode}


def _located(where: str, error: Exception) -> Exception:
  """``error`` as a new ValueError/TypeError prefixed with ``where: ``."""
  cls = TypeError if isinstance(error, TypeError) else ValueError
  return cls(f"{where}: {error}")


def _renamed(error: Exception, old: str, new: str) -> Exception:
  """``error`` with its leading parameter ``old`` (``old:``/``old[i]:``)
  renamed ``new``; unchanged if it starts otherwise."""
  message = str(error)
  if not (message.startswith(old) and message[len(old):len(old) + 1] in ":["):
    return error
  cls = TypeError if isinstance(error, TypeError) else ValueError
  return cls(new + message[len(old):])


def _plain(spec: Any) -> Any:
  """A mapping spec (``ml_collections.ConfigDict`` too) as a dict."""
  if hasattr(spec, "to_dict"):
    return spec.to_dict()
  if isinstance(spec, Mapping):
    return dict(spec)
  return spec


def _as_tuple(value: Any, field: str) -> tuple:
  """A tuple, list or 1-D array field as a tuple."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if not isinstance(value, (tuple, list)):
    raise ValueError(f"{field}: must be a tuple, got {value!r}.")
  return tuple(value)


def _feature(spec: Any, where: str,
             shared: Mapping[str, Any]) -> features_lib.Feature:
  """``features.from_spec(spec, **shared)``; errors prefixed with ``where``."""
  try:
    return features_lib.from_spec(spec, **shared)
  except (ValueError, TypeError) as e:
    raise _located(where, e) from e


# --------------------------------------------------------------------------
# TargetSpec.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  """An unconditional target described by plain values (checked on creation).

  ``TargetSpec(**config.target.to_dict())`` turns a run config's target
  section into a spec. Construction builds the features and the target once
  with stand-in decode/encode, so every invalid value raises here, before a
  model is loaded (see the module docstring for the message form).

  Attributes:
    kind: "pointwise" (P = a·Π b_i), "distributional" (P = a·exp(λ·φ)) or
      "reward" (P = a·exp(r/β)).
    features: feature specs (anything ``features.from_spec`` accepts: a
      registry name, ``"name:key=value,..."``, a mapping ``{"name": ...}``
      or a ``features.Feature``). Pointwise: the boolean constraints b_i(x),
      all must hold; distributional: the features φ_k(x); reward: empty.
    moments: distributional only: the target moment μ̄_k of each feature,
      strictly inside its value range.
    lambdas: distributional only: λ_k, one per feature, or empty to fit λ
      on samples of the base model before training (:attr:`fits_lambdas`).
    beta: reward only: the temperature β > 0 of exp(r(x)/β).
    reward: reward only: the feature spec of the reward r(x).
    fit_samples: distributional with λ fitted: the number of samples from
      the base model λ is fitted on (an integer >= ``MIN_FIT_SAMPLES``).
  """

  kind: str
  features: tuple = ()
  moments: tuple[float, ...] = ()
  lambdas: tuple[float, ...] = ()
  beta: float = 1.0
  reward: str | Mapping[str, Any] = ""
  fit_samples: int = 2048

  def __post_init__(self):
    _values.choice("kind", self.kind, KINDS)
    self._set("features", tuple(
        _plain(s) for s in _as_tuple(self.features, "features")))
    self._set("moments", _as_tuple(self.moments, "moments"))
    self._set("lambdas", _as_tuple(self.lambdas, "lambdas"))
    self._set("reward", _plain(self.reward))
    self._check_unused_fields()
    target = self._build(_STAND_INS)
    if isinstance(target, DistributionalTarget):
      self._set("moments", target.moments)
      self._set("lambdas", target.lambdas or ())
    elif isinstance(target, RewardTarget):
      self._set("beta", target.beta)
    if self.fits_lambdas:
      _values.integer("fit_samples", self.fit_samples, minimum=MIN_FIT_SAMPLES)

  def _set(self, field: str, value: Any) -> None:
    object.__setattr__(self, field, value)

  def _check_unused_fields(self) -> None:
    """Fields the kind does not use must be left empty; a reward is needed."""
    if self.kind != "distributional":
      for field in ("moments", "lambdas"):
        value = getattr(self, field)
        if value:
          raise ValueError(
              f"{field}: is only used by a distributional target; leave it "
              f"empty for kind={self.kind!r} (got {value!r}).")
    if self.kind != "reward":
      if self.reward:
        raise ValueError(f"reward: is only used by a reward target; leave it "
                         f"empty for kind={self.kind!r}.")
      return
    if not self.reward:
      raise ValueError("reward: a reward target needs a reward feature spec, "
                       f"one of: {', '.join(features_lib.names())}.")
    if self.features:
      raise ValueError("features: is unused by a reward target (the reward is "
                       f"`reward`); leave it empty (got {self.features!r}).")

  @property
  def fits_lambdas(self) -> bool:
    """True iff λ is fitted before training (distributional, no lambdas)."""
    return self.kind == "distributional" and not self.lambdas

  def _build(self, shared: Mapping[str, Any]):
    """The target, features built with the ``shared`` factory arguments."""
    if self.kind == "reward":
      return RewardTarget(_feature(self.reward, "reward", shared), self.beta)
    feats = tuple(_feature(s, f"features[{i}]", shared)
                  for i, s in enumerate(self.features))
    if self.kind == "distributional":
      return DistributionalTarget(feats, self.moments, self.lambdas or None)
    try:
      return PointwiseTarget(feats)
    except (ValueError, TypeError) as e:
      raise _renamed(e, "constraints", "features") from e

  def build(self, *, decode: Callable[[np.ndarray, np.ndarray], Sequence[str]],
            encode: Callable[[str], Sequence[int]], conditional: bool = False):
    """The target, its features built on a real tokenizer.

    Args:
      decode: ``decode(tokens [B, N], mask [B, N]) -> list[str]`` for text
        features, e.g. ``tokenizer.batch_decode``.
      encode: ``encode(text) -> list[int]``, e.g. ``tokenizer.encode``.
      conditional: wrap the target in a ``ConditionalTarget`` (one Z per
        prompt, CDPG).

    Returns:
      A ``PointwiseTarget``, ``DistributionalTarget`` (``lambdas`` None when
      :attr:`fits_lambdas`: the caller fits λ) or ``RewardTarget``; wrapped
      in a ``ConditionalTarget`` when ``conditional``.

    Raises:
      ValueError: a feature that only fails with the real tokenizer (e.g. a
        word ``encode`` cannot encode), named like the spec's own errors.
    """
    target = self._build({"decode": decode, "encode": encode})
    return ConditionalTarget(target) if conditional else target


# --------------------------------------------------------------------------
# Targets from a config mapping.
# --------------------------------------------------------------------------

_CONFIG_KINDS = KINDS + ("product", "conditional")


def _require(cfg: Mapping[str, Any], *keys: str) -> None:
  for key in keys:
    if key not in cfg:
      raise ValueError(f"{key}: missing; a {cfg['kind']} target config needs "
                       f"it.")


def _specs(value: Any) -> tuple:
  """One feature spec or several, as a tuple."""
  if isinstance(value, (str, Mapping, features_lib.Feature)):
    return (value,)
  return _as_tuple(value, "features")


def _nested(where: str, cfg: Any, shared: Mapping[str, Any]):
  """``from_config(cfg)``; errors prefixed with ``where.``."""
  try:
    return from_config(cfg, **shared)
  except (ValueError, TypeError) as e:
    cls = TypeError if isinstance(e, TypeError) else ValueError
    raise cls(f"{where}.{e}") from e


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

  The first three go through :class:`TargetSpec`. Errors start with the
  field they are about; inside a product or conditional target with its
  path, e.g. ``"factors[1].beta: must be ..."``.
  """
  cfg = _plain(cfg)
  kind = cfg.get("kind")
  if kind not in _CONFIG_KINDS:
    raise ValueError(f"kind: must be one of {', '.join(_CONFIG_KINDS)}; got "
                     f"{kind!r}.")
  if kind == "product":
    factors = tuple(_nested(f"factors[{i}]", f, shared)
                    for i, f in enumerate(cfg.get("factors", ())))
    return ProductTarget(factors, cfg.get("alignment_index", 0))
  if kind == "conditional":
    _require(cfg, "target")
    return ConditionalTarget(_nested("target", cfg["target"], shared))
  if kind == "reward":
    _require(cfg, "feature", "beta")
    spec = TargetSpec(kind, reward=cfg["feature"], beta=cfg["beta"])
  else:
    _require(cfg, "features", *(("moments",) if kind == "distributional"
                                else ()))
    lambdas = cfg.get("lambdas")
    spec = TargetSpec(kind, features=_specs(cfg["features"]),
                      moments=cfg.get("moments", ()),
                      lambdas=() if lambdas is None else lambdas)
  return spec._build(shared)  # pylint: disable=protected-access
