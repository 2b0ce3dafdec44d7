"""Training: the f-DPG state, the jitted step, shardings, checkpoints, the loop."""

from fdiv_jax.train.checkpoint import Checkpointer, CheckpointError, PreemptionGuard
from fdiv_jax.train.loop import TrainResult, train
from fdiv_jax.train.sharding import (jit_eval_step, jit_train_step, make_mesh,
                                     maybe_initialize_distributed, shard_batch,
                                     shard_state, state_shardings)
from fdiv_jax.train.state import Batch, FDPGState, create_state, make_optimizer
from fdiv_jax.train.step import make_eval_step, make_train_step

__all__ = [
    "Batch", "CheckpointError", "Checkpointer", "FDPGState", "PreemptionGuard",
    "TrainResult", "create_state", "jit_eval_step", "jit_train_step", "make_eval_step",
    "make_mesh", "make_optimizer", "make_train_step", "maybe_initialize_distributed",
    "shard_batch", "shard_state", "state_shardings", "train",
]
