"""λ of distributional constraints: E_{p_λ}[φ] = μ̄ for P_λ = a·exp(λ·φ).

Khalifa et al., "A Distributional Approach to Controlled Text Generation", ICLR
2021 (GDC): λ minimises the convex dual log Z(λ) − λ·μ̄; Z(λ) and the moments
are self-normalised importance-sampling estimates from samples of a proposal q.

With contexts c (prompts; Korbak et al., "Controlling Conditional Language
Models without Catastrophic Forgetting", ICML 2022, CDPG) one λ is shared by
every context and each context is normalised by its own Z_c(λ), as training
does; λ then minimises mean_c log Z_c(λ) − λ·μ̄, so that the MEAN over contexts
of the per-context moments E_{p_c}[φ] equals μ̄ (pooling every context's
samples into one estimate would solve a different equation).

Host-side NumPy and SciPy (the feasibility linear programme) in float64.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

Array = np.ndarray

# μ̄ is "strictly inside" when some representation gives every distinct sampled
# feature vector a weight above this (the linear programme of `_feasibility`).
_INTERIOR_TOL = 1e-9


class LambdaFitWarning(RuntimeWarning):
  """λ fitting did not converge, or its importance weights are degenerate."""

# --------------------------------------------------------------------------
# λ fitting for distributional constraints.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LambdaFit:
  """Result of :func:`fit_lambdas` (K features, C contexts).

  Attributes:
    lambdas: ``[K]`` fitted λ.
    moments: ``[K]`` mean over contexts of the per-context SNIS moments at the
      fitted λ, mean_c μ̂_c(λ̂) (for C = 1 the SNIS moments μ̂(λ̂)).
    target_moments: ``[K]`` μ̄.
    max_abs_error: max_k |moments_k − μ̄_k|.
    effective_sample_size: the smallest over contexts of (Σw)² / Σw², with
      w ∝ a e^{λ·φ} / q over the samples of the context.
    num_samples: number of samples N (every context).
    converged: whether max_abs_error ≤ tol.
    num_iterations: Newton iterations taken.
    feature_names: names of the features.
    context_moments: ``[C, K]`` per-context SNIS moments μ̂_c(λ̂).
    log_partition: ``[C]`` log Ẑ_c(λ̂) = log((1/N_c) Σ_{i∈c} a_i e^{λ̂·φ_i} /
      q_i): an estimate of log Z_c of P = a·e^{λ̂·φ}, e.g. to seed a trainer's
      running log Ẑ.
    context_counts: ``[C]`` number of samples N_c of each context (those with
      a = 0 included: they count in Ẑ_c with weight 0).
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
  context_moments: np.ndarray
  log_partition: np.ndarray
  context_counts: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Groups:
  """The samples with a > 0, merged by identical (context, φ).

  The G rows are sorted by context, so context c owns the rows
  ``starts[c]:starts[c + 1]``. Merging is exact: a_i e^{λ·φ}/q_i summed over
  a row's samples is e^{λ·φ} Σ_i a_i/q_i.
  """

  phi: np.ndarray         # [G, K]
  log_w: np.ndarray       # [G] log Σ_i a_i/q_i over the row's samples
  log_w2: np.ndarray      # [G] log Σ_i (a_i/q_i)² (for the ESS)
  context: np.ndarray     # [G]
  starts: np.ndarray      # [C]
  log_counts: np.ndarray  # [C] log N_c

  @property
  def num_contexts(self) -> int:
    return self.starts.shape[0]


def _row_codes(columns: Sequence[np.ndarray]) -> np.ndarray:
  """Integer codes of the rows of ``columns``: equal iff the rows are equal,
  ordered lexicographically (first column first)."""
  codes = np.zeros(columns[0].shape[0], np.int64)
  for column in columns:
    values, code = np.unique(column, return_inverse=True)
    # codes < n and code < n after each compression: no int64 overflow.
    _, codes = np.unique(codes * values.shape[0] + code, return_inverse=True)
  return codes.reshape(-1)


def _groups(phi: np.ndarray, log_w0: np.ndarray, ctx: np.ndarray,
            counts: np.ndarray) -> _Groups:
  """Merges the samples (a > 0 only) by identical (context, φ) rows."""
  codes = _row_codes([ctx, *phi.T])
  _, first = np.unique(codes, return_index=True)   # sorted by context
  num_rows = first.shape[0]
  peak = np.full(num_rows, -np.inf)
  np.maximum.at(peak, codes, log_w0)
  shifted = log_w0 - peak[codes]
  log_w = np.log(np.bincount(codes, np.exp(shifted), num_rows)) + peak
  log_w2 = np.log(np.bincount(codes, np.exp(2 * shifted), num_rows)) + 2 * peak
  context = ctx[first]
  starts = np.searchsorted(context, np.arange(counts.shape[0]))
  return _Groups(phi=phi[first], log_w=log_w, log_w2=log_w2, context=context,
                 starts=starts, log_counts=np.log(counts.astype(np.float64)))


def _snis(g: _Groups, lam: np.ndarray):
  """Per-context log Ẑ_c [C], row weights [G] normalised within each context,
  per-context moments [C, K] and the log of each context's Σw [C]."""
  log_u = g.log_w + g.phi @ lam
  peak = np.maximum.reduceat(log_u, g.starts)
  u = np.exp(log_u - peak[g.context])
  total = np.add.reduceat(u, g.starts)
  w = u / total[g.context]
  context_moments = np.add.reduceat(w[:, None] * g.phi, g.starts, axis=0)
  log_total = np.log(total) + peak
  return log_total - g.log_counts, w, context_moments, log_total


def _effective_sample_sizes(g: _Groups, lam: np.ndarray,
                            log_total: np.ndarray) -> np.ndarray:
  """(Σ_{i∈c} w_i)² / Σ_{i∈c} w_i² for each context c, [C]."""
  log_v = g.log_w2 + 2 * (g.phi @ lam) - 2 * log_total[g.context]
  return 1.0 / np.add.reduceat(np.exp(log_v), g.starts)


def _feasibility(g: _Groups, mu: np.ndarray) -> tuple[str, float]:
  """Whether μ̄ lies strictly inside the mean over contexts of the convex
  hulls of each context's sampled feature vectors (a linear programme).

  With the distinct vectors φ_{c,j} of context c, find weights w_{c,j} ≥ t,
  Σ_j w_{c,j} = 1 for each c, (1/C) Σ_c Σ_j w_{c,j} φ_{c,j} = μ̄, maximising
  t. Written with w = v + t, v ≥ 0, t ≥ 0, every constraint is an equality:

      Σ_{j∈c} v_{c,j} + n_c t = 1                       (one row per context)
      Σ_{c,j} v_{c,j} d_{c,j} + t Σ_{c,j} d_{c,j} = 0   (one row per feature)

  with d = (φ − μ̄) / (spread of the feature) (the 1/C is dropped: the right
  side is 0). Returns ("inside", t*), ("boundary", t*) when t* ≤
  ``_INTERIOR_TOL``, ("outside", nan) when infeasible, or ("unknown", nan).
  """
  num_rows, k = g.phi.shape
  c = g.num_contexts
  spread = np.ptp(g.phi, axis=0)
  d = (g.phi - mu) / np.where(spread > 0, spread, 1.0)
  per_context = np.diff(np.append(g.starts, num_rows)).astype(np.float64)
  rows = scipy.sparse.coo_array(
      (np.ones(num_rows), (g.context, np.arange(num_rows))), shape=(c, num_rows))
  a_eq = scipy.sparse.vstack([
      scipy.sparse.hstack([rows, per_context[:, None]]),
      scipy.sparse.csr_array(np.hstack([d.T, d.sum(0)[:, None]])),
  ]).tocsr()
  b_eq = np.concatenate([np.ones(c), np.zeros(k)])
  cost = np.zeros(num_rows + 1)
  cost[-1] = -1.0
  res = scipy.optimize.linprog(
      cost, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs",
      options={"primal_feasibility_tolerance": 1e-10,
               "dual_feasibility_tolerance": 1e-10})
  if res.status == 2:
    return "outside", float("nan")
  if res.status != 0:
    return "unknown", float("nan")
  t = float(res.x[-1])
  return ("inside" if t > _INTERIOR_TOL else "boundary"), t


def _unreachable(g: _Groups, mu: np.ndarray, names: tuple[str, ...],
                 where: str, num_samples: int) -> str:
  """Why μ̄ is not strictly inside the reachable set: one feature's range if
  that explains it (constant feature, outside, boundary), else jointly."""
  c = g.num_contexts
  lo = np.minimum.reduceat(g.phi, g.starts, axis=0).mean(0)
  hi = np.maximum.reduceat(g.phi, g.starts, axis=0).mean(0)
  for i in range(mu.shape[0]):
    if lo[i] == hi[i] == mu[i] or lo[i] < mu[i] < hi[i]:
      continue
    if lo[i] == hi[i]:
      if c == 1:
        why = (f"the feature is constant ({lo[i]:.6g}) on the {num_samples} "
               "samples (never or always present)")
      else:
        why = (f"the feature is constant on the samples of every one of the "
               f"{c} contexts (never or always present; mean value "
               f"{lo[i]:.6g})")
    elif mu[i] in (lo[i], hi[i]):
      why = ("the moment is on the boundary, so λ would be infinite; use a "
             "pointwise constraint for a feature that must always / never "
             "hold")
    else:
      why = "no reweighting of these samples can reach it"
    if c > 1:
      why += (f" (the range is the mean over the {c} contexts of the range "
              "each context's samples reach, as each context is normalised "
              "by its own Z_c)")
    return (f"target moment {mu[i]} of feature {names[i]!r} is outside the "
            f"range ({lo[i]:.6g}, {hi[i]:.6g}) that the samples reach: {why}")
  wanted = ", ".join(f"{n!r} = {m}" for n, m in zip(names, mu))
  hull = ("the convex hull of the sampled feature vectors" if c == 1 else
          f"the mean over the {c} contexts of the convex hulls of each "
          "context's sampled feature vectors (each context is normalised by "
          "its own Z_c)")
  if where == "outside":
    why = "no reweighting of the samples has these moments"
  else:
    why = ("only a reweighting that gives some samples weight 0 has these "
           "moments, so λ would be infinite")
  return (f"the target moments {wanted} cannot be reached together: each lies "
          "inside the range its feature takes on the samples, but the vector "
          f"of target moments lies {where} {hull}: {why}, and no finite λ "
          "exists (e.g. boolean features that never hold together on one "
          "sample need moments summing to less than 1)")


def _context_ids(context_ids, num_contexts, n: int) -> tuple[np.ndarray, int]:
  """The checked context of each sample ([N] int64) and C."""
  if context_ids is None:
    if num_contexts not in (None, 1):
      raise ValueError(f"num_contexts: {num_contexts} contexts need "
                       "context_ids (the context of each sample)")
    return np.zeros(n, np.int64), 1
  raw = np.asarray(context_ids)
  if raw.shape != (n,):
    raise ValueError(f"context_ids: shape {raw.shape}; expected ({n},)")
  if raw.dtype.kind not in "iu":
    raise ValueError(f"context_ids: must be integers, got dtype {raw.dtype}")
  ids = raw.astype(np.int64)
  if num_contexts is None:
    num_contexts = int(ids.max()) + 1
  if (isinstance(num_contexts, (bool, np.bool_))
      or not isinstance(num_contexts, (int, np.integer)) or num_contexts < 1):
    raise ValueError(f"num_contexts: must be an integer >= 1, got "
                     f"{num_contexts!r}")
  num_contexts = int(num_contexts)
  if ids.min() < 0 or ids.max() >= num_contexts:
    raise ValueError(f"context_ids: must lie in [0, {num_contexts}); got "
                     f"values in [{ids.min()}, {ids.max()}]")
  return ids, num_contexts


def _names_of(contexts: np.ndarray) -> str:
  shown = ", ".join(str(c) for c in contexts[:10])
  more = f" and {contexts.shape[0] - 10} more" if contexts.shape[0] > 10 else ""
  return f"context{'s' if contexts.shape[0] > 1 else ''} {shown}{more}"


def fit_lambdas(phi: Array, log_base: Array, log_proposal: Array,
                target_moments: Sequence[float], *,
                context_ids: Array | None = None,
                num_contexts: int | None = None,
                feature_names: Sequence[str] | None = None,
                init: Sequence[float] | None = None, tol: float = 1e-6,
                max_iter: int = 100, min_ess: float = 10.0) -> LambdaFit:
  """Fits λ of P_λ(x|c) = a(x|c) e^{λ·φ(x)} so that mean_c E_{p_c}[φ] = μ̄.

  GDC (Khalifa et al., ICLR 2021) for one context; with contexts c = 0..C−1
  (prompts), one λ is shared by all of them and each is normalised by its own
  Z_c(λ) = Σ_x a(x|c) e^{λ·φ(x)} (CDPG, Korbak et al., ICML 2022), as training
  normalises each context. λ minimises the convex dual

      L(λ) = (1/C) Σ_c log Ẑ_c(λ) − λ·μ̄,
      Ẑ_c(λ) = (1/N_c) Σ_{i∈c} w_i,   w_i = a(x_i|c) e^{λ·φ(x_i)} / q(x_i|c),
      ∇L = (1/C) Σ_c μ̂_c(λ) − μ̄,     μ̂_c(λ) = Σ_{i∈c} w_i φ(x_i) / Σ_{i∈c} w_i,
      ∇²L = (1/C) Σ_c Cov_c[φ]       (w-weighted within c; positive
                                       semi-definite),

  each context self-normalised on its own samples x_i ~ q(·|c), by damped
  Newton steps (backtracking on L) in float64 on the host, until
  max_k |mean_c μ̂_c − μ̄_k| ≤ ``tol``. For C = 1 this is the single-context
  dual log Ẑ(λ) − λ·μ̄. (Pooling the samples of every context into one
  estimate would instead solve Σ_c Z_c m_c / Σ_c Z_c = μ̄, which weights each
  context by its Z_c.)

  A finite λ exists iff μ̄ lies strictly inside (in the relative interior of)
  the mean over contexts of the convex hulls of each context's sampled
  feature vectors, (1/C) Σ_c conv{φ(x_i): i ∈ c}; for C = 1 the convex hull of
  the samples' feature vectors. This is checked first by a linear programme
  (scipy.optimize.linprog) on the distinct feature vectors of each context.

  Args:
    phi: ``[N, K]`` (or ``[N]``) feature values of the samples.
    log_base: ``[N]``, log a(x_i|c_i).
    log_proposal: ``[N]``, log q(x_i|c_i) (pass ``log_base`` when q = a).
    target_moments: ``[K]``, μ̄.
    context_ids: optional int ``[N]`` in [0, C), the context of each sample;
      None: every sample has the same context (C = 1).
    num_contexts: C (default: max(context_ids) + 1); every context needs
      samples.
    feature_names: names used in messages.
    init: initial λ (default 0).
    tol: tolerance on max_k |mean_c μ̂_c,k − μ̄_k|.
    max_iter: maximum Newton iterations.
    min_ess: warn when the final effective sample size of some context is
      below this.

  Returns:
    A :class:`LambdaFit` (``context_moments`` ``[C, K]``, ``log_partition``
    ``[C]``, ``context_counts`` ``[C]``).

  Raises:
    ValueError: μ̄ is not strictly inside the set above, so no finite λ exists
      (the message names the features and their target moments and says why:
      a feature constant on the samples, a moment outside or on the boundary
      of what the samples reach, or moments that cannot hold together); a
      context has no samples (or none with a > 0); malformed inputs.

  Warns:
    LambdaFitWarning: not converged after ``max_iter`` iterations, or the
      effective sample size of a context is below ``min_ess``.
  """
  phi = np.asarray(phi, np.float64)
  if phi.ndim == 1:
    phi = phi[:, None]
  if phi.ndim != 2:
    raise ValueError(f"phi: shape {phi.shape}; expected [N, K] or [N]")
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
  if not np.all(np.isfinite(phi)):
    raise ValueError("phi contains ±inf")
  if np.any(log_w0 == np.inf):
    raise ValueError("log_base − log_proposal is +inf for some sample")
  if n == 0:
    raise ValueError("phi: no samples")
  lam = (np.zeros(k) if init is None
         else np.ravel(np.asarray(init, np.float64)).copy())
  if lam.shape != (k,):
    raise ValueError(f"init: {lam.shape[0]} values for {k} features")
  ctx, c = _context_ids(context_ids, num_contexts, n)
  counts = np.bincount(ctx, minlength=c)
  if np.any(counts == 0):
    missing = np.flatnonzero(counts == 0)
    raise ValueError(
        f"{_names_of(missing)} of the {c} contexts "
        f"{'have' if missing.shape[0] > 1 else 'has'} no samples: each "
        "context is normalised by its own Z_c, which needs samples of that "
        "context")
  support = np.isfinite(log_w0)
  if not np.any(support):
    raise ValueError("every sample has zero base probability (log a = −inf)")
  reached = np.bincount(ctx[support], minlength=c)
  if np.any(reached == 0):
    raise ValueError(
        f"{_names_of(np.flatnonzero(reached == 0))}: every sample has zero "
        "base probability (log a = −inf)")
  g = _groups(phi[support], log_w0[support], ctx[support], counts)

  where, _ = _feasibility(g, mu)
  if where in ("outside", "boundary"):
    raise ValueError(_unreachable(
        g, mu, names, "outside" if where == "outside" else "on the boundary of",
        int(np.sum(support))))
  if where == "unknown":
    warnings.warn(
        "λ fitting: the feasibility linear programme did not decide whether "
        f"the target moments {mu} can be reached (features {names}); fitting "
        "anyway", LambdaFitWarning, stacklevel=2)

  log_z, w, cm, log_total = _snis(g, lam)
  mu_hat = cm.mean(0)
  dual = log_z.mean() - lam @ mu
  iteration = 0
  for iteration in range(1, max_iter + 1):
    grad = mu_hat - mu
    if np.max(np.abs(grad)) <= tol:
      iteration -= 1
      break
    centred = g.phi - cm[g.context]
    hess = (centred * w[:, None]).T @ centred / c
    step = -np.linalg.lstsq(hess + 1e-12 * np.eye(k), grad, rcond=None)[0]
    slope = grad @ step
    if not slope < 0:  # Numerically singular Hessian: fall back to gradient.
      step, slope = -grad, -(grad @ grad)
    t = 1.0
    for _ in range(60):
      new_lam = lam + t * step
      new = _snis(g, new_lam)
      new_dual = new[0].mean() - new_lam @ mu
      if new_dual <= dual + 1e-4 * t * slope:
        break
      # Near λ̂ the decrease of L is below its rounding error: judge the step
      # by the gradient instead.
      if (-slope <= 1e-9 * (1.0 + abs(dual)) and np.max(np.abs(
          new[2].mean(0) - mu)) < np.max(np.abs(grad))):
        break
      t *= 0.5
    lam, dual = new_lam, new_dual
    log_z, w, cm, log_total = new
    mu_hat = cm.mean(0)
  err = float(np.max(np.abs(mu_hat - mu)))
  converged = err <= tol
  ess_per_context = _effective_sample_sizes(g, lam, log_total)
  smallest = int(np.argmin(ess_per_context))
  ess = float(ess_per_context[smallest])
  of = (f"{n}" if c == 1 else
        f"{counts[smallest]} in context {smallest} (the smallest of the {c} "
        "contexts)")
  if not converged:
    warnings.warn(
        f"λ fitting did not converge after {max_iter} iterations: max |μ̂ − μ̄|"
        f" = {err:.3g} > tol = {tol:.3g} (features {names}, λ = {lam}, "
        f"ESS = {ess:.1f} of {of})", LambdaFitWarning, stacklevel=2)
  if ess < min_ess:
    warnings.warn(
        f"λ fitting: effective sample size {ess:.1f} of {of} is below "
        f"{min_ess}; the moments are unreliable (features {names})",
        LambdaFitWarning, stacklevel=2)
  return LambdaFit(lambdas=lam, moments=mu_hat, target_moments=mu,
                   max_abs_error=err, effective_sample_size=ess,
                   num_samples=n, converged=converged,
                   num_iterations=iteration, feature_names=names,
                   context_moments=cm, log_partition=log_z,
                   context_counts=counts)
