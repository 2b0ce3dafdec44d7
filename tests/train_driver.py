"""Trains the toy task with the real host loop in its own process (a script).

  python tests/train_driver.py WORKDIR NUM_STEPS

Prints "step N" after each completed step and a final JSON line with the
TrainResult summary. Used by tests/test_checkpoint.py for exact resume across
processes and SIGTERM handling.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import toy_task  # noqa: E402
from fdiv_jax.train import loop  # noqa: E402


def main():
  workdir, num_steps = sys.argv[1], int(sys.argv[2])
  config = toy_task.toy_config(checkpoint_every=3, log_every=2, eval_every=4,
                               eval_batch_size=32)
  task = toy_task.ToyTask(config, toy_task.toy_target("reward"))
  result = loop.train(task, workdir, loop=config.loop, step=config.step,
                      optimizer=config.optimizer, num_steps=num_steps,
                      on_step=lambda s: print(f"step {s}", flush=True))
  print(json.dumps({"step": result.step, "resumed_from": result.resumed_from,
                    "preempted": result.preempted}), flush=True)


if __name__ == "__main__":
  main()
