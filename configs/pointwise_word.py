r"""Pointwise word constraint (GDC pointwise; Khalifa et al., ICLR 2021).

Task. Unconditional generation from the base model a(x) under the hard
constraint "the sample contains one of the words" (a `word_list` feature on
the decoded text): p(x) ∝ a(x)·b(x). Rarer words make a harder task (lower
base rate E_a[b] = Z, higher-variance importance weights). f-DPG with
`divergence = "js"` by default; compare "forward_kl" (DPG/GDC) and
"reverse_kl" (KL-regularised RL).

Change the words with e.g.
  --config.target.features="('word_list:words=money|work',)"
and stack constraints (all must hold) by listing several features.

Run on CPU with the shipped demo model:

  python -m fdiv_jax.main --config=configs/pointwise_word.py --workdir=/tmp/pw

A GPU/TPU run with an imported GPT-2 (GDC used single words such as
"amazing", base rate ~1e-3, so it needs large batches):

  python -m fdiv_jax.main --config=configs/pointwise_word.py --workdir=/tmp/pw \
    --config.model.kind=hf --config.model.path=/path/to/gpt2 \
    --config.tokenizer=hf --config.batch_size=256 --config.max_new_tokens=64 \
    --config.num_steps=4000 --config.learning_rate=1.41e-5 \
    --config.eval_batch_size=1024 --config.mode=offline \
    --config.target.features="('word_list:words=amazing',)"
"""

import ml_collections

from fdiv_jax.run import config as config_lib


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The pointwise word-list config; ``size`` "tiny" shrinks it for tests."""
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
  c.target.kind = "pointwise"
  # Rarer than the quickstart's list: the base model's samples contain "money"
  # or "work" 2.3% of the time (± 0.24%, 4,096 samples of 48 bytes).
  c.target.features = ("word_list:words=money|work",)
  return config_lib.sized(c, size)
