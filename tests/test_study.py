"""The study of several f's over seeds (fdiv_jax.run.study, python -m
fdiv_jax.study): flag parsing, aggregation, the report, resuming, the command
line end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from fdiv_jax.run import study
from fdiv_jax.run.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, size="tiny"):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(size)
  config.lock()
  return config


# ----------------------------------------------------------------------------
# Flags.


def test_parse_divergences():
  choices = study.parse_divergences("kl, rkl,js,total_variation,hellinger,alpha:0.5")
  assert [c.name for c in choices] == ["forward_kl", "reverse_kl", "js", "tv",
                                       "hellinger", "alpha"]
  assert [c.label for c in choices] == ["forward_kl", "reverse_kl", "js", "tv",
                                        "hellinger", "alpha_0.5"]
  assert choices[-1].alpha == 0.5 and choices[0].alpha is None
  assert study.parse_divergences("alpha:-1,alpha:2")[1].label == "alpha_2"


@pytest.mark.parametrize("text,message", [
    ("", "no divergence"),
    ("js,,tv", "empty entry"),
    ("js,foo", "Unknown divergence 'foo'; valid names: forward_kl"),
    ("alpha", "needs its alpha"),
    ("alpha:x", "not a number"),
    ("alpha:1", "alpha"),
    ("js:0.5", "only alpha takes a value"),
    ("kl,forward_kl", "'forward_kl' is 'kl' again"),
    ("alpha:0.5,alpha:.5", "again"),
])
def test_parse_divergences_rejects(text, message):
  with pytest.raises(study.StudyError) as e:
    study.parse_divergences(text)
  assert message in str(e.value), str(e.value)


def test_parse_seeds():
  assert study.parse_seeds("0, 1,2,7") == (0, 1, 2, 7)
  for text, message in (("", "no seed"), (" ", "no seed"), ("0,a", "'a' is not an "
                                                             "integer"),
                        ("1,2,1", "seed 1 twice")):
    with pytest.raises(study.StudyError) as e:
      study.parse_seeds(text)
    assert message in str(e.value), (text, str(e.value))


def test_run_config_copies_and_sets_the_run_fields():
  config = load_config("toy_exact")
  c = study.run_config(config, study.Choice("alpha", 0.25), 7)
  assert (c.divergence, c.alpha, c.seed) == ("alpha", 0.25, 7)
  assert (config.divergence, config.alpha, config.seed) == ("js", 0.5, 0)
  assert c.is_locked and c.num_steps == config.num_steps == 3
  c.model.n_embd = 32  # a deep copy: the original's sub-dicts are untouched
  assert config.model.n_embd == 16


# ----------------------------------------------------------------------------
# Aggregation and the report (hand-made summaries).


def summary(divergence, alignment, kl, *, flags=(), exact=None, base_alignment=0.1,
            **extra):
  s = {"alignment": alignment, "alignment_se": 0.01, "kl_from_base": kl,
       "forward_kl": 2 * kl, "reverse_kl": 3 * kl, "js": kl / 2, "tv": kl / 4,
       "distinct_2": 0.5, "self_bleu": 0.2, "step": 10,
       "divergence": divergence, "flags": list(flags),
       "lambda_fit": {"converged": True, "lambdas": [1.0, 2.0]},
       "base": {"alignment": base_alignment, "kl_from_base": 0.0,
                "distinct_2": 0.9, "flags": ["base flag"]},
       "config": {"divergence": divergence, "num_steps": 10}}
  s.setdefault(divergence, kl / 8)  # the trained f, when not one of the four
  if exact is not None:
    s["exact/alignment"] = exact
    s["base"]["exact/alignment"] = exact / 2
  s.update(extra)
  return s


def hand_made_records():
  # js: alignment 0.1, 0.2, 0.6 → mean 0.3, std (ddof 1) sqrt(0.07).
  # hellinger: alignment 0.5, 0.7, 0.9 → mean 0.7, std 0.2; its own f
  # kl / 8 = 1, 2, 3; seed 2 has no self_bleu.
  records = [("js", 0, summary("js", 0.1, 1.0, base_alignment=0.1)),
             ("js", 1, summary("js", 0.2, 2.0, base_alignment=0.2,
                               flags=["low coverage"])),
             ("js", 2, summary("js", 0.6, 3.0, base_alignment=0.6)),
             ("hellinger", 0, summary("hellinger", 0.5, 8.0, base_alignment=99.0)),
             ("hellinger", 1, summary("hellinger", 0.7, 16.0, flags=["a", "b"])),
             ("hellinger", 2, summary("hellinger", 0.9, 24.0))]
  del records[5][2]["self_bleu"]
  return records


def test_aggregate_means_stds_missing_metrics_and_flags():
  s = study.aggregate(hand_made_records())
  assert s["divergences"] == ["js", "hellinger"]
  assert s["seeds"] == {"js": [0, 1, 2], "hellinger": [0, 1, 2]}
  assert s["trained"] == {"js": "js", "hellinger": "hellinger"}
  js, tv = s["aggregates"]["js"], s["aggregates"]["hellinger"]
  assert js["alignment"]["mean"] == pytest.approx(0.3, rel=1e-12)
  assert js["alignment"]["std"] == pytest.approx(math.sqrt(0.07), rel=1e-12)
  assert js["alignment"]["n"] == 3
  assert js["alignment"]["values"] == {"0": 0.1, "1": 0.2, "2": 0.6}
  assert tv["alignment"]["mean"] == pytest.approx(0.7, rel=1e-12)
  assert tv["alignment"]["std"] == pytest.approx(0.2, rel=1e-12)
  assert js["kl_from_base"]["mean"] == 2.0 and js["kl_from_base"]["std"] == 1.0
  assert js["forward_kl"]["mean"] == 4.0 and js["forward_kl"]["std"] == 2.0
  # The same check against NumPy for every metric of every divergence.
  records = hand_made_records()
  for label, agg in s["aggregates"].items():
    for metric, stats in agg.items():
      values = [study.run_metrics(r)[metric] for l, _, r in records
                if l == label and metric in study.run_metrics(r)]
      assert stats["n"] == len(values), (label, metric)
      assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-12)
      if len(values) > 1:
        assert stats["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=0)
  # A metric missing from one run: aggregated over the others, not common.
  assert tv["self_bleu"]["n"] == 2 and set(tv["self_bleu"]["values"]) == {"0", "1"}
  assert js["self_bleu"]["n"] == 3
  assert "self_bleu" not in s["common"]
  assert {"alignment", "kl_from_base", "distinct_2", "step",
          "lambda_fit/converged", "alignment_se"} <= set(s["common"])
  # Not metrics: the config, the base, the flags, the divergence's name.
  assert not any(k.startswith(("config", "base", "flags")) or k == "divergence"
                 for k in s["common"])
  assert tv["hellinger"]["mean"] == 2.0 and tv["hellinger"]["std"] == 1.0
  assert "hellinger" not in js and "hellinger" not in s["common"]
  # The base model: one per seed, from the first run of that seed.
  assert s["base"]["alignment"]["mean"] == pytest.approx(0.3, rel=1e-12)
  assert s["base"]["alignment"]["n"] == 3
  # Flags.
  assert s["flagged"] == [{"divergence": "js", "seed": 1, "flags": ["low coverage"]},
                          {"divergence": "hellinger", "seed": 1,
                           "flags": ["a", "b"]}]
  assert not s["exact"]
  assert len(s["runs"]) == 6 and s["runs"][1]["flags"] == ["low coverage"]


def test_aggregate_single_seed_and_non_finite_values():
  s = study.aggregate([("reverse_kl", 0, summary("reverse_kl", 0.9, math.inf)),
                       ("reverse_kl", 1, summary("reverse_kl", 0.8, 1.0)),
                       ("js", 3, summary("js", 0.5, 1.0))])
  rkl = s["aggregates"]["reverse_kl"]["kl_from_base"]
  assert rkl["mean"] == math.inf and math.isnan(rkl["std"]) and rkl["n"] == 2
  assert study.format_cell(rkl) == "inf (2)"
  one = s["aggregates"]["js"]["alignment"]
  assert one["mean"] == 0.5 and math.isnan(one["std"]) and one["n"] == 1
  assert study.format_cell(one) == "0.5000 (1)"
  with pytest.raises(ValueError, match="js seed 3 twice"):
    study.aggregate([("js", 3, summary("js", 0.5, 1.0))] * 2)


def test_format_cell():
  assert study.format_cell({"mean": 0.3, "std": math.sqrt(0.07), "n": 3}) == \
      "0.30 ± 0.26 (3)"
  assert study.format_cell({"mean": 0.48677, "std": 0.000051, "n": 5}) == \
      "0.486770 ± 0.000051 (5)"
  assert study.format_cell({"mean": 1.0, "std": 0.0, "n": 2}) == "1.0000 ± 0 (2)"
  assert study.format_cell(None) == "—"


def rows_of(markdown, first_cell):
  return [[c.strip() for c in line.strip("|").split("|")]
          for line in markdown.splitlines() if line.startswith(f"| {first_cell} ")]


def test_markdown_tables():
  s = study.aggregate(hand_made_records())
  md = study.render_markdown(s, config="configs/toy.py", seeds=(0, 1, 2),
                             overrides=["--config.num_steps=10"],
                             date="2024-01-02T03:04:05", workdir="/w")
  assert md.startswith("# f-divergence study: `configs/toy.py`")
  for text in ("`--config.num_steps=10`", "Seeds: 0, 1, 2 (3 per divergence)",
               "Date: 2024-01-02T03:04:05", "mean ± standard deviation over seeds"):
    assert text in md, text
  tables = md.split("## ")
  key, complete = tables[1], tables[2]
  header = key.splitlines()[2]
  assert header == ("| f | alignment | KL(π‖a) | trained f | forward KL | reverse KL |"
                    " JS | TV | Distinct-2 | Self-BLEU |")
  # Rows: the base model first, then one per f, each cell mean ± std (n).
  lines = [l for l in key.splitlines() if l.startswith("| ")]
  assert lines[1].startswith("| base model a |") and lines[2].startswith("| `js` |")
  (js,), (tv,) = rows_of(key, "`js`"), rows_of(key, "`hellinger`")
  assert js[1] == "0.30 ± 0.26 (3)"        # alignment
  assert js[2] == "2.0 ± 1.0 (3)"          # KL(π‖a)
  assert js[3] == "1.00 ± 0.50 (3)"        # its own f: js = kl / 2
  assert tv[3] == "2.0 ± 1.0 (3)"          # its own f: hellinger = kl / 8
  assert js[4] == "4.0 ± 2.0 (3)"          # forward KL = 2 kl
  assert tv[1] == "0.70 ± 0.20 (3)"
  assert tv[9] == "0.2000 ± 0 (2)"          # Self-BLEU, missing from one run
  (base,) = rows_of(key, "base model a")
  assert base[1] == "0.30 ± 0.26 (3)" and base[3] == "—"
  # The complete table: a row per common metric, no standard errors, and not
  # the metric missing from a run.
  assert complete.splitlines()[4] == "| metric | base model a | `js` | `hellinger` |"
  metrics = [l.split("|")[1].strip() for l in complete.splitlines()
             if l.startswith("| `")]
  assert metrics[:5] == ["`alignment`", "`kl_from_base`", "`forward_kl`",
                         "`reverse_kl`", "`js`"]
  assert "`step`" in metrics and "`lambda_fit/converged`" in metrics
  assert "`self_bleu`" not in metrics and "`alignment_se`" not in metrics
  assert "`tv`" in metrics and "`hellinger`" not in metrics  # in one row only
  assert rows_of(complete, "`step`")[0][1:] == ["", "10.0000 ± 0 (3)",
                                                "10.0000 ± 0 (3)"]
  # Flags: counted and listed.
  assert "2 of 6 runs flagged by the evaluation:" in md
  assert "- `js` seed 1: low coverage" in md and "- `hellinger` seed 1: a; b" in md
  # A study still running says so.
  partial = study.render_markdown(s, config="c", seeds=(0, 1, 2), planned=9)
  assert "6 of 9 runs finished (the study is still running)" in partial


def test_markdown_exact_columns_first():
  records = [(l, k, summary(l, 0.5, 1.0 + k, exact=0.4 + 0.1 * k,
                            **{f"exact/{l}": 0.01 * (k + 1)}))
             for l in ("hellinger", "alpha_0.5") for k in (0, 1)]
  s = study.aggregate(records)
  assert s["exact"] and s["trained"]["alpha_0.5"] == "alpha_0.5"
  md = study.render_markdown(s, config="c", seeds=(0, 1))
  header = next(l for l in md.splitlines() if l.startswith("| f |"))
  cells = [c.strip() for c in header.strip("|").split("|")]
  assert cells[1:8] == ["exact alignment", "exact KL(π‖a)", "exact trained f",
                        "exact forward KL", "exact reverse KL", "exact JS",
                        "exact TV"]
  assert cells[8] == "alignment"
  (row,) = rows_of(md, "`alpha_0.5`")
  assert row[1] == "0.450 ± 0.071 (2)"     # exact/alignment 0.4, 0.5
  assert row[2] == "—"                     # no exact/kl_from_base in these runs
  assert row[3] == "0.0150 ± 0.0071 (2)"  # exact/alpha_0.5: 0.01, 0.02
  (base,) = rows_of(md, "base model a")
  assert base[1] == "0.225 ± 0.035 (2)"    # the base's exact/alignment: halves


def test_pareto_points():
  kl_panel, diversity = study.pareto_points(study.aggregate(hand_made_records()))
  assert (kl_panel["x"], kl_panel["y"]) == ("kl_from_base", "alignment")
  assert (diversity["x"], diversity["y"]) == ("distinct_2", "alignment")
  js, hellinger = kl_panel["points"]
  assert js["label"] == "js" and hellinger["label"] == "hellinger"
  assert (js["x"], js["xerr"]) == (2.0, 1.0)
  assert js["y"] == pytest.approx(0.3) and js["yerr"] == pytest.approx(math.sqrt(0.07))
  assert js["seeds"] == [(1.0, 0.1), (2.0, 0.2), (3.0, 0.6)]
  assert diversity["points"][0]["x"] == 0.5 and diversity["points"][0]["xerr"] == 0
  assert kl_panel["base"]["x"] == 0.0 and kl_panel["base"]["y"] == pytest.approx(0.3)
  assert diversity["base"]["x"] == 0.9
  # Exact keys preferred; Self-BLEU without Distinct-2; non-finite seeds left out.
  records = [(l, k, summary(l, 0.5, [1.0, math.inf][k], exact=0.4 + 0.1 * k,
                            **{"exact/kl_from_base": 0.1 * (k + 1)}))
             for l in ("js", "tv") for k in (0, 1)]
  for _, _, r in records:
    del r["distinct_2"]
  kl_panel, diversity = study.pareto_points(study.aggregate(records))
  assert (kl_panel["x"], kl_panel["y"]) == ("exact/kl_from_base", "exact/alignment")
  assert kl_panel["points"][1]["x"] == pytest.approx(0.15)
  assert kl_panel["points"][1]["y"] == pytest.approx(0.45)
  assert diversity["x"] == "self_bleu"
  plain = study.pareto_points(study.aggregate([(l, k, summary(l, 0.5, [1.0, math.inf][k]))
                                               for l in ("js",) for k in (0, 1)]))
  assert plain[0]["points"][0]["seeds"] == [(1.0, 0.5)]


def test_pareto_plot_is_written(tmp_path):
  s = study.aggregate(hand_made_records())
  path = study.plot_pareto(s, str(tmp_path / "sub" / "pareto.png"))
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  # No alignment at all: still a figure, each panel saying "no data".
  empty = study.aggregate([("js", 0, {"divergence": "js", "js": 0.1})])
  path = study.plot_pareto(empty, str(tmp_path / "empty.png"))
  assert os.path.getsize(path) > 1000


# ----------------------------------------------------------------------------
# Planning, running, resuming (a fake run function; no training).


def fake_run(calls):
  def run_fn(config, workdir):
    calls.append((config.divergence, config.alpha, config.seed, workdir))
    os.makedirs(workdir, exist_ok=True)
    from fdiv_jax.run import tasks  # pylint: disable=g-import-not-at-top
    s = summary(config.divergence if config.divergence != "alpha" else
                f"alpha_{config.alpha:g}", 0.1 * (config.seed + 1), 1.0 + config.seed,
                exact=0.2)
    s["config"] = json.loads(tasks.describe(config).config_json)
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(s, f)
    return s
  return run_fn


def test_run_study_runs_only_what_is_not_finished(tmp_path):
  config = load_config("toy_exact")
  choices = study.parse_divergences("js,alpha:0.5")
  calls, logs = [], []
  s = study.run_study(config, str(tmp_path), choices, (0, 1), config_name="toy",
                      run_fn=fake_run(calls), log=logs.append)
  assert [c[:3] for c in calls] == [("js", 0.5, 0), ("js", 0.5, 1),
                                    ("alpha", 0.5, 0), ("alpha", 0.5, 1)]
  assert calls[2][3] == str(tmp_path / "alpha_0.5" / "seed0")
  assert s["divergences"] == ["js", "alpha_0.5"]
  for name in ("study.md", "study.json", "pareto.png"):
    assert (tmp_path / name).exists(), name
  # Remove one run's summary: only that run runs again.
  os.remove(tmp_path / "js" / "seed1" / "summary.json")
  calls.clear()
  s = study.run_study(config, str(tmp_path), choices, (0, 1), config_name="toy",
                      run_fn=fake_run(calls), log=logs.append)
  assert [c[:3] for c in calls] == [("js", 0.5, 1)]
  assert any("3 of 4 runs already finished" in line for line in logs)
  assert [(r["divergence"], r["seed"]) for r in s["runs"]] == [
      ("js", 0), ("js", 1), ("alpha_0.5", 0), ("alpha_0.5", 1)]
  # Everything finished: nothing runs.
  calls.clear()
  study.run_study(config, str(tmp_path), choices, (0, 1), config_name="toy",
                  run_fn=fake_run(calls), log=logs.append)
  assert not calls


def test_execute_reports_in_the_study_order(tmp_path):
  config = load_config("toy_exact")
  runs = study.plan(config, study.parse_divergences("js,tv"), (0, 1), str(tmp_path))
  fake_run([])(runs[3].config, runs[3].workdir)   # tv seed 1 finished before
  calls, reports = [], []
  done = study.execute(runs, fake_run(calls), log=lambda _: None,
                       on_done=lambda d: reports.append([r.name for r, _ in d]))
  assert [c[2] for c in calls] == [0, 1, 0]
  assert reports == [["js seed 0", "tv seed 1"],
                     ["js seed 0", "js seed 1", "tv seed 1"],
                     ["js seed 0", "js seed 1", "tv seed 0", "tv seed 1"]]
  assert [s["config"]["seed"] for _, s in done] == [0, 1, 0, 1]


def test_plan_checks_every_config_and_the_runs_already_there(tmp_path):
  config = load_config("toy_exact")
  choices = study.parse_divergences("js,tv")
  runs = study.plan(config, choices, (0, 1), str(tmp_path))
  assert [(r.label, r.seed) for r in runs] == [("js", 0), ("js", 1), ("tv", 0),
                                               ("tv", 1)]
  assert not any(tmp_path.iterdir())  # planning writes nothing
  bad = study.run_config(config, study.Choice("js"), 0)
  bad.learning_rate = 0.0
  with pytest.raises(ConfigError, match="js seed 0: config.learning_rate"):
    study.plan(bad, choices, (0,), str(tmp_path))
  # A finished run of another config in the study directory.
  fake_run([])(study.run_config(config, study.Choice("tv"), 1),
               str(tmp_path / "tv" / "seed1"))
  other = study.run_config(config, study.Choice("js"), 0)
  other.num_steps = 5
  with pytest.raises(study.StudyError, match=r"tv seed 1: .* a run of another config "
                     r"\(config.num_steps: 3 there, 5 now\)"):
    study.plan(other, choices, (0, 1), str(tmp_path))
  assert len(study.plan(config, choices, (0, 1), str(tmp_path))) == 4
  # A started run (config.json, no summary) of another config.
  os.makedirs(tmp_path / "js" / "seed0")
  started = json.loads(json.dumps(runs[0].config_json))
  started["seed"] = 9
  (tmp_path / "js" / "seed0" / "config.json").write_text(json.dumps(started))
  with pytest.raises(study.StudyError, match=r"js seed 0: .*config.seed: 9 there, 0"):
    study.plan(config, choices, (0, 1), str(tmp_path))


def test_a_field_added_since_a_run_counts_only_off_its_default(tmp_path):
  """A run recorded before a config field existed matches when the field is
  at its default now (the project's new fields keep the old behaviour), and
  not when it is set to something else."""
  config = load_config("toy_exact")
  choices = study.parse_divergences("js")
  (run,) = study.plan(config, choices, (0,), str(tmp_path))
  recorded = json.loads(json.dumps(run.config_json))
  # Not yet fields back then:
  del recorded["lora"], recorded["model"]["remat"], recorded["qrs_samples"]
  os.makedirs(tmp_path / "js" / "seed0")
  (tmp_path / "js" / "seed0" / "config.json").write_text(json.dumps(recorded))
  assert len(study.plan(config, choices, (0,), str(tmp_path))) == 1
  changed = study.run_config(config, study.Choice("js"), 0)
  changed.qrs_samples = 64
  with pytest.raises(study.StudyError,
                     match=r"config.qrs_samples: None there, 64 now"):
    study.plan(changed, choices, (0,), str(tmp_path))


def test_a_stopped_run_stops_the_study(tmp_path):
  config = load_config("toy_exact")
  with pytest.raises(study.Stopped, match="js seed 0 stopped by SIGTERM") as e:
    study.run_study(config, str(tmp_path), study.parse_divergences("js"), (0, 1),
                    config_name="toy", log=lambda _: None,
                    run_fn=lambda c, w: {"preempted": True, "signal": "SIGTERM"})
  assert e.value.signal == "SIGTERM"
  assert not (tmp_path / "study.md").exists()


# ----------------------------------------------------------------------------
# The command line.


def run_study_cli(args, env):
  return subprocess.run([sys.executable, "-m", "fdiv_jax.study", *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=600,
                        check=False)


def summary_mtimes(directory):
  return {os.path.relpath(os.path.join(r, f), directory):
          os.stat(os.path.join(r, f)).st_mtime_ns
          for r, _, files in os.walk(directory) for f in files
          if f == "summary.json"}


def test_study_end_to_end_and_resume(tmp_path, subprocess_env):
  workdir = tmp_path / "study"
  args = ["--config=configs/toy_exact.py:tiny", f"--workdir={workdir}",
          "--divergences=forward_kl,alpha:0.5", "--seeds=0,1",
          "--config.num_samples_md=1"]  # compiles nothing new
  t0 = time.time()
  out = run_study_cli(args, subprocess_env)
  first = time.time() - t0
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
  runs = [("forward_kl", 0), ("forward_kl", 1), ("alpha_0.5", 0), ("alpha_0.5", 1)]
  summaries = {}
  for label, seed in runs:
    with open(workdir / label / f"seed{seed}" / "summary.json", encoding="utf-8") as f:
      summaries[label, seed] = json.load(f)
    assert summaries[label, seed]["divergence"] == label
    assert summaries[label, seed]["config"]["seed"] == seed
    assert summaries[label, seed]["config"]["num_samples_md"] == 1  # override
  assert summaries["alpha_0.5", 1]["config"]["alpha"] == 0.5
  # study.json: the aggregates are the mean and std of the runs' values.
  with open(workdir / "study.json", encoding="utf-8") as f:
    report = json.load(f)
  assert report["divergences"] == ["forward_kl", "alpha_0.5"]
  assert report["overrides"] == ["--config.num_samples_md=1"]
  assert [(r["divergence"], r["seed"]) for r in report["runs"]] == runs
  for label in ("forward_kl", "alpha_0.5"):
    for metric in ("exact/alignment", "alignment", "exact/kl_from_base",
                   f"exact/{label}"):
      values = [summaries[label, seed][metric] for seed in (0, 1)]
      stats = report["aggregates"][label][metric]
      assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-9)
      assert stats["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9, abs=1e-15)
      assert stats["n"] == 2
  assert report["exact"]
  # study.md: the header, a row per f with the exact columns, the flags.
  md = (workdir / "study.md").read_text(encoding="utf-8")
  assert "# f-divergence study: `configs/toy_exact.py:tiny`" in md
  assert "`--config.num_samples_md=1`" in md and "Seeds: 0, 1 (2 per" in md
  (row,) = rows_of(md, "`alpha_0.5`")
  assert row[1] == study.format_cell(report["aggregates"]["alpha_0.5"]["exact/alignment"])
  assert row[1].endswith("(2)") and "±" in row[1]
  assert rows_of(md, "`forward_kl`") and rows_of(md, "base model a")
  flagged = sum(bool(s["flags"]) for s in summaries.values())
  assert f"{flagged} of 4 runs flagged by the evaluation" in md
  with open(workdir / "pareto.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Again: nothing runs again, the report is rewritten.
  before = summary_mtimes(workdir)
  assert len(before) == 4
  os.remove(workdir / "study.md")
  t0 = time.time()
  out = run_study_cli(args, subprocess_env)
  second = time.time() - t0
  assert out.returncode == 0, out.stderr[-3000:]
  assert "4 of 4 runs already finished (not run again)" in out.stdout
  assert summary_mtimes(workdir) == before
  assert (workdir / "study.md").read_text(encoding="utf-8").count("| `") >= 2
  assert second < first, (first, second)
  print(f"study: first invocation {first:.1f} s, second {second:.1f} s")


@pytest.mark.parametrize("flag,message", [
    ("--divergences=js,foo", "--divergences: Unknown divergence 'foo'"),
    ("--seeds=", "--seeds: no seed given"),
    ("--config.learning_rate=0", "invalid configuration: forward_kl seed 0: "
     "config.learning_rate"),
    ("--config.seed=3", "--config.seed is set per run by --seeds"),
])
def test_bad_flags_exit_2_before_any_run(flag, message, tmp_path, subprocess_env):
  workdir = tmp_path / "study"
  out = run_study_cli(["--config=configs/toy_exact.py:tiny", f"--workdir={workdir}",
                       "--divergences=forward_kl,js", "--seeds=0,1", flag],
                      subprocess_env)
  assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
  assert message in out.stderr, out.stderr[-2000:]
  assert not workdir.exists()
