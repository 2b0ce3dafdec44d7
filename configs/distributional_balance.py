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

One GPU (24 GB or more), Qwen2.5-0.5B in bfloat16 with LoRA rank 16 on its
seven projections (recipe sized by arithmetic, not measured here; README,
"Llama, Mistral, Qwen"): the default mesh (one device); the frozen base
takes 1 GB, the adapters with their Adam moments 0.1 GB, a batch's KV cache
0.4 GB; λ is fitted on 16,384 samples of the base before training.
With an instruct checkpoint (Qwen2.5-0.5B-Instruct, Llama-3.2-1B-Instruct) add
--config.chat_template=True: each prompt becomes a user turn of its chat template.

  python -m fdiv_jax.main --config=configs/distributional_balance.py --workdir=/tmp/balance_qwen \
    --config.model.kind=hf --config.model.path=/path/to/Qwen2.5-0.5B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.param_dtype=bfloat16 --config.model.remat=True \
    --config.reuse_sampler_log_probs=False \
    --config.lora.rank=16 --config.lora.alpha=32 \
    --config.lora.targets="('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj')" \
    --config.batch_size=256 --config.max_new_tokens=64 \
    --config.eval_batch_size=1024 --config.learning_rate=1e-4 \
    --config.num_steps=1000 --config.target.fit_samples=16384 \
    --config.export_hf=True

Several hosts with 8 GPUs each: the same command on every host, with
JAX_COORDINATOR_ADDRESS=<host 0>:<port>, JAX_NUM_PROCESSES=<hosts> and
JAX_PROCESS_ID=<0, 1, ...> (SLURM, Open MPI and Cloud TPU are detected).
Full fine-tuning of Llama-3.2-1B, float32 weights (policy, base and Adam
moments: ~20 GB, 2.5 GB per GPU) split over each host's 8 GPUs
(`mesh_fsdp=8`; `mesh_data` = the number of hosts). For LoRA on several
hosts, add the LoRA flags above and use --config.mesh_fsdp=1.

  python -m fdiv_jax.main --config=configs/distributional_balance.py --workdir=/tmp/balance_llama \
    --config.model.kind=hf --config.model.path=/path/to/Llama-3.2-1B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.remat=True --config.reuse_sampler_log_probs=False \
    --config.mesh_fsdp=8 \
    --config.batch_size=1024 --config.max_new_tokens=64 \
    --config.eval_batch_size=2048 --config.learning_rate=1e-5 \
    --config.num_steps=1000 --config.target.fit_samples=32768
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
