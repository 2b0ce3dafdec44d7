"""λ of distributional constraints: E_{p_λ}[φ] = μ̄ for P_λ = a·exp(λ·φ).

Khalifa et al., "A Distributional Approach to Controlled Text Generation", ICLR
2021 (GDC): λ minimises the convex dual log Z(λ) − λ·μ̄; Z(λ) and the moments
are self-normalised importance-sampling estimates from samples of a proposal q.
Host-side NumPy in float64.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

Array = np.ndarray


class LambdaFitWarning(RuntimeWarning):
  """λ fitting did not converge, or its importance weights are degenerate."""

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
