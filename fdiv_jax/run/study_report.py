r"""What a study reports: its runs' summaries aggregated over seeds, as tables
and a Pareto plot (the pure half of `fdiv_jax.run.study`).

`aggregate` turns the finished runs' `summary.json` into mean ± standard
deviation over seeds (ddof 1) of every scalar metric, per f and for the base
model; `render_markdown` writes them as study.md (a key table, a complete
table, the flagged runs); `pareto_points` / `plot_pareto` draw alignment
against KL(π‖a) and against diversity. Exact metrics (`exact/*`, enumerable
toy tasks) are preferred where present. Pure functions of dicts, apart from
`plot_pareto` writing its PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from fdiv_jax.run import reporting

PARETO_PNG = "pareto.png"

# Summary entries that are not metrics of the run.
_NOT_METRICS = ("config", "base", "flags", "divergence", "preempted", "signal")
# The column of the trained divergence: its key differs per row (`trained`).
TRAINED = "<trained>"
# (header, key) of the key table; the exact columns come first when present.
SAMPLED_COLUMNS = (
    ("alignment", "alignment"), ("KL(π‖a)", "kl_from_base"),
    ("trained f", TRAINED), ("forward KL", "forward_kl"),
    ("reverse KL", "reverse_kl"), ("JS", "js"), ("TV", "tv"),
    ("Distinct-2", "distinct_2"), ("Self-BLEU", "self_bleu"))
EXACT_COLUMNS = tuple((f"exact {header}", f"exact/{key}")
                      for header, key in SAMPLED_COLUMNS[:7])



# ----------------------------------------------------------------------------
# Aggregation.


def run_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
  """The scalar metrics of a summary (nested ones flattened with "/"), without
  the config, the base model, the flags and the divergence's name."""
  return reporting.scalars({k: v for k, v in summary.items() if k not in _NOT_METRICS})


def _stats(values: Mapping[int, float]) -> dict[str, Any]:
  """Mean and sample standard deviation (ddof 1; NaN below two values, or when
  a value is not finite) over seeds."""
  x = np.asarray(list(values.values()), dtype=np.float64)
  n = int(x.size)
  mean = float(np.mean(x)) if n else math.nan
  std = (float(np.std(x, ddof=1)) if n > 1 and np.all(np.isfinite(x))
         else math.nan)
  return {"mean": mean, "std": std, "n": n,
          "values": {str(seed): float(v) for seed, v in values.items()}}


def aggregate(records: Sequence[tuple[str, int, Mapping[str, Any]]]) -> dict[str, Any]:
  """Aggregates the summaries of a study over seeds.

  Args:
    records: (label, seed, summary) per run; rows keep the order of first
      appearance of each label.

  Returns:
    {"divergences": [labels], "seeds": {label: [seeds]},
     "trained": {label: the key of the trained divergence ("js", "alpha_0.5")},
     "runs": [{"divergence", "seed", "metrics", "flags"}],
     "aggregates": {label: {metric: {"mean", "std", "n", "values": {seed: v}}}}
       (a metric missing from a run is aggregated over the runs that have it:
       n says how many),
     "base": {metric: {...}} over seeds, the base model of each seed taken
       from its first run,
     "common": the metrics present in every run (sorted),
     "exact": whether any run has exact/* metrics,
     "flagged": [{"divergence", "seed", "flags"}] of the runs with flags}.
  """
  labels = list(dict.fromkeys(label for label, _, _ in records))
  per_label: dict[str, dict[int, dict[str, float]]] = {label: {} for label in labels}
  seeds: dict[str, list[int]] = {label: [] for label in labels}
  trained: dict[str, str] = {}
  base_by_seed: dict[int, dict[str, float]] = {}
  runs, flagged = [], []
  for label, seed, summary in records:
    if seed in per_label[label]:
      raise ValueError(f"{label} seed {seed} twice")
    metrics = run_metrics(summary)
    per_label[label][seed] = metrics
    seeds[label].append(seed)
    trained.setdefault(label, str(summary.get("divergence", label)))
    if isinstance(summary.get("base"), Mapping) and seed not in base_by_seed:
      base_by_seed[seed] = run_metrics(summary["base"])
    flags = [str(f) for f in summary.get("flags") or []]
    runs.append({"divergence": label, "seed": seed, "metrics": metrics,
                 "flags": flags})
    if flags:
      flagged.append({"divergence": label, "seed": seed, "flags": flags})

  def stats_of(by_seed: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    keys = list(dict.fromkeys(k for m in by_seed.values() for k in m))
    return {k: _stats({s: m[k] for s, m in by_seed.items() if k in m}) for k in keys}

  all_metrics = [m for by_seed in per_label.values() for m in by_seed.values()]
  common = sorted(set.intersection(*map(set, all_metrics))) if all_metrics else []
  return {
      "divergences": labels, "seeds": seeds, "trained": trained, "runs": runs,
      "aggregates": {label: stats_of(per_label[label]) for label in labels},
      "base": stats_of(base_by_seed), "common": common,
      "exact": any(k.startswith("exact/") for m in all_metrics for k in m),
      "flagged": flagged}


# ----------------------------------------------------------------------------
# Report.


def format_cell(stats: Mapping[str, Any] | None) -> str:
  """"0.487 ± 0.012 (5)": mean ± std over seeds (n), the digits set by the std;
  "—" when there is no value."""
  if not stats or not stats.get("n"):
    return "—"
  mean, std, n = stats["mean"], stats["std"], stats["n"]
  if n > 1 and math.isfinite(std) and std > 0:
    text = reporting.format_estimate(mean, std)
  elif n > 1 and std == 0:
    text = f"{reporting.format_estimate(mean)} ± 0"
  else:
    text = reporting.format_estimate(mean)
  return f"{text} ({n})"


def key_columns(study: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
  """(header, key) of the key table: the exact columns first on exact tasks."""
  return (EXACT_COLUMNS + SAMPLED_COLUMNS) if study["exact"] else SAMPLED_COLUMNS


def _key(key: str, trained: str | None) -> str | None:
  if TRAINED not in key:
    return key
  return None if trained is None else key.replace(TRAINED, trained)


def _escape(text: str) -> str:
  return str(text).replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(map(_escape, header)) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  lines += ["| " + " | ".join(map(_escape, row)) + " |" for row in rows]
  return "\n".join(lines)


def key_table(study: Mapping[str, Any]) -> str:
  """The key metrics: one row per f (the base model first), "mean ± std (n)"."""
  columns = key_columns(study)
  rows = [["base model a", *(format_cell(study["base"].get(k)) if TRAINED not in k
                             else "—" for _, k in columns)]]
  for label in study["divergences"]:
    agg = study["aggregates"][label]
    rows.append([f"`{label}`", *(format_cell(agg.get(_key(k, study["trained"][label])))
                                 for _, k in columns)])
  return _md_table(["f", *(h for h, _ in columns)], rows)


def _ordered_metrics(study: Mapping[str, Any]) -> list[str]:
  """The metrics common to every run, key metrics first, without `*_se`."""
  common = [k for k in study["common"] if not k.endswith("_se")]
  first = [k for _, k in key_columns(study) if k in common]
  return first + [k for k in common if k not in first]


def complete_table(study: Mapping[str, Any]) -> str:
  """Every scalar metric common to all runs: a row per metric, a column per f."""
  rows = []
  for metric in _ordered_metrics(study):
    rows.append([f"`{metric}`", format_cell(study["base"].get(metric)) if metric in
                 study["base"] else "",
                 *(format_cell(study["aggregates"][label].get(metric))
                   for label in study["divergences"])])
  return _md_table(["metric", "base model a", *(f"`{l}`" for l in study["divergences"])],
                   rows)


def render_markdown(study: Mapping[str, Any], *, config: str,
                    overrides: Sequence[str] = (), seeds: Sequence[int] = (),
                    date: str = "", workdir: str = "", planned: int | None = None
                    ) -> str:
  """study.md: header, key table, complete table, flagged runs.

  Args:
    study: `aggregate`'s result.
    config: the config file (as given to --config).
    overrides: the `--config.<field>=<value>` flags, applied to every run.
    seeds: the seeds of the study.
    date: when the report was written.
    workdir: the study directory (named in the header).
    planned: the number of runs of the study; when more than have finished,
      the header says the study is still running.
  """
  n_runs = len(study["runs"])
  lines = [f"# f-divergence study: `{config}`", ""]
  lines.append(f"- Config: `{config}`" + (f", in `{workdir}`" if workdir else ""))
  lines.append("- Overrides (every run): " + (
      ", ".join(f"`{o}`" for o in overrides) if overrides else "none"))
  lines.append(f"- Divergences: {', '.join(f'`{l}`' for l in study['divergences'])}")
  lines.append(f"- Seeds: {', '.join(map(str, seeds))} ({len(seeds)} per divergence)")
  if date:
    lines.append(f"- Date: {date}")
  status = f"{n_runs} runs"
  if planned is not None and planned > n_runs:
    status = f"{n_runs} of {planned} runs finished (the study is still running)"
  lines.append(f"- Runs: {status}; metrics are "
               + ("exact (by enumeration) where the column says `exact`, the "
                  "others estimated" if study["exact"] else "estimated")
               + " on fresh samples at the end of each run (`summary.json`).")
  lines += [
      "", "Each cell: mean ± standard deviation over seeds (number of runs). "
      "*Alignment*: E_π[b] (or the reward); *KL(π‖a)*: the distance from the base "
      "model; *trained f*: the row's own D_f(π‖p) (`" + "`, `".join(
          f"{l}` → `{study['trained'][l]}" for l in study["divergences"]) + "`); "
      "*forward KL* = KL(p‖π), *reverse KL* = KL(π‖p), *JS* and *TV*: to the "
      "target p. The base model row is a at each seed.", "",
      "## Key metrics", "", key_table(study), "",
      "## Every metric", "",
      "Every scalar metric of every run's `summary.json` (standard errors "
      "`*_se` of single runs are in `study.json`).", "",
      complete_table(study), "", "## Flagged runs", ""]
  flagged = study["flagged"]
  lines.append(f"{len(flagged)} of {n_runs} runs flagged by the evaluation"
               + (":" if flagged else "."))
  if flagged:
    lines.append("")
    lines += [f"- `{f['divergence']}` seed {f['seed']}: " + "; ".join(f["flags"])
              for f in flagged]
  lines += ["", f"Pareto plot: [`{PARETO_PNG}`]({PARETO_PNG}).", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Pareto plot.


def _pick(study: Mapping[str, Any], keys: Sequence[str]) -> str | None:
  """The first key present in some run (exact before sampled)."""
  for key in keys:
    if any(key in agg for agg in study["aggregates"].values()):
      return key
  return None


def _finite(*values: float) -> bool:
  return all(v is not None and math.isfinite(v) for v in values)


def _err(stats: Mapping[str, Any]) -> float:
  return stats["std"] if math.isfinite(stats["std"]) else 0.0


def _point(label: str, x: Mapping[str, Any], y: Mapping[str, Any]
           ) -> dict[str, Any] | None:
  seeds = [(x["values"][s], y["values"][s]) for s in x["values"]
           if s in y["values"] and _finite(x["values"][s], y["values"][s])]
  if not _finite(x["mean"], y["mean"]) and not seeds:
    return None
  return {"label": label, "x": x["mean"], "xerr": _err(x), "y": y["mean"],
          "yerr": _err(y), "seeds": seeds}


def pareto_points(study: Mapping[str, Any]) -> list[dict[str, Any]]:
  """What `plot_pareto` draws: two panels, each {"x": key, "y": key,
  "points": [{"label", "x", "xerr", "y", "yerr", "seeds": [(x, y)]}] per f,
  "base": the base model's point or None}. y is the alignment, x KL(π‖a) then
  Distinct-2 (Self-BLEU without it), exact keys preferred; means over seeds,
  errors the std over seeds (0 when undefined); non-finite values left out."""
  y_key = _pick(study, ("exact/alignment", "alignment"))
  panels = []
  for x_key in (_pick(study, ("exact/kl_from_base", "kl_from_base")),
                _pick(study, ("distinct_2", "self_bleu"))):
    points, base = [], None
    if x_key is not None and y_key is not None:
      for label in study["divergences"]:
        agg = study["aggregates"][label]
        if x_key in agg and y_key in agg:
          point = _point(label, agg[x_key], agg[y_key])
          if point is not None:
            points.append(point)
      if x_key in study["base"] and y_key in study["base"]:
        base = _point("base model a", study["base"][x_key], study["base"][y_key])
    panels.append({"x": x_key, "y": y_key, "points": points, "base": base})
  return panels


_X_UNITS = {"kl_from_base": "KL(π‖a), nats", "distinct_2": "Distinct-2",
            "self_bleu": "Self-BLEU"}


def plot_pareto(study: Mapping[str, Any], path: str) -> str:
  """pareto.png (`pareto_points`): alignment (y) against KL(π‖a), and against
  Distinct-2 (or Self-BLEU), one marker per f at its mean over seeds with std
  error bars, each seed faint behind, the base model as a black star.
  Returns `path`."""
  fig = Figure(figsize=(11.0, 4.6), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  markers = "osD^vP<>Xph"
  order = {label: i for i, label in enumerate(study["divergences"])}
  for ax, panel in zip(axes, pareto_points(study)):
    x_key, y_key = panel["x"], panel["y"]
    ax.grid(alpha=0.3)
    ax.set_ylabel(y_key or "alignment")
    ax.set_xlabel(f"{x_key}: {_X_UNITS[reporting.base_name(x_key)]}" if x_key
                  else "")
    if not panel["points"] and panel["base"] is None:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
      continue
    ax.set_title(f"{'exact ' if y_key.startswith('exact/') else ''}alignment vs "
                 f"{x_key}")
    for point in panel["points"]:
      i = order[point["label"]]
      style = {"color": f"C{i % 10}", "marker": markers[i % len(markers)]}
      if point["seeds"]:
        ax.scatter(*zip(*point["seeds"]), s=18, alpha=0.25, linewidths=0, **style)
      if _finite(point["x"], point["y"]):
        ax.errorbar(point["x"], point["y"], xerr=point["xerr"], yerr=point["yerr"],
                    ms=8, capsize=3, linestyle="none", label=point["label"], **style)
    base = panel["base"]
    if base is not None and _finite(base["x"], base["y"]):
      ax.errorbar(base["x"], base["y"], xerr=base["xerr"], yerr=base["yerr"],
                  color="black", marker="*", ms=13, capsize=3, linestyle="none",
                  label=base["label"])
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  fig.suptitle("f-DPG: alignment against the distance from a and diversity "
               "(mean ± std over seeds; faint: single seeds)", fontsize="medium")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path
