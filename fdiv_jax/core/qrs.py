"""Quasi-rejection sampling (QRS) from an unnormalised target P.

Eikema, Kruszewski, Dance, Elsahar and Dymetman, "An approximate sampler for
energy-based models with divergence diagnostics", TMLR 2022.

Draw x ~ q and accept it with probability min(1, P(x) / (β q(x))). The
accepted samples follow exactly

    p_β(x) = min(P(x), β q(x)) / Z_β,   Z_β = Σ_x min(P(x), β q(x)),

which is the target p = P / Z once β ≥ max_x P(x)/q(x). The expected
acceptance rate is Z_β / β, and the total-variation distance to p is bounded
by TV(p_β, p) ≤ 1 − Z_β / Z. All three are estimated from the proposals with
importance weights w = P/q (x ~ q):

    Ẑ = mean_i w_i,   Ẑ_β = mean_i min(w_i, β).

Everything is in log space (log β, log P, log q); log P = −inf (a violated
hard constraint) is never accepted.

Two layers: pure functions of arrays (:func:`log_acceptance_probability`,
:func:`accept`, :func:`diagnostics`, :func:`log_beta_for_quantile`), jittable,
whose per-proposal arrays must all be ``[B]`` and log β a scalar (checked: an
AssertionError names the function and the argument; nothing is broadcast);
and a host loop
(:func:`sample`) that draws batches from any ``propose(rng) -> (samples,
log_q)`` until ``num_samples`` are accepted or a cap is reached.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import _checks

Array = jax.Array


class QRSWarning(RuntimeWarning):
  """QRS stopped at its cap before accepting the requested number."""


def _check(fn: str, log_target, log_proposal, log_beta=None) -> None:
  _checks.samples(fn, log_target=log_target, log_proposal=log_proposal)
  _checks.scalar(fn, log_beta=log_beta)


def log_acceptance_probability(log_target: Array, log_proposal: Array,
                               log_beta: Array | float) -> Array:
  """log min(1, P(x) / (β q(x))) for x ~ q; ``[B]``. −inf where P = 0.

  Args:
    log_target: ``[B]``, log P(x_i).
    log_proposal: ``[B]``, log q(x_i).
    log_beta: scalar log β.
  """
  _check("log_acceptance_probability", log_target, log_proposal, log_beta)
  log_ratio = jnp.asarray(log_target) - jnp.asarray(log_proposal) - log_beta
  return jnp.minimum(log_ratio, 0.0)


def accept(rng: Array, log_target: Array, log_proposal: Array,
           log_beta: Array | float) -> Array:
  """Accept/reject decisions, bool ``[B]``: log U < log min(1, P/(βq)), U~U(0,1).

  Args:
    rng: PRNG key.
    log_target: ``[B]``, log P(x_i).
    log_proposal: ``[B]``, log q(x_i).
    log_beta: scalar log β.
  """
  _check("accept", log_target, log_proposal, log_beta)
  log_acc = log_acceptance_probability(log_target, log_proposal, log_beta)
  u = jax.random.uniform(rng, log_acc.shape, log_acc.dtype)
  return jnp.log(u) < log_acc


class Diagnostics(NamedTuple):
  """QRS diagnostics, estimated from proposals x_i ~ q (Eikema et al. 2022).

  Attributes:
    acceptance_rate: Ẑ_β / β, the expected fraction of proposals accepted.
    log_z_beta: log Ẑ_β = log mean_i min(P(x_i)/q(x_i), β).
    log_z: log Ẑ = log mean_i P(x_i)/q(x_i).
    tv_bound: 1 − Ẑ_β / Ẑ, the bound on TV(p_β, p); 0 when β ≥ max P/q.
  """
  acceptance_rate: Array
  log_z_beta: Array
  log_z: Array
  tv_bound: Array


def _log_mean_exp(x: Array) -> Array:
  return jax.nn.logsumexp(x) - jnp.log(x.shape[0])


def diagnostics(log_target: Array, log_proposal: Array,
                log_beta: Array | float) -> Diagnostics:
  """Acceptance rate, Ẑ_β, Ẑ and the TV bound from proposals x_i ~ q.

  Args:
    log_target: ``[B]``, log P(x_i).
    log_proposal: ``[B]``, log q(x_i).
    log_beta: scalar log β.

  Returns:
    :class:`Diagnostics` of scalars.
  """
  _check("diagnostics", log_target, log_proposal, log_beta)
  log_w = jnp.asarray(log_target) - jnp.asarray(log_proposal)
  log_beta = jnp.asarray(log_beta, log_w.dtype)
  return _diagnostics_from_sums(
      jax.nn.logsumexp(jnp.minimum(log_w, log_beta)), jax.nn.logsumexp(log_w),
      log_w.shape[0], log_beta)


def _diagnostics_from_sums(log_sum_w_beta, log_sum_w, count, log_beta):
  log_count = jnp.log(jnp.asarray(count, jnp.result_type(log_sum_w)))
  log_z_beta = log_sum_w_beta - log_count
  log_z = log_sum_w - log_count
  return Diagnostics(
      acceptance_rate=jnp.exp(log_z_beta - log_beta),
      log_z_beta=log_z_beta,
      log_z=log_z,
      # No sample with P > 0 yet (Ẑ = 0): only the trivial bound 1.
      tv_bound=jnp.where(jnp.isneginf(log_z), 1.0,
                         -jnp.expm1(log_z_beta - log_z)))


def log_beta_for_quantile(log_target: Array, log_proposal: Array,
                          quantile: float) -> Array:
  """log β at a quantile of log P/q over proposals (1.0: the max, β ≥ P/q there).

  A simple way to pick β: higher quantiles are closer to p and slower.

  Args:
    log_target: ``[B]``, log P(x_i).
    log_proposal: ``[B]``, log q(x_i).
    quantile: in [0, 1].

  Returns:
    Scalar log β.
  """
  _check("log_beta_for_quantile", log_target, log_proposal)
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {quantile}")
  log_w = jnp.asarray(log_target) - jnp.asarray(log_proposal)
  return jnp.quantile(log_w, quantile)


@dataclasses.dataclass
class QRSResult:
  """What :func:`sample` returns.

  Attributes:
    samples: the accepted samples, a pytree of numpy arrays with leading
      dimension ``num_accepted`` (at most the requested number).
    log_target: ``[num_accepted]`` log P of the accepted samples.
    log_proposal: ``[num_accepted]`` log q of the accepted samples.
    num_proposed: proposals drawn in total.
    num_accepted: samples returned.
    empirical_acceptance_rate: accepted / proposed over all proposals drawn.
    diagnostics: :class:`Diagnostics` over all proposals drawn.
    complete: whether the requested number was reached before the cap.
  """
  samples: Any
  log_target: np.ndarray
  log_proposal: np.ndarray
  num_proposed: int
  num_accepted: int
  empirical_acceptance_rate: float
  diagnostics: Diagnostics
  complete: bool


def _resolve_log_beta(beta, log_beta) -> float:
  if (beta is None) == (log_beta is None):
    raise ValueError("QRS: pass exactly one of beta (> 0) or log_beta")
  if beta is not None:
    beta = float(beta)
    if not beta > 0.0 or math.isinf(beta):
      raise ValueError(f"QRS: beta must be a finite number > 0, got {beta}")
    return math.log(beta)
  log_beta = float(log_beta)
  if not math.isfinite(log_beta):
    raise ValueError(f"QRS: log_beta must be finite, got {log_beta}")
  return log_beta


def sample(rng: Array, propose: Callable[[Array], tuple[Any, Array]],
           log_target_fn: Callable[[Any], Array], num_samples: int, *,
           beta: float | None = None, log_beta: float | None = None,
           max_proposals: int = 10_000_000) -> QRSResult:
  """Draws ``num_samples`` samples from p_β ∝ min(P, βq) by QRS.

  Repeats: ``samples, log_q = propose(key)`` (a batch x ~ q, leading
  dimension B, with the exact log q), ``log_p = log_target_fn(samples)``,
  accept each with probability min(1, P/(βq)); until ``num_samples`` are
  accepted or ``max_proposals`` proposals were drawn (then a
  :class:`QRSWarning` and ``complete=False``). Acceptances are independent,
  so keeping the first ``num_samples`` accepted is exact.

  Args:
    rng: PRNG key.
    propose: ``propose(key) -> (samples pytree [B, ...], log_q [B])``.
    log_target_fn: ``log_target_fn(samples) -> log P [B]``.
    num_samples: number of accepted samples wanted (> 0).
    beta: β > 0; or pass ``log_beta``.
    log_beta: log β.
    max_proposals: cap on the number of proposals drawn.

  Returns:
    :class:`QRSResult`.
  """
  lb = _resolve_log_beta(beta, log_beta)
  if int(num_samples) <= 0:
    raise ValueError(f"QRS: num_samples must be > 0, got {num_samples}")
  if int(max_proposals) <= 0:
    raise ValueError(f"QRS: max_proposals must be > 0, got {max_proposals}")
  kept, kept_lp, kept_lq = [], [], []
  num_accepted = num_proposed = 0
  log_sum_w = log_sum_w_beta = -np.inf
  while num_accepted < num_samples and num_proposed < max_proposals:
    rng, k_propose, k_accept = jax.random.split(rng, 3)
    samples, log_q = propose(k_propose)
    log_q = np.asarray(log_q, np.float64)
    log_p = np.asarray(log_target_fn(samples), np.float64)
    if log_p.shape != log_q.shape or log_q.ndim != 1:
      raise ValueError(
          f"QRS: log_target_fn returned shape {log_p.shape} and propose "
          f"returned log_q of shape {log_q.shape}; expected equal [B]")
    keep = np.asarray(accept(k_accept, log_p.astype(np.float32),
                             log_q.astype(np.float32), lb))
    log_w = log_p - log_q
    log_sum_w = np.logaddexp(log_sum_w, _np_logsumexp(log_w))
    log_sum_w_beta = np.logaddexp(log_sum_w_beta,
                                  _np_logsumexp(np.minimum(log_w, lb)))
    num_proposed += log_q.shape[0]
    if np.any(keep):
      kept.append(jax.tree.map(lambda x: np.asarray(x)[keep], samples))
      kept_lp.append(log_p[keep])
      kept_lq.append(log_q[keep])
      num_accepted += int(np.sum(keep))
  total_accepted = num_accepted
  complete = num_accepted >= num_samples
  if kept:
    out = jax.tree.map(lambda *xs: np.concatenate(xs)[:num_samples], *kept)
    out_lp = np.concatenate(kept_lp)[:num_samples]
    out_lq = np.concatenate(kept_lq)[:num_samples]
  else:
    out, out_lp, out_lq = None, np.zeros((0,)), np.zeros((0,))
  if not complete:
    warnings.warn(
        f"QRS accepted {num_accepted} of the {num_samples} samples wanted "
        f"after {num_proposed} proposals (max_proposals={max_proposals}); "
        f"raise max_proposals or lower beta", QRSWarning, stacklevel=2)
  diag = jax.tree.map(
      float, _diagnostics_from_sums(log_sum_w_beta, log_sum_w,
                                    float(num_proposed), lb))
  return QRSResult(
      samples=out, log_target=out_lp, log_proposal=out_lq,
      num_proposed=num_proposed, num_accepted=min(num_accepted, num_samples),
      empirical_acceptance_rate=total_accepted / max(num_proposed, 1),
      diagnostics=diag, complete=complete)


def _np_logsumexp(x: np.ndarray) -> float:
  m = np.max(x)
  if not np.isfinite(m):
    return float(m)
  return float(m + np.log(np.sum(np.exp(x - m))))
