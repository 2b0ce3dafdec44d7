"""Baselines: pure state updates with the documented values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.core import baselines


def test_moving_average_window():
  b = baselines.get("moving_average", window=3)
  state = b.init()
  r = jnp.ones(4)
  assert float(b.value(state, r)[0]) == 0.0
  for stat in (1.0, 2.0, 3.0, 4.0):
    state = b.update(state, stat * r)
  # The last three batch means: (2 + 3 + 4)/3.
  np.testing.assert_allclose(b.value(state, r), 3.0)
  state = baselines.get("moving_average", window=3).update(b.init(), jnp.array([1., 5.]))
  np.testing.assert_allclose(b.value(state, r), 3.0)  # one batch seen: its mean


def test_moving_average_uses_weighted_masked_rewards():
  b = baselines.get("moving_average", window=2)
  rewards = jnp.array([1.0, 2.0, 100.0])
  weights = jnp.array([2.0, 0.5, 7.0])
  mask = jnp.array([True, True, False])
  state = b.update(b.init(), rewards, weights, mask)
  assert float(b.value(state, rewards)[0]) == pytest.approx((2.0 + 1.0) / 2)


def test_ema_is_bias_corrected():
  b = baselines.get("ema", decay=0.8)
  state = b.init()
  for _ in range(5):
    state = b.update(state, jnp.full(3, 2.5))
  np.testing.assert_allclose(b.value(state, jnp.zeros(3)), 2.5, rtol=1e-6)
  state = b.update(b.init(), jnp.array([1.0, 3.0]))
  np.testing.assert_allclose(b.value(state, jnp.zeros(2)), 2.0, rtol=1e-6)


def test_batch_mean_and_leave_one_out():
  r = jnp.array([1.0, 2.0, 3.0, 10.0])
  mask = jnp.array([True, True, True, False])
  np.testing.assert_allclose(baselines.get("batch_mean").value((), r, mask=mask), 2.0)
  loo = baselines.get("leave_one_out").value((), r, mask=mask)
  np.testing.assert_allclose(loo[:3], [2.5, 2.0, 1.5])
  np.testing.assert_allclose(baselines.get("none").value((), r), 0.0)
  single = baselines.get("leave_one_out").value((), jnp.array([4.0]))
  np.testing.assert_allclose(single, 0.0)


def test_states_are_pytrees_that_jit():
  for kind in baselines.KINDS:
    b = baselines.get(kind)
    step = jax.jit(lambda s, r: (b.update(s, r), b.value(s, r)))
    state = b.init()
    for _ in range(3):
      state, value = step(state, jnp.arange(4.0))
    assert value.shape == (4,)


def test_bad_configuration_is_rejected():
  with pytest.raises(ValueError, match="^kind: .*valid kinds: none, moving_average"):
    baselines.get("median")
  with pytest.raises(ValueError, match="^window: must be an integer >= 1"):
    baselines.get("moving_average", window=0)
  with pytest.raises(ValueError, match=r"^decay: must be in \[0, 1\)"):
    baselines.get("ema", decay=1.0)
