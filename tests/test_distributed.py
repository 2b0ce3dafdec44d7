"""Several processes: `jax.distributed` on CPU (gloo collectives), two real
processes on localhost give the one-process result bit for bit, and a
checkpoint written by two processes resumes in one and vice versa (six
processes in two rounds of three, about 1.5 minutes on 2 cores; in CI). The
load test (marked `load`, outside CI) runs the quickstart for 200 steps on 8
simulated devices: no recompilation, no memory growth, no leaked file handles
(`pytest -m load -s ...`).
"""

import collections
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest

from test_crash import assert_same_arrays, read_checkpoint, selected

HERE = os.path.dirname(__file__)
DRIVER = os.path.join(HERE, "distributed_driver.py")
NUM_STEPS, CUT = 4, 2   # checkpoints at 2, 4; the copies resume from 2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(mode, workdir, num_steps, env, *, processes=1, devices=1):
  """Starts the driver as `processes` processes of one JAX job (each with its
  own CPU device) or as one process with `devices` CPU devices; returns the
  [(Popen, log path)] to `finish`."""
  env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  started = []
  for i in range(processes):
    log = f"{workdir}.{mode}.{i}.log"
    process_env = dict(env, JAX_PROCESS_ID=str(i)) if processes > 1 else env
    with open(log, "w") as f:
      started.append((subprocess.Popen(
          [sys.executable, DRIVER, mode, str(workdir), str(num_steps)],
          stdout=f, stderr=subprocess.STDOUT, env=process_env), log))
  return started


def finish(started, timeout=900):
  """Waits for every process; one failing kills the others (they would wait
  for it at the next collective). Returns each process's JSON line."""
  try:
    for proc, log in started:
      proc.wait(timeout=timeout)
      if proc.returncode != 0:
        with open(log) as f:
          raise AssertionError(f"{log}: exit code {proc.returncode}\n"
                               f"{f.read()[-4000:]}")
  finally:
    for proc, _ in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  results = []
  for _, log in started:
    with open(log) as f:
      results.append(json.loads(f.read().strip().splitlines()[-1]))
  return results


def same_numbers(a: dict, b: dict) -> bool:
  """Equal dicts of floats, NaN equal to NaN."""
  return a.keys() == b.keys() and all(
      x == y or (math.isnan(x) and math.isnan(y)) for x, y in
      ((a[k], b[k]) for k in a))


def cut_copy(src, dst, step):
  """A copy of workdir `src` whose checkpoints stop at `step`."""
  shutil.copytree(src, dst)
  checkpoints = os.path.join(dst, "checkpoints")
  for name in os.listdir(checkpoints):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(checkpoints, name))


def test_two_processes_match_one_and_checkpoints_move_between_them(
    tmp_path, subprocess_env):
  # The same mesh (data = 2) and global batch: one process with two CPU
  # devices, and two processes with one each, whose collectives go through
  # gloo between the processes.
  one, two = tmp_path / "one", tmp_path / "two"
  single = start("train", one, NUM_STEPS, subprocess_env, devices=2)
  pair = start("train", two, NUM_STEPS, subprocess_env, processes=2)
  (r1,), (r2a, r2b) = finish(single), finish(pair)
  assert (r1["processes"], r1["devices"], r1["local_devices"]) == (1, 2, 2)
  assert [(r["process"], r["processes"], r["devices"], r["local_devices"])
          for r in (r2a, r2b)] == [(0, 2, 2, 1), (1, 2, 2, 1)]
  for r in (r1, r2a, r2b):
    assert (r["step"], r["resumed_from"]) == (NUM_STEPS, None)
    assert same_numbers(r["last_metrics"], r1["last_metrics"]), r
    assert same_numbers(r["last_eval"], r1["last_eval"]), r
  final = read_checkpoint(one / "checkpoints", NUM_STEPS)
  assert_same_arrays(final, read_checkpoint(two / "checkpoints", NUM_STEPS))

  # Checkpoint step 2 of the two-process run resumes in one process, and that
  # of the one-process run in two: both end where the straight runs did.
  to_one, to_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
  cut_copy(two, to_one, CUT)
  cut_copy(one, to_two, CUT)
  single = start("train", to_one, NUM_STEPS, subprocess_env, devices=2)
  pair = start("train", to_two, NUM_STEPS, subprocess_env, processes=2)
  for r in (*finish(single), *finish(pair)):
    assert (r["step"], r["resumed_from"]) == (NUM_STEPS, CUT), r
    assert same_numbers(r["last_eval"], r1["last_eval"]), r
  for workdir in (to_one, to_two):
    assert_same_arrays(final, read_checkpoint(workdir / "checkpoints", NUM_STEPS))


@pytest.mark.load
def test_quickstart_on_eight_devices_under_load(tmp_path, subprocess_env, request):
  """200 steps of the quickstart model on 8 simulated devices, a checkpoint
  every 10 steps and an evaluation every 100: the train and evaluation steps
  compile once, nothing compiles after step 20 (by then the first checkpoint
  has compiled Orbax's slicing programs), resident memory grows by less than
  5% from step 20 to the end, and the count of open file descriptors does not
  grow. Prints the figures (-s to see them)."""
  selected(request, "load")
  env = dict(subprocess_env, FDIV_JAX_CACHE_DIR=subprocess_env[
      "JAX_COMPILATION_CACHE_DIR"])
  (result,) = finish(start("load", tmp_path / "load", 200, env, devices=8),
                     timeout=3600)
  trace = {row["step"]: row for row in result["trace"]}
  assert result["devices"] == 8 and sorted(trace) == list(range(1, 201))
  at20, last = trace[20], trace[200]
  peak = max(row["rss_kib"] for row in result["trace"] if row["step"] >= 20)
  figures = {
      "cache_sizes": result["cache_sizes"],
      "compiles_by_step_1": trace[1]["compiles"],
      "compiles_steps_2_to_20": dict(collections.Counter(
          result["compiled"][trace[1]["compiles"]:at20["compiles"]])),
      "compiles_after_step_20": result["compiled"][at20["compiles"]:],
      "rss_mib_at_steps": {s: round(trace[s]["rss_kib"] / 1024, 1)
                           for s in (1, 10, 20, 50, 100, 150, 200)},
      "rss_mib_peak_after_20": peak / 1024,
      "rss_growth_after_20": peak / at20["rss_kib"] - 1,
      "fds_step_1_20_200_after": (trace[1]["fds"], at20["fds"], last["fds"],
                                  result["fds_after"]),
      "samples_per_second": result["samples_per_second"],
  }
  print(json.dumps(figures, indent=2))
  assert result["cache_sizes"] == {"train_step": 1, "eval_step": 1}, figures
  assert not figures["compiles_after_step_20"], figures
  assert figures["rss_growth_after_20"] < 0.05, figures
  assert last["fds"] <= at20["fds"], figures
