"""Run reporting: metrics as JSONL and TensorBoard scalars, PNG plots, a live
progress bar, a ``samples.md`` file and an end-of-run summary table.

Everything here runs on the host, outside ``jit``; metric values may be Python
numbers, NumPy or JAX scalars.

Metric names. Keys are free-form; nested dicts are flattened with ``/``
(``{"eval": {"js": x}}`` becomes ``"eval/js"``). The plots and the progress
bar find a metric by the last ``/``-component of its key (its *base name*), so
``"js"``, ``"eval/js"`` and ``"train/js"`` are all the JS divergence. Base names
with a meaning here:

========================  =================================================
``alignment``             E_π[b(x)] or E_π[r(x)]
``moment*``, ``moment/*``  feature moments E_π[φ_i(x)] (``moment_0``,
                          ``moment/<feature>``)
``forward_kl`` (``fkl``), divergences of π to the target p: KL(p‖π),
``reverse_kl`` (``rkl``), KL(π‖p), TV, JS, and the other names of
``tv``, ``js``,           ``fdiv_jax.core.divergences``; any other divergence to
``pearson_chi2``,         the target as ``div_<name>``
``neyman_chi2``,
``hellinger``, ``alpha``,
``div_*``
``kl_from_base``          KL(π‖a), from the base model (alias ``kl_base``)
(``kl_base``)
``distinct_1/2/3``,       diversity (``fdiv_jax.run.metrics.diversity_report``)
``self_bleu``
``samples_per_sec``       throughput, shown by the progress bar
========================  =================================================
"""

import collections
from collections.abc import Iterable, Mapping, Sequence
import json
import logging
import math
import numbers
import os
import re
import sys
import time
from typing import Any, TextIO

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import tensorboardX
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

DIVERGENCE_KEYS = ("forward_kl", "reverse_kl", "js", "tv", "fkl", "rkl",
                   "pearson_chi2", "neyman_chi2", "hellinger", "alpha")
DIVERGENCE_ALIASES = {"kl": "forward_kl", "fkl": "forward_kl",
                      "rkl": "reverse_kl"}
DIVERSITY_KEYS = ("distinct_1", "distinct_2", "distinct_3", "self_bleu")
KL_BASE_KEYS = ("kl_from_base", "kl_base")
ALIGNMENT_KEY = "alignment"

# JSON has no NaN/inf; they are written as these strings and read back.
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ----------------------------------------------------------------------------
# Metric values.


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flattens nested mappings: ``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
  flat = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix=f"{name}/"))
    else:
      flat[name] = value
  return flat


def to_float(value: Any) -> float | None:
  """A scalar (Python, NumPy, JAX, size-1 array) as a float; else ``None``."""
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if hasattr(value, "__array__"):
    array = np.asarray(value)
    if array.size == 1 and np.issubdtype(array.dtype, np.number):
      return float(array.reshape(()))
  return None


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The flattened scalar metrics as floats; non-scalar values are left out."""
  out = {}
  for key, value in flatten(metrics).items():
    number = to_float(value)
    if number is None:
      logging.debug("reporting: %r is not a scalar, not written", key)
    else:
      out[key] = number
  return out


def base_name(key: str) -> str:
  return key.rsplit("/", 1)[-1]


def _json_value(x: float) -> float | str:
  if math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "Infinity" if x > 0 else "-Infinity"
  return x


def _from_json_value(x: Any) -> Any:
  if isinstance(x, str) and x in _NONFINITE:
    return _NONFINITE[x]
  return x


def read_metrics(jsonl_path: str) -> list[dict[str, Any]]:
  """Rows of a ``metrics.jsonl``, with NaN/inf restored; bad lines skipped."""
  rows = []
  if not os.path.exists(jsonl_path):
    return rows
  with open(jsonl_path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # e.g. a line cut short by a crash
      if isinstance(row, dict) and "step" in row:
        rows.append({k: _from_json_value(v) for k, v in row.items()})
  return rows


# ----------------------------------------------------------------------------
# JSONL + TensorBoard writer.


class MetricWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard event files.

  Each ``write(step, metrics)`` appends one JSON object per line,
  ``{"step": step, "time": unix_seconds, "<key>": value, ...}``, with the scalar
  metrics as floats (NaN and ±inf as the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"``, so that every line is valid JSON), and writes the same
  scalars to ``workdir/tensorboard/`` with ``tensorboardX`` (tag = key).

  Resuming: a new writer on the same workdir keeps the earlier lines and
  appends (a trailing line cut short by a crash is removed). When training
  resumes from a checkpoint at step s, call ``truncate_after(s)`` to drop the
  lines logged after that checkpoint; TensorBoard is told to purge them too.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self._use_tb = tensorboard
    os.makedirs(workdir, exist_ok=True)
    self._drop_partial_last_line()
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = self._open_tb() if tensorboard else None

  def _open_tb(self, purge_step: int | None = None):
    return tensorboardX.SummaryWriter(logdir=self._tb_dir,
                                      purge_step=purge_step, flush_secs=30)

  def _drop_partial_last_line(self):
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Logs the scalar metrics at ``step``; returns what was written."""
    step = int(step)
    values = scalars(metrics)
    row = {"step": step, "time": time.time()}
    row.update({k: _json_value(v) for k, v in values.items()})
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in values.items():
        # TensorBoard cannot plot inf (e.g. a reverse KL under a hard
        # constraint); the JSONL line keeps it.
        if math.isfinite(value):
          self._tb.add_scalar(key, value, global_step=step)
    return values

  def truncate_after(self, step: int) -> int:
    """Drops every logged line with ``step`` > ``step``; returns how many.

    Call once when resuming from a checkpoint saved at ``step``. The JSONL
    file is rewritten; TensorBoard's next event file starts with a purge
    marker at ``step + 1`` (TensorBoard then hides the later events of the
    earlier files).
    """
    self._file.close()
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and int(row.get("step", 0)) <= step:
        kept.append(line)
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    if self._use_tb:
      if self._tb is not None:
        self._tb.close()
      self._tb = self._open_tb(purge_step=int(step) + 1)
    return len(lines) - len(kept)

  def flush(self):
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------
# Plots.


def _is_divergence(key: str) -> bool:
  name = base_name(key)
  return name in DIVERGENCE_KEYS or name.startswith("div_")


def _is_alignment(key: str) -> bool:
  return (base_name(key) == ALIGNMENT_KEY or
          any(part.startswith("moment") for part in key.split("/")))


# (file stem, title, y label, key predicate)
_PLOTS = (
    ("alignment", "Alignment", "E_π[b] or E_π[φ]", _is_alignment),
    ("divergences", "Divergences to the target p", "D(π, p)",
     _is_divergence),
    ("kl_base", "KL(π‖a) from the base model", "nats",
     lambda key: base_name(key) in KL_BASE_KEYS),
    ("diversity", "Diversity", "score",
     lambda key: base_name(key) in DIVERSITY_KEYS),
)


def _series(rows: Sequence[Mapping[str, Any]],
            key: str) -> tuple[np.ndarray, np.ndarray]:
  steps, values = [], []
  for row in rows:
    value = row.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
      steps.append(row["step"])
      values.append(value)
  return np.asarray(steps), np.asarray(values)


def plot_metrics(jsonl_path: str, out_dir: str) -> list[str]:
  """Writes PNG plots of a ``metrics.jsonl`` over steps; returns their paths.

  One figure per group, each with one line per matching key (see the module
  docstring for base names): ``alignment.png`` (``alignment``, moments),
  ``divergences.png`` (``forward_kl``, ``reverse_kl``, ``tv``, ``js``, the
  other divergence names, ``div_*``), ``kl_base.png`` (``kl_from_base``),
  ``diversity.png`` (``distinct_1/2/3``, ``self_bleu``). A group with no key in the file is skipped, and so are
  non-finite values. Uses the Agg canvas directly (no pyplot, no global
  backend change).
  """
  rows = read_metrics(jsonl_path)
  keys = sorted({k for row in rows for k in row if k not in ("step", "time")})
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for stem, title, ylabel, matches in _PLOTS:
    lines = [(key, *_series(rows, key)) for key in keys if matches(key)]
    lines = [line for line in lines if line[1].size]
    if not lines:
      continue
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, steps, values in lines:
      ax.plot(steps, values, marker="." if steps.size < 50 else None,
              label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(path)
    written.append(path)
  return written


# ----------------------------------------------------------------------------
# Progress bar.


def _lookup(metrics: Mapping[str, float], name: str) -> float | None:
  """The value of key ``name``, else of the first key with that base name."""
  if name in metrics:
    return metrics[name]
  for key, value in metrics.items():
    if base_name(key) == name:
      return value
  return None


class _LineStream:
  """A file for tqdm off a terminal: one line per refresh, no ``\\r``."""

  def __init__(self, stream: TextIO):
    self._stream = stream

  def write(self, text: str):
    text = text.strip("\r\n")
    if text:
      self._stream.write(text + "\n")

  def flush(self):
    self._stream.flush()


class ProgressBar:
  """A tqdm bar over training steps with the key metrics in its postfix.

  Shows ``step/total``, elapsed time and ETA (tqdm's own), and in the postfix
  alignment (``align``), the divergence to the target (``<name>``), KL(π‖a)
  (``kl_base``, from ``kl_from_base`` or ``kl_base``) and samples/s. Samples/s is ``metrics["samples_per_sec"]``
  when given, else steps/s (over the last 20 updates) × ``samples_per_step``
  when that is set.

  On a terminal the bar redraws at most every 0.5 s. Off a terminal (CI, log
  files) it prints a plain line at most every ``log_interval_s`` seconds
  (and at the end), without carriage returns.

  Args:
    total: number of training steps.
    initial: the step training starts (or resumes) at.
    samples_per_step: samples drawn per step, for samples/s.
    divergence_key: base name of the divergence shown (the trained one, e.g.
      ``"js"``; ``"kl"``/``"fkl"`` and ``"rkl"`` also find ``forward_kl`` and
      ``reverse_kl``); by default the first present of ``DIVERGENCE_KEYS``,
      then ``div_*``.
    file: the stream (default ``sys.stderr``).
    log_interval_s: minimum seconds between lines off a terminal.
    disable: no output at all.
  """

  def __init__(self, total: int, initial: int = 0, *,
               samples_per_step: int | None = None,
               divergence_key: str | None = None,
               file: TextIO | None = None, log_interval_s: float = 30.0,
               disable: bool = False):
    stream = sys.stderr if file is None else file
    self._stream = stream
    isatty = getattr(stream, "isatty", lambda: False)()
    self._samples_per_step = samples_per_step
    self._divergence_key = divergence_key
    self._history = collections.deque(maxlen=20)  # (time, step)
    self._bar = tqdm.tqdm(
        total=total, initial=initial, desc="train", unit="step",
        file=stream if isatty else _LineStream(stream),
        dynamic_ncols=isatty, ascii=not isatty, leave=True,
        mininterval=0.5 if isatty else log_interval_s,
        maxinterval=10.0 if isatty else 10 * log_interval_s,
        smoothing=0.1, disable=disable)

  def postfix(self, metrics: Mapping[str, Any]) -> dict[str, str]:
    """The postfix fields shown for ``metrics`` (exposed for tests)."""
    values = scalars(metrics)
    fields = {}
    alignment = _lookup(values, ALIGNMENT_KEY)
    if alignment is not None:
      fields["align"] = f"{alignment:.3f}"
    if self._divergence_key:
      key = self._divergence_key
      names = [key, DIVERGENCE_ALIASES.get(key, key)]
    else:
      names = [*DIVERGENCE_KEYS, *sorted({base_name(k) for k in values
                                          if base_name(k).startswith("div_")})]
    for name in names:
      value = _lookup(values, name)
      if value is not None:
        fields[self._divergence_key or name] = f"{value:.4g}"
        break
    for name in KL_BASE_KEYS:
      kl_base = _lookup(values, name)
      if kl_base is not None:
        fields["kl_base"] = f"{kl_base:.4g}"
        break
    rate = _lookup(values, "samples_per_sec")
    if rate is None and self._samples_per_step:
      steps_per_sec = self.steps_per_sec()
      if steps_per_sec:
        rate = steps_per_sec * self._samples_per_step
    if rate is not None:
      fields["samples/s"] = f"{rate:.1f}"
    return fields

  def steps_per_sec(self) -> float | None:
    """Steps/s over the last (up to) 20 updates; ``None`` before two."""
    if len(self._history) < 2:
      return None
    (t0, n0), (t1, n1) = self._history[0], self._history[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None

  def update(self, step: int, metrics: Mapping[str, Any] | None = None):
    """Moves the bar to absolute ``step`` and shows ``metrics``."""
    self._history.append((time.perf_counter(), int(step)))
    delta = int(step) - self._bar.n
    if metrics:
      self._bar.set_postfix(self.postfix(metrics), refresh=False)
    if delta > 0:
      self._bar.update(delta)

  def write(self, message: str):
    """Prints a line, on the bar's stream, without breaking the bar."""
    self._bar.write(message, file=self._stream)

  def close(self):
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------
# Samples and summary.

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _fenced(text: str) -> str:
  """``text`` in a Markdown code fence longer than any backtick run in it."""
  text = _CONTROL.sub("\N{REPLACEMENT CHARACTER}", text)
  longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
  fence = "`" * max(3, longest + 1)
  return f"{fence}text\n{text}\n{fence}"


def _as_list(samples: str | Sequence[str]) -> list[str]:
  return [samples] if isinstance(samples, str) else list(samples)


def write_samples_md(path: str, prompts: Sequence[str],
                     base_samples: Sequence[str | Sequence[str]],
                     trained_samples: Sequence[str | Sequence[str]], *,
                     title: str = "Samples: base model vs trained policy",
                     header: str | None = None) -> str:
  """Writes a Markdown file comparing base and trained samples per prompt.

  Args:
    path: the file to write (its directory is created).
    prompts: P prompts (``""`` for unconditional sampling).
    base_samples: P entries, each one sample or a list of samples of the base
      model a(x|prompt).
    trained_samples: the same for the trained policy π.
    title: the top heading.
    header: optional Markdown paragraph under the title (e.g. the config).

  Returns:
    ``path``. Samples are shown verbatim in code fences (continuations only,
    the prompt is shown once above them); control characters become U+FFFD.
  """
  if not len(prompts) == len(base_samples) == len(trained_samples):
    raise ValueError(f"{len(prompts)} prompts, {len(base_samples)} base and "
                     f"{len(trained_samples)} trained sample entries")
  parts = [f"# {title}\n"]
  if header:
    parts.append(f"{header}\n")
  for i, (prompt, base, trained) in enumerate(
      zip(prompts, base_samples, trained_samples), start=1):
    shown = "(unconditional)" if not prompt else f"`{prompt}`" if (
        "`" not in prompt and "\n" not in prompt) else "\n\n" + _fenced(prompt)
    parts.append(f"## {i}. Prompt: {shown}\n")
    for label, samples in (("Base model", base), ("Trained", trained)):
      parts.append(f"**{label}**\n")
      parts.extend(f"{_fenced(s)}\n" for s in _as_list(samples))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  return path


def _format(value: Any) -> str:
  number = to_float(value)
  if number is None:
    return "" if value is None else str(value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return str(int(value))
  if number != 0 and (abs(number) >= 1e5 or abs(number) < 1e-3):
    return f"{number:.3e}"
  return f"{number:.4f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  rows = [list(header)] + [list(r) for r in rows]
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  def fmt(row):
    cells = [row[0].ljust(widths[0])]
    cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
    return "  ".join(cells).rstrip()
  rule = "  ".join("-" * w for w in widths)
  return "\n".join([fmt(rows[0]), rule, *map(fmt, rows[1:])])


def summary_table(metrics: Mapping[str, Any]) -> str:
  """A short aligned text table of final metrics, for the end of a run.

  ``{"alignment": 0.93, "js": 0.01}`` gives two columns (metric, value).
  If every value is itself a mapping, e.g. ``{"base": {...}, "trained":
  {...}}``, each becomes a column, so that models can be compared row by row
  (a missing entry is blank). Nested mappings below that are flattened with
  ``/``. Floats show 4 decimals (scientific notation when very large or
  small), integers as integers.
  """
  if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
    columns = {name: flatten(sub) for name, sub in metrics.items()}
    keys = list(dict.fromkeys(k for sub in columns.values() for k in sub))
    rows = [[k, *(_format(sub.get(k)) for sub in columns.values())]
            for k in keys]
    return _table(["metric", *columns], rows)
  flat = flatten(metrics)
  return _table(["metric", "value"], [[k, _format(v)] for k, v in flat.items()])
