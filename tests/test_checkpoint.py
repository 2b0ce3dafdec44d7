"""Orbax checkpoints: exact resume in a new process, SIGTERM, corrupt directories."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import toy_task
from fdiv_jax.train import checkpoint, sharding

HERE = os.path.dirname(__file__)
DRIVER = os.path.join(HERE, "train_driver.py")


def drive(workdir, num_steps, env):
  out = subprocess.run([sys.executable, DRIVER, str(workdir), str(num_steps)],
                       capture_output=True, text=True, timeout=600, check=False,
                       env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def restore(workdir, step=None):
  config = toy_task.toy_config()
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  mesh = sharding.make_mesh()
  state = sharding.shard_state(toy_task.create_state(config, task), mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  return ckpt.restore(checkpoint.abstract_like(state), step), ckpt


def test_resume_in_a_new_process_is_bit_identical(tmp_path, subprocess_env):
  straight = drive(tmp_path / "straight", 8, subprocess_env)
  assert straight == {"step": 8, "resumed_from": None, "preempted": False}
  first = drive(tmp_path / "split", 4, subprocess_env)
  assert first["step"] == 4
  second = drive(tmp_path / "split", 8, subprocess_env)
  assert second == {"step": 8, "resumed_from": 4, "preempted": False}
  a, _ = restore(tmp_path / "straight")
  b, _ = restore(tmp_path / "split")
  assert int(a.step) == int(b.step) == 8
  leaves_a = jax.tree_util.tree_leaves_with_path(jax.device_get(a))
  leaves_b = jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  # The fields that make the resume exact are among them, not default values.
  assert np.isfinite(np.asarray(a.log_partition.log_z)).all()
  assert float(a.log_partition.count[0]) == 8 * 64
  assert not np.array_equal(np.asarray(a.rng), np.asarray(jax.random.PRNGKey(0)))


def test_sigterm_leaves_a_checkpoint_of_the_last_completed_step(tmp_path, subprocess_env):
  proc = subprocess.Popen([sys.executable, DRIVER, str(tmp_path), "100000"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=subprocess_env)
  seen = 0
  deadline = time.time() + 300
  while seen < 5 and time.time() < deadline:
    line = proc.stdout.readline()
    if line.startswith("step "):
      seen = int(line.split()[1])
  assert seen >= 5, proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["preempted"] and result["step"] >= 5
  steps = [int(l.split()[1]) for l in out.splitlines() if l.startswith("step ")]
  assert result["step"] == max(steps + [seen])
  state, ckpt = restore(tmp_path)
  assert ckpt.latest_step() == result["step"] == int(state.step)


def test_corrupt_or_foreign_checkpoints_give_a_clear_error(tmp_path, subprocess_env):
  drive(tmp_path, 3, subprocess_env)
  _, ckpt = restore(tmp_path)
  assert ckpt.latest_step() == 3
  # Corrupt every file of the saved step.
  step_dir = os.path.join(tmp_path, "checkpoints", "3")
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match=r"step 3 .* cannot be restored"):
    restore(tmp_path)
  # The error left everything in place.
  assert os.path.isdir(step_dir)
  # The host loop refuses too, instead of silently starting fresh.
  out = subprocess.run([sys.executable, DRIVER, str(tmp_path), "6"],
                       capture_output=True, text=True, timeout=600, check=False,
                       env=subprocess_env)
  assert out.returncode != 0 and "cannot be restored" in out.stderr
  # A directory of unrelated files is not taken for an empty run.
  foreign = tmp_path / "foreign"
  (foreign / "checkpoints").mkdir(parents=True)
  (foreign / "checkpoints" / "notes.txt").write_text("not a checkpoint")
  out = subprocess.run([sys.executable, DRIVER, str(foreign), "2"],
                       capture_output=True, text=True, timeout=600, check=False,
                       env=subprocess_env)
  assert out.returncode != 0 and "not Orbax checkpoints" in out.stderr
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint to restore"):
    restore(foreign)
