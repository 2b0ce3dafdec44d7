"""Shape contracts of the core's public entry points, and its error messages.

Every per-sample argument is [N] with one N (log Z and log β as documented);
a mismatch raises AssertionError naming the function and the argument instead
of broadcasting into a wrong number. The checks read static shapes only: jitted
results equal eager ones, a jitted function traces once per shape, and under
`vmap` the ranks are per example. Constructor errors start with the parameter
they are about (``"<param>: ..."``).
"""

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.core import baselines, divergences, estimators, qrs

N = 4
_RNG = np.random.default_rng(0)
LOG_MODEL = np.log(_RNG.dirichlet(np.ones(N))).astype(np.float32)
LOG_PROPOSAL = np.log(_RNG.dirichlet(np.ones(N))).astype(np.float32)
LOG_BASE = np.log(_RNG.dirichlet(np.ones(N))).astype(np.float32)
LOG_TARGET = (np.log(_RNG.dirichlet(np.ones(N))) + 1.3).astype(np.float32)
LOG_P = np.log(_RNG.dirichlet(np.ones(N))).astype(np.float32)
MASK = np.array([True, True, True, False])
CONTEXT_IDS = np.array([0, 1, 0, 1], np.int32)
FEATURES = _RNG.normal(size=(N, 2)).astype(np.float32)
REWARDS = _RNG.normal(size=N).astype(np.float32)
WEIGHTS = np.exp(_RNG.normal(size=N)).astype(np.float32)

COLUMN = (N, 1)   # [N, 1]: broadcasts against [N] into a silently wrong [N, N].
LONGER = (N + 1,)  # [N + 1]: another N.


def _like(shape, dtype=np.float32):
  return np.linspace(-1.0, 0.5, math.prod(shape)).reshape(shape).astype(dtype)


class Case(NamedTuple):
  """A public function, arguments that satisfy its contract, and bad variants.

  `call(**arrays)` calls the function (non-array parameters bound inside);
  each bad variant (arg, value) replaces one argument and must fail with a
  message containing "<fn>: <arg> ".
  """
  fn: str
  call: Callable[..., Any]
  arrays: dict
  bad: tuple
  also_good: tuple = ()  # overrides that also satisfy the contract


_DIV_ARRAYS = dict(log_model=LOG_MODEL, log_target=LOG_TARGET,
                   log_proposal=LOG_PROPOSAL, log_z=np.float32(1.1), mask=MASK)
_DIV_BAD = (("log_model", _like(COLUMN)), ("log_target", _like(COLUMN)),
            ("log_target", _like(LONGER)), ("log_proposal", _like(COLUMN)),
            ("log_proposal", _like(LONGER)), ("log_z", _like(COLUMN)),
            ("log_z", _like(LONGER)), ("mask", np.ones(COLUMN, bool)),
            ("mask", np.ones(LONGER, bool)))
_DIV_GOOD = ({"log_z": _like((N,))}, {"mask": None})


def _baseline_state(kind):
  b = baselines.get(kind, window=3) if kind == "moving_average" else (
      baselines.get(kind))
  state = b.update(b.init(), jnp.array([1.0, 2.0, 4.0]))
  return b, state


def _baseline_cases():
  cases = []
  bad = (("rewards", _like(COLUMN)), ("weights", _like(COLUMN)),
         ("weights", _like(LONGER)), ("mask", np.ones(COLUMN, bool)),
         ("mask", np.ones(LONGER, bool)))
  good = ({"weights": None}, {"mask": None}, {"weights": None, "mask": None})
  arrays = dict(rewards=REWARDS, weights=WEIGHTS, mask=MASK)
  for kind in baselines.KINDS:
    b, state = _baseline_state(kind)
    cases.append(Case("Baseline.value", lambda b=b, s=state, **a: b.value(s, **a),
                      arrays, bad, good))
    cases.append(Case("Baseline.update", lambda b=b, s=state, **a: b.update(s, **a),
                      arrays, bad, good))
  return cases


_QRS_ARRAYS = dict(log_target=LOG_TARGET, log_proposal=LOG_PROPOSAL,
                   log_beta=np.float32(0.2))
_QRS_BAD = (("log_target", _like(COLUMN)), ("log_proposal", _like(COLUMN)),
            ("log_proposal", _like(LONGER)), ("log_beta", _like((N,))))

CASES = [
    Case("exact", lambda **a: divergences.exact("js", **a),
         dict(log_pi=LOG_MODEL, log_p=LOG_P),
         (("log_p", _like(COLUMN)), ("log_p", _like(LONGER)),
          ("log_pi", np.float32(-1.0))),
         ({"log_pi": np.stack([LOG_MODEL, LOG_P]),
           "log_p": np.stack([LOG_P, LOG_MODEL])},)),
    Case("log_mean_exp", estimators.log_mean_exp,
         dict(log_values=LOG_TARGET, mask=MASK),
         (("log_values", _like(COLUMN)), ("mask", np.ones(COLUMN, bool)),
          ("mask", np.ones(LONGER, bool))), ({"mask": None},)),
    Case("log_importance_weights", estimators.log_importance_weights,
         dict(log_numerator=LOG_TARGET, log_proposal=LOG_PROPOSAL),
         (("log_numerator", _like(COLUMN)), ("log_proposal", _like(COLUMN)),
          ("log_proposal", _like(LONGER)))),
    Case("log_partition", estimators.log_partition,
         dict(log_target=LOG_TARGET, log_proposal=LOG_PROPOSAL, mask=MASK),
         (("log_target", _like(COLUMN)), ("log_proposal", _like(COLUMN)),
          ("log_proposal", _like(LONGER)), ("mask", np.ones(LONGER, bool))),
         ({"mask": None},)),
    Case("update_partition",
         lambda **a: estimators.update_partition(estimators.init_partition(2), **a),
         dict(log_target=LOG_TARGET, log_proposal=LOG_PROPOSAL,
              context_ids=CONTEXT_IDS, mask=MASK),
         (("log_target", _like(COLUMN)), ("log_proposal", _like(COLUMN)),
          ("log_proposal", _like(LONGER)),
          ("context_ids", np.zeros(COLUMN, np.int32)),
          ("context_ids", np.zeros(LONGER, np.int32)),
          ("context_ids", CONTEXT_IDS.astype(np.float32)),
          ("mask", np.ones(COLUMN, bool))),
         ({"context_ids": None}, {"mask": None})),
    Case("divergence",
         lambda **a: estimators.divergence(divergences.get("alpha", alpha=0.5), **a),
         _DIV_ARRAYS, _DIV_BAD, _DIV_GOOD),
    Case("forward_kl", estimators.forward_kl, _DIV_ARRAYS, _DIV_BAD, _DIV_GOOD),
    Case("reverse_kl", estimators.reverse_kl, _DIV_ARRAYS, _DIV_BAD, _DIV_GOOD),
    Case("total_variation", estimators.total_variation, _DIV_ARRAYS, _DIV_BAD,
         _DIV_GOOD),
    Case("jensen_shannon", estimators.jensen_shannon, _DIV_ARRAYS, _DIV_BAD,
         _DIV_GOOD),
    Case("divergences_to_target", estimators.divergences_to_target, _DIV_ARRAYS,
         _DIV_BAD, _DIV_GOOD),
    Case("kl_from_base", estimators.kl_from_base,
         dict(log_model=LOG_MODEL, log_base=LOG_BASE, log_proposal=LOG_PROPOSAL,
              mask=MASK),
         (("log_model", _like(COLUMN)), ("log_base", _like(COLUMN)),
          ("log_base", _like(LONGER)), ("log_proposal", _like(COLUMN)),
          ("mask", np.ones(LONGER, bool))), ({"mask": None},)),
    Case("self_normalized_moments", estimators.self_normalized_moments,
         dict(values=FEATURES, log_weights=LOG_TARGET - LOG_PROPOSAL, mask=MASK),
         (("values", _like(LONGER)), ("values", _like((N + 1, 2))),
          ("values", _like((N, 2, 1))), ("log_weights", _like(COLUMN)),
          ("mask", np.ones(COLUMN, bool)), ("mask", np.ones(LONGER, bool))),
         ({"values": FEATURES[:, 0]}, {"values": np.ones(COLUMN, np.float32)},
          {"mask": None})),
    Case("effective_sample_size", estimators.effective_sample_size,
         dict(log_weights=LOG_TARGET - LOG_PROPOSAL, mask=MASK),
         (("log_weights", _like(COLUMN)), ("mask", np.ones(COLUMN, bool)),
          ("mask", np.ones(LONGER, bool))), ({"mask": None},)),
    Case("weighted_mean_reward", baselines.weighted_mean_reward,
         dict(rewards=REWARDS, weights=WEIGHTS, mask=MASK),
         (("rewards", _like(COLUMN)), ("weights", _like(COLUMN)),
          ("weights", _like(LONGER)), ("mask", np.ones(LONGER, bool))),
         ({"weights": None, "mask": None},)),
    *_baseline_cases(),
    Case("log_acceptance_probability", qrs.log_acceptance_probability,
         _QRS_ARRAYS, _QRS_BAD),
    Case("accept", lambda **a: qrs.accept(jax.random.key(0), **a), _QRS_ARRAYS,
         _QRS_BAD),
    Case("diagnostics", qrs.diagnostics, _QRS_ARRAYS, _QRS_BAD),
    Case("log_beta_for_quantile",
         lambda **a: qrs.log_beta_for_quantile(quantile=0.75, **a),
         dict(log_target=LOG_TARGET, log_proposal=LOG_PROPOSAL),
         _QRS_BAD[:3]),
]


def _case_id(case: Case) -> str:
  return case.fn


def _bad_variants():
  for i, case in enumerate(CASES):
    for arg, value in case.bad:
      yield pytest.param(case, arg, value,
                         id=f"{case.fn}[{i}]-{arg}-{np.shape(value)}")


def _good_variants():
  for i, case in enumerate(CASES):
    for j, overrides in enumerate(({},) + tuple(case.also_good)):
      yield pytest.param(case, overrides, id=f"{case.fn}[{i}]-{j}")


def _perturbed(arrays: dict, by: float) -> dict:
  """The same shapes and dtypes, other float values."""
  out = {}
  for k, v in arrays.items():
    if v is not None and np.issubdtype(np.asarray(v).dtype, np.floating):
      v = (np.asarray(v) + by).astype(np.asarray(v).dtype)
    out[k] = v
  return out


def _assert_trees_close(got, want):
  got_leaves, got_tree = jax.tree.flatten(got)
  want_leaves, want_tree = jax.tree.flatten(want)
  assert got_tree == want_tree
  for g, w in zip(got_leaves, want_leaves):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------ mismatches.


@pytest.mark.parametrize("case,arg,value", list(_bad_variants()))
def test_mismatched_shape_raises_naming_function_and_argument(case, arg, value):
  arrays = dict(case.arrays, **{arg: value})
  with pytest.raises(AssertionError) as info:
    case.call(**arrays)
  assert f"{case.fn}: {arg} " in str(info.value)


@pytest.mark.parametrize("case,arg,value", list(_bad_variants()))
def test_mismatch_is_caught_at_trace_time_under_jit(case, arg, value):
  arrays = dict(case.arrays, **{arg: value})
  with pytest.raises(AssertionError, match=re.escape(f"{case.fn}: {arg} ")):
    jax.jit(case.call)(**arrays)


def test_the_broadcast_the_checks_prevent_gives_wrong_numbers():
  # Without the check, a [4] log_model against a [4, 1] log_target is a [4, 4]
  # grid of mismatched pairs, averaged over the wrong axis: 4 wrong "estimates".
  right = float(estimators.reverse_kl(LOG_MODEL, LOG_TARGET, LOG_PROPOSAL, 1.1))
  wrong = np.asarray(estimators._divergence(
      "reverse_kl", LOG_MODEL, LOG_TARGET[:, None], LOG_PROPOSAL, 1.1, None))
  assert wrong.shape == (N,)
  assert np.all(np.abs(wrong - right) > 1e-3)
  with pytest.raises(AssertionError, match="reverse_kl: log_target must have shape"):
    estimators.reverse_kl(LOG_MODEL, LOG_TARGET[:, None], LOG_PROPOSAL, 1.1)


def test_messages_state_the_shapes():
  with pytest.raises(AssertionError) as info:
    estimators.log_partition(LOG_TARGET, _like(COLUMN))
  assert "(4,)" in str(info.value) and "(4, 1)" in str(info.value)
  with pytest.raises(AssertionError, match=r"integer dtype; got float32"):
    estimators.update_partition(estimators.init_partition(2), LOG_TARGET,
                                LOG_PROPOSAL, CONTEXT_IDS.astype(np.float32))


def test_python_lists_are_one_argument_each():
  # chex reads a list as many inputs; the checks read it as one array.
  got = estimators.effective_sample_size([0.0, 0.0, 0.0])
  assert float(got) == pytest.approx(3.0)
  with pytest.raises(AssertionError, match="log_partition: log_proposal "):
    estimators.log_partition([0.0, 1.0], [0.0, 1.0, 2.0])


# ------------------------------------------------------ matching shapes.


@pytest.mark.parametrize("case,overrides", list(_good_variants()))
def test_matching_shapes_work_and_jit_equals_eager_without_retracing(case,
                                                                    overrides):
  arrays = dict(case.arrays, **overrides)
  eager = case.call(**arrays)
  for leaf in jax.tree.leaves(eager):
    assert not np.any(np.isnan(np.asarray(leaf, np.float64)))
  traces = []

  def traced(**a):
    traces.append(1)
    return case.call(**a)

  jitted = jax.jit(traced)
  _assert_trees_close(jitted(**arrays), eager)
  other = _perturbed(arrays, 0.25)
  _assert_trees_close(jitted(**other), case.call(**other))
  assert len(traces) == 1  # the same shapes: no second trace, no recompile


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_vmap_over_a_batch_of_problems(case):
  """Under vmap the ranks are per example: [B, N] inputs, [N] per call."""
  keys = list(case.arrays)
  examples = [_perturbed(case.arrays, by) for by in (0.0, 0.3, -0.7)]
  stacked = [None if case.arrays[k] is None else
             np.stack([e[k] for e in examples]) for k in keys]
  batched = jax.vmap(lambda *v: case.call(**dict(zip(keys, v))))(*stacked)
  one_by_one = [case.call(**e) for e in examples]
  _assert_trees_close(batched, jax.tree.map(lambda *x: np.stack(x), *one_by_one))


def test_vmap_still_rejects_a_mismatch_within_an_example():
  with pytest.raises(AssertionError, match="log_partition: log_proposal "):
    jax.vmap(estimators.log_partition)(np.zeros((3, N), np.float32),
                                       np.zeros((3, N, 1), np.float32))


def test_vmapped_log_partition_equals_the_per_row_estimates():
  log_target = np.stack([LOG_TARGET, LOG_TARGET + 1.0])
  log_proposal = np.stack([LOG_PROPOSAL, LOG_PROPOSAL])
  got = np.asarray(jax.vmap(estimators.log_partition)(log_target, log_proposal))
  want = [math.log(np.mean(np.exp(t.astype(np.float64) - q)))
          for t, q in zip(log_target, log_proposal)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[1] - got[0] == pytest.approx(1.0, rel=1e-5)


def test_exact_keeps_its_batch_axes_when_shapes_match():
  log_pi = np.stack([LOG_MODEL, LOG_P])
  log_p = np.stack([LOG_P, LOG_P])
  got = np.asarray(divergences.exact("tv", log_pi, log_p))
  assert got.shape == (2,)
  want = 0.5 * np.sum(np.abs(np.exp(log_pi) - np.exp(log_p)), axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got[1] == 0.0
  with pytest.raises(AssertionError, match="exact: log_p "):
    divergences.exact("tv", log_pi, log_p[:1])  # [1, K] no longer broadcasts


# ------------------------------------------------- constructor messages.


def _message(fn, *args, **kwargs) -> str:
  with pytest.raises(ValueError) as info:
    fn(*args, **kwargs)
  return str(info.value)


def test_baseline_messages_start_with_the_parameter():
  assert _message(baselines.Baseline, "x") == (
      "kind: unknown baseline kind 'x'; valid kinds: none, moving_average, ema, "
      "batch_mean, leave_one_out.")
  assert _message(baselines.Baseline, "moving_average", window=0) == (
      "window: must be an integer >= 1, got 0.")
  assert _message(baselines.get, "ema", decay=1.0) == (
      "decay: must be in [0, 1), got 1.0.")
  assert _message(baselines.get, "ema", decay=-0.1).startswith("decay: ")
  assert _message(baselines.get, "ema", decay=float("nan")).startswith("decay: ")
  assert _message(baselines.get, "moving_average", window=2.5) == (
      "window: must be an integer >= 1, got 2.5.")
  fields = {f.name for f in dataclasses.fields(baselines.Baseline)}
  for message in (_message(baselines.get, "median"),
                  _message(baselines.get, "moving_average", window=-3),
                  _message(baselines.get, "ema", decay=2.0)):
    assert message.split(":")[0] in fields, message


def test_baseline_valid_parameters_still_construct():
  assert baselines.get("moving_average", window=np.int64(2)).window == 2
  assert baselines.get("ema", decay=0.0).decay == 0.0
  # Every parameter is checked, even one the kind does not use: a config
  # with baseline_window=0 is a mistake whatever the baseline.
  with pytest.raises(ValueError, match=r"^window: must be an integer >= 1"):
    baselines.get("batch_mean", window=0)
  with pytest.raises(ValueError, match=r"^decay: must be in \[0, 1\)"):
    baselines.get("moving_average", decay=1.0)


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, float("nan"), float("inf"),
                                 -float("inf"), "abc", [0.5]])
def test_every_alpha_error_starts_with_alpha(bad):
  message = _message(divergences.get, "alpha", alpha=bad)
  assert message.startswith("alpha: must be a finite real number other than 0 "
                            "and 1, got "), message
  assert repr(bad) in message


def test_missing_alpha_starts_with_alpha():
  for kwargs in ({}, {"alpha": None}):
    message = _message(divergences.get, "alpha", **kwargs)
    assert message.startswith("alpha: "), message
    assert "needs a parameter alpha" in message


def test_unknown_name_lists_every_accepted_name():
  message = _message(divergences.get, "foo")
  assert message.startswith("Unknown divergence 'foo'; valid names: forward_kl")
  for name in divergences.accepted_names():
    assert re.search(rf"\b{name}\b", message), name
  for alias, canonical in divergences.ALIASES.items():
    assert f"{alias} (= {canonical})" in message


def test_unexpected_parameters_name_the_divergence():
  assert _message(divergences.get, "js", alpha=0.5).startswith(
      "Divergence 'js' takes no parameters")
  assert _message(divergences.get, "kl", beta=1).startswith(
      "Divergence 'forward_kl' takes no parameters")
  assert _message(divergences.get, "alpha", alpha=0.5, beta=1).startswith(
      "Divergence 'alpha' takes only 'alpha'")


# ------------------------------------------- aliases and metric names.


def test_aliases_are_public_read_only_and_resolve():
  assert dict(divergences.ALIASES) == {"kl": "forward_kl", "rkl": "reverse_kl",
                                       "jensen_shannon": "js",
                                       "total_variation": "tv"}
  with pytest.raises(TypeError):
    divergences.ALIASES["fkl"] = "forward_kl"  # type: ignore[index]
  assert "fkl" not in divergences.ALIASES
  for alias, canonical in divergences.ALIASES.items():
    assert canonical in divergences.NAMES
    assert divergences.get(alias) == divergences.get(canonical)


def test_accepted_names_are_the_names_then_the_aliases():
  names = divergences.accepted_names()
  assert names == divergences.NAMES + ("kl", "rkl", "jensen_shannon",
                                       "total_variation")
  assert len(set(names)) == len(names)
  for name in names:
    params = {"alpha": 0.5} if name == "alpha" else {}
    assert divergences.get(name, **params).name in divergences.NAMES
  with pytest.raises(ValueError):
    divergences.get("fkl")  # not accepted, so not listed


def test_metric_name():
  for name in divergences.NAMES:
    if name != "alpha":
      assert divergences.get(name).metric_name == name
  assert divergences.get("kl").metric_name == "forward_kl"
  assert divergences.get("total_variation").metric_name == "tv"
  for alpha, want in ((0.5, "alpha_0.5"), (-1.5, "alpha_-1.5"), (2.0, "alpha_2"),
                      (2, "alpha_2"), (0.25, "alpha_0.25"), (1e-7, "alpha_1e-07")):
    assert divergences.get("alpha", alpha=alpha).metric_name == want
  # The keys of the reported estimates are these metric names.
  metrics = estimators.divergences_to_target(LOG_MODEL, LOG_TARGET, LOG_PROPOSAL,
                                             1.1)
  assert set(metrics) == {divergences.get(n).metric_name
                          for n in ("kl", "rkl", "js", "tv")}
