r"""Builds the shipped preference set from the demo model and a ground-truth rule.

  python fdiv_jax/data/make_preferences.py [--out=fdiv_jax/data] [--seed=0]

(about a minute on 2 CPU cores). A maintenance script like `make_corpus.py`:
its output is shipped, and rebuilding it with the same seed on the same JAX
version gives the same files.

The rule is the quickstart's constraint (`configs/quickstart.py`): b(x) = 1 iff
the decoded text contains one of the 15 words of `WORDS` as a whole word, any
case (the registry feature `word_list`, `GROUND_TRUTH`). It labels the data
and is the ground truth every run evaluates against (its `alignment`).

1. Continuations are sampled from the shipped base model a
   (`fdiv_jax/data/pretrained`), unconditionally (the prompt is [BOS]; the
   rows' "prompt" is ""), 48 new bytes each, temperature 1, in chunks of
   `CHUNK` rows with the keys fold_in(PRNGKey(seed), chunk). A sample is kept when its text
   re-encodes to the sampled bytes (valid UTF-8, no NUL), so that
   `preference_data.encode_responses` gives back the sampled tokens: the text,
   EOS appended when the sample ended, cut at 48 bytes.
2. Pairs: the first pool's satisfying samples (b = 1) and violating ones
   (b = 0), each in sampling order, are zipped: pair i is (i-th satisfying,
   i-th violating), chosen = the satisfying one. The first `NUM_PAIRS_TRAIN`
   pairs go to `preference_pairs.train.jsonl`, the next `NUM_PAIRS_TEST` to
   `preference_pairs.test.jsonl`.
3. Lists: a second pool (keys fold_in(PRNGKey(seed + 1), chunk)) cut into
   groups of `LIST_SIZE` consecutive samples, rewards b(x) ∈ {0, 1}:
   `preference_lists.train.jsonl` (`NUM_LISTS_TRAIN`) and
   `preference_lists.test.jsonl` (`NUM_LISTS_TEST`).
4. `preferences.json`: the settings, the counts, the ground-truth rate of the
   base model on each pool with its standard error, and the files' sizes and
   SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import jax
import numpy as np

if __package__ in (None, ""):  # run as a script: the repository on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))

from fdiv_jax.lm import pretrain, sampling  # noqa: E402
from fdiv_jax.run import preference_data  # noqa: E402
from fdiv_jax.targets import features  # noqa: E402

WORDS = ("love", "life", "man", "time", "money", "work", "never", "people",
         "world", "good", "you", "your", "know", "think", "day")
GROUND_TRUTH = "word_list:words=" + "|".join(WORDS)
MAX_NEW_TOKENS = 48
CHUNK = 256
NUM_PAIRS_TRAIN = 1200
NUM_PAIRS_TEST = 200
LIST_SIZE = 4
NUM_LISTS_TRAIN = 256
NUM_LISTS_TEST = 64


def sample_pool(model, params, tokenizer, rng, chunks: range):
  """Texts and ground-truth values of the CHUNK base-model samples of each
  chunk c of ``chunks`` (key fold_in(rng, c)); dropped: the samples whose text
  does not re-encode to the sampled tokens."""
  config = sampling.SamplerConfig(max_new_tokens=MAX_NEW_TOKENS,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  draw = sampling.make_sampler(model, config)
  rule = features.from_spec(GROUND_TRUTH, decode=tokenizer.batch_decode)
  prompts = np.full((CHUNK, 1), tokenizer.bos_id, np.int32)
  lengths = np.ones((CHUNK,), np.int32)
  texts, values, dropped = [], [], 0
  for chunk in chunks:
    out = draw(params, jax.random.fold_in(rng, chunk), prompts, lengths)
    tokens, mask = (np.asarray(x) for x in jax.device_get((out.tokens, out.mask)))
    b = np.asarray(rule(tokens, mask))
    keep = mask & (tokens != tokenizer.eos_id)
    decoded = tokenizer.batch_decode(tokens, keep)
    again, again_mask, _ = preference_data.encode_responses(
        decoded, tokenizer, MAX_NEW_TOKENS)
    for i, text in enumerate(decoded):
      exact = (text and "\0" not in text
               and np.array_equal(again_mask[i], mask[i])
               and np.array_equal(again[i][mask[i]], tokens[i][mask[i]]))
      if exact:
        texts.append(text)
        values.append(float(b[i]))
      else:
        dropped += 1
  return texts, np.asarray(values), dropped


def rate(values: np.ndarray) -> dict[str, float]:
  p = float(np.mean(values))
  return {"rate": p, "rate_se": math.sqrt(p * (1 - p) / len(values)),
          "samples": int(len(values))}


def file_info(path: str) -> dict:
  with open(path, "rb") as f:
    data = f.read()
  return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
          "rows": data.count(b"\n")}


def build(out_dir: str, seed: int = 0, log=print) -> dict:
  """Writes the four JSONL files and preferences.json into ``out_dir``."""
  model, params, tokenizer = pretrain.load_pretrained()
  # Pool 1 (pairs): enough for the pairs at a ground-truth rate near 35%.
  need = NUM_PAIRS_TRAIN + NUM_PAIRS_TEST
  texts, values, dropped = [], np.zeros((0,)), 0
  chunks = 0
  while min(np.sum(values == 1), np.sum(values == 0)) < need:
    more = max(1, math.ceil((need - np.sum(values == 1)) / (0.3 * CHUNK)))
    t, v, d = sample_pool(model, params, tokenizer, jax.random.PRNGKey(seed),
                          range(chunks, chunks + more))
    texts += t
    values = np.concatenate([values, v])
    dropped += d
    chunks += more
  good = [t for t, v in zip(texts, values) if v == 1][:need]
  bad = [t for t, v in zip(texts, values) if v == 0][:need]
  pair_pool = {**rate(values), "dropped": dropped, "chunks": chunks}
  log(f"pairs pool: {len(values)} samples, ground truth {pair_pool['rate']:.3f} "
      f"± {pair_pool['rate_se']:.3f}, {dropped} dropped")
  n = NUM_PAIRS_TRAIN
  paths = {}
  paths["pairs_train"] = preference_data.write_pairs(
      os.path.join(out_dir, preference_data.SHIPPED["pairs_train"]),
      [""] * n, good[:n], bad[:n])
  paths["pairs_test"] = preference_data.write_pairs(
      os.path.join(out_dir, preference_data.SHIPPED["pairs_test"]),
      [""] * NUM_PAIRS_TEST, good[n:need], bad[n:need])
  # Pool 2 (lists).
  num_lists = NUM_LISTS_TRAIN + NUM_LISTS_TEST
  list_chunks = math.ceil(num_lists * LIST_SIZE / (0.95 * CHUNK))
  texts, values, dropped = sample_pool(
      model, params, tokenizer, jax.random.PRNGKey(seed + 1), range(list_chunks))
  if len(texts) < num_lists * LIST_SIZE:
    raise RuntimeError(f"only {len(texts)} usable samples for the lists")
  list_pool = {**rate(values), "dropped": dropped, "chunks": list_chunks}
  log(f"lists pool: {len(values)} samples, ground truth {list_pool['rate']:.3f} "
      f"± {list_pool['rate_se']:.3f}, {dropped} dropped")
  groups = [(texts[i * LIST_SIZE:(i + 1) * LIST_SIZE],
             values[i * LIST_SIZE:(i + 1) * LIST_SIZE].tolist())
            for i in range(num_lists)]
  for key, part in (("lists_train", groups[:NUM_LISTS_TRAIN]),
                    ("lists_test", groups[NUM_LISTS_TRAIN:])):
    paths[key] = preference_data.write_lists(
        os.path.join(out_dir, preference_data.SHIPPED[key]), [""] * len(part),
        [g[0] for g in part], [g[1] for g in part])
  used = np.asarray([v for _, r in groups for v in r])
  mixed = sum(0 < sum(r) < LIST_SIZE for _, r in groups)
  stats = {
      "script": "fdiv_jax/data/make_preferences.py",
      "seed": seed,
      "base_model": "fdiv_jax/data/pretrained",
      "ground_truth": GROUND_TRUTH,
      "max_new_tokens": MAX_NEW_TOKENS,
      "prompt": "",
      "jax_version": jax.__version__,
      "pairs": {"pool": pair_pool, "train": NUM_PAIRS_TRAIN, "test": NUM_PAIRS_TEST,
                "chosen_ground_truth": 1.0, "rejected_ground_truth": 0.0},
      "lists": {"pool": list_pool, "train": NUM_LISTS_TRAIN, "test": NUM_LISTS_TEST,
                "size": LIST_SIZE, "reward_mean": float(used.mean()),
                "lists_with_both_labels": int(mixed)},
      "files": {preference_data.SHIPPED[k]: file_info(p) for k, p in paths.items()},
  }
  stats_path = os.path.join(out_dir, preference_data.SHIPPED["stats"])
  with open(stats_path, "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
    f.write("\n")
  log(f"wrote {', '.join(sorted(paths.values()))} and {stats_path}")
  return stats


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=preference_data.DATA_DIR)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  build(args.out, args.seed)


if __name__ == "__main__":
  main()
