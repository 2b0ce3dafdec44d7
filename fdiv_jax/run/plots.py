"""PNG plots of a run's ``metrics.jsonl`` over steps.

Uses the Agg canvas directly (no pyplot, no global backend change).
"""

import math
import os
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from fdiv_jax.run import reporting
from fdiv_jax.run.reporting import base_name


def _is_alignment(key: str) -> bool:
  return (base_name(key) == reporting.ALIGNMENT_KEY or
          any(part.startswith("moment") for part in key.split("/")))


# (file stem, title, y label, key predicate)
_PLOTS = (
    ("alignment", "Alignment", "E_π[b] or E_π[φ]", _is_alignment),
    ("divergences", "Divergences to the target p", "D(π, p)",
     reporting.is_divergence_key),
    ("kl_base", "KL(π‖a) from the base model", "nats",
     lambda key: base_name(key) in reporting.KL_BASE_KEYS),
    ("diversity", "Diversity", "score",
     lambda key: base_name(key) in reporting.DIVERSITY_KEYS),
)


def _series(rows: Sequence[Mapping[str, Any]],
            key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Steps, values and standard errors (0 where none) of `key`, finite only."""
  steps, values, errors = [], [], []
  for row in rows:
    value = row.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
      se = row.get(key + "_se", 0.0)
      steps.append(row["step"])
      values.append(value)
      errors.append(se if isinstance(se, (int, float)) and math.isfinite(se)
                    else 0.0)
  return np.asarray(steps), np.asarray(values), np.asarray(errors)


def _quantity(key: str) -> str:
  """The quantity a key measures: its name without train/, eval/, exact/."""
  parts = [p for p in key.split("/") if p not in ("train", "eval", "exact")]
  return "/".join(parts)


def spans_decades(values: np.ndarray, ratio: float = 100.0) -> bool:
  """True when all values are positive and the largest is `ratio` × the least:
  a linear axis would flatten all but the largest."""
  values = values[np.isfinite(values)]
  return bool(values.size and np.all(values > 0)
              and values.max() >= ratio * values.min())


def plot_metrics(jsonl_path: str, out_dir: str) -> list[str]:
  """Writes PNG plots of a ``metrics.jsonl`` over steps; returns their paths.

  One figure per group (see the module docstring for base names):
  ``alignment.png`` (``alignment``, moments), ``divergences.png``
  (``forward_kl``, ``reverse_kl``, ``tv``, ``js`` and the other divergences'
  metric names), ``kl_base.png`` (``kl_from_base``), ``diversity.png``
  (``distinct_1/2/3``, ``self_bleu``). Each quantity gets its own panel, with
  the training estimate as a thin line, the evaluation as points joined by a
  line with a ±1 standard-error band (``<key>_se``), and the exact value
  (``exact/<key>``) dashed when there is one; a panel whose values span two
  decades or more uses a log scale. A group with no key in the file is
  skipped, and so are non-finite values.
  """
  rows = reporting.read_metrics(jsonl_path)
  keys = sorted({k for row in rows for k in row
                 if k not in ("step", "time") and not k.endswith("_se")})
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for stem, title, ylabel, matches in _PLOTS:
    by_quantity: dict[str, list[str]] = {}
    for key in keys:
      if matches(key) and _series(rows, key)[0].size:
        by_quantity.setdefault(_quantity(key), []).append(key)
    if not by_quantity:
      continue
    names = sorted(by_quantity)
    cols = min(2, len(names))
    nrows = -(-len(names) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
      ax = fig.add_subplot(nrows, cols, i + 1)
      plotted = []
      for key in by_quantity[name]:
        steps, values, errors = _series(rows, key)
        if key.startswith("train/"):
          ax.plot(steps, values, lw=0.8, alpha=0.6, label="train (batch)")
        elif "/exact/" in f"/{key}":
          ax.plot(steps, values, ls="--", color="black", label="exact")
        else:
          line, = ax.plot(steps, values, marker="o", ms=3, label=key.split("/")[0])
          ax.fill_between(steps, values - errors, values + errors, alpha=0.25,
                          color=line.get_color(), lw=0)
        plotted.append(values)
      if spans_decades(np.concatenate(plotted)):
        ax.set_yscale("log")
      ax.set_title(name, fontsize="medium")
      ax.set_xlabel("step")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
      ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(path)
    written.append(path)
  return written
