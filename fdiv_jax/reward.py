r"""The reward-model command: a Bradley–Terry reward model from preference pairs.

  python -m fdiv_jax.reward --config=configs/preference_pairs.py --workdir=DIR \
      [--config.reward_model.num_steps=600 ...]

Flags and exit codes only; the training is `fdiv_jax.run.reward.run` (what DIR
receives is documented there; the model is DIR/model, for
``--config.target.reward=learned_reward:path=DIR/model`` of an RLHF config such
as `configs/rlhf_learned_reward.py`). The pairs are ``config.preference.
train_file`` (held out: ``config.preference.eval_file``); the settings are
``config.reward_model.*``. Exit codes as the main job's: 2 for a bad config
value or data row (the message names the field, or the file and line; nothing
written), 3 for a checkpoint that cannot be restored or saved, 130 / 143 after
SIGINT / SIGTERM (the last step saved: the same command resumes).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fdiv_jax.run import reward
from fdiv_jax.run.config import ConfigError
from fdiv_jax.train import checkpoint, sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/<task>.py) with get_config().",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (created; an "
                               "existing one is resumed).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  sharding.maybe_initialize_distributed()
  try:
    summary = reward.run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(f"fdiv_jax.reward: invalid configuration: {e}", file=sys.stderr)
    sys.exit(2)
  except checkpoint.CheckpointError as e:
    print(f"fdiv_jax.reward: {e}", file=sys.stderr)
    sys.exit(3)
  if summary.get("preempted"):
    sys.exit(EXIT_CODES.get(summary["signal"], 1))


if __name__ == "__main__":
  app.run(main)
