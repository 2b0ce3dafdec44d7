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

One GPU (24 GB or more), Qwen2.5-0.5B in bfloat16 with LoRA rank 16 on its
seven projections (recipe sized by arithmetic, not measured here; README,
"Llama, Mistral, Qwen"): the default mesh (one device); the frozen base
takes 1 GB, the adapters with their Adam moments 0.1 GB, a batch's KV cache
0.4 GB.

  python -m fdiv_jax.main --config=configs/sentiment_rlhf.py --workdir=/tmp/rl_qwen \
    --config.model.kind=hf --config.model.path=/path/to/Qwen2.5-0.5B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.param_dtype=bfloat16 --config.model.remat=True \
    --config.reuse_sampler_log_probs=False \
    --config.lora.rank=16 --config.lora.alpha=32 \
    --config.lora.targets="('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj')" \
    --config.batch_size=256 --config.max_new_tokens=64 \
    --config.eval_batch_size=1024 --config.learning_rate=1e-4 \
    --config.num_steps=1000 \
    --config.export_hf=True

Several hosts with 8 GPUs each: the same command on every host, with
JAX_COORDINATOR_ADDRESS=<host 0>:<port>, JAX_NUM_PROCESSES=<hosts> and
JAX_PROCESS_ID=<0, 1, ...> (SLURM, Open MPI and Cloud TPU are detected).
Full fine-tuning of Llama-3.2-1B, float32 weights (policy, base and Adam
moments: ~20 GB, 2.5 GB per GPU) split over each host's 8 GPUs
(`mesh_fsdp=8`; `mesh_data` = the number of hosts). For LoRA on several
hosts, add the LoRA flags above and use --config.mesh_fsdp=1.

  python -m fdiv_jax.main --config=configs/sentiment_rlhf.py --workdir=/tmp/rl_llama \
    --config.model.kind=hf --config.model.path=/path/to/Llama-3.2-1B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.remat=True --config.reuse_sampler_log_probs=False \
    --config.mesh_fsdp=8 \
    --config.batch_size=1024 --config.max_new_tokens=64 \
    --config.eval_batch_size=2048 --config.learning_rate=1e-5 \
    --config.num_steps=1000
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
