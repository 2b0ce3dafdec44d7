"""The jitted f-DPG step: it learns (measured exactly), compiles once, skips NaNs."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_task
from fdiv_jax import targets
from fdiv_jax.core import divergences
from fdiv_jax.lm import enumeration
from fdiv_jax.lm import output_layer
from fdiv_jax.targets import features
from fdiv_jax.train import eval_step as eval_step_lib
from fdiv_jax.train import sharding
from fdiv_jax.train import step as step_lib


def run(task, config, num_steps):
  mesh = sharding.make_mesh()
  state = sharding.shard_state(toy_task.create_state(config, task), mesh)
  step_fn = sharding.jit_train_step(
      step_lib.make_train_step(config.step, task.model, task.target, task.sampler),
      state, mesh)
  batch = task.batch(0, config.batch_size)
  metrics = None
  for _ in range(num_steps):
    state, metrics = step_fn(state, batch)
  return state, metrics, step_fn


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js", "tv"])
def test_online_fdpg_halves_the_exact_divergence(divergence):
  config = toy_task.toy_config(divergence=divergence)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  before = task.exact(task.params).divergences[divergence]
  state, metrics, _ = run(task, config, 250)
  after = task.exact(state.params)
  assert math.isfinite(before) and before > 0.05
  assert after.divergences[divergence] <= 0.5 * before, (before, after)
  # The other divergences to the target fall too, and alignment rises.
  base = task.exact(task.params)
  assert after.divergences["tv"] < base.divergences["tv"]
  assert after.alignment > base.alignment
  assert all(np.isfinite(v) for v in jax.device_get(metrics).values())


def test_pointwise_constraint_is_learned_and_exact_metrics_agree():
  config = toy_task.toy_config(divergence="js")
  task = toy_task.ToyTask(config, toy_task.toy_target("pointwise"))
  base = task.exact(task.params)
  state, metrics, _ = run(task, config, 250)
  after = task.exact(state.params)
  assert after.divergences["js"] <= 0.25 * base.divergences["js"]
  assert after.alignment > 0.95 > base.alignment
  # The running Ẑ converges to the exact Z of a·b.
  assert float(metrics["log_z"]) == pytest.approx(base.log_z, abs=0.02)
  assert float(metrics["satisfied_fraction"]) > 0.9


def test_offline_with_a_stale_proposal_also_decreases():
  config = toy_task.toy_config(divergence="js", mode="offline",
                               proposal_update_window=5, proposal_update_metric="tv")
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  before = task.exact(task.params).divergences["js"]
  state, metrics, _ = run(task, config, 250)
  after = task.exact(state.params).divergences["js"]
  assert after <= 0.5 * before
  # q was replaced by π at least once, and the importance weights were used.
  assert int(state.num_proposal_updates) >= 1
  assert "proposal_tv" in metrics


def test_step_compiles_once(caplog):
  config = toy_task.toy_config()
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  state, _, step_fn = run(task, config, 1)
  batch = task.batch(1, config.batch_size)
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    caplog.clear()
    for _ in range(3):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
  compiled = [r for r in caplog.records if "Compiling" in r.getMessage()
              and "step" in r.getMessage()]
  assert not compiled, [r.getMessage() for r in compiled]
  assert step_fn._cache_size() == 1


def test_non_finite_gradients_are_skipped_and_counted():
  poison = features.Feature("poison", lambda t, m, c=None: jnp.full(t.shape[:1],
                                                                    jnp.nan))
  config = toy_task.toy_config()
  task = toy_task.ToyTask(config, targets.RewardTarget(poison, beta=1.0))
  before = jax.device_get(task.params)
  state, metrics, _ = run(task, config, 2)
  assert int(metrics["skipped_updates"]) == 2
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  # Neither the running Ẑ nor the baseline took the NaNs in.
  assert np.all(np.isfinite(np.asarray(state.baseline_state.values)))
  assert not np.any(np.isnan(np.asarray(state.log_partition.log_sum_weights)))


def test_ema_params_and_grad_accumulation():
  config = toy_task.toy_config(ema_decay=0.5, grad_accum_steps=2)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  state, _, _ = run(task, config, 1)
  # One micro-batch: no update yet, EMA unchanged.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(task.params),
               jax.device_get(state.params))
  state, _, _ = run(task, config, 2)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       task.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0
  expected = jax.tree.map(lambda p0, p: 0.5 * p0 + 0.5 * p, task.params, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.ema_params), jax.device_get(expected))


def _evaluate_at_the_exact_log_z(task, config, seed):
  """One evaluation of π = the initial params with the state's log Ẑ set to
  the exact log Z (so only sampling error remains); also the exact metrics,
  the trained divergence included."""
  mesh = sharding.make_mesh()
  state = sharding.shard_state(toy_task.create_state(config, task), mesh)
  exact = enumeration.exact_metrics(task.model, task.params, task.base_params,
                                    task.target, task.prompt, task.support,
                                    extra=(config.step.divergence,))
  state = state.replace(log_partition=state.log_partition._replace(
      log_sum_weights=jnp.array([exact.log_z], jnp.float32),
      count=jnp.ones((1,), jnp.float32)))
  eval_fn = jax.jit(eval_step_lib.make_eval_step(config.step, task.model,
                                                 task.target, task.sampler))
  batch = task.batch(0, config.loop.eval_batch_size)
  metrics, samples = eval_fn(state, batch, jax.random.PRNGKey(seed))
  return metrics, samples, exact


def test_eval_step_metrics_match_exact_values():
  config = toy_task.toy_config(eval_batch_size=4096)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  m, samples, exact = _evaluate_at_the_exact_log_z(task, config, 3)
  assert samples.tokens.shape == (4096, toy_task.NEW_TOKENS)
  assert float(m["kl_from_base"]) == pytest.approx(0.0, abs=1e-5)
  assert float(m["alignment"]) == pytest.approx(exact.alignment, abs=0.05)
  for name in ("tv", "js", "forward_kl"):
    assert float(m[name]) == pytest.approx(exact.divergences[name], abs=0.05), name


def _one_step_metrics(**overrides):
  config = toy_task.toy_config(**overrides)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  _, metrics, _ = run(task, config, 1)
  return jax.device_get(metrics)


def _count_known_path_calls(monkeypatch):
  calls = []
  known = output_layer.known_token_log_softmax

  def counting(*args, **kwargs):
    calls.append(1)
    return known(*args, **kwargs)

  monkeypatch.setattr(output_layer, "known_token_log_softmax", counting)
  return calls


def test_on_policy_step_differentiates_the_samplers_log_q(monkeypatch):
  """Online and unwarped, q = π: log π is the sampler's log q (π/q exactly 1)
  and only its gradient is computed; loss and gradient equal a rescoring's."""
  calls = _count_known_path_calls(monkeypatch)
  fast = _one_step_metrics()
  assert calls, "the on-policy step did not reuse the sampler's log q"
  calls.clear()
  full = _one_step_metrics(reuse_sampler_log_probs=False)
  assert not calls
  assert fast["importance_weight_mean"] == 1.0
  assert full["importance_weight_mean"] == pytest.approx(1.0, abs=1e-5)
  for key in ("loss", "grad_norm", "pseudo_reward_mean", "advantage_std", "js"):
    assert fast[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("warping", [dict(temperature=0.8), dict(top_k=2),
                                     dict(mode="offline")])
def test_log_pi_is_rescored_whenever_q_is_not_pi(warping, monkeypatch):
  calls = _count_known_path_calls(monkeypatch)
  fast = _one_step_metrics(**warping)
  assert not calls
  full = _one_step_metrics(reuse_sampler_log_probs=False, **warping)
  for key in fast:
    np.testing.assert_array_equal(fast[key], full[key], err_msg=key)
  if "mode" not in warping:  # Offline starts with q = π exactly, by value.
    assert abs(fast["importance_weight_mean"] - 1.0) > 1e-3


@pytest.mark.parametrize("d", [divergences.get("hellinger"),
                               divergences.get("pearson_chi2"),
                               divergences.get("neyman_chi2"),
                               divergences.get("alpha", alpha=0.5),
                               divergences.get("alpha", alpha=-1.0)], ids=str)
def test_the_trained_divergence_is_reported_by_step_and_evaluation(d):
  """Every f of the registry is visible: the step and the evaluation report the
  trained divergence under its metric name, and the evaluation's estimate
  matches the exact value by enumeration."""
  config = toy_task.toy_config(divergence=d, eval_batch_size=4096)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  _, metrics, _ = run(task, config, 1)
  assert d.metric_name in metrics and np.isfinite(float(metrics[d.metric_name]))
  for name in ("forward_kl", "reverse_kl", "tv", "js"):
    assert name in metrics
  m, _, exact = _evaluate_at_the_exact_log_z(task, config, 5)
  want = exact.divergences[d.metric_name]
  assert float(m[d.metric_name]) == pytest.approx(want, rel=0.05, abs=0.01)


def test_eval_step_refuses_a_warped_sampler():
  config = toy_task.toy_config(temperature=0.8)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  with pytest.raises(ValueError, match="untempered"):
    eval_step_lib.make_eval_step(config.step, task.model, task.target, task.sampler)
  eval_step_lib.make_eval_step(config.step, task.model, task.target,
                               task.sampler.untempered())


def test_a_truncated_proposal_reports_the_mass_it_misses():
  truncated = _one_step_metrics(top_k=2)
  assert 0.0 < truncated["truncated_mass"] < 1.0
  assert truncated["truncated_mass"] <= truncated["truncated_sequence_mass"] < 1.0
  assert "truncated_mass" not in _one_step_metrics(temperature=0.8)


def test_evaluation_errors_match_the_spread_over_repeated_evaluations():
  """The mixture evaluation on the toy task, 40 times with fresh samples: the
  mean of each estimate is the exact value, and its reported standard error is
  the spread of the estimates over the repetitions."""
  config = toy_task.toy_config(eval_batch_size=512, divergence="hellinger")
  task = toy_task.ToyTask(config, toy_task.toy_target("pointwise"))
  # Some training first, so that π ≠ a and the mixture matters.
  state, _, _ = run(task, config, 30)
  exact = enumeration.exact_metrics(task.model, state.params, task.base_params,
                                    task.target, task.prompt, task.support,
                                    extra=(config.step.divergence,))
  eval_fn = jax.jit(eval_step_lib.make_eval_step(config.step, task.model,
                                                 task.target, task.sampler))
  batch = task.batch(0, 256)
  draws = [jax.device_get(eval_fn(state, batch, jax.random.PRNGKey(100 + i))[0])
           for i in range(40)]
  for name, want in (("hellinger", exact.divergences["hellinger"]),
                     ("tv", exact.divergences["tv"]),
                     ("alignment", exact.alignment),
                     ("kl_from_base", exact.kl_from_base)):
    values = np.array([float(m[name]) for m in draws])
    errors = np.array([float(m[name + "_se"]) for m in draws])
    spread = np.std(values, ddof=1)
    assert abs(values.mean() - want) < 4 * spread / np.sqrt(40) + 0.01, (
        name, values.mean(), want)
    assert 0.6 * spread < errors.mean() < 1.6 * spread, (name, errors.mean(), spread)
