"""``config.preference`` described: `describe` → `PreferenceSpec`.

What `run.run_spec.describe` calls for the ``preference`` section of a run
config: the `train.preference_step.PreferenceConfig` (objective, f, β, ...)
built and checked, the data files read (`run.preference_data`), every text
checked against the run's tokenizer and the longest prompt + max_new_tokens
against the model's positions, so that a bad value or row stops the run with
a `ConfigError` naming the field (and the file and line) before anything is
written.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from fdiv_jax.run.preference_data import ListData, PairData, file_digest, read


@dataclasses.dataclass(frozen=True, eq=False)
class PreferenceSpec:
  """Offline preference training, described (built by `describe`).

  Attributes:
    config: the `train.preference_step.PreferenceConfig`.
    train: the training data (`PairData` for f-DPO, `ListData` for f-PO).
    heldout: the held-out data of the same format, or None.
    train_digest: `file_digest` of the training file (checkpoints record it).
  """
  config: Any
  train: PairData | ListData
  heldout: PairData | ListData | None
  train_digest: str


def _texts(data: PairData | ListData) -> Iterator[tuple[str, ...]]:
  """The texts of each row: prompt and responses."""
  if isinstance(data, PairData):
    yield from zip(data.prompts, data.chosen, data.rejected)
  else:
    for prompt, texts in zip(data.prompts, data.responses):
      yield (prompt, *texts)


def _config_error(field: str, message: str):
  from fdiv_jax.run.config import ConfigError  # pylint: disable=g-import-not-at-top
  return ConfigError(f"config.{field}: {message}")


# Leading parameter of a `PreferenceConfig` error → its config field.
_FIELDS = {"objective": "preference.objective", "beta": "preference.beta",
           "reward_temperature": "preference.reward_temperature",
           "divergence": "divergence", "log_ratio_clip": "log_ratio_clip",
           "ema_decay": "ema_decay"}


def describe(c, *, step, tokenizer, max_new_tokens: int,
             max_positions: int | None) -> PreferenceSpec | None:
  """`PreferenceSpec` of ``config.preference`` (None when ``objective`` is
  empty: f-DPG). Reads and checks the data files (cheap: they are small).

  Args:
    c: the run config.
    step: the run's f-DPG `StepConfig` (its divergence, EMA and clip).
    tokenizer: the run's tokenizer.
    max_new_tokens: N, the responses' token budget.
    max_positions: the model's position limit (None: none).

  Raises:
    ConfigError: ``config.preference.<field>: ...``; a data error names the
      file and line (``config.preference.train_file: pairs.jsonl:17: ...``).
  """
  section = c.get("preference")
  if section is None or not section.get("objective"):
    return None
  from fdiv_jax.train import preference_step  # pylint: disable=g-import-not-at-top
  try:
    config = preference_step.PreferenceConfig(
        objective=section.objective, divergence=step.divergence,
        beta=section.beta, reward_temperature=section.reward_temperature,
        log_ratio_clip=step.log_ratio_clip, ema_decay=step.ema_decay)
  except (ValueError, TypeError) as e:
    name, _, rest = str(e).partition(": ")
    raise _config_error(_FIELDS.get(name, "preference.objective"),
                        rest if name in _FIELDS else str(e)) from e
  if step.mode != "online":
    raise _config_error("mode", f"{step.mode!r} is f-DPG's (a proposal updated "
                        "during sampling); offline preference training samples "
                        "nothing: leave mode 'online'.")
  data = {}
  for field in ("train_file", "eval_file"):
    path = section.get(field, "")
    if not isinstance(path, str):
      raise _config_error(f"preference.{field}", f"must be a path, got {path!r}.")
    if not path:
      if field == "train_file":
        raise _config_error("preference.train_file", f"objective "
                            f"{config.objective!r} needs a {config.data_format} "
                            "file (JSONL; fdiv_jax/run/preference_data.py).")
      data[field] = None
      continue
    try:
      data[field] = read(path, config.data_format)
    except ValueError as e:
      raise _config_error(f"preference.{field}", str(e)) from e
  for field, found in data.items():
    if found is None:
      continue
    longest, longest_line = 0, 0
    for number, texts in enumerate(_texts(found), start=1):
      for i, text in enumerate(texts):
        try:
          ids = tokenizer.encode(text)
        except ValueError as e:
          raise _config_error(f"preference.{field}", f"{found.path}:{number}: the "
                              f"tokenizer cannot encode {text!r:.60}: {e}") from e
        if i == 0 and 1 + len(ids) > longest:  # the prompt, BOS included
          longest, longest_line = 1 + len(ids), number
    # Responses are cut at max_new_tokens (as the sampler cuts its samples);
    # a prompt is never cut: one too long for the model is an error.
    if max_positions is not None and longest + max_new_tokens > max_positions:
      raise _config_error(
          f"preference.{field}", f"{found.path}:{longest_line}: the prompt has "
          f"{longest} tokens (BOS included); with max_new_tokens {max_new_tokens} "
          f"that exceeds the model's {max_positions} positions; shorten the "
          f"prompt or lower max_new_tokens.")
  return PreferenceSpec(config, data["train_file"], data["eval_file"],
                        file_digest(section.train_file))
