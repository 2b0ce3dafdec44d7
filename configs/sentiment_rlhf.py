r"""RLHF as distribution matching: positive sentiment with a KL anchor.

Task (Korbak et al., NeurIPS 2022). The reward r(x) is the VADER compound
sentiment of the decoded text, in [-1, 1] (`sentiment`, an offline lexicon
scorer). The target is p(x) ∝ a(x)·exp(r(x)/β), the optimum of
E_π[r] − β·KL(π‖a); smaller β = stronger preference. `divergence =
"reverse_kl"` is exactly KL-regularised RL; the default here is "js".

Run on CPU with the shipped demo model:

  python -m fdiv_jax.main --config=configs/sentiment_rlhf.py --workdir=/tmp/rl

A GPU/TPU run with an imported GPT-2 (add movie-review style prompts with
--config.prompts="('This movie was', 'I think the film')" for the conditional
version):

  python -m fdiv_jax.main --config=configs/sentiment_rlhf.py --workdir=/tmp/rl \
    --config.model.kind=hf --config.model.path=/path/to/gpt2 \
    --config.tokenizer=hf --config.batch_size=256 --config.max_new_tokens=64 \
    --config.num_steps=2000 --config.learning_rate=1.41e-5 \
    --config.eval_batch_size=1024
"""

import ml_collections

from fdiv_jax.run import config as config_lib


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The sentiment RLHF config; ``size`` "tiny" shrinks it for tests."""
  c = config_lib.base_config()
  c.seed = 0
  c.divergence = "js"
  c.num_steps = 1000
  c.batch_size = 64
  c.max_new_tokens = 48
  c.learning_rate = 1e-4
  c.checkpoint_every = 200
  c.eval_every = 100
  c.eval_batch_size = 256
  c.model.kind = "pretrained"
  c.tokenizer = "byte"
  c.target.kind = "reward"
  c.target.reward = "sentiment"
  c.target.beta = 0.2              # energy r/β in [-5, 5]
  return config_lib.sized(c, size)
