"""A tiny enumerable f-DPG task shared by the training tests (not a test file).

Vocabulary {0 = EOS/BOS/pad, 1, 2, 3}, at most 3 new tokens: 40 possible
continuations, so every divergence of the policy to the target is exact.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax import targets
from fdiv_jax.core import baselines, divergences
from fdiv_jax.lm import enumeration, models, sampling
from fdiv_jax.targets import features
from fdiv_jax.train import loop as loop_lib
from fdiv_jax.train import optimizer as optimizer_lib
from fdiv_jax.train import state as state_lib
from fdiv_jax.train import step as step_lib

VOCAB, NEW_TOKENS, EOS = 4, 3, 0
_SAMPLER_FIELDS = ("temperature", "top_k", "top_p")
_BASELINE_FIELDS = {"baseline": "kind", "baseline_window": "window",
                    "baseline_decay": "decay"}


@dataclasses.dataclass(frozen=True)
class ToySettings:
  """The typed objects of a toy run (what the run layer builds from a config)."""
  loop: loop_lib.LoopConfig
  step: step_lib.StepConfig
  optimizer: optimizer_lib.OptimizerConfig
  sampler: sampling.SamplerConfig

  @property
  def batch_size(self) -> int:
    return self.loop.batch_size


def toy_config(**overrides: Any) -> ToySettings:
  """Toy defaults; each override goes to the object that owns its field."""
  values = dict(num_steps=200, batch_size=64, learning_rate=3e-3, warmup_steps=0,
                log_every=1, eval_every=1000, eval_batch_size=64,
                checkpoint_every=1000, divergence="js")
  values.update(overrides)
  if "alpha" in values:
    values["divergence"] = divergences.get(values.pop("divergence"),
                                           alpha=values.pop("alpha"))
  pick = lambda cls: {f.name: values[f.name] for f in dataclasses.fields(cls)
                      if f.name in values}
  baseline = baselines.Baseline(**{v: values[k] for k, v in _BASELINE_FIELDS.items()
                                   if k in values})
  used = ({f.name for c in (loop_lib.LoopConfig, step_lib.StepConfig,
                            optimizer_lib.OptimizerConfig)
           for f in dataclasses.fields(c)} | set(_SAMPLER_FIELDS)
          | set(_BASELINE_FIELDS))
  unknown = set(values) - used
  assert not unknown, f"toy_config: unknown fields {sorted(unknown)}"
  step_values = pick(step_lib.StepConfig)
  step_values["baseline"] = baseline
  return ToySettings(
      loop=loop_lib.LoopConfig(**pick(loop_lib.LoopConfig)),
      step=step_lib.StepConfig(**step_values),
      optimizer=optimizer_lib.OptimizerConfig(**pick(optimizer_lib.OptimizerConfig)),
      sampler=sampling.SamplerConfig(
          max_new_tokens=NEW_TOKENS, eos_id=EOS, pad_id=EOS,
          **{k: values[k] for k in _SAMPLER_FIELDS if k in values}))


def toy_target(kind="reward"):
  has_one = features.contains_tokens(1, name="has_1")
  if kind == "reward":  # P = a·exp(3·b): full support, every divergence finite
    return targets.RewardTarget(has_one, beta=1 / 3)
  return targets.PointwiseTarget((has_one,))


def create_state(settings: ToySettings, task, **kwargs):
  """The step-0 FDPGState of `task` under `settings` (host arrays)."""
  return state_lib.create_state(task.model, task.params, step_config=settings.step,
                                optimizer=settings.optimizer,
                                base_params=task.base_params,
                                seed=settings.loop.seed, **kwargs)


@dataclasses.dataclass
class ToyTask:
  config: ToySettings
  target: object
  seed: int = 1

  def __post_init__(self):
    self.model = models.GPT2LM(models.GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_layer=1, n_head=2, n_embd=16))
    self.params = self.model.init(jax.random.PRNGKey(self.seed),
                                  jnp.zeros((1, 4), jnp.int32))["params"]
    self.base_params = self.params
    self.sampler = self.config.sampler
    self.num_contexts = 1
    self.support = enumeration.all_continuations(VOCAB, NEW_TOKENS, EOS)
    self.prompt = np.array([EOS])

  def batch(self, step, batch_size):
    del step
    return state_lib.Batch(jnp.zeros((batch_size, 1), jnp.int32),
                           jnp.ones((batch_size,), jnp.int32),
                           jnp.zeros((batch_size,), jnp.int32))

  def exact(self, params):
    return enumeration.exact_metrics(self.model, params, self.base_params, self.target,
                                     self.prompt, self.support)
