"""A tiny enumerable f-DPG task shared by the training tests (not a test file).

Vocabulary {0 = EOS/BOS/pad, 1, 2, 3}, at most 3 new tokens: 40 possible
continuations, so every divergence of the policy to the target is exact.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.run import config as config_lib
from fdiv_jax.lm import enumeration, models
from fdiv_jax.targets import features
from fdiv_jax import targets
from fdiv_jax.train import state as state_lib
from fdiv_jax.train import step as step_lib

VOCAB, NEW_TOKENS, EOS = 4, 3, 0


def toy_config(**overrides):
  c = config_lib.base_config()
  c.batch_size = 64
  c.max_new_tokens = NEW_TOKENS
  c.learning_rate = 3e-3
  c.warmup_steps = 0
  c.log_every = 1
  c.eval_every = 1000
  c.eval_batch_size = 64
  c.checkpoint_every = 1000
  for key, value in overrides.items():
    c[key] = value
  return c


def toy_target(kind="reward"):
  has_one = features.contains_tokens(1, name="has_1")
  if kind == "reward":  # P = a·exp(3·b): full support, every divergence finite
    return targets.RewardTarget(has_one, beta=1 / 3)
  return targets.PointwiseTarget((has_one,))


@dataclasses.dataclass
class ToyTask:
  config: object
  target: object
  seed: int = 1

  def __post_init__(self):
    self.model = models.GPT2LM(models.GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_layer=1, n_head=2, n_embd=16))
    self.params = self.model.init(jax.random.PRNGKey(self.seed),
                                  jnp.zeros((1, 4), jnp.int32))["params"]
    self.base_params = self.params
    self.sampler = step_lib.sampler_from_config(self.config, eos_id=EOS, pad_id=EOS)
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
