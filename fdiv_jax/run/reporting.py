"""Run reporting: metrics as JSONL and TensorBoard scalars, a ``samples.md`` file
and an end-of-run summary table (plots: ``plots``; the live bar: ``progress``).

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
``forward_kl``,           divergences of π to the target p under their
``reverse_kl``, ``tv``,   ``Divergence.metric_name``: KL(p‖π), KL(π‖p), TV,
``js``, ``hellinger``,    JS, and any other f of ``fdiv_jax.core.divergences``
``alpha_0.5``, ...        (``is_divergence_key``)
``kl_from_base``          KL(π‖a), from the base model (alias ``kl_base``)
(``kl_base``)
``distinct_1/2/3``,       diversity (``fdiv_jax.run.metrics.diversity_report``)
``self_bleu``
``samples_per_sec``       throughput, shown by the progress bar
========================  =================================================
"""

from collections.abc import Iterable, Mapping, Sequence
import json
import logging
import math
import numbers
import os
import re
import time
from typing import Any

import numpy as np

from fdiv_jax.core import divergences
import tensorboardX

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

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


def is_divergence_key(key: str) -> bool:
  """True when the base name of `key` is a divergence's metric name."""
  name = base_name(key)
  return name in divergences.NAMES or name.startswith("alpha_")


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


def format_estimate(value: Any, standard_error: Any = None) -> str:
  """``0.7813 ± 0.0129``: a figure with its standard error (when known), both
  to the precision the error allows (two significant digits of the error)."""
  number = to_float(value)
  se = to_float(standard_error)
  if number is None:
    return ""
  if se is None or not math.isfinite(se) or se <= 0 or not math.isfinite(number):
    return _format(value)
  digits = max(0, 1 - math.floor(math.log10(se)))
  if digits > 6:
    return f"{number:.3e} ± {se:.1e}"
  return f"{number:.{digits}f} ± {se:.{digits}f}"


def with_errors(metrics: Mapping[str, Any], keys: Sequence[str]) -> dict[str, str]:
  """{key: "value ± se"} for the keys present, `key_se` giving the error."""
  return {k: format_estimate(metrics[k], metrics.get(k + "_se"))
          for k in keys if k in metrics}


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
  small), integers as integers, strings (e.g. from `format_estimate`) as
  they are.
  """
  if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
    columns = {name: flatten(sub) for name, sub in metrics.items()}
    keys = list(dict.fromkeys(k for sub in columns.values() for k in sub))
    rows = [[k, *(_format(sub.get(k)) for sub in columns.values())]
            for k in keys]
    return _table(["metric", *columns], rows)
  flat = flatten(metrics)
  return _table(["metric", "value"], [[k, _format(v)] for k, v in flat.items()])
