r"""The reward-model command: a Bradley–Terry reward model from preference pairs.

  python -m fdiv_jax.reward --config=configs/preference_pairs.py --workdir=DIR \
      [--config.reward_model.num_steps=600 ...]

`run(config, workdir)` trains `targets.reward_model.RewardModel` (a scalar head
on the last hidden state of a GPT-2 backbone) on the pairs of
``config.preference.train_file`` with the Bradley–Terry loss
−log σ(r(y_w) − r(y_l)), and reports its accuracy on the held-out pairs of
``config.preference.eval_file``. The backbone starts from the run's base model
(``reward_model.init = "base"``: ``model.*``, the shipped byte-level GPT-2 by
default) or from a random GPT-2 of ``reward_model.n_layer/n_head/n_embd``
(``"random"``). Every response is scored as the learned reward scores it later
(`features.reward_model_rows`): ``[BOS] + prompt + response``, the response
``(encode(text) + [EOS])[:max_new_tokens]``.

The workdir receives:
  config.json, metrics.jsonl, tensorboard/   as the main job's (train/* every
                     `log_every` steps, heldout/* every `reward_model.eval_every`)
  checkpoints/       Orbax checkpoints of the whole training state (parameters,
                     AdamW moments, step) every `reward_model.checkpoint_every`
                     steps: the same command resumes exactly, SIGINT / SIGTERM
                     save the last step (exit 130 / 143)
  model/             the trained reward model, what
                     ``target.reward = "learned_reward:path=DIR/model"`` reads:
                     reward_model.json (format, backbone config, tokenizer ids,
                     max_new_tokens, training info and held-out accuracy) and
                     params.msgpack (`save_reward_model`)
  summary.json       held-out loss, accuracy (± binomial standard error), the
                     mean margin r(y_w) − r(y_l), the spread of the rewards (for
                     choosing β of P = a·exp(r/β)), and the config

`GroundTruthTarget` (a ground-truth rule reported as a run's ``alignment``,
``config.ground_truth``) lives in `targets.ground_truth`; re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from fdiv_jax.core import _values
from fdiv_jax.run import preference_data, tasks
from fdiv_jax.run.config import ConfigError
from fdiv_jax.targets import features as features_lib
from fdiv_jax.targets.ground_truth import GroundTruthTarget  # noqa: F401

INITS = ("base", "random")
MODEL_DIR = "model"


# ----------------------------------------------------------------------------
# The reward model's settings and files.


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """``config.reward_model`` (checked when constructed)."""
  init: str = "base"
  n_layer: int = 2
  n_head: int = 2
  n_embd: int = 64
  num_steps: int = 600
  batch_size: int = 32
  learning_rate: float = 1e-4
  eval_every: int = 100
  checkpoint_every: int = 100

  def __post_init__(self):
    _values.choice("init", self.init, INITS)
    for name in ("n_layer", "n_head", "n_embd", "num_steps", "batch_size",
                 "eval_every", "checkpoint_every"):
      _values.integer(name, getattr(self, name), minimum=1)
    _values.real("learning_rate", self.learning_rate, low=0.0, low_open=True)
    if self.init == "random" and self.n_embd % self.n_head:
      raise ValueError(f"n_head: must divide n_embd={self.n_embd}, got "
                       f"{self.n_head}.")


@dataclasses.dataclass(frozen=True, eq=False)
class RewardSpec:
  """Everything the reward command needs (built by `describe`)."""
  run: Any                                # tasks.RunSpec
  config: RewardModelConfig
  train: preference_data.PairData
  heldout: preference_data.PairData | None
  train_digest: str


def describe(config) -> RewardSpec:
  """The reward command's typed description; raises `ConfigError` (nothing
  is written): ``config.reward_model.<field>: ...``, or a data error naming
  the file and line."""
  spec = tasks.describe(config)
  section = config.get("reward_model")
  fields = {f.name: f"reward_model.{f.name}" for f in dataclasses.fields(
      RewardModelConfig)}
  try:
    rm = RewardModelConfig(**(section.to_dict() if section else {}))
  except TypeError as e:
    raise ConfigError(f"config.reward_model: {e}") from e
  except ValueError as e:
    name, _, rest = str(e).partition(": ")
    raise ConfigError(f"config.{fields.get(name, 'reward_model')}: {rest}") from e
  if spec.model.kind not in ("pretrained", "gpt2"):
    raise ConfigError(f"config.model.kind: the reward model's backbone is a "
                      f"GPT-2 (model.kind 'pretrained' or 'gpt2'), got "
                      f"{spec.model.kind!r}.")
  if rm.batch_size % max(1, _num_devices(spec)):
    raise ConfigError(f"config.reward_model.batch_size: {rm.batch_size} must divide "
                      f"evenly over the mesh's {_num_devices(spec)} devices.")
  pref = config.get("preference") or {}
  data = {}
  for field in ("train_file", "eval_file"):
    path = pref.get(field, "")
    if not path:
      if field == "train_file":
        raise ConfigError("config.preference.train_file: the reward model trains on "
                          "preference pairs (JSONL); name the file.")
      data[field] = None
      continue
    try:
      data[field] = preference_data.read_pairs(path)
    except ValueError as e:
      raise ConfigError(f"config.preference.{field}: {e}") from e
    longest = preference_data.longest_prompt(data[field], spec.tokenizer)
    limit = (spec.model.max_positions if rm.init == "base" else None)
    if limit is not None and longest + spec.sampler.max_new_tokens > limit:
      raise ConfigError(f"config.preference.{field}: its longest prompt ({longest} "
                        f"tokens) + max_new_tokens exceeds the backbone's {limit} "
                        "positions.")
  return RewardSpec(spec, rm, data["train_file"], data["eval_file"],
                    preference_data.file_digest(pref.get("train_file")))


def _num_devices(spec) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from fdiv_jax.train import sharding  # pylint: disable=g-import-not-at-top
  data, fsdp = sharding.mesh_shape(spec.loop.mesh_data, spec.loop.mesh_fsdp,
                                   jax.device_count())
  return data * fsdp


def save_reward_model(path: str, backbone_config, params, tokenizer, *,
                      max_new_tokens: int, info: dict[str, Any] | None = None) -> str:
  """Writes a reward model directory that `features.learned_reward` reads:
  ``reward_model.json`` and ``params.msgpack`` (the RewardModel's parameters,
  ``{"backbone": ..., "head": ...}``). Returns ``path``."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = {}
  for field in dataclasses.fields(backbone_config):
    value = getattr(backbone_config, field.name)
    config[field.name] = (jnp.dtype(value).name if field.name in
                          ("dtype", "param_dtype") else value)
  meta = {"format": features_lib.REWARD_MODEL_FORMAT, "backbone": "GPT2LM",
          "backbone_config": config,
          "tokenizer": {"name": type(tokenizer).__name__, "bos_id": tokenizer.bos_id,
                        "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                        "vocab_size": tokenizer.vocab_size},
          "max_new_tokens": int(max_new_tokens), "info": info or {}}
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, features_lib.REWARD_MODEL_PARAMS + ".tmp")
  with open(tmp, "wb") as f:
    f.write(flax.serialization.to_bytes(jax.device_get(params)))
  os.replace(tmp, os.path.join(path, features_lib.REWARD_MODEL_PARAMS))
  with open(os.path.join(path, features_lib.REWARD_MODEL_CONFIG), "w",
            encoding="utf-8") as f:
    json.dump(meta, f, indent=2, default=float)
    f.write("\n")
  return path


def encode_pairs(data: preference_data.PairData, tokenizer,
                 max_new_tokens: int) -> dict[str, np.ndarray]:
  """The rows the reward model scores (`features.reward_model_rows`):
  ``chosen_tokens``/``chosen_mask``/``rejected_tokens``/``rejected_mask``
  ``[n, P + N]``, ``[BOS] + prompt + response`` right-packed."""
  x = preference_data.encode_pairs(data, tokenizer, max_new_tokens)
  context = {"prompts": x["prompts"], "prompt_lengths": x["prompt_lengths"]}
  out = {}
  for side in ("chosen", "rejected"):
    rows, mask = features_lib.reward_model_rows(
        x[f"{side}_tokens"], x[f"{side}_mask"], context, tokenizer.bos_id)
    out[f"{side}_tokens"] = np.asarray(rows, np.int32)
    out[f"{side}_mask"] = np.asarray(mask, bool)
  return out


# ----------------------------------------------------------------------------
# Training.


def _backbone(spec: RewardSpec, width: int):
  """(GPT2Config, initial backbone params or None for random)."""
  from fdiv_jax.lm import models  # pylint: disable=g-import-not-at-top
  run_spec, rm = spec.run, spec.config
  if rm.init == "base":
    model, params = run_spec.model.load(run_spec.loop.seed)
    return model.config, params
  config = models.GPT2Config(vocab_size=run_spec.tokenizer.vocab_size,
                             n_positions=width, n_layer=rm.n_layer,
                             n_head=rm.n_head, n_embd=rm.n_embd)
  return config, None


def heldout_figures(r_chosen: np.ndarray, r_rejected: np.ndarray) -> dict[str, float]:
  """Held-out Bradley–Terry figures from the rewards of the pairs: the
  accuracy counts a tie r(y_w) = r(y_l) as ½ (the untrained model, whose head
  starts at 0, ties every pair: chance, not 0), ``ties`` is their fraction."""
  margin = r_chosen - r_rejected
  n = len(margin)
  acc = float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))))
  both = np.concatenate([r_chosen, r_rejected])
  return {"loss": float(np.mean(np.logaddexp(0.0, -margin))),
          "accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n),
          "margin": float(np.mean(margin)),
          "margin_se": float(np.std(margin) / math.sqrt(n)),
          "reward_chosen": float(np.mean(r_chosen)),
          "reward_rejected": float(np.mean(r_rejected)),
          "reward_std": float(np.std(both)), "ties": float(np.mean(margin == 0)),
          "num_pairs": float(n)}


def run(config, workdir: str) -> dict[str, Any]:
  """Trains the reward model per ``config`` in ``workdir`` (module docstring);
  returns the summary.

  Raises:
    ConfigError: a bad config value or data row (nothing written yet).
    train.CheckpointError: a checkpoint that cannot be restored or saved.
  """
  spec = describe(config)
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from flax.training import train_state
  from fdiv_jax.lm import models
  from fdiv_jax.run import experiment, plots, preference, reporting
  from fdiv_jax.targets import reward_model as rm_lib
  from fdiv_jax.train import checkpoint as checkpoint_lib
  from fdiv_jax.train import loop as loop_lib
  from fdiv_jax.train import optimizer as optimizer_lib
  from fdiv_jax.train import sharding
  # pylint: enable=g-import-not-at-top
  experiment.enable_compilation_cache()
  run_spec, rm = spec.run, spec.config
  tokenizer = run_spec.tokenizer
  max_new = run_spec.sampler.max_new_tokens
  train_rows = encode_pairs(spec.train, tokenizer, max_new)
  heldout_rows = (None if spec.heldout is None
                  else encode_pairs(spec.heldout, tokenizer, max_new))
  width = max(train_rows["chosen_tokens"].shape[1],
              heldout_rows["chosen_tokens"].shape[1] if heldout_rows else 0)
  backbone_config, backbone_params = _backbone(spec, width)
  model = rm_lib.RewardModel(models.GPT2LM(backbone_config))
  init_rng = jax.random.fold_in(jax.random.PRNGKey(run_spec.loop.seed), 5)
  params = rm_lib.init_params(init_rng, model,
                              jnp.asarray(train_rows["chosen_tokens"][:1]),
                              jnp.asarray(train_rows["chosen_mask"][:1]),
                              backbone_params)
  # Constant after a fixed warm-up: the learning rate of a step does not
  # depend on num_steps, so a run extended with a larger num_steps resumes
  # exactly where the shorter one stopped.
  tx = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(
      learning_rate=rm.learning_rate, num_steps=rm.num_steps,
      lr_schedule="constant", warmup_steps=10, max_grad_norm=1.0))

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(run_spec.config_json)
  mesh = sharding.make_mesh(run_spec.loop.mesh_data, run_spec.loop.mesh_fsdp)
  state = sharding.shard_state(train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx), mesh)
  leaves = jax.tree.leaves(state.params)
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=rm.checkpoint_every,
      keep=run_spec.loop.keep_checkpoints,
      identity={"reward_model": rm.init, "data": spec.train_digest,
                "params": f"{sum(int(x.size) for x in leaves):,} values in "
                          f"{len(leaves)} arrays"})

  def train_step(state, batch):
    grads, metrics = jax.grad(lambda p: rm_lib.loss_fn(model, p, batch),
                              has_aux=True)(state.params)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g ** 2) for g in
                                        jax.tree.leaves(grads)))
    return state.apply_gradients(grads=grads), metrics

  def rewards(params, tokens, mask):
    return model.apply({"params": params}, tokens, mask)

  writer = reporting.MetricWriter(workdir)
  bar = preference._progress_bar(total=rm.num_steps, samples_per_step=rm.batch_size)  # pylint: disable=protected-access

  def evaluate(at, state) -> dict[str, float]:
    if heldout_rows is None:
      return {}
    out = {"chosen": [], "rejected": []}
    n = len(spec.heldout)
    for idx, weights in preference_data.chunks(n, rm.batch_size * max(
        1, 64 // rm.batch_size)):
      for side in out:
        batch = sharding.shard_batch((heldout_rows[f"{side}_tokens"][idx],
                                      heldout_rows[f"{side}_mask"][idx]), mesh)
        values = np.asarray(jax.device_get(score(state.params, *batch)))
        out[side].append(values[weights > 0])
    figures = heldout_figures(np.concatenate(out["chosen"]),
                              np.concatenate(out["rejected"]))
    writer.write(at, {f"heldout/{k}": v for k, v in figures.items()})
    bar.write(preference.heldout_line(at, figures))
    return figures

  t0 = time.time()
  try:
    resumed = checkpointer.latest_step()
    if resumed is not None:
      state = checkpointer.restore(checkpoint_lib.abstract_like(state))
      writer.truncate_after(resumed)
      bar.write(f"Resuming from the checkpoint at step {resumed} in {workdir}.")
    elif checkpointer.has_foreign_content():
      raise checkpoint_lib.CheckpointError(
          f"{checkpointer.directory} holds files that are not Orbax checkpoints; "
          "refusing to start fresh over them. Move them away or pick a new --workdir.")
    start = int(jax.device_get(state.step))
    bar.update(start)
    step_fn = sharding.jit_train_step(train_step, state, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    score = jax.jit(rewards, in_shardings=(
        sharding.state_shardings(state.params, mesh), sharding.batch_sharding(mesh),
        sharding.batch_sharding(mesh)), out_shardings=replicated)
    figures = evaluate(0, state) if start == 0 else {}
    current, preempted = start, False
    with checkpoint_lib.PreemptionGuard() as guard:
      while current < rm.num_steps:
        idx = preference_data.batch_indices(len(spec.train), rm.batch_size, current,
                                            run_spec.loop.seed)
        batch = sharding.shard_batch({k: v[idx] for k, v in train_rows.items()}, mesh)
        state, metrics = step_fn(state, batch)
        current += 1
        if current % run_spec.loop.log_every == 0 or current == rm.num_steps:
          host = loop_lib.to_host(metrics)
          writer.write(current, {f"train/{k}": v for k, v in host.items()})
          bar.update(current, host)
        else:
          bar.update(current)
        if current % rm.eval_every == 0 or current == rm.num_steps:
          figures = evaluate(current, state)
        checkpointer.save(current, state)
        if guard.requested:
          preempted = True
          break
      if not figures and not preempted:
        figures = evaluate(current, state)
      checkpointer.save(current, state, force=True)
    checkpointer.close()
  except BaseException:
    try:
      checkpointer.close()
    except Exception:  # noqa: BLE001 - the first error is the one to report
      pass
    bar.close()
    writer.close()
    raise
  bar.close()
  writer.close()
  if preempted:
    print(f"\nStopped by {guard.signal_name} at step {current}; the checkpoint is "
          f"saved. Run the same command again to resume.", file=sys.stderr)
    return {"preempted": True, "step": current, "signal": guard.signal_name}
  plots.plot_metrics(writer.path, os.path.join(workdir, "plots"))
  preference.plot_heldout(writer.path, os.path.join(workdir, "plots", "preference.png"))
  info = {"train_file": os.path.abspath(spec.train.path), "train_pairs": len(spec.train),
          "train_digest": spec.train_digest, "steps": current, "init": rm.init,
          "heldout_file": (os.path.abspath(spec.heldout.path) if spec.heldout else ""),
          **{f"heldout_{k}": v for k, v in figures.items()}}
  model_dir = save_reward_model(os.path.join(workdir, MODEL_DIR), backbone_config,
                                state.params, tokenizer, max_new_tokens=max_new,
                                info=info)
  summary = {**{f"heldout/{k}": v for k, v in figures.items()}, "step": current,
             "wall_seconds": time.time() - t0, "model": model_dir,
             "config": json.loads(run_spec.config_json)}
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, allow_nan=True)
  shown = reporting.with_errors(figures, ("accuracy", "loss", "margin",
                                          "reward_chosen", "reward_rejected",
                                          "reward_std"))
  print(f"\nReward model ({rm.init} backbone) trained {current} steps in "
        f"{summary['wall_seconds']:.0f} s on {len(spec.train)} pairs.\n"
        + reporting.summary_table({"held out": shown} if shown else {"": {}})
        + f"\n\nWrote {model_dir}: use it as "
        f"--config.target.reward=learned_reward:path={model_dir}")
  return summary
