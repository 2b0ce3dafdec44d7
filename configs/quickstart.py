r"""Quickstart: the CPU demo of f-DPG (a few minutes on 2 CPU cores).

Task. The base model a(x) is the shipped byte-level GPT-2 trained on fortune
cookies (`fdiv_jax/data/pretrained`). The preference is a pointwise (hard)
constraint, GDC-style: every sample must contain one of the words "love",
"life", "man", "time", "money", "work", "never", "people", "world", "good",
"you", "your", "know", "think" or "day" (whole words, any case; a host-side
`word_list` feature; base rate 38% of 48-byte samples). With this small model
JS levels off at 75-80% of samples after ~150 steps (reverse KL goes further,
at several times the KL from the base model).
The target is p(x) ∝ a(x)·b(x); the policy π starts from a and is trained by
f-DPG with the Jensen–Shannon divergence (`divergence = "js"`; try
"forward_kl" = DPG, "reverse_kl" = RL with a KL penalty, "tv", ...).

Run:

  python -m fdiv_jax.main --config=configs/quickstart.py --workdir=/tmp/quick
  python -m fdiv_jax.main --config=configs/quickstart.py:tiny ...   # tests

A GPU/TPU run with an imported GPT-2 (local Hugging Face directory with
config.json, model.safetensors and tokenizer.json); note the leading spaces of
GPT-2 words do not matter here, since `word_list` matches decoded text:

  python -m fdiv_jax.main --config=configs/quickstart.py --workdir=/tmp/q \
    --config.model.kind=hf --config.model.path=/path/to/gpt2 \
    --config.tokenizer=hf --config.batch_size=256 --config.max_new_tokens=64 \
    --config.num_steps=2000 --config.learning_rate=1.41e-5 \
    --config.eval_batch_size=1024 --config.checkpoint_every=250
"""

import ml_collections

from fdiv_jax.run import config as config_lib


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The quickstart config; ``size`` "tiny" shrinks it for tests."""
  c = config_lib.base_config()
  c.seed = 0
  c.divergence = "js"
  c.num_steps = 400
  c.batch_size = 64
  c.max_new_tokens = 48
  c.learning_rate = 3e-4
  c.lr_schedule = "cosine"
  c.warmup_steps = 10
  c.ema_decay = 0.95              # evaluate the Polyak average of the policy
  c.checkpoint_every = 100
  c.eval_every = 50
  c.eval_batch_size = 256
  c.log_every = 10
  c.model.kind = "pretrained"     # the shipped demo model
  c.model.path = ""
  c.tokenizer = "byte"
  # Base rate 38% of 48-byte samples (each word alone is 1-3%, "you" 16%).
  c.target.kind = "pointwise"
  c.target.features = (
      "word_list:words=love|life|man|time|money|work|never|people|world|good|"
      "you|your|know|think|day",)
  return config_lib.sized(c, size)
