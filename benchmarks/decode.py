"""Decode time per token with the KV cache: 512 new tokens against 32.

The sampler sizes its cache to prompt + new tokens (``sampling.sample`` calls
``model.init_cache(B, P + N)``), never to the model's maximum positions, so a
short generation does not pay for a long cache. A decode step still attends
over the whole cache (the columns not yet written are masked, not skipped), so
its attention costs O(P + N) per token while the projections, the MLP and the
output layer cost O(1): the ratio of the time per token at N = 512 to that at
N = 32 measures how much the attention over the cache adds. Issue 12 asks for
at most 1.3x.

Models (random weights; cost does not depend on the values), each with 4096
positions so that the same model serves both lengths:

* ``decoder``: a small Llama-shaped ``DecoderLM``: 4 layers, width 256, 8 query
  heads sharing 2 key/value heads (GQA), head 32, SwiGLU 688, vocabulary 32000.
* ``gpt2``: the reference GPT-2 shape of our benchmarks: 2 layers, width 128,
  4 heads, vocabulary 50257.

Batch 16 (--batch), a one-token prompt, no EOS (every row generates exactly N
tokens), temperature 1. Each length is timed --repeats times after compiling,
lengths interleaved so that a noisy machine affects both alike; the best run
counts. Prints the ratio per model, for the sampler as it is (its cache grown
in segments as the loop advances, ``sampling._segment_ends``) and with one
cache of prompt + new tokens from the first step.

  .venv/bin/python benchmarks/decode.py [--models decoder,gpt2] [--batch 16]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.lm import models
from fdiv_jax.lm import sampling

POSITIONS = 4096
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# The sampler's cache grown in segments (the default), and one cache of
# prompt + new tokens from the start (one segment), for comparison.
VARIANTS = (("cache grown in segments", None), ("one cache of P + N", 1))


def _model(name):
  if name == "decoder":
    model = models.DecoderLM(models.DecoderConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=POSITIONS))
  elif name == "gpt2":
    model = models.GPT2LM(models.GPT2Config(
        vocab_size=50257, n_positions=POSITIONS, n_layer=2, n_head=4,
        n_embd=128))
  else:
    raise ValueError(f"unknown model {name!r}: decoder or gpt2")
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 1), jnp.int32))["params"]
  return model, params


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="decoder,gpt2")
  parser.add_argument("--lengths", default="32,512")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                      help="cpu: the process's CPU time (all threads), steadier "
                      "than wall time on a machine shared with other jobs")
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch "
        f"{args.batch}, one-token prompt, no EOS; best of {args.repeats} "
        f"({args.clock} time)")
  for name in args.models.split(","):
    model, params = _model(name)
    prompts = np.zeros((args.batch, 1), np.int32)
    prompt_lengths = np.ones(args.batch, np.int32)
    compiled = {}
    default_segments = sampling._MAX_SEGMENTS  # pylint: disable=protected-access
    for variant, segments in VARIANTS:
      sampling._MAX_SEGMENTS = segments or default_segments  # pylint: disable=protected-access
      for n in lengths:
        sampler = sampling.make_sampler(
            model, sampling.SamplerConfig(max_new_tokens=n, eos_id=None))
        compiled[variant, n] = sampler.lower(
            params, jax.random.key(0), prompts, prompt_lengths).compile()
    sampling._MAX_SEGMENTS = default_segments  # pylint: disable=protected-access
    best = {key: float("inf") for key in compiled}
    for i in range(args.repeats):
      for key, fn in compiled.items():  # interleaved
        start = CLOCKS[args.clock]()
        out = fn(params, jax.random.key(i), prompts, prompt_lengths)
        jax.block_until_ready(out)
        best[key] = min(best[key], CLOCKS[args.clock]() - start)
        assert int(out.lengths.min()) == key[1]
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"{name} ({count / 1e6:.1f}M parameters):")
    first, last = lengths[0], lengths[-1]
    for variant, _ in VARIANTS:
      per_token = {n: best[variant, n] / n for n in lengths}
      cells = ", ".join(f"N={n}: {1e3 * per_token[n]:.2f} ms/token "
                        f"({args.batch * n / best[variant, n]:,.0f} tokens/s)"
                        for n in lengths)
      print(f"  {variant:<28} {cells}; ratio N={last}/N={first}: "
            f"{per_token[last] / per_token[first]:.2f}x")


if __name__ == "__main__":
  main()
