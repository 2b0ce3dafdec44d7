"""A PyTorch anchor for the f-DPG step: the same work as ``train_step.py``'s
presets, written the way a PyTorch toolkit does it, to be timed side by side.

The step, per iteration (batch B, N new tokens, one-token prompts):

1. sample x ~ π with Hugging Face ``generate`` (KV cache, ancestral sampling,
   no top-k/top-p), under ``no_grad``;
2. log a(x): one forward of the frozen base model over prompt + x, under
   ``no_grad``, ``log_softmax`` of the continuation positions, gathered;
3. log π(x): one forward of π with gradients, the same gather;
4. the JS pseudo-reward weights from the detached log-ratios (a pointwise
   "contains one of these word tokens" constraint, as in ``train_step.py``),
   the loss ``−Σ_i w_i log π(x_i)``, ``backward``, global-norm clipping at 1
   and AdamW.

This is what disco-generation does once its scoring is fixed to one forward per
model (its shipped version re-scores token by token); its code is not used
here (CC BY-NC-SA): only the shape of the computation is the same. The model is
``transformers.GPT2LMHeadModel`` with random weights in float32 (the cost does
not depend on the values) and no dropout (as ``GPT2LM``), on
``torch.get_num_threads()`` threads.

  python benchmarks/torch_anchor.py [--model gpt2-small|reference]
      [--batch 16] [--new_tokens 32] [--steps 3]

Prints seconds per step (best and mean of ``--steps`` after one warm-up step)
and the split between sampling, scoring a, and the forward + backward of π and
the update. Compare with ``python benchmarks/train_step.py --model=...`` run
just before or after it: the machine is shared, so only a side-by-side ratio
means anything.
"""

import argparse
import copy
import math
import time

import torch
import transformers

WORD_TOKENS = (1842, 1204, 640, 582, 1637, 670, 1239, 661, 995, 922)
SHAPES = {
    "reference": dict(n_layer=2, n_head=4, n_embd=128, n_positions=64),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}
DEFAULT_BATCH = {"reference": 64, "gpt2-small": 16}
EOS = 50256


def continuation_log_probs(model, sequences, num_prompt):
  """[B]: Σ_n log p(x_n | x_<n) over the positions after the prompt."""
  logits = model(sequences).logits[:, num_prompt - 1:-1].float()
  picked = torch.gather(torch.log_softmax(logits, dim=-1), 2,
                        sequences[:, num_prompt:, None])[..., 0]
  return picked.sum(dim=1)


def js_weights(log_pi, log_p):
  """Detached weights of the JS f-DPG surrogate for on-policy samples.

  With r = P(x)/π(x) (P unnormalised; the cost of the scalar arithmetic is
  what matters here, not the estimator's details), the JS pseudo-reward is
  ½·log(2r / (1 + r)), centred by its batch mean.
  """
  log_r = log_p - log_pi
  reward = 0.5 * (math.log(2.0) + log_r - torch.logaddexp(
      torch.zeros_like(log_r), log_r))
  reward = torch.where(torch.isfinite(reward), reward, torch.full_like(reward, -10.0))
  return reward - reward.mean()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gpt2-small", choices=tuple(SHAPES))
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  batch = args.batch or DEFAULT_BATCH[args.model]
  torch.manual_seed(0)
  # No dropout: GPT2Config's default 0.1 would add mask work that our GPT2LM
  # (no dropout) does not do.
  config = transformers.GPT2Config(vocab_size=50257, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0,
                                   **SHAPES[args.model])
  policy = transformers.GPT2LMHeadModel(config)
  base = copy.deepcopy(policy).eval().requires_grad_(False)
  optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
  prompts = torch.full((batch, 1), EOS, dtype=torch.long)
  words = torch.tensor(WORD_TOKENS)

  def step():
    t0 = time.perf_counter()
    policy.eval()
    with torch.no_grad():
      sequences = policy.generate(
          prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
          top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
          min_new_tokens=args.new_tokens, pad_token_id=EOS, use_cache=True)
    t1 = time.perf_counter()
    with torch.no_grad():
      log_a = continuation_log_probs(base, sequences, 1)
    t2 = time.perf_counter()
    policy.train()
    log_pi = continuation_log_probs(policy, sequences, 1)
    satisfied = torch.isin(sequences[:, 1:], words).any(dim=1)
    log_p = torch.where(satisfied, log_a, torch.full_like(log_a, -math.inf))
    weights = js_weights(log_pi.detach(), log_p)
    loss = -(weights * log_pi).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    t3 = time.perf_counter()
    return t3 - t0, (t1 - t0, t2 - t1, t3 - t2)

  step()  # warm-up
  times, parts = zip(*(step() for _ in range(args.steps)))
  mean_parts = [sum(p[i] for p in parts) / len(parts) for i in range(3)]
  num_params = sum(p.numel() for p in policy.parameters())
  print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; {args.model} "
        f"({num_params / 1e6:.1f}M parameters, float32), batch {batch}, "
        f"{args.new_tokens} new tokens, JS")
  print(f"step: best {min(times) * 1e3:.0f} ms, mean {sum(times) / len(times) * 1e3:.0f} "
        f"ms over {len(times)} steps  ->  {batch / min(times):.1f} samples/s (best)")
  print(f"  sampling {mean_parts[0] * 1e3:.0f} ms, scoring a {mean_parts[1] * 1e3:.0f} "
        f"ms, log π forward + backward + AdamW {mean_parts[2] * 1e3:.0f} ms (means)")


if __name__ == "__main__":
  main()
