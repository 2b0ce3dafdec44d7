r"""Conditional code generation that compiles (CDPG; Korbak et al., ICML 2022).

Task. Each prompt is the start of a Python snippet; the constraint b(x, c) = 1
iff prompt + continuation compiles (`python_compiles`: `compile(src,
"<sample>", "exec")`, never executed). The target is the conditional EBM
p(x|c) ∝ a(x|c)·b(x, c) with one partition function Z_c per prompt, so the
train step keeps one log Ẑ per prompt (`Task.num_contexts`). f-DPG with
`divergence = "js"`.

With the shipped demo model (English fortunes, not code) the prompts span
easy contexts (a comment: any one-line continuation compiles) and hard ones
(an open string must be closed), which is what makes the per-context
normalisation matter. It runs on CPU:

  python -m fdiv_jax.main --config=configs/code_compilable.py --workdir=/tmp/code

A GPU/TPU run with an imported GPT-2-architecture code model (e.g. a local
codeparrot-small directory) and function-signature prompts:

  python -m fdiv_jax.main --config=configs/code_compilable.py \
    --workdir=/tmp/code \
    --config.model.kind=hf --config.model.path=/path/to/code-gpt2 \
    --config.tokenizer=hf --config.batch_size=256 --config.max_new_tokens=128 \
    --config.num_steps=2000 --config.learning_rate=1.41e-5 \
    --config.eval_batch_size=1024

One GPU (24 GB or more), Qwen2.5-0.5B in bfloat16 with LoRA rank 16 on its
seven projections (recipe sized by arithmetic, not measured here; README,
"Llama, Mistral, Qwen"): the default mesh (one device); the frozen base
takes 1 GB, the adapters with their Adam moments 0.1 GB, a batch's KV cache
0.4 GB; 128 new tokens: a 0.8 GB KV cache; 32 samples per prompt and step.
With an instruct checkpoint (Qwen2.5-0.5B-Instruct, Llama-3.2-1B-Instruct) add
--config.chat_template=True: each prompt becomes a user turn of its chat template.

  python -m fdiv_jax.main --config=configs/code_compilable.py --workdir=/tmp/code_qwen \
    --config.model.kind=hf --config.model.path=/path/to/Qwen2.5-0.5B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.param_dtype=bfloat16 --config.model.remat=True \
    --config.reuse_sampler_log_probs=False \
    --config.lora.rank=16 --config.lora.alpha=32 \
    --config.lora.targets="('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj')" \
    --config.batch_size=256 --config.max_new_tokens=128 \
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

  python -m fdiv_jax.main --config=configs/code_compilable.py --workdir=/tmp/code_llama \
    --config.model.kind=hf --config.model.path=/path/to/Llama-3.2-1B \
    --config.tokenizer=hf --config.model.dtype=bfloat16 \
    --config.model.remat=True --config.reuse_sampler_log_probs=False \
    --config.mesh_fsdp=8 \
    --config.batch_size=1024 --config.max_new_tokens=128 \
    --config.eval_batch_size=2048 --config.learning_rate=1e-5 \
    --config.num_steps=1000
"""

import ml_collections

from fdiv_jax.run import config as config_lib


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The compilable-code config; ``size`` "tiny" shrinks it for tests."""
  c = config_lib.base_config()
  c.seed = 0
  c.divergence = "js"
  c.num_steps = 1000
  c.batch_size = 64               # 8 samples for each of the 8 prompts
  c.max_new_tokens = 32
  c.learning_rate = 1e-4
  c.checkpoint_every = 200
  c.eval_every = 100
  c.eval_batch_size = 256
  c.model.kind = "pretrained"
  c.tokenizer = "byte"
  # Easy contexts (a comment: b = 1 for any one-line continuation) and hard
  # ones (an open string must be closed, then nothing invalid may follow:
  # ~5% under a pre-release demo checkpoint). Every prompt needs a base rate
  # > 0, or its target p(.|c) does not exist (Z_c = 0).
  c.prompts = (
      "# ",
      "x = 1  # ",
      "def f(x):\n    return x  # ",
      "message = \"",
      "quote = \"",
      "text = \"",
      "title = \"",
      "name = \"",
  )
  c.prompt_sampling = "cycle"
  c.target.kind = "pointwise"
  c.target.features = ("python_compiles",)
  return config_lib.sized(c, size)
