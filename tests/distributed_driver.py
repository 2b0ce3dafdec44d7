"""One process of a multi-process toy run, or the quickstart under load (a
script started by tests/test_distributed.py).

  python tests/distributed_driver.py train WORKDIR NUM_STEPS

    The toy task (tests/toy_task.py) with the real host loop, checkpoints
    every 2 steps, on every device of the job. A multi-process job is
    described by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
    (`sharding.maybe_initialize_distributed`, as in `fdiv_jax.main`); one
    process with N CPU devices by XLA_FLAGS=--xla_force_host_platform_device_count=N.
    Prints one JSON line: this process, the devices, and the TrainResult's
    step, resumed_from, last metrics and last evaluation.

  python tests/distributed_driver.py load WORKDIR NUM_STEPS

    The main job's quickstart (`experiment.run`) on a mesh of every device
    (mesh_data = device count), batch 2 per device, evaluation every 100 steps,
    a checkpoint every 10 (the first, at step 10, compiles Orbax's slicing
    programs and sets up its writers: one-time costs before step 20). After
    every step it records the resident memory (VmRSS), the open file
    descriptors (/proc/self/fd) and the XLA compilations so far (jax_log_compiles);
    prints one JSON line with them and the jitted steps' cache sizes.
"""

import importlib.util
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, num_steps: int) -> dict:
  from fdiv_jax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()  # before any other JAX call
  import jax  # pylint: disable=g-import-not-at-top
  import toy_task  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = toy_task.toy_config(checkpoint_every=2, log_every=1, eval_every=4,
                               eval_batch_size=32)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  result = loop.train(task, workdir, loop=config.loop, step=config.step,
                      optimizer=config.optimizer, num_steps=num_steps)
  return {"process": jax.process_index(), "processes": jax.process_count(),
          "devices": jax.device_count(), "local_devices": jax.local_device_count(),
          "step": result.step, "resumed_from": result.resumed_from,
          "last_metrics": result.last_metrics, "last_eval": result.last_eval}


def _memory_kib() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1])
  raise RuntimeError("no VmRSS in /proc/self/status")


class _Compiles(logging.Handler):
  """Collects jax_log_compiles' "Compiling <name> ..." records."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.names = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.names.append(message.split()[1])


def load(workdir: str, num_steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import experiment  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import loop, sharding  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "configs", "quickstart.py")
  spec = importlib.util.spec_from_file_location("quickstart", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.num_steps = num_steps
  config.mesh_data = jax.device_count()
  config.batch_size = 2 * jax.device_count()
  config.eval_batch_size = 4 * jax.device_count()   # 2 rows per device
  config.eval_every = 100
  config.checkpoint_every = 10
  config.log_every = 10

  compiles = _Compiles()
  logging.getLogger("jax").addHandler(compiles)
  jax.config.update("jax_log_compiles", True)
  jitted = {}

  def keep(name, make):
    def wrapped(*args, **kwargs):
      fn = make(*args, **kwargs)
      jitted[name] = getattr(fn, "jitted", fn)   # a LoRA step wraps its jit
      return fn
    return wrapped
  sharding.jit_train_step = keep("train_step", sharding.jit_train_step)
  sharding.jit_eval_step = keep("eval_step", sharding.jit_eval_step)

  trace = []
  original_train = loop.train

  def train_with_trace(*args, on_step=None, **kwargs):
    def hook(step):
      trace.append({"step": step, "rss_kib": _memory_kib(),
                    "fds": len(os.listdir("/proc/self/fd")),
                    "compiles": len(compiles.names)})
      if on_step is not None:
        on_step(step)
    return original_train(*args, on_step=hook, **kwargs)
  loop.train = train_with_trace

  summary = experiment.run(config, workdir)
  return {"devices": jax.device_count(), "trace": trace,
          "compiled": compiles.names,
          "cache_sizes": {k: v._cache_size() for k, v in jitted.items()},
          "fds_after": len(os.listdir("/proc/self/fd")),
          "samples_per_second": summary["samples_per_second"],
          "alignment": summary["alignment"]}


def main():
  mode, workdir, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
  out = {"train": train, "load": load}[mode](workdir, num_steps)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
