"""Unnormalised log-targets log P(x) as pure functions of arrays.

The formulas behind every target of ``fdiv_jax.targets`` (P = a·b,
a·exp(λ·φ), a·exp(r/β)), and the per-context importance-sampling estimate of
log Z_c for conditional targets. Pure JAX: no features, no models.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fdiv_jax.core import estimators

Array = jax.Array


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
