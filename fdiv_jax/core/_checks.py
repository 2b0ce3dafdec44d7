"""Shape contracts of the core's public functions (rlax style, with chex).

The checks read static shapes only, so they cost nothing under `jit`. A failed
check raises chex's AssertionError whose message names the function and the
argument, e.g. ``fdpg_loss: log_target must have shape [N] = (4,) like
log_model; got (4, 1)``, instead of broadcasting a [4] against a [4, 1] into a
silently wrong [4, 4].
"""

from __future__ import annotations

import chex
import jax.numpy as jnp


def _shape(x) -> tuple[int, ...]:
  return tuple(jnp.shape(x))


def samples(fn: str, **arrays) -> None:
  """Every named array (None skipped) is [N], with one N for all of them."""
  present = [(name, x) for name, x in arrays.items() if x is not None]
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
  for name, x in arrays.items():
    if x is None or jnp.ndim(x) == 0:
      continue
    chex.assert_shape(x, _shape(like), custom_message=(
        f"{fn}: {name} must be a scalar or have shape {_shape(like)} (one value "
        f"per sample); got {_shape(x)}"))


def same_shape(fn: str, **arrays) -> None:
  """Every named array (None skipped) has the shape of the first one."""
  present = [(name, x) for name, x in arrays.items() if x is not None]
  first_name, first = present[0]
  for name, x in present[1:]:
    chex.assert_shape(x, _shape(first), custom_message=(
        f"{fn}: {name} must have the shape of {first_name}, {_shape(first)}; "
        f"got {_shape(x)}"))
