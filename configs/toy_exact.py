r"""An enumerable toy task with exact metrics (tests and sanity checks).

Task. A tiny randomly initialised GPT-2 over the toy vocabulary {0 = BOS/EOS/
pad, 1 = "a", 2 = "b", 3 = "c"} generates at most 3 tokens: 40 possible
continuations, so Z, every divergence D_f(π‖p), KL(π‖a) and the alignment
have exact values by enumeration (`config.exact_metrics = True` puts the
support on the task: `Task.support`,
`Task.exact(params)` → `enumeration.ExactMetrics`). The target is the reward
EBM p(x) ∝ a(x)·exp(b(x)/β) with b(x) = 1 iff x contains token 1 and
β = 1/3 (full support, so every divergence is finite); for the pointwise
version use --config.target.kind=pointwise
--config.target.features="('contains_tokens:token_ids=1',)"
--config.target.reward="". f-DPG with `divergence = "js"`.

Run (seconds on CPU):

  python -m fdiv_jax.main --config=configs/toy_exact.py --workdir=/tmp/toy

It is a correctness check, not a scale test; on a GPU/TPU only the batch
grows: --config.batch_size=4096 --config.eval_batch_size=4096.

One GPU, several hosts: exact metrics need an enumerable space, i.e. this
tiny random GPT-2, so there is no Qwen2.5-0.5B / Llama-3.2-1B recipe for this
task: the recipes for real models (LoRA rank, batch, lengths, mesh, several
hosts) are in the other configs, e.g. configs/quickstart.py. What the toy
does check at any scale is the machinery: LoRA's policy against its exact
divergences (--config.lora.rank=2, adapters on the fused c_attn), and the
mesh (--config.mesh_fsdp=N on N devices gives the 1-device result):

  python -m fdiv_jax.main --config=configs/toy_exact.py --workdir=/tmp/toy_lora \
    --config.lora.rank=2 --config.lora.alpha=4 --config.learning_rate=3e-2

(100 steps here: exact JS 0.172 → 0.123, training 128 adapter parameters
of the model's 3,504.)
"""

import ml_collections

from fdiv_jax.run import config as config_lib


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The toy config; ``size`` "tiny" shrinks the run (the model is tiny)."""
  c = config_lib.base_config()
  c.seed = 0
  c.divergence = "js"
  c.num_steps = 200
  c.batch_size = 64
  c.max_new_tokens = 3
  c.learning_rate = 3e-3
  c.warmup_steps = 0
  c.checkpoint_every = 100
  c.eval_every = 50
  c.eval_batch_size = 512           # 256 of π and 256 of a: ESS well above 50
  c.log_every = 10
  c.model.kind = "gpt2"
  c.model.vocab_size = 4
  c.model.n_positions = 8
  c.model.n_layer = 1
  c.model.n_head = 2
  c.model.n_embd = 16
  c.tokenizer = "toy"
  c.exact_metrics = True
  c.target.kind = "reward"
  c.target.reward = "contains_tokens:token_ids=1"
  c.target.beta = 1 / 3
  return config_lib.sized(c, size)
