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
  ``divergences.png`` (``forward_kl``, ``reverse_kl``, ``tv``, ``js`` and the
  other divergences' metric names), ``kl_base.png`` (``kl_from_base``),
  ``diversity.png`` (``distinct_1/2/3``, ``self_bleu``). A group with no key
  in the file is skipped, and so are non-finite values.
  """
  rows = reporting.read_metrics(jsonl_path)
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
