"""Sampler throughput: tokens/s with and without the KV cache, compile time.

Reference config (shared across our benchmarks): GPT-2 architecture, 2 layers,
4 heads, width 128, vocabulary 50257 (6.84M parameters with 64 positions).
Batch 64, a one-token BOS prompt, no EOS (every row generates exactly N
tokens), plain sampling (temperature 1) unless --top_k/--top_p are given.

Length 32 runs on the 64-position reference model; lengths 128 and 512 need
more positions, so every length is also run on the same architecture with
1024 positions (position count does not change the cost per token), which is
the model the per-token time ratios are computed on.

The uncached sampler recomputes a full forward pass over the whole [B, 1 + N]
buffer at every step, so its cost per step is constant for a given N; for N
above --uncached_max_len it is estimated as N times the measured time of one
uncached step (marked "est.").

Usage:  .venv/bin/python benchmarks/sampling.py [--lengths 32,128,512]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.lm import models
from fdiv_jax.lm import sampling

HF_ANCHOR_TOKENS_PER_S = 1100.0  # HF generate, batch 64 x 32, this machine.


def _model(n_positions):
  config = models.GPT2Config(vocab_size=50257, n_positions=n_positions,
                             n_layer=2, n_head=4, n_embd=128)
  model = models.GPT2LM(config)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 1), jnp.int32))["params"]
  return model, params


def _time_sampler(model, params, config, batch, repeats, use_cache=True):
  """Returns (compile seconds, best run seconds)."""
  sampler = sampling.make_sampler(model, config, use_cache=use_cache)
  prompts = np.full((batch, 1), 50256, np.int32)
  lengths = np.ones(batch, np.int32)
  start = time.perf_counter()
  compiled = sampler.lower(params, jax.random.key(0), prompts,
                           lengths).compile()
  compile_s = time.perf_counter() - start
  runs = []
  for i in range(repeats):
    start = time.perf_counter()
    out = compiled(params, jax.random.key(i + 1), prompts, lengths)
    jax.block_until_ready(out)
    runs.append(time.perf_counter() - start)
  assert int(out.lengths.min()) == config.max_new_tokens
  return compile_s, min(runs)


def _time_uncached_step(model, params, config, batch, repeats):
  """Seconds for one uncached step (full forward over [B, 1 + N])."""
  n = config.max_new_tokens
  tokens = jnp.zeros((batch, 1 + n), jnp.int32)
  valid = jnp.ones((batch, 1 + n), bool)

  @jax.jit
  def step(params, rng, tokens, valid):
    hidden = model.apply({"params": params}, tokens, None, valid,
                         method="hidden_states")[:, n // 2]
    logits = model.apply({"params": params}, hidden, method="unembed")
    return jax.random.categorical(rng, jax.nn.log_softmax(logits))

  jax.block_until_ready(step(params, jax.random.key(0), tokens, valid))
  runs = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, jax.random.key(i), tokens, valid))
    runs.append(time.perf_counter() - start)
  return min(runs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="32,128,512")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--uncached_max_len", type=int, default=32)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  batch = args.batch
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"batch {batch}, top_k={args.top_k}, top_p={args.top_p}")

  def config(n):
    return sampling.SamplerConfig(max_new_tokens=n, top_k=args.top_k,
                                  top_p=args.top_p, eos_id=None, pad_id=0)

  if 32 in lengths:
    model, params = _model(64)
    compile_s, run_s = _time_sampler(model, params, config(32), batch,
                                     args.repeats)
    tps = batch * 32 / run_s
    print(f"reference (64 positions), N=32 cached: {tps:,.0f} tokens/s "
          f"({batch / run_s:,.1f} seq/s, {run_s:.3f} s/batch, "
          f"{tps / HF_ANCHOR_TOKENS_PER_S:.1f}x the HF generate anchor), "
          f"compile {compile_s:.2f} s")

  model, params = _model(1024)
  per_token = {}
  print("same architecture with 1024 positions:")
  print(f"{'N':>5} {'cached tok/s':>13} {'ms/step':>8} {'compile s':>10} "
        f"{'uncached tok/s':>15} {'speed-up':>9}")
  for n in lengths:
    compile_s, run_s = _time_sampler(model, params, config(n), batch,
                                     args.repeats)
    cached_tps = batch * n / run_s
    per_token[n] = run_s / n
    if n <= args.uncached_max_len:
      _, un_s = _time_sampler(model, params, config(n), batch, 1,
                              use_cache=False)
      mark = ""
    else:
      un_s = n * _time_uncached_step(model, params, config(n), batch,
                                     args.repeats)
      mark = " est."
    uncached_tps = batch * n / un_s
    print(f"{n:>5} {cached_tps:>13,.0f} {1e3 * run_s / n:>8.2f} "
          f"{compile_s:>10.2f} {uncached_tps:>10,.0f}{mark:>5} "
          f"{un_s / run_s:>8.1f}x")
  first = lengths[0]
  ratios = ", ".join(f"N={n}: {per_token[n] / per_token[first]:.2f}"
                     for n in lengths)
  print(f"cached time per token relative to N={first}: {ratios}")


if __name__ == "__main__":
  main()
