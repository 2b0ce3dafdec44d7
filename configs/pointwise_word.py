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

One GPU (24 GB or more), Qwen2.5-0.5B in bfloat16 with LoRA rank 16 on its
seven projections (recipe sized by arithmetic, not measured here; README,
"Llama, Mistral, Qwen"): the default mesh (one device); the frozen base
takes 1 GB, the adapters with their Adam moments 0.1 GB, a batch's KV cache
0.4 GB; a rare word needs the large batch.

  python -m fdiv_jax.main --config=configs/pointwise_word.py --workdir=/tmp/pw_qwen \
    --config.model.kind=hf --config.model.path=/path/to/Qwen2.5-0.5B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.param_dtype=bfloat16 --config.model.remat=True \
    --config.reuse_sampler_log_probs=False \
    --config.lora.rank=16 --config.lora.alpha=32 \
    --config.lora.targets="('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj')" \
    --config.batch_size=512 --config.max_new_tokens=64 \
    --config.eval_batch_size=1024 --config.learning_rate=1e-4 \
    --config.num_steps=2000 --config.mode=offline \
    --config.target.features="('word_list:words=amazing',)" \
    --config.export_hf=True

Several hosts with 8 GPUs each: the same command on every host, with
JAX_COORDINATOR_ADDRESS=<host 0>:<port>, JAX_NUM_PROCESSES=<hosts> and
JAX_PROCESS_ID=<0, 1, ...> (SLURM, Open MPI and Cloud TPU are detected).
Full fine-tuning of Llama-3.2-1B, float32 weights (policy, base and Adam
moments: ~20 GB, 2.5 GB per GPU) split over each host's 8 GPUs
(`mesh_fsdp=8`; `mesh_data` = the number of hosts). For LoRA on several
hosts, add the LoRA flags above and use --config.mesh_fsdp=1.

  python -m fdiv_jax.main --config=configs/pointwise_word.py --workdir=/tmp/pw_llama \
    --config.model.kind=hf --config.model.path=/path/to/Llama-3.2-1B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.remat=True --config.reuse_sampler_log_probs=False \
    --config.mesh_fsdp=8 \
    --config.batch_size=2048 --config.max_new_tokens=64 \
    --config.eval_batch_size=4096 --config.learning_rate=1e-5 \
    --config.num_steps=2000 --config.mode=offline \
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
