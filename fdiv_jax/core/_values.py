"""Checks of the Python values that configure the library's objects.

Every typed object (a `Baseline`, a `SamplerConfig`, a `train.StepConfig`, ...)
checks its fields when constructed, with these helpers, so that each error has
one form: a ValueError whose message starts with the parameter at fault, e.g.
``"top_p: must be in (0, 1] (1 = off), got 1.5."``. The run layer maps the
leading parameter to the config field that set it (``config.top_p: ...``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def _fail(name: str, requirement: str, value: Any, note: str):
  raise ValueError(f"{name}: must be {requirement}{note}, got {value!r}.")


def is_integer(value: Any) -> bool:
  """An integer that is not a bool (NumPy integers count)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, *, minimum: int | None = None,
            note: str = "") -> int:
  """`value` if it is an integer >= `minimum`; else "name: must be ..."."""
  if not is_integer(value) or (minimum is not None and value < minimum):
    _fail(name, "an integer" + ("" if minimum is None else f" >= {minimum}"),
          value, note)
  return int(value)


def real(name: str, value: Any, *, low: float | None = None,
         high: float | None = None, low_open: bool = False,
         high_open: bool = False, note: str = "") -> float:
  """`value` if it is a finite real number in the interval; else an error.

  The interval is [low, high] with `low_open` / `high_open` excluding an end;
  the message says e.g. "must be a finite number > 0" or "must be in [0, 1)".
  """
  ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
        and math.isfinite(value))
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    if low is not None and high is not None:
      requirement = (f"in {'(' if low_open else '['}{low:g}, {high:g}"
                     f"{')' if high_open else ']'}")
    elif low is not None:
      requirement = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
      requirement = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
      requirement = "a finite number"
    _fail(name, requirement, value, note)
  return float(value)


def boolean(name: str, value: Any) -> bool:
  """`value` if it is True or False; else "name: must be True or False"."""
  if not isinstance(value, bool):
    raise ValueError(f"{name}: must be True or False, got {value!r}.")
  return value


def choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
  """`value` if it is one of `allowed`; else an error listing them."""
  try:
    ok = value in allowed
  except TypeError:  # an unhashable value against a dict's keys
    ok = False
  if not ok:
    raise ValueError(f"{name}: must be one of {', '.join(map(str, allowed))}; "
                     f"got {value!r}.")
  return value
