"""Runs one f-DPG step on several meshes of simulated CPU devices (a script).

Started by tests/test_sharding.py in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before
JAX starts). Prints one JSON line: the max |Δparams| against one device.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import toy_task  # noqa: E402
from fdiv_jax.train import sharding  # noqa: E402
from fdiv_jax.train import step as step_lib  # noqa: E402


def one_step(data, fsdp, num_steps=2):
  config = toy_task.toy_config(mesh_data=data, mesh_fsdp=fsdp)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  mesh = sharding.make_mesh(data, fsdp)
  state = sharding.shard_state(toy_task.create_state(config, task), mesh)
  sharded_leaves = sum(
      1 for s in jax.tree.leaves(sharding.state_shardings(state.params, mesh))
      if any(axis is not None for axis in s.spec))
  step_fn = sharding.jit_train_step(
      step_lib.make_train_step(config.step, task.model, task.target, task.sampler),
      state, mesh)
  for i in range(num_steps):
    batch = sharding.shard_batch(task.batch(i, config.batch_size), mesh)
    state, metrics = step_fn(state, batch)
  devices = {d for leaf in jax.tree.leaves(state.params) for d in leaf.devices()}
  return jax.device_get(state.params), float(metrics["loss"]), len(devices), (
      sharded_leaves)


def main():
  assert jax.device_count() == 8, jax.device_count()
  reference, ref_loss, _, _ = one_step(1, 1)
  out = {"devices": jax.device_count()}
  for name, (data, fsdp) in {"data8": (8, 1), "data2_fsdp4": (2, 4)}.items():
    params, loss, used, sharded = one_step(data, fsdp)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), reference, params)
    out[name] = {"max_abs_diff": max(jax.tree.leaves(diffs)),
                 "loss_diff": abs(loss - ref_loss), "devices_used": used,
                 "sharded_param_leaves": sharded}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
