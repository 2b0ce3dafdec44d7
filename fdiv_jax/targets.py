"""Target distributions: energy-based models p(x) = P(x) / Z over sequences.

A preference on the outputs of a base model a(x|c) becomes an unnormalised
target P(x) (DESIGN.md §1):

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
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax import estimators
from fdiv_jax import features as features_lib

Array = jax.Array
Feature = features_lib.Feature
Context = Mapping[str, Array] | None


class LambdaFitWarning(RuntimeWarning):
  """λ fitting did not converge, or its importance weights are degenerate."""


# --------------------------------------------------------------------------
# Pure log-space building blocks.
# --------------------------------------------------------------------------


def _float_dtype(x: Array) -> Any:
  return jnp.result_type(x, jnp.float32)


def pointwise_log_prob(log_base: Array, b: Array) -> Array:
  """log P(x) = log a(x) + Σ_i log b_i(x)  (Khalifa et al., ICLR 2021).

  Args:
    log_base: ``[B]``, log a(x).
    b: ``[B]`` or ``[B, K]`` constraint values in {0, 1} (bool or float).

  Returns:
    ``[B]``: log a(x) where every constraint holds, −inf where one fails.
  """
  log_base = jnp.asarray(log_base)
  dtype = _float_dtype(log_base)
  b = jnp.asarray(b).astype(dtype)
  if b.ndim == log_base.ndim + 1:
    log_b = jnp.sum(jnp.log(b), axis=-1)
  else:
    log_b = jnp.log(b)
  return log_base.astype(dtype) + log_b


def distributional_log_prob(log_base: Array, phi: Array,
                            lambdas: Array) -> Array:
  """log P(x) = log a(x) + λ·φ(x)  (GDC, Khalifa et al., ICLR 2021).

  Args:
    log_base: ``[B]``, log a(x).
    phi: ``[B, K]`` feature values.
    lambdas: ``[K]``.

  Returns:
    ``[B]``.
  """
  log_base = jnp.asarray(log_base)
  dtype = _float_dtype(log_base)
  energy = jnp.asarray(phi, dtype) @ jnp.asarray(lambdas, dtype)
  return log_base.astype(dtype) + energy


def _check_beta(beta: Any, field: str = "beta") -> None:
  try:
    value = float(beta)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # Traced inside jit: cannot be checked here.
  if not value > 0.0 or math.isinf(value):
    raise ValueError(f"{field} must be a finite number > 0, got {beta!r}")


def reward_log_prob(log_base: Array, r: Array, beta: float | Array) -> Array:
  """log P(x) = log a(x) + r(x) / β, β > 0 (KL-regularised RL / RLHF).

  The normalised p is the optimum of E_π[r] − β KL(π‖a) (Korbak et al.,
  NeurIPS 2022).

  Args:
    log_base: ``[B]``, log a(x).
    r: ``[B]`` rewards.
    beta: temperature β > 0 (checked when concrete).

  Returns:
    ``[B]``.
  """
  _check_beta(beta)
  log_base = jnp.asarray(log_base)
  dtype = _float_dtype(log_base)
  return log_base.astype(dtype) + jnp.asarray(r, dtype) / beta


def log_partition_per_context(log_target: Array, log_proposal: Array,
                              context_ids: Array, num_contexts: int) -> Array:
  """One importance-sampling estimate of log Z_c per context (CDPG).

  log Ẑ_c = logsumexp_{i: c_i = c}(log P(x_i|c) − log q(x_i|c)) − log N_c,
  with x_i ~ q(·|c_i). Contexts without samples get −inf. The one-batch form
  of ``estimators.update_partition`` (which keeps a running estimate).

  Args:
    log_target: ``[B]``, log P(x_i | c_i).
    log_proposal: ``[B]``, log q(x_i | c_i).
    context_ids: int ``[B]`` in [0, num_contexts).
    num_contexts: static number of contexts C.

  Returns:
    ``[C]``.
  """
  log_target = jnp.asarray(log_target)
  dtype = _float_dtype(log_target)
  state = estimators.init_partition(num_contexts, dtype)
  return estimators.update_partition(state, log_target, log_proposal,
                                     jnp.asarray(context_ids)).log_z


# --------------------------------------------------------------------------
# Target objects.
# --------------------------------------------------------------------------


def _as_features(feats: Any, field: str) -> tuple[Feature, ...]:
  if isinstance(feats, Feature):
    feats = (feats,)
  feats = tuple(feats)
  for f in feats:
    if not isinstance(f, Feature):
      raise TypeError(f"{field}: expected features.Feature, got {type(f)}")
  if not feats:
    raise ValueError(f"{field}: needs at least one feature")
  return feats


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
    feats = _as_features(self.constraints, "PointwiseTarget.constraints")
    for f in feats:
      if not f.is_boolean:
        raise ValueError(
            f"PointwiseTarget.constraints: feature {f.name!r} is not boolean; "
            "use a DistributionalTarget or a RewardTarget for real features")
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
      raise TypeError(
          f"RewardTarget.reward: expected features.Feature, got "
          f"{type(self.reward)}")
    _check_beta(self.beta, "RewardTarget.beta")
    object.__setattr__(self, "beta", float(self.beta))

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
  ``log_prob`` refuses. Target moments outside a feature's value range are
  rejected at construction.

  ``alignment`` is the per-sample energy λ·φ(x) = log P(x) − log a(x): a
  distributional EBM is the reward EBM with r = λ·φ and β = 1, so its
  alignment is that reward; E_π[alignment] grows as π moves from a towards p.
  How well the moments are matched is read from ``feature_values``
  (E_π[φ] against ``moments``).

  Attributes:
    features: the φ_k.
    moments: target moments μ̄_k, one per feature.
    lambdas: fitted λ_k, or None.
  """

  features: tuple[Feature, ...]
  moments: tuple[float, ...]
  lambdas: tuple[float, ...] | None = None

  def __post_init__(self):
    feats = _as_features(self.features, "DistributionalTarget.features")
    moments = tuple(float(m) for m in np.ravel(np.asarray(self.moments)))
    if len(moments) != len(feats):
      raise ValueError(
          f"DistributionalTarget.moments: {len(moments)} values for "
          f"{len(feats)} features")
    for f, m in zip(feats, moments):
      lo, hi = f.value_range
      if not lo <= m <= hi:
        raise ValueError(
            f"DistributionalTarget.moments: target moment {m} of feature "
            f"{f.name!r} is outside its value range [{lo}, {hi}]")
    object.__setattr__(self, "features", feats)
    object.__setattr__(self, "moments", moments)
    if self.lambdas is not None:
      lambdas = tuple(float(x) for x in np.ravel(np.asarray(self.lambdas)))
      if len(lambdas) != len(feats):
        raise ValueError(
            f"DistributionalTarget.lambdas: {len(lambdas)} values for "
            f"{len(feats)} features")
      object.__setattr__(self, "lambdas", lambdas)

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
          log_proposal: Array, context: Context = None,
          **kwargs: Any) -> tuple["DistributionalTarget", "LambdaFit"]:
    """Fits λ on samples x ~ q; returns (fitted target, :class:`LambdaFit`).

    Args:
      tokens, mask, context: samples from the proposal q (see module doc).
      log_base: ``[B]``, log a(x|c).
      log_proposal: ``[B]``, log q(x|c) of the same samples (q = a is fine).
      **kwargs: passed to :func:`fit_lambdas` (``tol``, ``max_iter``, ...).
    """
    phi = np.asarray(self.feature_values(tokens, mask, context))
    fit = fit_lambdas(phi, log_base, log_proposal, self.moments,
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
      raise ValueError("ProductTarget.factors: needs at least one target")
    for t in factors:
      if not hasattr(t, "log_energy"):
        raise TypeError(f"ProductTarget.factors: {t!r} is not a target")
    if not 0 <= self.alignment_index < len(factors):
      raise ValueError(
          f"ProductTarget.alignment_index: {self.alignment_index} is not in "
          f"[0, {len(factors)})")
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


# --------------------------------------------------------------------------
# λ fitting for distributional constraints.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LambdaFit:
  """Result of :func:`fit_lambdas`.

  Attributes:
    lambdas: ``[K]`` fitted λ.
    moments: ``[K]`` SNIS moments μ̂(λ) achieved at the fitted λ.
    target_moments: ``[K]`` μ̄.
    max_abs_error: max_k |μ̂_k − μ̄_k|.
    effective_sample_size: (Σw)² / Σw² of the weights w ∝ a e^{λ·φ} / q.
    num_samples: number of samples N.
    converged: whether max_abs_error ≤ tol.
    num_iterations: Newton iterations taken.
    feature_names: names of the features.
  """

  lambdas: np.ndarray
  moments: np.ndarray
  target_moments: np.ndarray
  max_abs_error: float
  effective_sample_size: float
  num_samples: int
  converged: bool
  num_iterations: int
  feature_names: tuple[str, ...]


def _snis(log_w0: np.ndarray, phi: np.ndarray, lam: np.ndarray):
  """log Σ w, normalised weights and SNIS moments at λ (float64, host)."""
  log_w = log_w0 + phi @ lam
  m = np.max(log_w)
  w = np.exp(log_w - m)
  total = np.sum(w)
  w = w / total
  return np.log(total) + m, w, w @ phi


def fit_lambdas(phi: Array, log_base: Array, log_proposal: Array,
                target_moments: Sequence[float], *,
                feature_names: Sequence[str] | None = None,
                init: Sequence[float] | None = None, tol: float = 1e-6,
                max_iter: int = 100, min_ess: float = 10.0) -> LambdaFit:
  """Fits λ of P_λ(x) = a(x) e^{λ·φ(x)} so that E_{p_λ}[φ] = μ̄ (GDC).

  Minimises the convex dual  L(λ) = log Ẑ(λ) − λ·μ̄, with the self-normalised
  importance-sampling estimate over samples x_i ~ q:

      Ẑ(λ) ∝ Σ_i w_i,   w_i = a(x_i) e^{λ·φ(x_i)} / q(x_i),
      ∇L = μ̂(λ) − μ̄,   μ̂(λ) = Σ_i w_i φ(x_i) / Σ_i w_i,
      ∇²L = Cov_w[φ]  (positive semi-definite),

  by damped Newton steps (backtracking on L) in float64 on the host, until
  max_k |μ̂_k − μ̄_k| ≤ ``tol``. Khalifa et al. (ICLR 2021) fit λ with the
  same SNIS moments by gradient steps; Newton converges in a few iterations.

  Args:
    phi: ``[N, K]`` (or ``[N]``) feature values of the samples.
    log_base: ``[N]``, log a(x_i).
    log_proposal: ``[N]``, log q(x_i) (pass ``log_base`` when q = a).
    target_moments: ``[K]``, μ̄.
    feature_names: names used in messages.
    init: initial λ (default 0).
    tol: tolerance on max_k |μ̂_k − μ̄_k|.
    max_iter: maximum Newton iterations.
    min_ess: warn when the final effective sample size is below this.

  Returns:
    A :class:`LambdaFit`.

  Raises:
    ValueError: a target moment is not strictly inside the range the samples
      reach (a feature never / always present): no finite λ exists.

  Warns:
    LambdaFitWarning: not converged after ``max_iter`` iterations, or the
      effective sample size is below ``min_ess``.
  """
  phi = np.asarray(phi, np.float64)
  if phi.ndim == 1:
    phi = phi[:, None]
  log_w0 = (np.asarray(log_base, np.float64)
            - np.asarray(log_proposal, np.float64))
  mu = np.ravel(np.asarray(target_moments, np.float64))
  n, k = phi.shape
  names = (tuple(feature_names) if feature_names is not None
           else tuple(f"feature_{i}" for i in range(k)))
  if mu.shape != (k,):
    raise ValueError(
        f"target_moments: {mu.shape[0]} values for {k} features")
  if log_w0.shape != (n,):
    raise ValueError(
        f"log_base / log_proposal: shape {log_w0.shape}; expected ({n},)")
  if np.any(np.isnan(log_w0)) or np.any(np.isnan(phi)):
    raise ValueError("phi / log_base / log_proposal contain NaN")
  if np.any(log_w0 == np.inf):
    raise ValueError("log_base − log_proposal is +inf for some sample")
  support = np.isfinite(log_w0)
  if not np.any(support):
    raise ValueError("every sample has zero base probability (log a = −inf)")
  phi, log_w0 = phi[support], log_w0[support]
  for i in range(k):
    lo, hi = float(np.min(phi[:, i])), float(np.max(phi[:, i]))
    if not lo < mu[i] < hi:
      if lo == hi:
        why = (f"the feature is constant ({lo}) on the {phi.shape[0]} samples "
               "(never or always present)")
      elif mu[i] in (lo, hi):
        why = ("the moment is on the boundary, so λ would be infinite; use a "
               "pointwise constraint for a feature that must always / never "
               "hold")
      else:
        why = "no reweighting of these samples can reach it"
      raise ValueError(
          f"target moment {mu[i]} of feature {names[i]!r} is outside the range "
          f"({lo}, {hi}) that the samples reach: {why}")

  lam = (np.zeros(k) if init is None
         else np.ravel(np.asarray(init, np.float64)).copy())
  log_z, w, mu_hat = _snis(log_w0, phi, lam)
  dual = log_z - lam @ mu
  iteration = 0
  for iteration in range(1, max_iter + 1):
    grad = mu_hat - mu
    if np.max(np.abs(grad)) <= tol:
      iteration -= 1
      break
    centred = phi - mu_hat
    hess = (centred * w[:, None]).T @ centred
    step = -np.linalg.lstsq(hess + 1e-12 * np.eye(k), grad, rcond=None)[0]
    slope = grad @ step
    if not slope < 0:  # Numerically singular Hessian: fall back to gradient.
      step, slope = -grad, -(grad @ grad)
    t = 1.0
    for _ in range(60):
      new_lam = lam + t * step
      new_log_z, new_w, new_mu_hat = _snis(log_w0, phi, new_lam)
      new_dual = new_log_z - new_lam @ mu
      if new_dual <= dual + 1e-4 * t * slope:
        break
      t *= 0.5
    lam, w, mu_hat, dual = new_lam, new_w, new_mu_hat, new_dual
  err = float(np.max(np.abs(mu_hat - mu)))
  converged = err <= tol
  ess = float(1.0 / np.sum(w * w))
  if not converged:
    warnings.warn(
        f"λ fitting did not converge after {max_iter} iterations: max |μ̂ − μ̄|"
        f" = {err:.3g} > tol = {tol:.3g} (features {names}, λ = {lam}, "
        f"ESS = {ess:.1f} of {n})", LambdaFitWarning, stacklevel=2)
  if ess < min_ess:
    warnings.warn(
        f"λ fitting: effective sample size {ess:.1f} of {n} is below "
        f"{min_ess}; the moments are unreliable (features {names})",
        LambdaFitWarning, stacklevel=2)
  return LambdaFit(lambdas=lam, moments=mu_hat, target_moments=mu,
                   max_abs_error=err, effective_sample_size=ess,
                   num_samples=n, converged=converged,
                   num_iterations=iteration, feature_names=names)


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
