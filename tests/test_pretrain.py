"""Tests for fdiv_jax.lm.pretrain: data layout, a few steps of a tiny model, the
checkpoint round trip and the shipped checkpoint."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax.lm import pretrain
from fdiv_jax.lm.tokenization import ByteTokenizer

TINY = pretrain.PretrainConfig(n_layer=1, n_head=2, n_embd=16, seq_len=32,
                               batch_size=4, steps=12, warmup_steps=2,
                               eval_every=6, eval_batches=1,
                               holdout_fraction=0.25)


def test_stream_and_rows_exact():
  tok = ByteTokenizer()
  stream = pretrain.make_stream(["ab", "c"], tok, seq_len=4)
  expected = [tok.bos_id, ord("a"), ord("b"), tok.eos_id,
              tok.bos_id, ord("c"), tok.eos_id]
  np.testing.assert_array_equal(stream.tokens, expected)
  np.testing.assert_array_equal(stream.starts, [0, 4])
  rows, mask = pretrain.make_rows(stream, np.array([4]), 4, tok.bos_id)
  # Circular read: c EOS | BOS a.
  np.testing.assert_array_equal(
      rows, [[tok.bos_id, ord("c"), tok.eos_id, tok.bos_id, ord("a")]])
  np.testing.assert_array_equal(mask, [[1, 1, 0, 1]])  # no loss on BOS


def test_long_passages_get_inner_row_starts():
  tok = ByteTokenizer()
  stream = pretrain.make_stream(["x" * 200], tok, seq_len=64)
  # 202 tokens, stride 64 - 32 = 32, starts while offset < 202 - 32.
  np.testing.assert_array_equal(stream.starts, np.arange(0, 170, 32))


def test_split_corpus():
  train, heldout = pretrain.split_corpus([str(i) for i in range(10)], 0.2)
  assert train == [str(i) for i in range(8)] and heldout == ["8", "9"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrain")
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join(["the cat sat on the mat."] * 6 +
                              ["a dog ran in the park."] * 2) + "\n")
  out = str(root / "ckpt")
  logs = []
  model, params, info = pretrain.pretrain(TINY, out, str(corpus),
                                          log=logs.append)
  return model, params, info, out, logs


def test_tiny_pretrain_learns_and_saves(tiny_run):
  model, _, info, out, logs = tiny_run
  vocab = ByteTokenizer().vocab_size
  assert math.isfinite(info["train_loss_nats_per_byte"])
  assert math.isfinite(info["heldout_loss_nats_per_byte"])
  # Uniform prediction costs log V nats; a few steps on repetitive text beat it.
  assert info["train_loss_nats_per_byte"] < math.log(vocab)
  assert info["num_params"] == sum(
      x.size for x in jax.tree_util.tree_leaves(tiny_run[1]))
  assert sorted(os.listdir(out)) == ["config.json", "params.msgpack"]
  assert any("held-out" in line for line in logs)
  assert model.config.n_positions == TINY.seq_len


def test_load_pretrained_round_trip(tiny_run):
  model, params, _, out, _ = tiny_run
  loaded_model, loaded_params, tok = pretrain.load_pretrained(out)
  assert loaded_model.config == model.config
  equal = jax.tree_util.tree_map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
      params, loaded_params)
  assert all(jax.tree_util.tree_leaves(equal))
  tokens = jnp.array([[tok.bos_id, *tok.encode("the cat")]], jnp.int32)
  np.testing.assert_array_equal(
      model.apply({"params": params}, tokens),
      loaded_model.apply({"params": loaded_params}, tokens))


def test_shipped_checkpoint():
  files = [os.path.join(pretrain.PRETRAINED_DIR, f)
           for f in os.listdir(pretrain.PRETRAINED_DIR)]
  assert sum(os.path.getsize(f) for f in files) <= 10 * 2**20
  model, params, tok = pretrain.load_pretrained()
  tokens = jnp.array([[tok.bos_id, *tok.encode("The meaning of life is")]])
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (1, tokens.shape[1], model.config.vocab_size)
  assert bool(jnp.all(jnp.isfinite(logits)))
  # It has learnt English: after "life is" a space or letter beats EOS/BOS.
  log_probs = jax.nn.log_softmax(logits[0, -1])
  assert log_probs[ord(" ")] > log_probs[tok.eos_id]


def test_load_or_pretrain_uses_the_cache(tiny_run, monkeypatch, tmp_path):
  model, params, _, out, _ = tiny_run
  monkeypatch.setattr(pretrain, "PRETRAINED_DIR", str(tmp_path / "none"))
  loaded_model, loaded_params, _ = pretrain.load_or_pretrain(
      out, log=lambda msg: pytest.fail(f"retrained: {msg}"))
  assert loaded_model.config == model.config
  np.testing.assert_array_equal(loaded_params["wte"]["embedding"],
                                params["wte"]["embedding"])
