r"""A study: every f of a list over seeds, one table and a Pareto plot.

  python -m fdiv_jax.study --config=configs/toy_exact.py --workdir=DIR \
      --divergences=forward_kl,reverse_kl,js,tv,hellinger,pearson_chi2,alpha:0.5 \
      --seeds=0,1,2,3,4 [--config.<field>=<value> ...]

Flags and exit codes only; the study is `fdiv_jax.run.study.run_study` (what
DIR receives is documented there: DIR/<f>/seed<k>/ per run, study.md,
study.json, pareto.png). The overrides apply to every run; `divergence` and
`seed` are set by --divergences and --seeds. Bad flags or a bad config value
exit with 2 before any run starts or any directory is made; an unreadable
checkpoint exits with 3; SIGINT / SIGTERM stop the running run with its
checkpoint saved and exit with 130 / 143. Running the same command again
resumes: finished runs (summary.json) are not run again.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fdiv_jax.run import study
from fdiv_jax.run.config import ConfigError
from fdiv_jax.train import checkpoint, sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/<task>.py) with get_config().",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The study directory: one run per "
                               "(f, seed) in <workdir>/<f>/seed<k>, and the report.")
_DIVERGENCES = flags.DEFINE_string(
    "divergences", "forward_kl,reverse_kl,js,tv",
    "Comma-separated divergences (names or aliases of the registry; "
    "alpha:<value> for an α-divergence).")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
# Set per run by --divergences / --seeds, so not overridable.
_SET_BY_THE_STUDY = {"divergence": "--divergences", "seed": "--seeds"}


def _fail(message: str, code: int = 2):
  print(f"fdiv_jax.study: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  for field, flag in _SET_BY_THE_STUDY.items():
    if field in overrides:
      _fail(f"--config.{field} is set per run by {flag}; leave it out.")
  try:
    choices = study.parse_divergences(_DIVERGENCES.value)
    seeds = study.parse_seeds(_SEEDS.value)
  except study.StudyError as e:
    _fail(str(e))
  sharding.maybe_initialize_distributed()
  try:
    study.run_study(
        _CONFIG.value, _WORKDIR.value, choices, seeds,
        config_name=flags.FLAGS["config"].config_filename,
        overrides=[f"--config.{k}={v}" for k, v in overrides.items()])
  except ConfigError as e:
    _fail(f"invalid configuration: {e}")
  except study.StudyError as e:
    _fail(str(e))
  except checkpoint.CheckpointError as e:
    _fail(str(e), 3)
  except study.Stopped as e:
    _fail(str(e), EXIT_CODES.get(e.signal, 1))


if __name__ == "__main__":
  app.run(main)
