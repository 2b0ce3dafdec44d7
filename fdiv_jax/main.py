r"""The main job: train a policy by f-DPG toward a preference-defined target.

  python -m fdiv_jax.main --config=configs/quickstart.py --workdir=/tmp/quick \
      [--config.divergence=forward_kl --config.num_steps=500 ...]

This file is kept short on purpose: flags and exit codes. The run itself is
`fdiv_jax.run.experiment.run` (what the workdir receives is documented there).
A bad config value stops at once with exit code 2 and a message naming the
field and the allowed values, before the workdir is touched; an unreadable
checkpoint exits with 3; SIGINT / SIGTERM save a checkpoint and exit with
130 / 143. Re-running with the same workdir resumes from its last checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fdiv_jax.run import experiment
from fdiv_jax.run.config import ConfigError
from fdiv_jax.train import checkpoint, sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/<task>.py) with get_config().",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (created; an "
                               "existing one is resumed).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
run = experiment.run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  sharding.maybe_initialize_distributed()
  try:
    summary = experiment.run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(f"fdiv_jax: invalid configuration: {e}", file=sys.stderr)
    sys.exit(2)
  except (checkpoint.CheckpointError, experiment.WorkdirError) as e:
    print(f"fdiv_jax: {e}", file=sys.stderr)
    sys.exit(3)
  if summary.get("preempted"):
    sys.exit(EXIT_CODES.get(summary["signal"], 1))


if __name__ == "__main__":
  app.run(main)
