r"""Distributional constraint: half of the generated biographies about women.

Task (GDC distributional; Khalifa et al., ICLR 2021). The feature φ(x) = 1
iff the text uses more female than male pronouns (`female`); the constraint
is E_p[φ] = 0.5. The target is p(x|c) ∝ a(x|c)·exp(λ·φ(x)), with λ fitted
before training on `target.fit_samples` samples of the base model
(`tasks.Task.lambda_fit` reports λ, the reached moment and the effective
sample size). Biography-style prompts "<name> is a" with gender-neutral names
make the task conditional (CDPG: one Z_c per prompt); λ is shared and fitted
on the samples of all prompts pooled. f-DPG with `divergence = "js"`.

Run on CPU with the shipped demo model (trained on fortune cookies, so
pronouns are rarer than in biographies; fitting needs samples that use them):

  python -m fdiv_jax.main --config=configs/distributional_balance.py \
    --workdir=/tmp/balance

A GPU/TPU run with an imported GPT-2:

  python -m fdiv_jax.main --config=configs/distributional_balance.py \
    --workdir=/tmp/balance \
    --config.model.kind=hf --config.model.path=/path/to/gpt2 \
    --config.tokenizer=hf --config.batch_size=256 --config.max_new_tokens=64 \
    --config.num_steps=2000 --config.learning_rate=1.41e-5 \
    --config.eval_batch_size=1024 --config.target.fit_samples=16384
"""

import ml_collections

from fdiv_jax.run import config as config_lib


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The gender-balance config; ``size`` "tiny" shrinks it for tests."""
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
  c.prompts = ("Alex is a", "Sam is a", "Robin is a", "Jordan is a",
               "Taylor is a", "Morgan is a", "Casey is a", "Jamie is a")
  c.target.kind = "distributional"
  c.target.features = ("female",)
  c.target.moments = (0.5,)
  c.target.fit_samples = 4096
  c = config_lib.sized(c, size)
  if size == "tiny":
    # 64 samples of 8 bytes rarely contain a pronoun, so λ could not be fitted:
    # the tiny run uses a fixed λ (tests/test_tasks.py covers the fit).
    c.target.lambdas = (2.0,)
  return c
