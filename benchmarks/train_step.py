"""Throughput of the whole f-DPG train step on the reference config.

Reference config (shared by our benchmarks): GPT-2 architecture, 2 layers, 4 heads,
width 128, vocabulary 50257, 64 positions (6.8M parameters); batch 64, 32 new
tokens, JS divergence, a pointwise constraint "contains one of a list of word
tokens" (a jittable token-level feature; with the real GPT-2 tokenizer these would be
the ids of " love", " life", ...).

Prints samples/s and compile time of the jitted step (sample with the KV cache →
score π and a → log P → Ẑ → loss → optax update), and the split of a step between
sampling, scoring a (forward), the gradient of log π (on-policy its value is the
sampler's log q; see `scoring.sequence_log_probs`) and the rest (update, metrics),
each part timed as its own jitted function on the same inputs.

Anchor (same 2-core machine): the PyTorch toolkit disco-generation takes 26.7 s per
step as shipped (2.4 samples/s), 4.3 s (15 samples/s) with its scoring fixed.

  python benchmarks/train_step.py [--batch 64] [--new_tokens 32] [--steps 10]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from fdiv_jax import targets
from fdiv_jax.lm import models, sampling, scoring
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()

  model = models.GPT2LM(models.GPT2Config(vocab_size=50257, n_positions=64, n_layer=2,
                                          n_head=4, n_embd=128))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  step_config = step_lib.StepConfig(divergence="js")
  target = targets.PointwiseTarget((features.contains_tokens(WORD_TOKENS, "word"),))
  eos = 50256
  sampler = sampling.SamplerConfig(max_new_tokens=args.new_tokens, eos_id=eos,
                                   pad_id=eos)
  mesh = sharding.make_mesh()
  state = sharding.shard_state(state_lib.create_state(
      model, params, step_config=step_config,
      optimizer=optimizer_lib.OptimizerConfig()), mesh)
  batch = state_lib.Batch(jnp.full((args.batch, 1), eos, jnp.int32),
                          jnp.ones((args.batch,), jnp.int32),
                          jnp.zeros((args.batch,), jnp.int32))
  step_fn = sharding.jit_train_step(
      step_lib.make_train_step(step_config, model, target, sampler), state, mesh)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps

  # The parts, each jitted on its own, as the step does them (online, unwarped:
  # log π is the sampler's log q, so scoring π is its gradient only).
  sample_fn = jax.jit(lambda p, r: sampling.sample(model, p, r, batch.prompts,
                                                   batch.prompt_lengths, sampler))
  out = sample_fn(state.params, jax.random.PRNGKey(1))
  sample_s = timed(sample_fn, state.params, jax.random.PRNGKey(1), repeats=args.steps)

  def score_base(base):
    return scoring.sequence_log_probs(model, base, batch.prompts, batch.prompt_lengths,
                                      out.tokens, out.mask)[1]

  def grad_log_pi(p):
    def log_pi(p):
      return scoring.sequence_log_probs(
          model, p, batch.prompts, batch.prompt_lengths, out.tokens, out.mask,
          known_token_log_probs=out.token_log_q)[1].sum()
    return jax.grad(log_pi)(p)

  base_s = timed(jax.jit(score_base), state.base_params, repeats=args.steps)
  grad_s = timed(jax.jit(grad_log_pi), state.params, repeats=args.steps)
  score_s = base_s + grad_s

  rest_s = max(step_s - sample_s - score_s, 0.0)
  print(f"reference config: GPT-2 2x128, 4 heads, vocab 50257 ({num_params / 1e6:.1f}M "
        f"parameters); batch {args.batch}, {args.new_tokens} new tokens, JS, pointwise "
        f"word constraint; {jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"compile + first step: {compile_s:.1f} s")
  print(f"step: {step_s * 1e3:.0f} ms  ->  {args.batch / step_s:.1f} samples/s "
        f"({args.batch * args.new_tokens / step_s:.0f} tokens/s)")
  print(f"  sampling {sample_s * 1e3:.0f} ms ({100 * sample_s / step_s:.0f}%), "
        f"scoring a {base_s * 1e3:.0f} ms ({100 * base_s / step_s:.0f}%), "
        f"∇ log π {grad_s * 1e3:.0f} ms ({100 * grad_s / step_s:.0f}%), "
        f"update+metrics {rest_s * 1e3:.0f} ms ({100 * rest_s / step_s:.0f}%)")
  print(f"vs disco-generation on this machine: {args.batch / step_s / 2.4:.0f}x the "
        f"shipped 2.4 samples/s, {args.batch / step_s / 15:.1f}x the fixed 15 samples/s; "
        f"goal >= 50 samples/s")


if __name__ == "__main__":
  main()
