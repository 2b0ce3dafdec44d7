"""Device meshes and shardings for the train step (`jax.sharding`, `jit`).

A 2-D mesh with axes ("data", "fsdp"):

  - the batch (prompts, and so every sample drawn from them) is split over both
    axes: every device generates and scores B / (data·fsdp) sequences;
  - parameters, the base model, the proposal, the EMA copy and the optimiser's
    moments are replicated over "data" and, when fsdp > 1, split over "fsdp"
    along their largest dimension divisible by it (ZeRO-3 / FSDP style; XLA
    inserts the all-gathers and reduce-scatters);
  - scalars and small state (log Ẑ, baseline, RNG, counters) are replicated.

The step is compiled once by `jit_train_step` with these `in_shardings` /
`out_shardings` and the state donated, except a LoRA state's frozen base
weights (`FDPGState.frozen_base`): they are an input of their own, neither
donated nor returned, so the step never copies them and the caller's arrays
stay valid (one copy of the base in memory). LoRA's adapters follow the same
rule as any parameter: A [in, r] and B [r, out] are split along their larger
dimension when they hold 1024 values or more. Sampling uses JAX's partitionable
threefry, so the samples (and hence the update) do not depend on the number of
devices.

Several hosts (a TPU slice, several GPU hosts): call `maybe_initialize_distributed()`
first, before any other JAX call. It runs `jax.distributed.initialize()` when the
environment describes a multi-process job (Cloud TPU sets it up by itself; for
GPUs set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or
launch under SLURM / Open MPI, which JAX detects), then build the mesh over
`jax.devices()` (all hosts' devices). Every host runs the same program and
passes the same global host batch to `shard_batch` (tasks build batches
deterministically from the step), which places each device's share.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdiv_jax.core import _values

DATA, FSDP = "data", "fsdp"
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                  "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when the environment describes several hosts.

  Cloud TPU, SLURM and Open MPI are recognised by JAX itself. Elsewhere set, on
  every process, JAX_COORDINATOR_ADDRESS (host:port of process 0, the same for
  all), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0, 1, ...): JAX reads only the
  first, so the other two are passed here. FDIV_JAX_SINGLE_HOST=1 skips it.
  """
  if any(os.environ.get(k) for k in _MULTIHOST_ENV) and os.environ.get(
      "FDIV_JAX_SINGLE_HOST") != "1":
    kwargs = {}
    for arg, name in (("num_processes", "JAX_NUM_PROCESSES"),
                      ("process_id", "JAX_PROCESS_ID")):
      value = os.environ.get(name)
      if value:
        try:
          kwargs[arg] = int(value)
        except ValueError:
          raise ValueError(f"{name}={value!r}: must be an integer.") from None
    jax.distributed.initialize(**kwargs)
    return True
  return False


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """The (data, fsdp) sizes of the mesh over `num_devices` devices.

  `data = -1` takes every device not used by fsdp.

  Raises:
    ValueError: a size below 1, or more devices than there are; the message
      starts with the parameter at fault ("mesh_data: ..." or "mesh_fsdp: ...")
      and names the devices available.
  """
  _values.integer("mesh_fsdp", fsdp, minimum=1)
  if data != -1:
    _values.integer("mesh_data", data, minimum=1,
                    note=", or -1 for every device not used by mesh_fsdp")
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(f"mesh_fsdp: {fsdp} does not divide the {num_devices} "
                       f"available device(s).")
    data = num_devices // fsdp
  if data * fsdp > num_devices:
    raise ValueError(f"mesh_data: mesh_data={data} x mesh_fsdp={fsdp} needs "
                     f"{data * fsdp} devices; {num_devices} available.")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp") mesh; data = -1 takes every device not used by fsdp."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(data, fsdp, len(devices))
  grid = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
  return Mesh(grid, (DATA, FSDP))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P((DATA, FSDP)))


def _leaf_spec(x: Any, fsdp: int) -> P:
  shape = getattr(x, "shape", ())
  if fsdp == 1 or len(shape) == 0:
    return P()
  # Split the largest dimension divisible by the fsdp axis; small arrays stay
  # replicated (sharding them costs more in collectives than it saves).
  if int(np.prod(shape)) < 1024:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for axis in order:
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = FSDP
      return P(*spec)
  return P()


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """A sharding for every leaf of the train state (see the module docstring)."""
  fsdp = mesh.shape[FSDP]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(x, fsdp)), state)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x`, the same host value on every process, placed with `sharding`: each
  process copies in its own devices' shards (`jax.make_array_from_callback`).
  `jax.device_put` would first check that every process passes equal values,
  a collective per call, and one that fails on NaN entries (NaN != NaN), such
  as a fresh state's empty windows."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)
  value = np.asarray(x)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


def shard_state(state: Any, mesh: Mesh) -> Any:
  """Places a (host or single-device) state onto the mesh."""
  shardings = state_shardings(state, mesh)
  if jax.process_count() == 1:
    return jax.device_put(state, shardings)
  return jax.tree.map(_put, state, shardings)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
  return jax.tree.map(lambda x: _put(x, sharding), batch)


def jit_train_step(step_fn, state: Any, mesh: Mesh):
  """`jax.jit` of the step with explicit shardings; the input state is donated
  (but for a LoRA state's frozen base weights: see the module docstring)."""
  state_sharding = state_shardings(state, mesh)
  batch_spec = batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  if getattr(state, "frozen_base", None) is None:
    return jax.jit(step_fn, in_shardings=(state_sharding, batch_spec),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  rest_sharding = state_sharding.replace(base_params=None)

  def split_step(base_params, rest, batch):
    new_state, metrics = step_fn(rest.replace(base_params=base_params), batch)
    return new_state.replace(base_params=None), metrics

  jitted = jax.jit(split_step,
                   in_shardings=(state_sharding.base_params, rest_sharding,
                                 batch_spec),
                   out_shardings=(rest_sharding, replicated), donate_argnums=(1,))

  def step(state, batch):
    new_state, metrics = jitted(state.base_params,
                                state.replace(base_params=None), batch)
    return new_state.replace(base_params=state.base_params), metrics

  step.jitted = jitted
  return step


def jit_eval_step(eval_fn, state: Any, mesh: Mesh):
  """`jax.jit` of `eval_step(state, batch, rng) -> (metrics, samples)`; the
  outputs are replicated, so every host can read all of them."""
  state_sharding = state_shardings(state, mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(eval_fn, in_shardings=(state_sharding, batch_sharding(mesh),
                                        replicated), out_shardings=replicated)
