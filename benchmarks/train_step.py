"""Throughput of the whole f-DPG train step, on the reference config and on
model-size presets.

Presets (--model):

* ``reference`` (default; shared by our benchmarks): GPT-2 architecture, 2 layers,
  4 heads, width 128, vocabulary 50257, 64 positions (6.8M parameters); batch 64.
* ``gpt2-small``: GPT-2 small's shape, 12 layers, 12 heads, width 768,
  vocabulary 50257, 1024 positions (124M parameters); batch 16.
* ``qwen2.5-0.5b``: Qwen2.5-0.5B's shape (width 896, SwiGLU 4864, 14 query heads
  sharing 2 key/value heads of 64, q/k/v biases, tied embeddings, vocabulary
  151936, rope θ 1e6) with --layers of its 24 blocks (default: 24 on an
  accelerator, 4 on CPU, where the whole stack would take minutes per step;
  the line printed says how many); batch 16.

All: 32 new tokens (--new_tokens), JS divergence, a pointwise constraint "contains
one of a list of word tokens" (a jittable token-level feature; with the real GPT-2
tokenizer these would be the ids of " love", " life", ...), random weights (the cost
does not depend on the values). --lora R trains rank-R adapters on the frozen base
(the family's default targets) instead of every weight.

Prints samples/s and compile time of the jitted step (sample with the KV cache →
score π and a → log P → Ẑ → loss → optax update), and the split of a step between
sampling, scoring a (forward), the gradient of log π (on-policy its value is the
sampler's log q; see `scoring.sequence_log_probs`) and the rest (update, metrics),
each part timed as its own jitted function on the same inputs. Then tokens/s of
sampling and of the update (the step less sampling), the model FLOPs utilisation
(MFU) against a matmul roofline measured in the same process and printed beside
it (the best rate of a jitted 2048 x 2048 matmul in --dtype, measured before and
after the step: the vendor's peak is not known here, and on a shared CPU the
best rate is what the chip reaches when it is not shared), and the peak memory
while compiling and running the step (host RSS on CPU, the device's peak bytes
in use on an accelerator).

Model FLOPs count the matrix products of the weights only, 2 per weight per
token for a forward pass (the output layer included, the embedding lookup not;
attention scores, at most 33 columns here, are left out): sampling and scoring
a are one forward each, the gradient of log π three (forward + backward) with
full fine-tuning and two under LoRA (no weight gradients of the frozen base).

Anchor: ``benchmarks/torch_anchor.py`` runs the same step in PyTorch (Hugging
Face ``generate``, one forward of a, forward + backward of π, AdamW); run the two
side by side. Earlier, not side by side on the same 2-core machine: the PyTorch
toolkit disco-generation took 26.7 s per step as shipped (2.4 samples/s), 4.3 s
(15 samples/s) with its scoring fixed.

  python benchmarks/train_step.py [--model reference|gpt2-small|qwen2.5-0.5b]
      [--lora 16] [--batch 64] [--new_tokens 32] [--steps 10] [--layers 4]
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from fdiv_jax import targets
from fdiv_jax.lm import models, sampling, scoring
from fdiv_jax.lm.models import lora as lora_lib
from fdiv_jax.targets import features
from fdiv_jax.train import optimizer as optimizer_lib
from fdiv_jax.train import sharding
from fdiv_jax.train import state as state_lib
from fdiv_jax.train import step as step_lib

WORD_TOKENS = (1842, 1204, 640, 582, 1637, 670, 1239, 661, 995, 922)  # " love", ...


def timed(fn, *args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


PRESETS = ("reference", "gpt2-small", "qwen2.5-0.5b")
DEFAULT_BATCH = {"reference": 64, "gpt2-small": 16, "qwen2.5-0.5b": 16}


def build_model(preset, layers=None, dtype=jnp.float32):
  """(model, params, description, family) of a preset, random weights;
  parameters and activations in ``dtype`` (logits float32)."""
  types = dict(dtype=dtype, param_dtype=dtype)
  if preset == "reference":
    model = models.GPT2LM(models.GPT2Config(vocab_size=50257, n_positions=64,
                                            n_layer=2, n_head=4, n_embd=128,
                                            **types))
    desc, family = "GPT-2 2x128, 4 heads, vocab 50257", "gpt2"
  elif preset == "gpt2-small":
    model = models.GPT2LM(models.GPT2Config(vocab_size=50257, n_positions=1024,
                                            n_layer=12, n_head=12, n_embd=768,
                                            **types))
    desc, family = "GPT-2 small 12x768, 12 heads, vocab 50257", "gpt2"
  elif preset == "qwen2.5-0.5b":
    layers = layers or (4 if jax.devices()[0].platform == "cpu" else 24)
    model = models.DecoderLM(models.DecoderConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
        head_dim=64, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1e6, attention_bias=True, tie_word_embeddings=True, **types))
    short = "" if layers == 24 else f", shortened from 24"
    desc = (f"Qwen2.5-0.5B shape with {layers} layers{short}: 896 wide, 14/2 "
            f"heads, vocab 151936")
    family = "qwen2"
  else:
    raise ValueError(f"--model: one of {PRESETS}, got {preset!r}")
  params = jax.jit(model.init)(jax.random.PRNGKey(0),
                               jnp.zeros((1, 8), jnp.int32))["params"]
  return model, params, desc, family


def matmul_flops(params) -> int:
  """Weights that multiply activations, per token (module docstring): every
  kernel of rank 2, the output layer (GPT-2's tied wte, the Llama family's
  lm_head or tied embed_tokens) included; position tables excluded."""
  count = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if x.ndim == 2 and "wpe" not in name:
      count += x.size
  return count


def roofline(dtype, size=2048, repeats=20) -> float:
  """FLOP/s of a jitted square ``size`` matmul in ``dtype``, best of ``repeats``
  (on a machine shared with other jobs, the best is the rate the chip reaches
  when it is not shared)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2 * size ** 3 / best


def peak_memory() -> str:
  """Peak device memory on an accelerator, else the process's peak host RSS."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device peak"
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return f"{rss_kib / 2**20:.2f} GiB host peak RSS"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="reference", choices=PRESETS)
  parser.add_argument("--lora", type=int, default=0,
                      help="LoRA rank (0: full fine-tuning)")
  parser.add_argument("--layers", type=int, default=None,
                      help="qwen2.5-0.5b: blocks (default 24, 4 on CPU)")
  parser.add_argument("--batch", type=int, default=None,
                      help="default 64 (reference), 16 (the other presets)")
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="parameters and activations (log-probs stay float32)")
  args = parser.parse_args()
  args.batch = args.batch or DEFAULT_BATCH[args.model]
  dtype = jnp.dtype(args.dtype)

  model, params, desc, family = build_model(args.model, args.layers, dtype)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  flops_per_token = 2 * matmul_flops(params)
  base_params = None
  if args.lora:
    lora_config = models.LoRAConfig(args.lora).for_family(family)
    model = models.LoRALM(model, lora_config, base_path="random")
    base_params = params
    params = lora_lib.init_adapters(lora_config, base_params,
                                    jax.random.PRNGKey(4))
  trained = sum(x.size for x in jax.tree.leaves(params))
  step_config = step_lib.StepConfig(divergence="js")
  target = targets.PointwiseTarget((features.contains_tokens(WORD_TOKENS, "word"),))
  eos = 50256
  sampler = sampling.SamplerConfig(max_new_tokens=args.new_tokens, eos_id=eos,
                                   pad_id=eos)
  mesh = sharding.make_mesh()
  state = sharding.shard_state(state_lib.create_state(
      model, params, step_config=step_config, base_params=base_params,
      optimizer=optimizer_lib.OptimizerConfig()), mesh)
  batch = state_lib.Batch(jnp.full((args.batch, 1), eos, jnp.int32),
                          jnp.ones((args.batch,), jnp.int32),
                          jnp.zeros((args.batch,), jnp.int32))
  step_fn = sharding.jit_train_step(
      step_lib.make_train_step(step_config, model, target, sampler), state, mesh)
  peak_before = roofline(dtype)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps
  step_peak = peak_memory()  # before the parts below add their own executables

  # The parts, each jitted on its own, as the step does them (online, unwarped:
  # log π is the sampler's log q, so scoring π is its gradient only).
  # The frozen base is an argument, not a closed-over constant (which jit would
  # copy into the executable).
  sample_fn = jax.jit(lambda p, base, r: sampling.sample(
      model, lora_lib.policy_params(model, base, p), r, batch.prompts,
      batch.prompt_lengths, sampler))
  out = sample_fn(state.params, state.base_params, jax.random.PRNGKey(1))
  sample_s = timed(sample_fn, state.params, state.base_params, jax.random.PRNGKey(1),
                   repeats=args.steps)

  base_model = model.base if args.lora else model

  def score_base(base):
    return scoring.sequence_log_probs(base_model, base, batch.prompts,
                                      batch.prompt_lengths, out.tokens, out.mask)[1]

  def grad_log_pi(p, base):
    def log_pi(p):
      return scoring.sequence_log_probs(
          model, lora_lib.policy_params(model, base, p),
          batch.prompts, batch.prompt_lengths, out.tokens, out.mask,
          known_token_log_probs=out.token_log_q)[1].sum()
    return jax.grad(log_pi)(p)

  base_s = timed(jax.jit(score_base), state.base_params, repeats=args.steps)
  grad_s = timed(jax.jit(grad_log_pi), state.params, state.base_params,
                 repeats=args.steps)
  score_s = base_s + grad_s

  rest_s = max(step_s - sample_s - score_s, 0.0)
  mode = (f"LoRA rank {args.lora} ({trained / 1e6:.2f}M trained)" if args.lora
          else "full fine-tuning")
  print(f"{args.model}: {desc} ({num_params / 1e6:.1f}M parameters, {args.dtype}), "
        f"{mode}; "
        f"batch {args.batch}, {args.new_tokens} new tokens, JS, pointwise "
        f"word constraint; {jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"compile + first step: {compile_s:.1f} s")
  print(f"step: {step_s * 1e3:.0f} ms  ->  {args.batch / step_s:.1f} samples/s "
        f"({args.batch * args.new_tokens / step_s:.0f} tokens/s)")
  print(f"  sampling {sample_s * 1e3:.0f} ms ({100 * sample_s / step_s:.0f}%), "
        f"scoring a {base_s * 1e3:.0f} ms ({100 * base_s / step_s:.0f}%), "
        f"∇ log π {grad_s * 1e3:.0f} ms ({100 * grad_s / step_s:.0f}%), "
        f"update+metrics {rest_s * 1e3:.0f} ms ({100 * rest_s / step_s:.0f}%)")
  tokens = args.batch * args.new_tokens
  update_s = max(step_s - sample_s, 1e-9)
  # Forward per token: sampling, scoring a; gradient: 3 forwards (2 under LoRA).
  step_flops = flops_per_token * tokens * (2 + (2 if args.lora else 3))
  peak = max(peak_before, roofline(dtype))  # measured before and after
  print(f"tokens/s: sampling {tokens / sample_s:,.0f}, update (step less sampling) "
        f"{tokens / update_s:,.0f}, whole step {tokens / step_s:,.0f}")
  print(f"MFU {100 * step_flops / step_s / peak:.0f}% of the measured {args.dtype} "
        f"matmul roofline {peak / 1e9:,.0f} GFLOP/s (best 2048^2 matmul of this run); "
        f"model FLOPs {step_flops / 1e9:,.0f} G/step, "
        f"{step_flops / step_s / 1e9:,.0f} GFLOP/s")
  print(f"peak memory: {step_peak} (compiling and running the step)")
  if args.model == "reference":
    print(f"vs disco-generation on this machine: {args.batch / step_s / 2.4:.0f}x the "
          f"shipped 2.4 samples/s, {args.batch / step_s / 15:.1f}x the fixed 15 "
          f"samples/s; goal >= 50 samples/s")


if __name__ == "__main__":
  main()
