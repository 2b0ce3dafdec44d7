r"""Offline f-DPO against online f-DPG with a learned reward: table and plot.

  python docs/studies/preference/compare.py --offline=OFFLINE_STUDY \
      --online=ONLINE_STUDY --out=docs/studies/preference

reads the `study.json` of two `python -m fdiv_jax.study` directories (the
commands are in README, "Preference data ...") and writes comparison.md (mean ±
sample standard deviation over seeds of the final evaluation of every run) and
comparison.png (ground-truth alignment against KL(π‖π_ref) and against
Distinct-2, one point per setting and divergence with its ± std bars, the base
model a = π_ref as a star). Only the standard library, NumPy and Matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

COLUMNS = (("ground-truth alignment", "alignment"),
           ("KL(π‖π_ref)", "kl_from_base"),
           ("Distinct-2", "distinct_2"),
           ("Self-BLEU", "self_bleu"),
           ("held-out pair accuracy", "heldout/accuracy"),
           ("learned reward E_π[r]", "moment/learned_reward"))
LABELS = {"reverse_kl": "reverse KL", "forward_kl": "forward KL", "js": "JS",
          "alpha_0.5": "α = 0.5"}
SETTINGS = (("offline", "offline f-DPO (reverse KL = DPO)"),
            ("online", "online f-DPG, learned reward (reverse KL = RLHF)"))


def load(path: str) -> dict:
  with open(os.path.join(path, "study.json"), encoding="utf-8") as f:
    return json.load(f)


def cell(stats: dict | None) -> str:
  if not stats or not stats.get("n"):
    return "—"
  mean, std = stats["mean"], stats["std"]
  if not math.isfinite(mean):
    return str(mean)
  digits = 3 if abs(mean) < 10 else 1
  text = f"{mean:.{digits}f}"
  if stats["n"] > 1 and math.isfinite(std):
    text += f" ± {std:.{digits}f}"
  return text


def base_cell(studies: dict[str, dict], key: str) -> str:
  """The base model's value: from the first study that has it. Its held-out
  accuracy is left out (at π = π_ref every margin is 0 up to rounding, and
  the accuracy counts rounding signs), its KL from itself is 0."""
  if key == "heldout/accuracy":
    return "— (margins 0)"
  if key == "kl_from_base":
    return "0"
  for study in studies.values():
    if key in study["base"]:
      return cell(study["base"][key])
  return "—"


def table(studies: dict[str, dict]) -> str:
  header = ["setting", "divergence", *[c for c, _ in COLUMNS], "seeds"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] * len(header)) + "|"]
  lines.append("| base model a = π_ref | — | " + " | ".join(
      base_cell(studies, k) for _, k in COLUMNS) + " | |")
  for setting, _ in SETTINGS:
    study = studies[setting]
    for label in study["divergences"]:
      agg = study["aggregates"][label]
      n = max(s["n"] for s in agg.values())
      lines.append(f"| {setting} | {LABELS.get(label, label)} | " + " | ".join(
          cell(agg.get(k)) for _, k in COLUMNS) + f" | {n} |")
  return "\n".join(lines)


def plot(studies: dict[str, dict], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(11, 4.2), dpi=110)
  FigureCanvasAgg(fig)
  markers = {"reverse_kl": "o", "forward_kl": "s", "js": "^", "alpha_0.5": "D"}
  colors = {"offline": "tab:blue", "online": "tab:orange"}
  base = next(iter(studies.values()))["base"]
  for i, (xkey, xlabel) in enumerate((("kl_from_base", "KL(π‖π_ref) (nats)"),
                                      ("distinct_2", "Distinct-2 (diversity)"))):
    ax = fig.add_subplot(1, 2, i + 1)
    for setting, name in SETTINGS:
      study = studies[setting]
      for label in study["divergences"]:
        agg = study["aggregates"][label]
        x, y = agg.get(xkey), agg.get("alignment")
        if not x or not y:
          continue
        ax.errorbar(x["mean"], y["mean"], xerr=np.nan_to_num(x["std"]),
                    yerr=np.nan_to_num(y["std"]), marker=markers.get(label, "o"),
                    color=colors[setting], ms=7, capsize=3, ls="none",
                    label=f"{setting}: {LABELS.get(label, label)}")
    if xkey in base and "alignment" in base:
      ax.plot(base[xkey]["mean"], base["alignment"]["mean"], "k*", ms=12,
              label="base model a")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ground-truth alignment E_π[b]")
    ax.grid(alpha=0.3)
    if i == 0:
      ax.legend(fontsize="x-small", loc="lower right")
  fig.suptitle("Offline f-DPO vs online f-DPG with a learned reward "
               "(shipped pairs; mean ± std over 3 seeds)", fontsize="medium")
  fig.tight_layout()
  fig.savefig(path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--offline", required=True)
  parser.add_argument("--online", required=True)
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args(argv)
  studies = {"offline": load(args.offline), "online": load(args.online)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "comparison.md"), "w", encoding="utf-8") as f:
    f.write(table(studies) + "\n")
  plot(studies, os.path.join(args.out, "comparison.png"))
  print(table(studies))


if __name__ == "__main__":
  main()
