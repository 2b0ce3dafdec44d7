"""The live progress bar of a training run (tqdm)."""

import collections
import sys
import time
from typing import Any, Mapping, TextIO

import tqdm

from fdiv_jax.core import divergences
from fdiv_jax.run import reporting
from fdiv_jax.run.reporting import base_name

# Shown when no divergence key is given: the first present, in this order.
_DEFAULT_DIVERGENCES = (*divergences.STANDARD,
                        *(n for n in divergences.NAMES
                          if n not in divergences.STANDARD))


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
  (``kl_base``, from ``kl_from_base`` or ``kl_base``) and samples/s.
  Samples/s is ``metrics["samples_per_sec"]`` when given, else steps/s (over the last 20 updates) × ``samples_per_step``
  when that is set.

  On a terminal the bar redraws at most every 0.5 s. Off a terminal (CI, log
  files) it prints a plain line at most every ``log_interval_s`` seconds
  (and at the end), without carriage returns.

  Args:
    total: number of training steps.
    initial: the step training starts (or resumes) at.
    samples_per_step: samples drawn per step, for samples/s.
    divergence_key: base name of the divergence shown: the trained one's
      ``Divergence.metric_name`` (e.g. ``"js"``, ``"hellinger"``,
      ``"alpha_0.5"``); by default the first present of forward KL, reverse
      KL, JS, TV and the other names of the registry.
    moment_targets: for a distributional target, the target moment of each
      feature by name: the bar shows ``name=E_π[φ]/μ̄`` (e.g.
      ``female=0.27/0.50``) instead of the energy as alignment.
    file: the stream (default ``sys.stderr``).
    log_interval_s: minimum seconds between lines off a terminal.
    disable: no output at all.
  """

  def __init__(self, total: int, initial: int = 0, *,
               samples_per_step: int | None = None,
               divergence_key: str | None = None,
               moment_targets: Mapping[str, float] | None = None,
               file: TextIO | None = None, log_interval_s: float = 30.0,
               disable: bool = False):
    stream = sys.stderr if file is None else file
    self._stream = stream
    isatty = getattr(stream, "isatty", lambda: False)()
    self._samples_per_step = samples_per_step
    self._divergence_key = divergence_key
    self._moment_targets = dict(moment_targets or {})
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
    values = reporting.scalars(metrics)
    fields = {}
    if self._moment_targets:
      for name, goal in self._moment_targets.items():
        moment = _lookup(values, f"moment/{name}")
        if moment is None:
          moment = values.get(f"train/moment/{name}", values.get(f"eval/moment/{name}"))
        if moment is not None:
          fields[name] = f"{moment:.2f}/{goal:.2f}"
    else:
      alignment = _lookup(values, reporting.ALIGNMENT_KEY)
      if alignment is not None:
        fields["align"] = f"{alignment:.3f}"
    if self._divergence_key:
      names = [self._divergence_key]
    else:
      names = [*_DEFAULT_DIVERGENCES, *sorted(
          {base_name(k) for k in values if reporting.is_divergence_key(k)})]
    for name in names:
      value = _lookup(values, name)
      if value is not None:
        fields[self._divergence_key or name] = f"{value:.4g}"
        break
    for name in reporting.KL_BASE_KEYS:
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
