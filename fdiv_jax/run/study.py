r"""A study of several f's over seeds: what `python -m fdiv_jax.study` does.

  python -m fdiv_jax.study --config=configs/toy_exact.py --workdir=DIR \
      --divergences=forward_kl,reverse_kl,js,tv,hellinger,pearson_chi2,alpha:0.5 \
      --seeds=0,1,2,3,4 [--config.<field>=<value> ...]

Each (f, seed) pair is one `experiment.run` of a copy of the config with
`divergence`, `alpha` (for an entry `alpha:<value>`) and `seed` set, in
`DIR/<f>/seed<k>` (`<f>` is the divergence's metric name: `forward_kl`,
`alpha_0.5`, ...); the overrides apply to every run. Before anything runs, every
run's config is checked (`tasks.describe`), and so is every run already in DIR
(its config must be this one): a bad value is a `ConfigError`, bad study flags
or a DIR holding runs of another config a `StudyError`, and nothing is written.

Resuming: a run whose `summary.json` exists is not run again, and a run stopped
half-way resumes from its last checkpoint (`experiment.run` does that), so
running the same command again finishes an interrupted study.

The study directory receives, rewritten after every finished run (so a long
study can be read while it runs):
  study.md     a header (config, overrides, seeds, date); a table of the key
               metrics, one row per f and the base model first, each cell
               "mean ± std over seeds (n)"; a complete table of every scalar
               metric common to all runs; the runs flagged by the evaluation
  study.json   the per-run values and the aggregates (`aggregate`)
  pareto.png   alignment against KL(π‖a) and against Distinct-2 (Self-BLEU when
               there is no Distinct-2), one marker per f at the mean over seeds
               with std error bars, the seeds faint behind, the base model

Exact metrics (`exact/*`, enumerable toy tasks) are preferred where present.
The logic is pure functions (`parse_divergences`, `parse_seeds`; the tables
and the plot in `fdiv_jax.run.study_report`), apart from the running (`plan`,
`execute`, `run_study`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fdiv_jax.core import divergences
from fdiv_jax.run.config import ConfigError
# The reporting half, re-exported: `study.aggregate`, `study.render_markdown`, ...
from fdiv_jax.run.study_report import (  # noqa: F401
    EXACT_COLUMNS, PARETO_PNG, SAMPLED_COLUMNS, TRAINED, aggregate,
    complete_table, format_cell, key_columns, key_table, pareto_points,
    plot_pareto, render_markdown, run_metrics)

SUMMARY_FILE = "summary.json"
STUDY_MD = "study.md"
STUDY_JSON = "study.json"

class StudyError(ValueError):
  """Bad study flags, or a study directory holding runs of another config."""


# ----------------------------------------------------------------------------
# Flags.


@dataclasses.dataclass(frozen=True)
class Choice:
  """One f of the study: a canonical divergence name and its alpha (or None)."""
  name: str
  alpha: float | None = None

  @property
  def divergence(self) -> divergences.Divergence:
    params = {} if self.alpha is None else {"alpha": self.alpha}
    return divergences.get(self.name, **params)

  @property
  def label(self) -> str:
    """The metric name (`js`, `alpha_0.5`): the run directory and table row."""
    return self.divergence.metric_name


def parse_divergences(text: str) -> tuple[Choice, ...]:
  """``"forward_kl,js,alpha:0.5"`` → choices; aliases become canonical names.

  Raises:
    StudyError: no entry, an empty entry, an unknown name, `alpha` without
      its value (``alpha:0.5``), a value on another f, or the same f twice.
  """
  entries = [e.strip() for e in (text or "").split(",")]
  if entries == [""]:
    raise StudyError("--divergences: no divergence given (e.g. "
                     "--divergences=forward_kl,reverse_kl,js,tv,alpha:0.5).")
  choices, seen = [], {}
  for entry in entries:
    if not entry:
      raise StudyError(f"--divergences={text!r}: an empty entry.")
    name, sep, value = (part.strip() for part in entry.partition(":"))
    canonical = divergences.ALIASES.get(name, name)
    if canonical not in divergences.NAMES:
      try:
        divergences.get(name)
      except ValueError as e:
        raise StudyError(f"--divergences: {e}") from None
    if canonical == "alpha":
      if not sep:
        raise StudyError(f"--divergences: {entry!r} needs its alpha, e.g. alpha:0.5.")
      try:
        alpha = float(value)
      except ValueError:
        raise StudyError(f"--divergences: {entry!r}: alpha {value!r} is not a "
                         "number.") from None
      try:
        divergences.get("alpha", alpha=alpha)
      except ValueError as e:
        raise StudyError(f"--divergences: {entry!r}: {e}") from None
      choice = Choice("alpha", alpha)
    else:
      if sep:
        raise StudyError(f"--divergences: {entry!r}: only alpha takes a value "
                         "(alpha:<value>).")
      choice = Choice(canonical)
    if choice.label in seen:
      raise StudyError(f"--divergences: {entry!r} is {seen[choice.label]!r} again.")
    seen[choice.label] = entry
    choices.append(choice)
  return tuple(choices)


def parse_seeds(text: str) -> tuple[int, ...]:
  """``"0,1,2"`` → (0, 1, 2). Raises `StudyError`: none, not an integer, twice."""
  entries = [e.strip() for e in (text or "").split(",")]
  if entries == [""]:
    raise StudyError("--seeds: no seed given (e.g. --seeds=0,1,2).")
  seeds = []
  for entry in entries:
    try:
      seed = int(entry)
    except ValueError:
      raise StudyError(f"--seeds={text!r}: {entry!r} is not an integer.") from None
    if seed in seeds:
      raise StudyError(f"--seeds={text!r}: seed {seed} twice.")
    seeds.append(seed)
  return tuple(seeds)


# ----------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class Run:
  """One (f, seed) run of a study."""
  label: str
  seed: int
  workdir: str
  config: Any                     # its ConfigDict
  config_json: dict[str, Any]     # as `experiment.run` records it

  @property
  def name(self) -> str:
    return f"{self.label} seed {self.seed}"

  @property
  def summary_path(self) -> str:
    return os.path.join(self.workdir, SUMMARY_FILE)

  @property
  def done(self) -> bool:
    return os.path.exists(self.summary_path)


def run_config(config, choice: Choice, seed: int):
  """A copy of `config` with the divergence, its alpha and the seed set (the
  original is untouched; references inside the copy follow the new values)."""
  c = copy.deepcopy(config)
  c.divergence = choice.name
  if choice.alpha is not None:
    c.alpha = float(choice.alpha)
  c.seed = int(seed)
  return c


_ABSENT = object()


def _differences(a: Any, b: Any, path: str = "config",
                 defaults: Any = _ABSENT) -> list[str]:
  """The fields where config `a` (now) and `b` (recorded) differ. A field the
  recorded config lacks (added to the project after that run) is no
  difference when its value now is its default (`defaults`, the base
  config): new fields default to the behaviour from before they existed."""
  if b is _ABSENT and defaults is not _ABSENT and a == defaults:
    return []
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    out = []
    for key in sorted(set(a) | set(b)):
      out += _differences(
          a.get(key, _ABSENT), b.get(key, _ABSENT), f"{path}.{key}",
          defaults.get(key, _ABSENT) if isinstance(defaults, Mapping) else _ABSENT)
    return out
  if a == b:
    return []
  show = lambda x: None if x is _ABSENT else x  # pylint: disable=unnecessary-lambda-assignment
  return [f"{path}: {show(b)!r} there, {show(a)!r} now"]


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def plan(config, choices: Sequence[Choice], seeds: Sequence[int],
         workdir: str) -> list[Run]:
  """Every run of the study, each config checked; writes nothing.

  Raises:
    ConfigError: a run's config has a bad value (the message names the run).
    StudyError: a run directory in `workdir` holds a run of another config
      (finished: its summary.json; started: its config.json).
  """
  from fdiv_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import tasks  # pylint: disable=g-import-not-at-top
  defaults = json.loads(config_lib.base_config().to_json_best_effort())
  if not choices:
    raise StudyError("--divergences: no divergence given.")
  if not seeds:
    raise StudyError("--seeds: no seed given.")
  runs = []
  for choice in choices:
    for seed in seeds:
      c = run_config(config, choice, seed)
      try:
        spec = tasks.describe(c)
      except ConfigError as e:
        raise ConfigError(f"{choice.label} seed {seed}: {e}") from e
      runs.append(Run(choice.label, seed,
                      os.path.join(workdir, choice.label, f"seed{seed}"), c,
                      json.loads(spec.config_json)))
  for run in runs:
    path = run.summary_path if run.done else os.path.join(run.workdir, "config.json")
    if not os.path.exists(path):
      continue
    try:
      recorded = _read_json(path)
    except (OSError, json.JSONDecodeError) as e:
      raise StudyError(f"{run.name}: cannot read {path}: {e}") from None
    if run.done:
      recorded = recorded.get("config", {})
    diff = _differences(run.config_json, recorded, defaults=defaults)
    if diff:
      raise StudyError(
          f"{run.name}: {path} is a run of another config ({'; '.join(diff[:5])}"
          f"{'; ...' if len(diff) > 5 else ''}). Use another --workdir, or remove "
          f"{run.workdir} to run it again.")
  return runs


class Stopped(Exception):
  """A run was stopped by a signal (its checkpoint is saved)."""

  def __init__(self, run: Run, signal: str):
    super().__init__(f"{run.name} stopped by {signal}; run the same command "
                     "again to resume the study.")
    self.run = run
    self.signal = signal


def execute(runs: Sequence[Run], run_fn: Callable[[Any, str], Mapping[str, Any]],
            *, on_done: Callable[[list[tuple[Run, dict]]], None] | None = None,
            log: Callable[[str], None] = print) -> list[tuple[Run, dict]]:
  """Runs what has no summary.json yet (`run_fn(config, workdir)`, e.g.
  `experiment.run`); returns every (run, summary), read from summary.json.

  `on_done(finished so far)` is called after each run that ran. Raises
  `Stopped` when a run returns a preempted summary (SIGINT / SIGTERM).
  """
  order = {(run.label, run.seed): i for i, run in enumerate(runs)}

  def in_order(done):  # the study's order, whichever finished first
    return sorted(done, key=lambda rs: order[(rs[0].label, rs[0].seed)])

  finished = [(run, _read_json(run.summary_path)) for run in runs if run.done]
  todo = [run for run in runs if not run.done]
  if finished:
    log(f"study: {len(finished)} of {len(runs)} runs already finished (not run "
        f"again): {', '.join(run.name for run, _ in finished)}.")
  for i, run in enumerate(todo, start=1):
    log(f"study: [{i}/{len(todo)}] {run.name} in {run.workdir}")
    result = run_fn(run.config, run.workdir)
    if result.get("preempted"):
      raise Stopped(run, result.get("signal", "a signal"))
    finished.append((run, _read_json(run.summary_path)))
    if on_done is not None:
      on_done(in_order(finished))
  return in_order(finished)


# ----------------------------------------------------------------------------
# The study.


def write_report(workdir: str, finished: Sequence[tuple[Run, Mapping[str, Any]]], *,
                 config: str, overrides: Sequence[str], seeds: Sequence[int],
                 planned: int | None = None, date: str | None = None
                 ) -> dict[str, Any]:
  """Writes study.md, study.json and pareto.png of the finished runs."""
  study = aggregate([(run.label, run.seed, summary) for run, summary in finished])
  date = date or datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  meta = {"config": config, "overrides": list(overrides), "seeds": list(seeds),
          "date": date, "planned_runs": planned,
          "run_dirs": {f"{run.label}/seed{run.seed}": run.workdir
                       for run, _ in finished}}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, STUDY_MD), "w", encoding="utf-8") as f:
    f.write(render_markdown(study, config=config, overrides=overrides, seeds=seeds,
                            date=date, workdir=workdir, planned=planned))
  with open(os.path.join(workdir, STUDY_JSON), "w", encoding="utf-8") as f:
    json.dump({**meta, **study}, f, indent=2, allow_nan=True)
  plot_pareto(study, os.path.join(workdir, PARETO_PNG))
  return study


def run_study(config, workdir: str, choices: Sequence[Choice], seeds: Sequence[int],
              *, config_name: str, overrides: Sequence[str] = (),
              run_fn: Callable[[Any, str], Mapping[str, Any]] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Plans (every config checked first), runs what is not finished, reports.

  Returns `aggregate`'s result. Raises `ConfigError` / `StudyError` before
  anything is written, `Stopped` when a run is stopped by a signal.
  """
  runs = plan(config, choices, seeds, workdir)
  if run_fn is None:
    from fdiv_jax.run import experiment  # pylint: disable=g-import-not-at-top
    run_fn = experiment.run
  report = dict(config=config_name, overrides=overrides, seeds=seeds,
                planned=len(runs))
  import jax  # pylint: disable=g-import-not-at-top
  writes = jax.process_index() == 0  # one writer on a multi-host job

  def write(done):
    return (write_report(workdir, done, **report) if writes else aggregate(
        [(run.label, run.seed, summary) for run, summary in done]))

  finished = execute(runs, run_fn, log=log, on_done=write)
  study = write(finished)
  log(f"study: {len(finished)} runs; wrote {os.path.join(workdir, STUDY_MD)}, "
      f"{STUDY_JSON} and {PARETO_PNG}; {len(study['flagged'])} runs flagged.\n\n"
      + key_table(study))
  return study
