"""Training: the f-DPG state, the jitted step, shardings, checkpoints, the loop.

Everything here takes typed objects (`StepConfig`, `OptimizerConfig`,
`LoopConfig`, `sampling.SamplerConfig`, a target, a model); the run layer
(`fdiv_jax.run`) builds them from a config file once.

  state.py       FDPGState (TrainState + log Ẑ, baseline, proposal, RNG, EMA), Batch
  optimizer.py   OptimizerConfig → AdamW with clipping, schedule, accumulation
  rollout.py     x ~ q with log q, log a, log P; the sample metrics
  step.py        StepConfig → the jitted f-DPG update, read top to bottom
  eval_step.py   the evaluation step: fresh samples of π, metrics and samples
  sharding.py    the ("data", "fsdp") mesh and the shardings of the step
  checkpoint.py  Orbax checkpoints of the whole state, preemption handling
  loop.py        LoopConfig → the host loop with resume, evaluation, checkpoints
"""

from fdiv_jax.train.checkpoint import Checkpointer, CheckpointError, PreemptionGuard
from fdiv_jax.train.eval_step import EvalSamples, make_eval_step
from fdiv_jax.train.loop import LoopConfig, TrainResult, train
from fdiv_jax.train.optimizer import (OptimizerConfig, all_finite,
                                      make_optimizer, skip_if_not_finite)
from fdiv_jax.train.sharding import (jit_eval_step, jit_train_step, make_mesh,
                                     maybe_initialize_distributed, shard_batch,
                                     shard_state, state_shardings)
from fdiv_jax.train.state import Batch, FDPGState, create_state
from fdiv_jax.train.step import StepConfig, make_train_step

__all__ = [
    "Batch", "CheckpointError", "Checkpointer", "EvalSamples", "FDPGState",
    "LoopConfig", "OptimizerConfig", "PreemptionGuard", "StepConfig", "TrainResult",
    "all_finite", "create_state", "jit_eval_step", "jit_train_step", "make_eval_step", "make_mesh",
    "make_optimizer", "make_train_step", "maybe_initialize_distributed",
    "shard_batch", "shard_state", "skip_if_not_finite", "state_shardings", "train",
]
