"""The main job end to end: every config runs, outputs exist, bad overrides fail
at once, Ctrl-C then re-run resumes."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fdiv_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("quickstart", "pointwise_word", "distributional_balance", "sentiment_rlhf",
           "code_compilable", "toy_exact")


def load_config(name, size="tiny"):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(size)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_runs_a_few_steps(name, tmp_path):
  config = load_config(name)
  summary = main_lib.run(config, str(tmp_path))
  with open(tmp_path / "summary.json", encoding="utf-8") as f:
    written = json.load(f)
  for key in ("alignment", "kl_from_base", "distinct_2", "self_bleu", "js", "config"):
    assert key in written, key
  assert written["step"] == config.num_steps == summary["step"]
  assert written["config"]["divergence"] == config.divergence
  assert set(written["base"]) >= {"alignment", "distinct_2"}
  for name_ in ("metrics.jsonl", "samples.md", "config.json"):
    assert (tmp_path / name_).exists(), name_
  assert any((tmp_path / "tensorboard").iterdir())
  assert (tmp_path / "plots" / "alignment.png").exists()
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert any("train/loss" in r for r in rows) and any("eval/alignment" in r for r in rows)


def test_toy_exact_divergence_falls(tmp_path):
  config = load_config("toy_exact", size="")
  config.num_steps = 120
  config.eval_every = 60
  summary = main_lib.run(config, str(tmp_path))
  base, final = summary["base"], summary
  assert final["exact/js"] < 0.25 * base["exact/js"], (base["exact/js"], final["exact/js"])
  assert final["exact/alignment"] > base["exact/alignment"]
  # The sampled estimates track the exact values.
  assert abs(final["js"] - final["exact/js"]) < 0.02


def run_main(args, env, **kwargs):
  return subprocess.run([sys.executable, "-m", "fdiv_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=600,
                        check=False, **kwargs)


def snapshot(directory):
  return sorted((os.path.relpath(os.path.join(r, f), directory),
                 os.path.getmtime(os.path.join(r, f)))
                for r, _, files in os.walk(directory) for f in files)


@pytest.mark.parametrize("override,config,message", [
    ("--config.divergence=foo", "quickstart",
     "config.divergence: Unknown divergence 'foo'; valid names: forward_kl, "
     "reverse_kl"),
    ("--config.mesh_data=64", "toy_exact", "config.mesh_data: "),
    ("--config.target.beta=-1", "sentiment_rlhf", "config.target.beta"),
    ("--config.learning_rate=0", "toy_exact", "config.learning_rate"),
])
def test_bad_override_fails_at_once_and_leaves_the_workdir_untouched(
    override, config, message, tmp_path, subprocess_env):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  before = snapshot(workdir)
  t0 = time.time()
  out = run_main([f"--config=configs/{config}.py", f"--workdir={workdir}", override],
                 subprocess_env)
  assert out.returncode == 2, out.stderr[-2000:]
  assert message in out.stderr, out.stderr[-2000:]
  assert snapshot(workdir) == before
  assert time.time() - t0 < 120  # no model was built, nothing compiled


def test_unknown_field_is_rejected_by_the_flag_parser(tmp_path, subprocess_env):
  out = run_main(["--config=configs/quickstart.py", f"--workdir={tmp_path}",
                  "--config.beta=-1"], subprocess_env)
  assert out.returncode != 0 and "beta" in out.stderr
  assert not any(tmp_path.iterdir())


def test_ctrl_c_then_rerun_resumes(tmp_path, subprocess_env):
  args = ["--config=configs/toy_exact.py", f"--workdir={tmp_path}",
          "--config.num_steps=400", "--config.checkpoint_every=1000",
          "--config.log_every=1", "--config.eval_every=1000"]
  proc = subprocess.Popen([sys.executable, "-m", "fdiv_jax.main", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=subprocess_env)
  deadline = time.time() + 300
  jsonl = tmp_path / "metrics.jsonl"
  while time.time() < deadline:
    if jsonl.exists() and sum(1 for _ in open(jsonl, encoding="utf-8")) >= 5:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out[-3000:]
  assert "Run the same command again to resume" in out
  ckpts = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(ckpts) == 1 and 0 < ckpts[0] < 400
  stopped = ckpts[0]
  out = run_main(args + ["--config.num_steps=" + str(stopped + 3)], subprocess_env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {stopped}" in out.stderr
  with open(tmp_path / "summary.json", encoding="utf-8") as f:
    assert json.load(f)["step"] == stopped + 3
  with open(jsonl, encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f]
  train_steps = [s for s in steps if s > 0]
  assert train_steps == sorted(train_steps)  # no duplicated steps after resume


@pytest.mark.parametrize("divergence,key", [("hellinger", "hellinger"),
                                            ("jensen_shannon", "js")])
def test_the_trained_divergence_reaches_metrics_and_summary(divergence, key,
                                                            tmp_path):
  config = load_config("toy_exact")
  config.divergence = divergence
  summary = main_lib.run(config, str(tmp_path))
  assert summary["divergence"] == key
  assert np.isfinite(summary[key]) and np.isfinite(summary["exact/" + key])
  assert key in summary["base"]
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert any(f"train/{key}" in r for r in rows)
  assert any(f"eval/{key}" in r for r in rows)


def test_rerunning_a_finished_run_still_reports_it(tmp_path):
  config = load_config("toy_exact")
  main_lib.run(config, str(tmp_path))
  os.remove(tmp_path / "summary.json")
  again = main_lib.run(load_config("toy_exact"), str(tmp_path))   # nothing to train
  assert again["step"] == config.num_steps
  for key in ("alignment", "js", "js_se", "exact/js"):
    assert np.isfinite(again[key]), key
  with open(tmp_path / "samples.md", encoding="utf-8") as f:
    trained = f.read().split("**Trained**", 1)[1]
  assert "```text" in trained


def _rare_feature_config(**target):
  """toy_exact with a distributional target on a rare feature: x contains
  the sequence 3 3 3 (about 1% of the base model's continuations)."""
  config = load_config("toy_exact")
  config.target.kind = "distributional"
  config.target.reward = ""
  config.target.features = ({"name": "contains_sequences",
                             "sequences": ((3, 3, 3),)},)
  config.target.moments = (0.5,)
  for key, value in target.items():
    config.target[key] = value
  return config


def test_a_rare_feature_is_never_a_silent_zero_divergence(tmp_path):
  """With λ fixed (no fit to learn Z from) and 8 evaluation samples, none of
  which shows the feature, the samples make p look like a: the step-0
  evaluation must then be flagged rather than report a plain 0."""
  config = _rare_feature_config(lambdas=(6.0,))
  config.num_steps = 1
  summary = main_lib.run(config, str(tmp_path))
  base = summary["base"]
  assert base["exact/js"] > 0.1              # the truth: a is far from p
  if base["feature_max/contains_sequences"] == 0.0:
    assert any("outside the sampled range" in f for f in base["flags"]), base
  else:
    assert base["js"] > 2 * base["js_se"]


def test_the_lambda_fit_seeds_z_so_the_base_row_is_right(tmp_path):
  """λ fitted on 4,096 samples of a: those samples seed the running Ẑ, and the
  step-0 (base model) evaluation's divergences are positive, within a few
  standard errors of the exact values by enumeration."""
  config = _rare_feature_config(fit_samples=4096)
  config.num_steps = 1
  config.eval_batch_size = 256
  summary = main_lib.run(config, str(tmp_path))
  base = summary["base"]
  assert summary["lambda_fit"]["converged"]
  for name in ("js", "tv", "reverse_kl"):
    value, se, exact = base[name], base[name + "_se"], base["exact/" + name]
    assert exact > 0.05 and value > 0, (name, value, exact)
    assert abs(value - exact) < 4 * se + 0.02, (name, value, se, exact)
    # Positive beyond its error, or the evaluation says it cannot tell.
    assert value > 2 * se or base["flags"], (name, value, se)


def test_qrs_report_after_training_reaches_the_summary(tmp_path):
  config = load_config("toy_exact")
  config.qrs_samples = 64
  summary = main_lib.run(config, str(tmp_path))
  with open(tmp_path / "summary.json", encoding="utf-8") as f:
    written = json.load(f)
  assert written["qrs/num_samples"] == 64
  for q in ("q0.5", "q0.9", "q1.0"):
    for key in ("acceptance", "acceptance_se", "tv_bound", "alignment"):
      assert f"qrs/{q}/{key}" in written, (q, key)
    assert 0.0 < written[f"qrs/{q}/acceptance"] <= 1.0
  # Raising β accepts less and bounds the TV distance tighter.
  assert written["qrs/q0.5/acceptance"] >= written["qrs/q1.0/acceptance"]
  assert written["qrs/q0.5/tv_bound"] >= written["qrs/q1.0/tv_bound"]
  assert summary["qrs/num_samples"] == 64
