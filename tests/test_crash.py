"""Nothing lost: the main job killed (SIGKILL) at any moment, even while Orbax
is writing a checkpoint, resumes when re-run and ends bit-identical to an
uninterrupted run; a save that fails (a full disk, an unwritable directory) is
a named error that keeps the last good checkpoint; an unfinished save is never
taken for a checkpoint.

`test_killed_anywhere_then_rerun_is_bit_identical[ci]` runs in CI (one kill
forced mid-save, one at a seeded random moment of training); the `[long]`
variant, marked `slow`, kills eight times (`pytest -m slow tests/test_crash.py`).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler

import toy_task
from fdiv_jax.train import checkpoint
from fdiv_jax.train import loop as loop_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10
ARGS = ("--config=configs/toy_exact.py", f"--config.num_steps={NUM_STEPS}",
        "--config.checkpoint_every=2", "--config.keep_checkpoints=2",
        "--config.log_every=1", "--config.eval_every=1000",
        "--config.eval_batch_size=64")
# summary.json fields that measure time (they differ between any two runs).
TIME_FIELDS = ("samples_per_second", "compile_seconds", "wall_seconds")


def selected(request, marker):
  """Long tests run only when their marker is asked for (`-m slow`)."""
  if marker not in (request.config.getoption("markexpr") or ""):
    pytest.skip(f"long; run with -m {marker}")


# --------------------------------------------------------------------------
# Reading a workdir.
# --------------------------------------------------------------------------


def read_checkpoint(directory, step):
  """Every array of checkpoint `step` under `directory`, as NumPy arrays by
  path (no model needed; shardings ignored, so any topology reads it)."""
  path = os.path.join(directory, str(step), "default")
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    values = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(values)}


def steps_and_unfinished(directory):
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(n for n in names if checkpoint.is_temporary(n)))


def assert_same_arrays(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


def summary_without_times(workdir):
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  for key in TIME_FIELDS:
    assert key in summary, key
    del summary[key]
  return summary


def metric_rows(workdir):
  """metrics.jsonl without its wall-clock `time` column."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  for row in rows:
    row.pop("time")
  return rows


def last_train_step(workdir, since):
  """The last training step logged at or after time `since` (-1: none); rows
  of an earlier (killed) process do not count."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return -1
  for line in reversed(lines):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line being written
    if "train/loss" in row and row["time"] >= since:
      return row["step"]
  return -1


# --------------------------------------------------------------------------
# Killing the main job.
# --------------------------------------------------------------------------


def start_main(workdir, env, log):
  return subprocess.Popen(
      [sys.executable, "-m", "fdiv_jax.main", *ARGS, f"--workdir={workdir}"],
      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def kill_when(proc, condition, poll=0.0005, timeout=600):
  """SIGKILLs `proc` as soon as `condition()` holds; False if it exited first."""
  deadline = time.time() + timeout
  while proc.poll() is None:
    if condition():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    assert time.time() < deadline, "the main job never reached the kill point"
    time.sleep(poll)
  return False


def run_with_kill(workdir, env, log, kind, arg):
  """Starts the main job and kills it per (kind, arg):

    ("save", s)          while an Orbax save of a step >= s is in flight (its
                         temporary directory exists, and this process has
                         trained that far: a leftover of the previous kill,
                         removed at start-up, does not count);
    ("step", (s, dt))    dt seconds after step s is logged (metrics.jsonl);
    ("time", dt)         dt seconds after the start (often still starting up).

  Returns (killed, unfinished saves left behind right after the kill).
  """
  ckpt = os.path.join(workdir, "checkpoints")
  t0 = time.time()
  proc = start_main(workdir, env, log)
  if kind == "save":
    def saving():
      return (any(int(n.split(".", 1)[0]) >= arg
                  for n in steps_and_unfinished(ckpt)[1])
              and last_train_step(workdir, t0) >= arg)
    killed = kill_when(proc, saving)
  elif kind == "step":
    step, delay = arg
    reached = []

    def after_step():
      if not reached and last_train_step(workdir, t0) >= step:
        reached.append(time.time())
      return bool(reached) and time.time() >= reached[0] + delay
    killed = kill_when(proc, after_step, poll=0.002)
  else:
    killed = kill_when(proc, lambda: time.time() >= t0 + arg, poll=0.01)
  if not killed:
    assert proc.returncode == 0, f"exit code {proc.returncode}; see {log.name}"
  return killed, steps_and_unfinished(ckpt)[1]


def kill_plan(name):
  """Seeded kill moments. "ci": one kill mid-save once a checkpoint exists,
  one at a random moment of training. "long": eight, from start-up to the
  last steps, two of them mid-save."""
  rng = random.Random(20240531)
  if name == "ci":
    return [("save", 4), ("step", (rng.randint(5, NUM_STEPS - 2),
                                   rng.uniform(0.0, 0.2)))]
  steps = [("step", (s, rng.uniform(0.0, 0.3)))
           for s in sorted(rng.sample(range(1, NUM_STEPS), 5))]
  return [("save", 2), ("time", rng.uniform(1.0, 8.0)), *steps[:2], ("save", 6),
          *steps[2:]]


@pytest.mark.parametrize("plan", ["ci", pytest.param("long", marks=pytest.mark.slow)])
def test_killed_anywhere_then_rerun_is_bit_identical(plan, tmp_path, subprocess_env,
                                                     request):
  if plan == "long":
    selected(request, "slow")
  # The run's own compilation cache, shared with the reference run.
  env = dict(subprocess_env, FDIV_JAX_CACHE_DIR=subprocess_env[
      "JAX_COMPILATION_CACHE_DIR"])
  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  with open(tmp_path / "straight.log", "w") as ref_log:
    reference = start_main(straight, env, ref_log)
    kills = []
    for i, (kind, arg) in enumerate(kill_plan(plan)):
      with open(tmp_path / f"crashed.{i}.log", "w") as log:
        kills.append((kind, arg, *run_with_kill(crashed, env, log, kind, arg)))
    with open(tmp_path / "crashed.final.log", "w") as log:
      final = start_main(crashed, env, log)
      assert final.wait(timeout=600) == 0, (tmp_path / "crashed.final.log").read_text()
    assert reference.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()

  # Every planned kill landed, and at least one while a save was in flight:
  # its unfinished directory was left behind, then never read as a checkpoint.
  assert all(killed for _, _, killed, _ in kills), kills
  assert any(unfinished for kind, _, _, unfinished in kills if kind == "save"), kills
  assert "Resuming from the checkpoint" in (tmp_path / "crashed.final.log").read_text()
  for workdir in (straight, crashed):
    steps, unfinished = steps_and_unfinished(workdir / "checkpoints")
    assert steps[-1] == NUM_STEPS and not unfinished, (steps, unfinished)

  # Bit for bit: every array of the final state, the summary (less its
  # timings) and every logged metric.
  assert_same_arrays(read_checkpoint(straight / "checkpoints", NUM_STEPS),
                     read_checkpoint(crashed / "checkpoints", NUM_STEPS))
  assert summary_without_times(straight) == summary_without_times(crashed)
  if plan == "ci":
    # Not yet for "long": its first kill lands before any checkpoint, and the
    # run layer keeps that run's metrics.jsonl rows (it truncates the file only
    # when resuming from a checkpoint), so steps 0..2 appear twice.
    assert metric_rows(straight) == metric_rows(crashed)


# --------------------------------------------------------------------------
# In process: unfinished saves, a full disk, an unwritable directory.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The session's persistent compilation cache (the one `subprocess_env`
  gives subprocesses) for this module's in-process runs: each `train` call
  jits a new closure, which would otherwise compile the same step again."""
  cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
  cache.mkdir(exist_ok=True)
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(cache))
  jax.config.update(names[1], 0.0)
  yield
  for name, value in before.items():
    jax.config.update(name, value)


def toy(**overrides):
  config = toy_task.toy_config(checkpoint_every=2, **overrides)
  return config, toy_task.ToyTask(config, toy_task.toy_target("reward"))


def train(workdir, num_steps, config_task):
  config, task = config_task
  return loop_lib.train(task, str(workdir), loop=config.loop, step=config.step,
                        optimizer=config.optimizer, num_steps=num_steps)


def files_of(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_unfinished_saves_are_never_taken_for_checkpoints(tmp_path):
  run = toy()
  # A first save killed mid-way: only its temporary directory exists. The run
  # starts fresh (it is not "foreign content"), and the leftover is removed.
  fresh = tmp_path / "fresh" / "checkpoints"
  (fresh / "2.orbax-checkpoint-tmp" / "default").mkdir(parents=True)
  (fresh / "2.orbax-checkpoint-tmp" / "default" / "partial").write_bytes(b"x")
  ckpt = checkpoint.Checkpointer(str(fresh))
  assert ckpt.latest_step() is None and not ckpt.has_foreign_content()
  assert steps_and_unfinished(fresh) == ([], [])
  ckpt.close()
  # With a finished step 2 and an unfinished 4 (and the timestamped name of
  # other Orbax versions), a run resumes from 2.
  result = train(tmp_path / "fresh", 2, run)
  assert result.resumed_from is None and result.step == 2
  for name in ("4.orbax-checkpoint-tmp", "4.orbax-checkpoint-tmp-1717171717"):
    (fresh / name / "default").mkdir(parents=True)
  result = train(tmp_path / "fresh", 4, run)
  assert result.resumed_from == 2 and result.step == 4
  assert steps_and_unfinished(fresh) == ([2, 4], [])


def test_a_full_disk_is_a_named_error_and_the_last_checkpoint_survives(
    tmp_path, monkeypatch):
  run = toy()
  train(tmp_path, 2, run)
  ckpt_dir = tmp_path / "checkpoints"
  before = files_of(ckpt_dir)

  # The disk fills up: Orbax's array writer gets ENOSPC after writing part of
  # step 4 into its temporary directory.
  async def full_disk(self, directory, *args, **kwargs):
    del self, args, kwargs
    with open(os.path.join(str(directory), "partial.bin"), "wb") as f:
      f.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

  monkeypatch.setattr(base_pytree_checkpoint_handler.BasePyTreeCheckpointHandler,
                      "async_save", full_disk)
  with pytest.raises(checkpoint.CheckpointError) as error:
    train(tmp_path, 6, run)
  message = str(error.value)
  assert f"Cannot save checkpoint step 4 in {ckpt_dir}" in message, message
  assert "No space left on device" in message, message
  assert "The last good checkpoint, step 2, is intact" in message, message
  # The partial step is gone, step 2 is byte for byte what it was.
  assert files_of(ckpt_dir) == before

  # Space again: the same call resumes from step 2.
  monkeypatch.undo()
  result = train(tmp_path, 4, run)
  assert result.resumed_from == 2 and result.step == 4


def test_an_unwritable_checkpoint_directory_is_a_named_error(tmp_path):
  """A workdir that cannot be created (here under a regular file, since root
  ignores permission bits): `CheckpointError` naming the path, before any
  step is run."""
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = blocker / "run"
  with pytest.raises(checkpoint.CheckpointError,
                     match=f"Cannot open the checkpoint directory {workdir}"):
    train(workdir, 2, toy())


def test_an_unwritable_workdir_stops_the_main_job_with_a_named_error(
    tmp_path, subprocess_env):
  """`python -m fdiv_jax.main` with a workdir that cannot be created: exit 3
  and a sentence naming it, not an OSError traceback; nothing is written."""
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = blocker / "run"
  result = subprocess.run(
      [sys.executable, "-m", "fdiv_jax.main",
       f"--config={os.path.join(ROOT, 'configs', 'toy_exact.py')}:tiny",
       f"--workdir={workdir}"],
      capture_output=True, text=True, env=subprocess_env, cwd=ROOT, timeout=300)
  assert result.returncode == 3, result.stderr[-3000:]
  assert f"fdiv_jax: Cannot write the workdir '{workdir}'" in result.stderr
  assert "Traceback" not in result.stderr
  assert blocker.read_text() == "not a directory"
  assert sorted(os.listdir(tmp_path)) == ["a_file"]
