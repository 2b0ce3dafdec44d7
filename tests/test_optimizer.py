"""The optimiser: its settings are checked, and its clipping never zeroes a step."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdiv_jax.train import optimizer


def test_clip_by_global_norm_matches_optax_on_ordinary_gradients():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}
  ours = optimizer.clip_by_global_norm(1.0)
  theirs = optax.clip_by_global_norm(1.0)
  got, _ = ours.update(grads, ours.init(grads))
  want, _ = theirs.update(grads, theirs.init(grads))
  for k in grads:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
  small = {"a": jnp.array([0.1, 0.2])}
  got, _ = ours.update(small, ours.init(small))
  np.testing.assert_array_equal(got["a"], small["a"])


def test_clip_by_global_norm_survives_a_norm_beyond_float32():
  """Entries of 1e19 square to 1e38 each: Σ g² overflows float32 and optax's
  clip returns a zero update; ours returns the gradient at norm 1."""
  grads = {"a": jnp.array([1e19, -1e19, 3e18], jnp.float32),
           "b": jnp.array([2e19], jnp.float32)}
  theirs = optax.clip_by_global_norm(1.0)
  zeroed, _ = theirs.update(grads, theirs.init(grads))
  assert not np.any(np.asarray(zeroed["a"]))     # the failure being fixed
  ours = optimizer.clip_by_global_norm(1.0)
  got, _ = ours.update(grads, ours.init(grads))
  flat = np.concatenate([np.asarray(got["a"]), np.asarray(got["b"])])
  assert np.linalg.norm(flat) == pytest.approx(1.0, rel=1e-5)
  want = np.array([1e19, -1e19, 3e18, 2e19]) / np.linalg.norm(
      [1e19, -1e19, 3e18, 2e19])
  np.testing.assert_allclose(flat, want, rtol=1e-5)


@pytest.mark.parametrize("field,value,text", [
    ("learning_rate", 0.0, "learning_rate: must be a finite number > 0"),
    ("learning_rate", float("nan"), "learning_rate: must be a finite number > 0"),
    ("lr_schedule", "step", "lr_schedule: must be one of constant, cosine, linear"),
    ("adam_b2", 1.0, "adam_b2: must be in [0, 1)"),
    ("max_grad_norm", -1.0, "max_grad_norm: must be a finite number >= 0"),
    ("grad_accum_steps", 0, "grad_accum_steps: must be an integer >= 1"),
])
def test_settings_are_checked(field, value, text):
  with pytest.raises(ValueError) as e:
    optimizer.OptimizerConfig(**{field: value})
  assert str(e.value).startswith(text), str(e.value)
