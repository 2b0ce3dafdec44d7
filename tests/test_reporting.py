"""Tests for fdiv_jax.run.reporting."""

import io
import json
import math
import os

import numpy as np
import pytest

from fdiv_jax.core import divergences
from fdiv_jax.run import plots, progress, reporting


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


class TestMetricWriter:

  def test_jsonl_and_tensorboard(self, tmp_path):
    workdir = str(tmp_path / "run")
    with reporting.MetricWriter(workdir) as writer:
      written = writer.write(1, {"loss": np.float32(0.5), "js": 0.25,
                                 "eval": {"alignment": np.array(0.75)},
                                 "count": 3, "vector": np.ones(3),
                                 "name": "x"})
      writer.write(2, {"loss": float("nan"), "fkl": float("inf"),
                       "rkl": -float("inf")})
    assert written == {"loss": 0.5, "js": 0.25, "eval/alignment": 0.75,
                       "count": 3.0}
    rows = _lines(os.path.join(workdir, "metrics.jsonl"))  # strict JSON
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["eval/alignment"] == 0.75 and "vector" not in rows[0]
    assert (rows[1]["loss"], rows[1]["fkl"], rows[1]["rkl"]) == (
        "NaN", "Infinity", "-Infinity")
    back = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert math.isnan(back[1]["loss"]) and back[1]["fkl"] == math.inf
    assert back[1]["rkl"] == -math.inf
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)

  def test_resume_appends_and_truncates(self, tmp_path):
    workdir = str(tmp_path)
    path = os.path.join(workdir, "metrics.jsonl")
    with reporting.MetricWriter(workdir, tensorboard=False) as writer:
      for step in (10, 20, 30):
        writer.write(step, {"loss": step / 10})
    with open(path, "a", encoding="utf-8") as f:
      f.write('{"step": 40, "lo')  # a crash in the middle of a line
    with reporting.MetricWriter(workdir) as writer:
      assert [r["step"] for r in _lines(path)] == [10, 20, 30]
      assert writer.truncate_after(20) == 1
      writer.write(30, {"loss": 9.0})
    rows = _lines(path)
    assert [(r["step"], r["loss"]) for r in rows] == [
        (10, 1.0), (20, 2.0), (30, 9.0)]


def test_plot_metrics(tmp_path):
  workdir = str(tmp_path)
  with reporting.MetricWriter(workdir, tensorboard=False) as writer:
    for step in range(5):
      writer.write(step, {"alignment": 0.1 * step, "fkl": 1.0 / (step + 1),
                          "eval/js": 0.1, "kl_from_base": float("nan"),
                          "distinct_1": 0.5, "self_bleu": 0.2,
                          "train/proposal_js": 0.3})
  files = plots.plot_metrics(os.path.join(workdir, "metrics.jsonl"),
                                 os.path.join(workdir, "plots"))
  names = sorted(os.path.basename(f) for f in files)
  # kl_from_base is all NaN: skipped.
  assert names == ["alignment.png", "divergences.png", "diversity.png"]
  for f in files:
    with open(f, "rb") as png:
      assert png.read(8) == b"\x89PNG\r\n\x1a\n"
  assert plots.plot_metrics(str(tmp_path / "missing.jsonl"),
                                str(tmp_path / "p2")) == []


class _Stream(io.StringIO):

  def isatty(self):
    return False


def test_progress_bar_off_a_terminal():
  stream = _Stream()
  bar = progress.ProgressBar(100, initial=10, samples_per_step=8,
                              file=stream, log_interval_s=3600)
  metrics = {"eval": {"alignment": 0.5, "js": 0.125}, "kl_base": 2.0,
             "samples_per_sec": 64.0}
  assert bar.postfix(metrics) == {"align": "0.500", "js": "0.125",
                                  "kl_base": "2", "samples/s": "64.0"}
  for step in range(11, 101):
    bar.update(step, metrics)
  assert bar.steps_per_sec() > 0
  del metrics["samples_per_sec"]
  assert float(bar.postfix(metrics)["samples/s"]) > 0  # from steps/s
  bar.close()
  out = stream.getvalue()
  assert "\r" not in out
  lines = out.strip().split("\n")
  assert 1 <= len(lines) <= 3  # start and end, not one per step
  assert "100/100" in lines[-1] and "align=0.500" in lines[-1]


def test_plot_groups_by_key():
  assert reporting.is_divergence_key("eval/exact/forward_kl")
  assert reporting.is_divergence_key("eval/hellinger")
  assert reporting.is_divergence_key("train/alpha_0.5")
  assert not reporting.is_divergence_key("train/proposal_js")
  assert not reporting.is_divergence_key("train/kl_from_base")
  assert plots._is_alignment("eval/moment/female")
  assert plots._is_alignment("eval/alignment")
  assert not plots._is_alignment("eval/loss")


@pytest.mark.parametrize("d", [divergences.get(n) for n in divergences.NAMES
                               if n != "alpha"] + [divergences.get("alpha", alpha=0.5)],
                         ids=str)
def test_progress_bar_shows_the_trained_divergence(d):
  # Every divergence of the registry is reported under its metric name, which
  # the plots group as a divergence and the bar shows when it is the trained one.
  key = d.metric_name
  assert reporting.is_divergence_key(f"train/{key}")
  bar = progress.ProgressBar(5, divergence_key=key, disable=True)
  metrics = {"forward_kl": 1.0, "reverse_kl": 2.0, "tv": 0.25, "js": 0.125,
             key: 0.0625}
  assert bar.postfix({"train": metrics}) == {key: "0.0625"}
  bar.close()


def test_progress_bar_divergence_choice():
  bar = progress.ProgressBar(5, disable=True)
  assert bar.postfix({"js": 0.5, "forward_kl": 1.0, "kl_from_base": 4.0}) == {
      "forward_kl": "1", "kl_base": "4"}
  bar.close()
  bar = progress.ProgressBar(5, disable=True)
  assert bar.postfix({"hellinger": 0.5}) == {"hellinger": "0.5"}
  assert bar.postfix({"alpha_2": 0.5}) == {"alpha_2": "0.5"}
  assert bar.postfix({}) == {}
  bar.close()


def test_write_samples_md(tmp_path):
  path = str(tmp_path / "out" / "samples.md")
  reporting.write_samples_md(
      path, ["", "Once"], ["base one", ["b1", "b2 ``` x"]],
      ["trained one\x01", "t1"])
  text = open(path, encoding="utf-8").read()
  assert text.startswith("# Samples")
  assert "## 1. Prompt: (unconditional)" in text
  assert "## 2. Prompt: `Once`" in text
  assert "````text\nb2 ``` x\n````" in text
  assert "trained one\N{REPLACEMENT CHARACTER}" in text
  assert text.count("**Base model**") == 2 and text.count("**Trained**") == 2
  with pytest.raises(ValueError):
    reporting.write_samples_md(path, [""], [], [])


def test_summary_table():
  table = reporting.summary_table(
      {"alignment": 0.91234, "kl_base": 12.5, "steps": 100, "ess": 1e-5})
  assert table.split("\n") == [
      "metric         value",
      "---------  ---------",
      "alignment     0.9123",
      "kl_base      12.5000",
      "steps            100",
      "ess        1.000e-05",
  ]
  table = reporting.summary_table({"base": {"alignment": 0.1, "js": 0.5},
                                   "trained": {"alignment": 0.9}})
  assert table.split("\n") == [
      "metric       base  trained",
      "---------  ------  -------",
      "alignment  0.1000   0.9000",
      "js         0.5000",
  ]


def test_plots_have_a_panel_per_quantity_with_error_bands_and_log_scales(
    tmp_path, monkeypatch):
  workdir = str(tmp_path)
  with reporting.MetricWriter(workdir, tensorboard=False) as writer:
    for step in range(0, 60, 10):
      writer.write(step, {"train/forward_kl": 10.0 ** (-step / 20),
                          "eval/forward_kl": 10.0 ** (-step / 20),
                          "eval/forward_kl_se": 0.01,
                          "eval/js": 0.3 - 0.001 * step, "eval/js_se": 0.02,
                          "eval/exact/js": 0.29 - 0.001 * step})
  axes = []
  real_add = plots.Figure.add_subplot

  def spy(fig, *args, **kwargs):
    ax = real_add(fig, *args, **kwargs)
    axes.append(ax)
    return ax

  monkeypatch.setattr(plots.Figure, "add_subplot", spy)
  plots.plot_metrics(os.path.join(workdir, "metrics.jsonl"),
                     os.path.join(workdir, "plots"))
  panels = {ax.get_title(): ax for ax in axes}
  assert set(panels) == {"forward_kl", "js"}          # one panel per quantity
  assert panels["forward_kl"].get_yscale() == "log"    # 1 … 3e-3: decades
  assert panels["js"].get_yscale() == "linear"
  # The band of ±1 standard error is drawn around the evaluation.
  assert any(type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")
             for c in panels["js"].collections)
  labels = [line.get_label() for line in panels["js"].get_lines()]
  assert "exact" in labels and "eval" in labels
  assert plots.spans_decades(np.array([1.0, 0.005]))
  assert not plots.spans_decades(np.array([1.0, -0.5, 0.001]))
