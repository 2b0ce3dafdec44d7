"""The optimiser: its settings are checked, and its clipping never zeroes a step."""

import jax
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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_finite_finds_one_bad_entry_in_a_large_leaf(bad, dtype):
  # Entries near the top of the range: x·0 stays 0, no spurious overflow.
  tree = {"big": jnp.full((4096, 300), 3e38, dtype),
          "small": jnp.ones((3,), dtype)}
  check = jax.jit(optimizer.all_finite)
  assert bool(check(tree))
  for leaf in ("big", "small"):
    broken = dict(tree)
    broken[leaf] = tree[leaf].reshape(-1).at[-2].set(bad).reshape(
        tree[leaf].shape)
    assert not bool(check(broken)), leaf


def test_skip_if_not_finite_behaves_as_optax_apply_if_finite():
  # A run of gradients with NaN / inf, long enough to pass
  # max_consecutive_errors (then the bad update is applied, as in optax).
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
  ours = optimizer.skip_if_not_finite(inner, max_consecutive_errors=2)
  ref = optax.apply_if_finite(inner, max_consecutive_errors=2)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
  state_ours, state_ref = ours.init(params), ref.init(params)
  assert jax.tree.structure(state_ours) == jax.tree.structure(state_ref)
  rows = [1.0, np.nan, 2.0, np.inf, -np.inf, np.nan, -np.inf, 0.5]
  for i, value in enumerate(rows):
    grads = {"w": jnp.full((2, 3), 0.3 * i).at[1, 2].set(value),
             "b": jnp.full((3,), -0.2)}
    up_ours, state_ours = jax.jit(ours.update)(grads, state_ours, params)
    up_ref, state_ref = jax.jit(ref.update)(grads, state_ref, params)
    for a, b in zip(jax.tree.leaves((up_ours, state_ours)),
                    jax.tree.leaves((up_ref, state_ref))):
      np.testing.assert_array_equal(a, b, err_msg=f"gradient {i}")
  assert int(state_ours.total_notfinite) == 5
  assert int(optimizer.skipped_updates(state_ours)) == 5


def test_skip_if_not_finite_passes_extra_arguments_on():
  # An inner transformation that reads an extra argument (`value`, as
  # optax.contrib.reduce_on_plateau does) works as under optax's guard.
  inner = optax.chain(optax.sgd(1.0),
                      optax.contrib.reduce_on_plateau(patience=0, factor=0.5))
  params = {"w": jnp.ones((2,))}
  ours = optimizer.skip_if_not_finite(inner, 3)
  ref = optax.apply_if_finite(inner, 3)
  state_ours, state_ref = ours.init(params), ref.init(params)
  for value in (3.0, 2.0, 2.5, 2.7, 2.9):
    grads = {"w": jnp.ones((2,))}
    up_ours, state_ours = ours.update(grads, state_ours, params,
                                      value=jnp.asarray(value))
    up_ref, state_ref = ref.update(grads, state_ref, params,
                                   value=jnp.asarray(value))
    np.testing.assert_array_equal(up_ours["w"], up_ref["w"])
  # The plateau was seen: the step is no longer sgd's -1.
  assert float(up_ours["w"][0]) > -1.0
