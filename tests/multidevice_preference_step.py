"""Two offline preference steps (f-DPO and f-PO) on 1 and 2 devices (a script).

Started by tests/test_preference_train.py in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=2 (the flag must be set before
JAX starts). A tiny GPT-2 (vocabulary 16); prompts of different lengths
(left-padded) and responses of different lengths (right-padded), log π_ref
cached by `preference_step.reference_log_probs`; the policy starts away from
π_ref so that every log-ratio is non-zero. Prints one JSON line: for each
objective, the max |Δ| of the parameters, the optimiser state and the metrics
after 2 steps on mesh data=2 against mesh data=1, and of the held-out sums.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from fdiv_jax.lm import models  # noqa: E402
from fdiv_jax.train import optimizer as optimizer_lib  # noqa: E402
from fdiv_jax.train import preference_step, sharding  # noqa: E402
from fdiv_jax.train import state as state_lib  # noqa: E402

VOCAB, BOS, EOS, PAD = 16, 1, 0, 0
ROWS, K, PROMPT, NEW = 8, 3, 3, 4
# f-DPO with JS (f' non-linear in log u), f-PO with reverse KL.
DIVERGENCES = {"fdpo": "js", "fpo": "reverse_kl"}


def _model():
  model = models.GPT2LM(models.GPT2Config(vocab_size=VOCAB, n_positions=PROMPT + NEW,
                                          n_layer=1, n_head=2, n_embd=16))
  base = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  noise = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.PRNGKey(1),
                                                          x.shape, x.dtype), base)
  return model, base, jax.tree.map(jnp.add, base, noise)


def _data(rng, rows):
  """Left-padded prompts [rows, PROMPT] (lengths 1..PROMPT, BOS first) and
  responses [rows, NEW] of 1..NEW tokens, ending with EOS when shorter."""
  lengths = rng.integers(1, PROMPT + 1, rows).astype(np.int32)
  prompts = np.full((rows, PROMPT), PAD, np.int32)
  for i, n in enumerate(lengths):
    prompts[i, PROMPT - n:] = [BOS, *rng.integers(2, VOCAB, n - 1)]
  return prompts, lengths


def _responses(rng, rows):
  tokens = np.full((rows, NEW), PAD, np.int32)
  mask = np.zeros((rows, NEW), bool)
  for i, n in enumerate(rng.integers(1, NEW + 1, rows)):
    ids = [*rng.integers(2, VOCAB, n - 1), EOS] if n < NEW else list(
        rng.integers(2, VOCAB, n))
    tokens[i, :n], mask[i, :n] = ids, True
  return tokens, mask


def batches(objective, model, base):
  """Two training batches and one held-out batch (host arrays), one weight 0."""
  rng = np.random.default_rng(0)
  score = preference_step.make_reference_scorer(model)
  ref = lambda p, l, t, m: preference_step.reference_log_probs(
      model, base, p, l, t, m, chunk_size=ROWS * K, score=score)
  out = []
  for _ in range(3):
    prompts, lengths = _data(rng, ROWS)
    weights = np.ones((ROWS,), np.float32)
    if objective == "fdpo":
      (ct, cm), (rt, rm) = _responses(rng, ROWS), _responses(rng, ROWS)
      out.append(preference_step.PairBatch(
          prompts=prompts, prompt_lengths=lengths, chosen_tokens=ct, chosen_mask=cm,
          rejected_tokens=rt, rejected_mask=rm,
          ref_chosen=ref(prompts, lengths, ct, cm),
          ref_rejected=ref(prompts, lengths, rt, rm), weights=weights))
    else:
      tokens, mask = _responses(rng, ROWS * K)
      response_mask = np.ones((ROWS, K), bool)
      response_mask[0, -1] = False  # a list of K - 1 responses
      flat = ref(np.repeat(prompts, K, 0), np.repeat(lengths, K, 0), tokens, mask)
      out.append(preference_step.ListBatch(
          prompts=prompts, prompt_lengths=lengths,
          tokens=tokens.reshape(ROWS, K, NEW), mask=mask.reshape(ROWS, K, NEW),
          response_mask=response_mask,
          ref=np.where(response_mask, flat.reshape(ROWS, K), 0.0).astype(np.float32),
          rewards=rng.normal(size=(ROWS, K)).astype(np.float32), weights=weights))
  out[-1] = out[-1].replace(weights=np.r_[np.ones(ROWS - 2), 0, 0].astype(np.float32))
  return out


def two_steps(objective, divergence, data, host_batches):
  model, base, start = _model()
  config = preference_step.PreferenceConfig(objective=objective,
                                            divergence=divergence, beta=0.5,
                                            ema_decay=0.5)
  mesh = sharding.make_mesh(data, 1)
  state = state_lib.create_state(
      model, start, step_config=config.step_config(),
      optimizer=optimizer_lib.OptimizerConfig(learning_rate=1e-4, num_steps=2,
                                              warmup_steps=0),
      base_params=base, seed=0)
  state = sharding.shard_state(state, mesh)
  step_fn = sharding.jit_train_step(
      preference_step.make_preference_step(config, model), state, mesh)
  heldout_fn = jax.jit(preference_step.make_heldout_step(config, model),
                       in_shardings=(sharding.state_shardings(state, mesh),
                                     sharding.batch_sharding(mesh)),
                       out_shardings=NamedSharding(mesh, PartitionSpec()))
  train_a, train_b, held = host_batches
  metrics = []
  for batch in (train_a, train_b):
    state, m = step_fn(state, sharding.shard_batch(batch, mesh))
    metrics.append(jax.device_get(m))
  sums = jax.device_get(heldout_fn(state, sharding.shard_batch(held, mesh)))
  devices = {d for leaf in jax.tree.leaves(state.params) for d in leaf.devices()}
  return (jax.device_get((state.params, state.opt_state, state.ema_params)),
          metrics, sums, len(devices))


def max_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(
      np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)), a, b)
  return max(jax.tree.leaves(diffs))


def main():
  assert jax.device_count() == 2, jax.device_count()
  out = {"devices": jax.device_count()}
  for objective in sys.argv[1:] or ("fdpo", "fpo"):
    divergence = DIVERGENCES[objective]
    model, base, start = _model()
    host_batches = batches(objective, model, base)
    one, m1, s1, _ = two_steps(objective, divergence, 1, host_batches)
    two, m2, s2, used = two_steps(objective, divergence, 2, host_batches)
    out[objective] = {
        "devices_used": used,
        "params_diff": max_diff(one[0], two[0]),
        "moments_diff": max_diff(one[1], two[1]),
        "ema_diff": max_diff(one[2], two[2]),
        "moved": max_diff(one[0], start),
        "metrics_diff": max_diff(m1, m2),
        "heldout_diff": max_diff(s1, s2),
        "loss": [float(m["loss"]) for m in m1],
        "heldout_n": float(s1["n"]),
    }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
