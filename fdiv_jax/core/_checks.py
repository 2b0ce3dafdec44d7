"""Shape contracts of the core's public functions (rlax style, with chex).

The checks read static shapes only, so they cost nothing under `jit`. A failed
check raises chex's AssertionError whose message names the function and the
argument, e.g. ``fdpg_loss: log_target must have shape [N] = (4,) like
log_model; got (4, 1)``, instead of broadcasting a [4] against a [4, 1] into a
silently wrong [4, 4]. Under `vmap` the shapes checked are those of one
example, so a vmapped [B, N] call is checked as B calls on [N].
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np


def _shape(x) -> tuple[int, ...]:
  return tuple(jnp.shape(x))


def _array(x):
  """`x` as something chex reads as one input (a list would be many inputs)."""
  return np.asarray(x) if isinstance(x, (list, tuple)) else x


def _present(arrays: dict) -> list[tuple[str, object]]:
  return [(name, _array(x)) for name, x in arrays.items() if x is not None]


def samples(fn: str, **arrays) -> None:
  """Every named array (None skipped) is [N], with one N for all of them."""
  present = _present(arrays)
  if not present:
    return
  first_name, first = present[0]
  chex.assert_rank(first, 1, custom_message=(
      f"{fn}: {first_name} must be a vector [N] of per-sample values; got shape "
      f"{_shape(first)}"))
  for name, x in present[1:]:
    chex.assert_shape(x, _shape(first), custom_message=(
        f"{fn}: {name} must have shape [N] = {_shape(first)} like {first_name}; "
        f"got {_shape(x)}"))


def scalar_or_samples(fn: str, like, **arrays) -> None:
  """Every named array (None skipped) is a scalar or has the shape of `like`."""
  for name, x in _present(arrays):
    if jnp.ndim(x) == 0:
      continue
    chex.assert_shape(x, _shape(like), custom_message=(
        f"{fn}: {name} must be a scalar or have shape {_shape(like)} (one value "
        f"per sample); got {_shape(x)}"))


def scalar(fn: str, **arrays) -> None:
  """Every named array (None skipped) is a scalar (shape ())."""
  for name, x in _present(arrays):
    chex.assert_rank(x, 0, custom_message=(
        f"{fn}: {name} must be a scalar; got shape {_shape(x)}"))


def samples_or_features(fn: str, like_name: str, like, **arrays) -> None:
  """Every named array (None skipped) is [N] or [N, K], N from `like` ([N])."""
  n = _shape(like)[0]
  for name, x in _present(arrays):
    chex.assert_rank(x, {1, 2}, custom_message=(
        f"{fn}: {name} must be [N] per-sample values or [N, K] per-sample "
        f"features; got shape {_shape(x)}"))
    chex.assert_axis_dimension(x, 0, n, custom_message=(
        f"{fn}: {name} must have N = {n} rows like {like_name}; got shape "
        f"{_shape(x)}"))


def integers(fn: str, **arrays) -> None:
  """Every named array (None skipped) has an integer dtype (ids, indices)."""
  for name, x in _present(arrays):
    chex.assert_type(x, int, custom_message=(
        f"{fn}: {name} must have an integer dtype; got {jnp.result_type(x)}"))


def same_shape(fn: str, **arrays) -> None:
  """Every named array (None skipped) has the shape of the first one."""
  present = _present(arrays)
  if not present:
    return
  first_name, first = present[0]
  for name, x in present[1:]:
    chex.assert_shape(x, _shape(first), custom_message=(
        f"{fn}: {name} must have the shape of {first_name}, {_shape(first)}; "
        f"got {_shape(x)}"))


def rank_at_least(fn: str, rank: int, **arrays) -> None:
  """Every named array (None skipped) has at least `rank` axes."""
  for name, x in _present(arrays):
    if jnp.ndim(x) < rank:
      raise AssertionError(
          f"{fn}: {name} must have at least {rank} axis(es); got shape "
          f"{_shape(x)}")
