"""Offline preference training end to end (tiny): f-DPO and f-PO through the
main job, the cached reference log-probabilities, exact resume, a bad config
refused before the workdir is touched, and the chain pairs → reward model →
f-DPG with the learned reward → Hugging Face export."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fdiv_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, size="tiny"):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(size)


def read_checkpoint(directory, step):
  """Every array of checkpoint ``step`` as NumPy, by path."""
  path = os.path.join(directory, str(step), "default")
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    values = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(values)}


def run_cli(module, args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_fdpo_resume_is_bit_identical_and_the_reference_cache_is_exact(tmp_path):
  config = load_config("preference_pairs")
  config.num_steps = 4
  config.eval_every = 4
  straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
  summary = main_lib.run(config, straight)
  config.num_steps = 2
  main_lib.run(config, halves)
  config.num_steps = 4
  resumed = main_lib.run(config, halves)  # a new run of the same workdir
  a = read_checkpoint(os.path.join(straight, "checkpoints"), 4)
  b = read_checkpoint(os.path.join(halves, "checkpoints"), 4)
  assert sorted(a) == sorted(b) and any("params" in k for k in a)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)
  assert resumed["step"] == summary["step"] == 4
  assert summary["objective"] == "fdpo" and summary["divergence"] == "reverse_kl"
  for key in ("alignment", "kl_from_base", "kl_from_base_se", "distinct_2",
              "heldout/accuracy", "heldout/accuracy_se", "heldout/loss",
              "heldout/margin"):
    assert np.isfinite(summary[key]), key
  # π starts as π_ref: every held-out margin is exactly 0 (the held-out step
  # scores π_ref beside π), so the pairs are all ties, the accuracy is chance
  # (a tie counts ½), not rounding noise, and the loss is log 2.
  with open(os.path.join(straight, "base_heldout.json"), encoding="utf-8") as f:
    base = json.load(f)
  assert base["margin"] == 0.0 and base["ties"] == 1.0 and base["accuracy"] == 0.5
  assert abs(base["loss"] - np.log(2.0)) < 1e-6
  assert summary["heldout/ties"] < 0.1  # trained: margins no longer 0
  with open(os.path.join(straight, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  # The cache: the first step (π = π_ref) sees log-ratios of rounding size
  # (the cache and the policy score the same arrays alike).
  first = next(r for r in rows if r["step"] == 1 and "train/loss" in r)
  for side in ("chosen", "rejected"):
    assert abs(first[f"train/log_ratio_{side}"]) < 1e-4, first
  assert {r["step"] for r in rows if "heldout/accuracy" in r} == {0, 4}
  assert (tmp_path / "straight" / "plots" / "preference.png").exists()


def test_preference_steps_on_two_devices_match_one_device(subprocess_env):
  """Two f-DPO (JS) and two f-PO (reverse KL) steps with mesh data=2 on
  simulated CPU devices against data=1 (tests/multidevice_preference_step.py).
  The gradient (Adam's first moment) and the metrics agree to float32
  rounding; the parameters to 5e-6 after moving 2e-4: Adam divides by
  sqrt(v), so a component whose gradient is exactly 0 in exact arithmetic
  (GPT-2's key bias) turns rounding noise of ~1e-9 into a step of a few
  percent of the learning rate (1e-4)."""
  env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "multidevice_preference_step.py")],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 2
  for objective in ("fdpo", "fpo"):
    r = result[objective]
    assert r["devices_used"] == 2, (objective, r)
    assert r["moved"] > 1e-4, (objective, r)  # both steps updated π
    assert r["moments_diff"] <= 1e-7, (objective, r)
    assert r["params_diff"] <= 5e-6 and r["ema_diff"] <= 5e-6, (objective, r)
    assert r["metrics_diff"] <= 1e-5, (objective, r)
    assert r["heldout_diff"] <= 1e-5 and r["heldout_n"] == 6, (objective, r)


def test_listwise_fpo_runs_through_the_main_job(tmp_path):
  config = load_config("preference_lists")
  config.num_steps = 2
  summary = main_lib.run(config, str(tmp_path))
  assert summary["objective"] == "fpo" and summary["step"] == 2
  # Held-out accuracy: over the ordered pairs r_i > r_j within the 64 lists.
  assert summary["heldout/num_pairs"] > 64
  with open(tmp_path / "base_heldout.json", encoding="utf-8") as f:
    base = json.load(f)  # π = π_ref: every implicit reward ties
  assert base["ties"] == 1.0 and base["accuracy"] == 0.5
  for key in ("alignment", "kl_from_base", "heldout/accuracy", "heldout/loss"):
    assert np.isfinite(summary[key]), key


def test_a_bad_objective_exits_2_and_leaves_the_workdir_untouched(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  out = run_cli("fdiv_jax.main", ["--config=configs/preference_pairs.py:tiny",
                                  f"--workdir={workdir}",
                                  "--config.preference.objective=ipo"])
  assert out.returncode == 2, out.stderr[-2000:]
  assert "config.preference.objective: must be one of" in out.stderr
  assert sorted(os.listdir(workdir)) == ["notes.txt"]


def test_pairs_to_reward_model_to_fdpg_to_export(tmp_path):
  rm_dir = tmp_path / "reward_model"
  out = run_cli("fdiv_jax.reward", ["--config=configs/preference_pairs.py:tiny",
                                    f"--workdir={rm_dir}"])
  assert out.returncode == 0, out.stderr[-3000:]
  with open(rm_dir / "summary.json", encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["step"] == 3 and summary["heldout/num_pairs"] == 200
  assert 0.0 <= summary["heldout/accuracy"] <= 1.0
  with open(rm_dir / "model" / "reward_model.json", encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["info"]["heldout_accuracy"] == summary["heldout/accuracy"]
  assert (rm_dir / "checkpoints" / "3").is_dir()
  config = load_config("rlhf_learned_reward")
  config.target.reward = f"learned_reward:path={rm_dir / 'model'}"
  config.divergence = "js"
  config.export_hf = True
  run = main_lib.run(config, str(tmp_path / "rlhf"))
  assert run["step"] == 3 and np.isfinite(run["alignment"])
  assert "moment/learned_reward" in run  # r reported beside the ground truth
  assert os.path.exists(tmp_path / "rlhf" / "export" / "config.json")
  # The learned reward (first called inside the jitted steps above) scores
  # the held-out pairs as the reward command reported.
  from fdiv_jax.lm import tokenization  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import preference_data  # pylint: disable=g-import-not-at-top
  from fdiv_jax.targets import features  # pylint: disable=g-import-not-at-top
  pairs = preference_data.read_pairs(preference_data.shipped("pairs_test"))
  x = preference_data.encode_pairs(pairs, tokenization.ByteTokenizer(), 8)
  r = features.learned_reward(str(rm_dir / "model"))
  margin = (np.asarray(r(x["chosen_tokens"], x["chosen_mask"]))
            - np.asarray(r(x["rejected_tokens"], x["rejected_mask"])))
  # (batched differently: a margin within float rounding of 0 may flip)
  assert np.mean(margin > 0) == pytest.approx(summary["heldout/accuracy"], abs=0.011)


def test_the_reward_model_resumes_bit_for_bit_when_extended(tmp_path):
  """4 steps straight and 2 + an extended run to 4 in the same workdir: the
  same checkpoint at 4, every array (parameters, AdamW moments, step)."""
  from fdiv_jax.run import reward  # pylint: disable=g-import-not-at-top
  config = load_config("preference_pairs")
  config.reward_model.eval_every = config.reward_model.checkpoint_every = 2
  straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
  config.reward_model.num_steps = 4
  summary = reward.run(config, straight)
  config.reward_model.num_steps = 2
  reward.run(config, halves)
  config.reward_model.num_steps = 4
  assert reward.run(config, halves)["step"] == summary["step"] == 4
  a = read_checkpoint(os.path.join(straight, "checkpoints"), 4)
  b = read_checkpoint(os.path.join(halves, "checkpoints"), 4)
  assert sorted(a) == sorted(b) and any("head" in k for k in a)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


def test_reward_model_accuracy_counts_a_tie_as_half():
  from fdiv_jax.run import reward  # pylint: disable=g-import-not-at-top
  zeros = np.zeros(4, np.float32)  # the untrained model: its head is 0
  untrained = reward.heldout_figures(zeros, zeros)
  assert untrained["accuracy"] == 0.5 and untrained["ties"] == 1.0
  figures = reward.heldout_figures(np.array([1.0, 2.0, 0.0, 0.5]),
                                   np.array([0.0, 3.0, 0.0, 0.0]))
  assert figures["accuracy"] == (1 + 0 + 0.5 + 1) / 4 and figures["ties"] == 0.25


def test_a_missing_reward_model_is_a_config_error_saying_how_to_train_one(tmp_path):
  from fdiv_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import tasks  # pylint: disable=g-import-not-at-top
  config = load_config("rlhf_learned_reward")
  config.target.reward = f"learned_reward:path={tmp_path}"
  with pytest.raises(config_lib.ConfigError) as e:
    tasks.describe(config)
  assert "config.target.reward" in str(e.value)
  assert "python -m fdiv_jax.reward" in str(e.value)
