"""Target distributions: energy-based models p(x) = P(x) / Z over sequences.

A preference on the outputs of a base model a(x|c) becomes an unnormalised
target P(x) (docs/mathematics.md):

=================  ======================================  ==================
kind               log P(x)                                paper
=================  ======================================  ==================
pointwise          log a(x) + Σ_i log b_i(x), b_i ∈ {0,1}  Khalifa et al. 2021
distributional     log a(x) + λ·φ(x), λ fitted to μ̄        Khalifa et al. 2021
reward (RLHF)      log a(x) + r(x) / β, β > 0              KL-regularised RL
product            log a(x) + Σ_j energy_j(x)              —
conditional        any of the above given a context c,     Korbak et al. 2022
                   one Z_c per context                     (ICML, CDPG)
=================  ======================================  ==================

P is never normalised here; Z is estimated by importance sampling from a
proposal q (``estimators.log_partition``; :func:`log_partition_per_context`
for one Ẑ per context).

Every target object is an immutable (frozen, hashable) Python object, closed
over by ``jit``, with:

* ``feature_names: tuple[str, ...]``
* ``log_energy(tokens, mask, context=None) -> [B]``: log P(x) − log a(x).
* ``log_prob(tokens, mask, log_base, context=None) -> [B]``: log P(x);
  −inf where a hard constraint is violated.
* ``feature_values(tokens, mask, context=None) -> float32 [B, K]``.
* ``alignment(tokens, mask, context=None) -> float32 [B]``.

``tokens`` is int32 ``[B, N]`` (the continuation), ``mask`` bool ``[B, N]``
(True on generated tokens up to and including EOS), ``log_base`` ``[B]`` is
log a(x|c), and ``context`` is None or ``{"prompts": int32 [B, P],
"prompt_lengths": int32 [B]}``.

λ for distributional constraints is fitted by :func:`fit_lambdas`: minimise
the convex dual log Z(λ) − λ·μ̄, with Z(λ) and the moments estimated by
self-normalised importance sampling from samples of a proposal q.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import _values
from fdiv_jax.targets import features as features_lib
from fdiv_jax.targets import lambdas as lambdas_lib
from fdiv_jax.targets.energies import (_float_dtype, distributional_log_prob,
                                       pointwise_log_prob)

Array = jax.Array
Feature = features_lib.Feature
Context = Mapping[str, Array] | None

# --------------------------------------------------------------------------
# Target objects.
# --------------------------------------------------------------------------


def _as_features(feats: Any, param: str) -> tuple[Feature, ...]:
  """``feats`` (one Feature or several) as a non-empty tuple of Features."""
  if isinstance(feats, Feature):
    feats = (feats,)
  feats = tuple(feats)
  for i, f in enumerate(feats):
    if not isinstance(f, Feature):
      raise TypeError(
          f"{param}[{i}]: expected a features.Feature, got {type(f).__name__}.")
  if not feats:
    raise ValueError(f"{param}: needs at least one feature, e.g. one of: "
                     f"{', '.join(features_lib.names())}.")
  return feats


def _finite(value: Any) -> float | None:
  """``value`` as a float if it is a finite real number, else None."""
  if isinstance(value, (bool, np.bool_, str, bytes)):
    return None
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _entries(values: Any) -> list[Any]:
  """The entries of a sequence, or of an array flattened."""
  if isinstance(values, (list, tuple)):
    return list(values)
  return np.ravel(np.asarray(values)).tolist()


class _Target:
  """Shared ``log_prob`` = log a + ``log_energy``; ``is_conditional``."""

  is_conditional = False

  def log_prob(self, tokens: Array, mask: Array, log_base: Array,
               context: Context = None) -> Array:
    """log P(x) = log a(x|c) + log_energy(x, c); ``[B]``."""
    log_base = jnp.asarray(log_base)
    if log_base.shape != tokens.shape[:1]:
      raise ValueError(
          f"log_base has shape {tuple(log_base.shape)}; expected "
          f"({tokens.shape[0]},)")
    energy = self.log_energy(tokens, mask, context)
    dtype = _float_dtype(log_base)
    return log_base.astype(dtype) + energy.astype(dtype)


@dataclasses.dataclass(frozen=True)
class PointwiseTarget(_Target):
  """P(x) = a(x) · Π_i b_i(x), boolean constraints b_i (GDC pointwise).

  ``alignment`` is 1 iff every constraint holds; ``feature_values`` are the
  b_i(x).
  """

  constraints: tuple[Feature, ...]

  def __post_init__(self):
    feats = _as_features(self.constraints, "constraints")
    for i, f in enumerate(feats):
      if not f.is_boolean:
        raise ValueError(
            f"constraints[{i}]: feature {f.name!r} is not boolean, so it "
            "cannot be a pointwise constraint; use kind='distributional' or "
            "'reward'.")
    object.__setattr__(self, "constraints", feats)

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.constraints)

  def feature_values(self, tokens, mask, context=None):
    return features_lib.stack(self.constraints, tokens, mask, context)

  def log_energy(self, tokens, mask, context=None):
    b = self.feature_values(tokens, mask, context)
    return pointwise_log_prob(jnp.zeros(b.shape[:1], b.dtype), b)

  def alignment(self, tokens, mask, context=None):
    b = self.feature_values(tokens, mask, context)
    return jnp.all(b > 0.5, axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RewardTarget(_Target):
  """P(x) = a(x) · exp(r(x) / β), β > 0 (RLHF as Bayesian inference).

  ``feature_values`` is ``r(x)`` as ``[B, 1]``; ``alignment`` is r(x).
  """

  reward: Feature
  beta: float

  def __post_init__(self):
    if not isinstance(self.reward, Feature):
      raise TypeError(f"reward: expected a features.Feature, got "
                      f"{type(self.reward).__name__}.")
    object.__setattr__(self, "beta", _values.real("beta", self.beta, low=0.0,
                                                  low_open=True))

  @property
  def feature_names(self) -> tuple[str, ...]:
    return (self.reward.name,)

  def feature_values(self, tokens, mask, context=None):
    return self.reward(tokens, mask, context)[:, None]

  def log_energy(self, tokens, mask, context=None):
    return self.reward(tokens, mask, context) / self.beta

  def alignment(self, tokens, mask, context=None):
    return self.reward(tokens, mask, context)


@dataclasses.dataclass(frozen=True)
class DistributionalTarget(_Target):
  """P(x) = a(x) · exp(λ·φ(x)) with E_p[φ] = μ̄ (GDC distributional).

  λ is fitted with :meth:`fit` (or :func:`fit_lambdas`); until then
  ``log_prob`` refuses. A target moment on the boundary of its feature's
  value range (where λ would be infinite) or outside it is rejected at
  construction.

  ``alignment`` is the per-sample energy λ·φ(x) = log P(x) − log a(x): a
  distributional EBM is the reward EBM with r = λ·φ and β = 1, so its
  alignment is that reward; E_π[alignment] grows as π moves from a towards p.
  How well the moments are matched is read from ``feature_values``
  (E_π[φ] against ``moments``).

  Attributes:
    features: the φ_k.
    moments: target moments μ̄_k, one finite number per feature, strictly
      inside the feature's ``value_range``.
    lambdas: λ_k, one finite number per feature, or None (also given as
      ``()``) until fitted.
  """

  features: tuple[Feature, ...]
  moments: tuple[float, ...]
  lambdas: tuple[float, ...] | None = None

  def __post_init__(self):
    feats = _as_features(self.features, "features")
    object.__setattr__(self, "features", feats)
    object.__setattr__(self, "moments", self._checked_moments(feats))
    object.__setattr__(self, "lambdas", self._checked_lambdas(len(feats)))

  def _checked_moments(self, feats: tuple[Feature, ...]) -> tuple[float, ...]:
    entries = _entries(self.moments)
    if len(entries) != len(feats):
      raise ValueError(f"moments: one target moment per feature "
                       f"({len(feats)}), got {len(entries)}.")
    moments = []
    for i, (f, entry) in enumerate(zip(feats, entries)):
      m = _finite(entry)
      if m is None:
        raise ValueError(
            f"moments: entry {i} must be a finite number, got {entry!r}.")
      lo, hi = f.value_range
      if not lo < m < hi:
        raise ValueError(
            f"moments: moment {m} of feature {f.name!r} must lie strictly "
            f"inside its range ({lo}, {hi}); at the boundary λ is infinite "
            "(use a pointwise constraint for a feature that must always "
            "hold).")
      moments.append(m)
    return tuple(moments)

  def _checked_lambdas(self, num_features: int) -> tuple[float, ...] | None:
    if self.lambdas is None:
      return None
    entries = _entries(self.lambdas)
    if not entries:
      return None
    lambdas = [_finite(x) for x in entries]
    if len(lambdas) != num_features or None in lambdas:
      raise ValueError(
          f"lambdas: must be empty (λ fitted later) or {num_features} finite "
          f"numbers, one per feature; got {self.lambdas!r}.")
    return tuple(lambdas)

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.features)

  def feature_values(self, tokens, mask, context=None):
    return features_lib.stack(self.features, tokens, mask, context)

  def _lambdas(self) -> tuple[float, ...]:
    if self.lambdas is None:
      raise ValueError(
          "DistributionalTarget.lambdas is not fitted: call target.fit(...) "
          "or target.with_lambdas(...) first")
    return self.lambdas

  def log_energy(self, tokens, mask, context=None):
    phi = self.feature_values(tokens, mask, context)
    lambdas = jnp.asarray(self._lambdas())  # float64 under enable_x64.
    return distributional_log_prob(jnp.zeros(phi.shape[:1], lambdas.dtype),
                                   phi, lambdas)

  def alignment(self, tokens, mask, context=None):
    return self.log_energy(tokens, mask, context).astype(jnp.float32)

  def with_lambdas(self, lambdas: Sequence[float]) -> "DistributionalTarget":
    """The same target with λ set."""
    return dataclasses.replace(self, lambdas=tuple(np.ravel(lambdas)))

  def fit(self, tokens: Array, mask: Array, log_base: Array,
          log_proposal: Array, context: Context = None, *,
          context_ids: Array | None = None,
          **kwargs: Any) -> tuple["DistributionalTarget", lambdas_lib.LambdaFit]:
    """Fits λ on samples x ~ q; returns (fitted target, :class:`LambdaFit`).

    With ``context_ids`` one λ is shared by the C contexts and fitted so that
    the mean over contexts of the per-context moments equals the target
    moments, each context normalised by its own Z_c (:func:`fit_lambdas`).

    Args:
      tokens, mask, context: samples from the proposal q (see module doc).
      log_base: ``[B]``, log a(x|c).
      log_proposal: ``[B]``, log q(x|c) of the same samples (q = a is fine).
      context_ids: optional int ``[B]`` in [0, C), the context (prompt index)
        of each sample; None: one context.
      **kwargs: passed to :func:`fit_lambdas` (``num_contexts``, ``tol``,
        ``max_iter``, ...).
    """
    phi = np.asarray(self.feature_values(tokens, mask, context))
    fit = lambdas_lib.fit_lambdas(phi, log_base, log_proposal, self.moments,
                                  context_ids=context_ids,
                                  feature_names=self.feature_names,
                                  init=self.lambdas, **kwargs)
    return self.with_lambdas(fit.lambdas), fit


@dataclasses.dataclass(frozen=True)
class ProductTarget(_Target):
  """P(x) = a(x) · Π_j P_j(x) / a(x): the product of several targets' energies.

  E.g. a pointwise constraint together with a reward. ``feature_names`` and
  ``feature_values`` concatenate the factors'. ``alignment`` is the alignment
  of factor ``alignment_index`` (default: the first one).
  """

  factors: tuple[Any, ...]
  alignment_index: int = 0

  def __post_init__(self):
    factors = tuple(self.factors)
    if not factors:
      raise ValueError("factors: needs at least one target.")
    for i, t in enumerate(factors):
      if not hasattr(t, "log_energy"):
        raise TypeError(f"factors[{i}]: {t!r} is not a target.")
    if not 0 <= self.alignment_index < len(factors):
      raise ValueError(
          f"alignment_index: {self.alignment_index} is not in "
          f"[0, {len(factors)}).")
    object.__setattr__(self, "factors", factors)

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(n for t in self.factors for n in t.feature_names)

  def feature_values(self, tokens, mask, context=None):
    return jnp.concatenate(
        [t.feature_values(tokens, mask, context) for t in self.factors],
        axis=-1)

  def log_energy(self, tokens, mask, context=None):
    return sum(t.log_energy(tokens, mask, context) for t in self.factors)

  def alignment(self, tokens, mask, context=None):
    return self.factors[self.alignment_index].alignment(tokens, mask, context)


def check_context(context: Context, batch: int) -> None:
  """Checks a conditional context; raises ValueError naming the bad field."""
  if context is None:
    raise ValueError(
        "context is required by a conditional target: pass "
        "{'prompts': int32 [B, P], 'prompt_lengths': int32 [B]}")
  for key, ndim in (("prompts", 2), ("prompt_lengths", 1)):
    if key not in context:
      raise ValueError(f"context[{key!r}] is missing")
    shape = tuple(jnp.shape(context[key]))
    if len(shape) != ndim or shape[0] != batch:
      raise ValueError(
          f"context[{key!r}] has shape {shape}; expected leading batch {batch} "
          f"and {ndim} dimension(s)")


@dataclasses.dataclass(frozen=True)
class ConditionalTarget(_Target):
  """P(x|c) = a(x|c) · energy(x, c): one target per context c (CDPG).

  Wraps any target; every call requires a context (checked), which the
  features receive (e.g. Python compilability of prompt + continuation).
  Normalisation is per context: Z_c = Σ_x P(x|c), estimated with
  :func:`log_partition_per_context` (Korbak et al., ICML 2022).
  """

  target: Any
  is_conditional = True

  def __post_init__(self):
    if not hasattr(self.target, "log_energy"):
      raise TypeError(f"target: {self.target!r} is not a target.")

  @property
  def feature_names(self) -> tuple[str, ...]:
    return self.target.feature_names

  def feature_values(self, tokens, mask, context=None):
    check_context(context, tokens.shape[0])
    return self.target.feature_values(tokens, mask, context)

  def log_energy(self, tokens, mask, context=None):
    check_context(context, tokens.shape[0])
    return self.target.log_energy(tokens, mask, context)

  def alignment(self, tokens, mask, context=None):
    check_context(context, tokens.shape[0])
    return self.target.alignment(tokens, mask, context)
