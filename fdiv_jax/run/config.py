"""The run configuration: every field and its default, and the task sizes.

Task configs in `configs/` start from `base_config()` and override what they
need. The ConfigDict stops at the run layer: `fdiv_jax.run.tasks.describe`
turns it, once, into the typed objects that everything below takes
(`train.LoopConfig`, `train.StepConfig`, `train.OptimizerConfig`,
`sampling.SamplerConfig`, `models.ModelSpec`, `targets.TargetSpec`, the
prompts). Each of those checks its own fields when constructed; `describe`
reports a failure as `ConfigError` naming the config field and the allowed
values, before anything is loaded or written.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
  """A config field has a value that is not allowed (the message names it)."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every task (a small CPU-sized run)."""
  c = ml_collections.ConfigDict()
  # Run.
  c.seed = 0
  c.num_steps = 200
  c.batch_size = 32
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.eval_every = 50
  c.eval_batch_size = 128
  c.log_every = 10
  c.num_samples_md = 8           # samples per model written to samples.md
  # > 0: after training, quasi-rejection sampling for p with the trained π as
  # proposal on this many samples: acceptance rate, TV bound and alignment of
  # the accepted samples at a few β quantiles (summary.json, qrs/*).
  c.qrs_samples = 0
  # Objective (f-DPG).
  # Any name `divergences.get` accepts: forward_kl (kl), reverse_kl (rkl),
  # tv (total_variation), js (jensen_shannon), pearson_chi2, neyman_chi2,
  # hellinger, alpha (with `alpha`).
  c.divergence = "js"
  c.alpha = 0.5                  # only for divergence="alpha"
  c.mode = "online"              # or "offline" (DPG with a separate proposal)
  c.baseline = "moving_average"
  c.baseline_window = 10
  c.baseline_decay = 0.9
  c.log_ratio_clip = 0.0         # 0: the dtype default of losses.fdpg_loss
  c.ema_decay = 0.0              # Polyak averaging of the policy; 0 = off
  c.proposal_update_metric = "tv"
  c.proposal_update_window = 5
  # Online with an unwarped sampler (temperature 1, no top-k/top-p) q = π, so
  # the sampler's log q is log π and the step only differentiates it (one
  # vocabulary pass fewer). False rescores log π with a full forward pass, e.g.
  # with bfloat16 activations, where a cached decode and a full forward differ
  # by more than float32 rounding.
  c.reuse_sampler_log_probs = True
  # Optimiser.
  c.learning_rate = 1e-4
  c.lr_schedule = "constant"
  c.warmup_steps = 10
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.weight_decay = 0.0
  c.max_grad_norm = 1.0
  c.grad_accum_steps = 1
  # Proposal sampler.
  c.max_new_tokens = 32
  c.temperature = 1.0
  c.top_k = 0
  c.top_p = 1.0
  # Top-k / top-p make q = 0 where π > 0 and bias the gradient, Ẑ and every
  # importance-sampled metric: refused unless set (the run then reports the
  # mass of π it misses). Temperature alone is always allowed.
  c.allow_truncated_proposal = False
  # Devices.
  c.mesh_data = -1               # -1: every device not used by fsdp
  c.mesh_fsdp = 1
  # Model (`fdiv_jax.lm.models.ModelSpec`):
  #   "pretrained": the shipped byte-level demo model (`model.path` empty) or a
  #                 `fdiv_jax.lm.pretrain` checkpoint directory; its own sizes win.
  #   "gpt2"/"lstm": random init of the sizes below, seeded by `seed` (LSTM:
  #                 embedding and hidden width n_embd, n_layer layers).
  #   "hf":         a local Hugging Face directory of a GPT-2, Llama, Mistral,
  #                 Qwen2 or Qwen3 model (`model.path`, with config.json +
  #                 model.safetensors, or shards); its own sizes win.
  c.model = ml_collections.ConfigDict()
  c.model.kind = "pretrained"
  c.model.path = ""
  c.model.vocab_size = 260
  c.model.n_layer = 2
  c.model.n_head = 2
  c.model.n_embd = 64
  c.model.n_positions = 64
  c.model.dtype = "float32"       # activations: "float32" or "bfloat16"
  # Stored weights: "float32", "bfloat16", or "float16" (a frozen LoRA base
  # only). Logits, log-probabilities and importance weights stay float32.
  c.model.param_dtype = "float32"
  c.model.remat = False           # rematerialise blocks (Llama family)
  # LoRA (`fdiv_jax.lm.models.lora`): rank 0 = full fine-tuning. With rank r
  # > 0 the policy is the frozen base plus adapters (α/r)·A·B on `targets`
  # (empty: ("q_proj", "v_proj") for the Llama family, ("c_attn",) for
  # GPT-2); the base model a is the same frozen weights without adapters, and
  # checkpoints hold the adapters and name the base weights.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.targets = ()
  # After training: the evaluated policy (the EMA when on; LoRA merged into
  # the weights) as a Hugging Face checkpoint in workdir/export/, with the
  # tokenizer and generation files of model.path.
  c.export_hf = False
  # "byte" (`ByteTokenizer`), "hf" (tokenizer.json in `model.path`) or "toy"
  # (tiny vocabulary for enumerable spaces: id 0 = BOS/EOS/pad, ids 1..V-1
  # decode to the letters a, b, c, ...; V = model.vocab_size <= 27).
  c.tokenizer = "byte"
  # Prompts: one BOS token per row when empty (unconditional generation).
  # Otherwise the task is conditional (CDPG, one log Z per prompt): each prompt
  # is encoded as [BOS] + encode(text) and a batch row gets prompt i by
  # `prompt_sampling`: "cycle" (row r of step s: (s * batch + r) mod C) or
  # "random" (uniform, seeded by (seed, step)).
  c.prompts = ()
  c.prompt_sampling = "cycle"
  # tokenizer "hf": each prompt as one user turn of the chat template of
  # model.path/tokenizer_config.json (jinja2), the assistant's turn opened.
  c.chat_template = False
  # Exact metrics by enumeration (toy spaces only): `tasks.Task.support`.
  c.exact_metrics = False
  # Target (`fdiv_jax.targets.TargetSpec`). Feature specs are a registry
  # name from `fdiv_jax.targets.features.names()`, "name:key=value,key=value" (a value
  # "a|b" is the tuple ("a", "b"); values are Python literals or plain
  # strings), or a mapping {"name": ..., **kwargs}. E.g.
  # "word_list:words=love|life|time", "contains_tokens:token_ids=1".
  c.target = ml_collections.ConfigDict()
  c.target.kind = "pointwise"    # "pointwise", "distributional" or "reward"
  c.target.features = ()         # pointwise: boolean constraints b(x), all must
                                 # hold; distributional: features φ(x)
  c.target.moments = ()          # distributional: target moment μ̄ per feature
  c.target.lambdas = ()          # distributional: fixed λ (skips fitting)
  c.target.beta = 1.0            # reward: temperature β > 0
  c.target.reward = ""           # reward: one feature spec, e.g. "sentiment"
  c.target.fit_samples = 2048    # distributional: samples from a to fit λ
  # A feature spec (as target.features): when set, every evaluation's
  # `alignment` is E_π of this feature, the ground truth, instead of the
  # target's own (a learned reward r(x)); the target's features stay
  # moment/<name>. `configs/rlhf_learned_reward.py` sets the rule its pairs
  # were labelled by.
  c.ground_truth = ""
  # Offline preference optimisation (`fdiv_jax.run.preference`): with an
  # objective, the main job trains π from fixed data against the frozen base
  # model π_ref = a, with the f of `divergence`, instead of by f-DPG. The
  # target above is then the ground truth the evaluation reports.
  c.preference = ml_collections.ConfigDict()
  c.preference.objective = ""    # "" (f-DPG), "fdpo" (pairs) or "fpo" (lists)
  c.preference.train_file = ""   # JSONL (`fdiv_jax.run.preference_data`)
  c.preference.eval_file = ""    # held-out JSONL of the same format, or ""
  c.preference.beta = 0.1        # β of D_f(π‖π_ref)
  c.preference.reward_temperature = 1.0  # f-PO: π̂* ∝ π_ref·exp(r/T)
  # The Bradley–Terry reward model (`python -m fdiv_jax.reward`), trained on
  # the pairs of preference.train_file (held out: preference.eval_file).
  c.reward_model = ml_collections.ConfigDict()
  c.reward_model.init = "base"   # "base": the weights of model.*; "random"
  c.reward_model.n_layer = 2     # "random": a GPT-2 of these sizes
  c.reward_model.n_head = 2
  c.reward_model.n_embd = 64
  c.reward_model.num_steps = 600
  c.reward_model.batch_size = 32
  c.reward_model.learning_rate = 1e-4
  c.reward_model.eval_every = 100
  c.reward_model.checkpoint_every = 100
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a task config in place for tests (a few steps in seconds).

  Every config in `configs/` applies it for ``--config=configs/X.py:tiny``:
  3 steps of batch 4, at most 8 new tokens, evaluation (8 samples, or enough
  for 2 samples.md samples per prompt) and checkpoints every 2 steps, 64
  samples to fit λ, and (randomly initialised models only) one layer of width
  16. The pretrained and Hugging Face models keep their size.
  """
  c.num_steps = 3
  c.batch_size = 4
  c.eval_every = 2
  c.checkpoint_every = 2
  c.log_every = 1
  c.warmup_steps = 0
  c.num_samples_md = 2
  # Half the evaluation samples are π's, and samples.md shows num_samples_md of
  # them for every prompt.
  c.eval_batch_size = max(8, 2 * c.num_samples_md * max(1, len(c.prompts)))
  c.max_new_tokens = min(c.max_new_tokens, 8)
  c.target.fit_samples = min(c.target.fit_samples, 64)
  c.reward_model.num_steps = min(c.reward_model.num_steps, 3)
  c.reward_model.batch_size = min(c.reward_model.batch_size, 4)
  c.reward_model.eval_every = c.reward_model.checkpoint_every = 2
  if c.model.kind in ("gpt2", "lstm") and c.tokenizer != "toy":
    c.model.n_layer = 1
    c.model.n_head = 2
    c.model.n_embd = 16
  return c


SIZES = ("default", "tiny")


def sized(c: ml_collections.ConfigDict,
          size: str | None) -> ml_collections.ConfigDict:
  """Applies a size suffix of ``--config=configs/X.py:SIZE`` ("" = default)."""
  size = size or "default"
  if size not in SIZES:
    raise ValueError(f"config size {size!r}: must be one of {', '.join(SIZES)} "
                     "(e.g. --config=configs/quickstart.py:tiny).")
  return tiny(c) if size == "tiny" else c
