"""Byte, toy and Hugging Face tokenizers; the size of enumerated spaces."""

import numpy as np
import pytest
import tokenizers
from tokenizers import models as tk_models
from tokenizers import pre_tokenizers

from fdiv_jax.lm import enumeration
from fdiv_jax.lm import tokenization


def test_byte_tokenizer_round_trip_and_specials():
  tok = tokenization.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256,
                                                                  257, 258)
  text = "héllo, wörld ✓"
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8")) and max(ids) < 256
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
  assert tok.decode([0xC3]) == "\ufffd"  # Truncated UTF-8 is replaced.


def test_byte_tokenizer_batch_decode_uses_mask():
  tok = tokenization.ByteTokenizer()
  tokens = np.array([[104, 105, 258, 256], [111, 107, 33, 107]], np.int32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)
  assert tok.batch_decode(tokens, mask) == ["hi", "ok!"]


def _word_level_file(tmp_path, specials):
  vocab = {w: i for i, w in enumerate(specials + ["the", "cat", "sat"])}
  tok = tokenizers.Tokenizer(tk_models.WordLevel(vocab, unk_token=specials[0]))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return path


def test_hf_tokenizer_from_file(tmp_path):
  path = _word_level_file(tmp_path, ["<unk>", "<pad>", "<s>", "</s>"])
  tok = tokenization.HFTokenizer.from_file(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 3, 7)
  assert tok.encode("the cat sat") == [4, 5, 6]
  assert tok.decode([2, 4, 5, 3]) == "the cat"
  tokens = np.array([[4, 6, 3, 1], [5, 5, 5, 5]], np.int32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  assert tok.batch_decode(tokens, mask) == ["the sat", "cat cat"]


def test_hf_tokenizer_gpt2_style_specials(tmp_path):
  path = _word_level_file(tmp_path, ["<|endoftext|>"])
  tok = tokenization.HFTokenizer.from_file(path)
  assert tok.eos_id == tok.bos_id == tok.pad_id == 0
  with pytest.raises(ValueError, match="EOS"):
    tokenization.HFTokenizer.from_file(path, eos_token="<nope>")


def test_toy_tokenizer_round_trip_and_specials():
  tok = tokenization.ToyTokenizer(4)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (4, 0, 0, 0)
  assert tok.encode("abcab") == [1, 2, 3, 1, 2]
  assert tok.encode("") == []
  assert tok.decode([0, 1, 2, 3, 0]) == "abc"
  tokens = np.array([[1, 3, 0, 0], [2, 2, 2, 2]], np.int32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  assert tok.batch_decode(tokens, mask) == ["ac", "bb"]
  full = tokenization.ToyTokenizer(tokenization.TOY_MAX_VOCAB)
  assert full.decode(full.encode("xyz")) == "xyz"
  assert tokenization.TOY_MAX_VOCAB == 27


def test_toy_tokenizer_errors_name_the_character_and_vocab_size():
  for bad in (1, 28, 2.0, True, "4"):
    with pytest.raises(ValueError, match=r"^vocab_size: .*\[2, 27\]"):
      tokenization.ToyTokenizer(bad)
  tok = tokenization.ToyTokenizer(4)
  with pytest.raises(ValueError) as e:
    tok.encode("aB")
  assert "'B'" in str(e.value) and "letters a..z" in str(e.value)
  assert "vocab_size 4" in str(e.value)
  with pytest.raises(ValueError) as e:
    tok.encode("ad")
  assert "'d'" in str(e.value) and "id 4" in str(e.value)
  assert "vocab_size 4" in str(e.value) and "a..c" in str(e.value)
  with pytest.raises(ValueError, match=r"only a \(ids 1\.\.1\); got 'b'"):
    tokenization.ToyTokenizer(2).encode("b")


@pytest.mark.parametrize("vocab_size, max_new_tokens", [(2, 1), (3, 4),
                                                         (4, 3), (5, 2)])
def test_support_size_matches_enumeration(vocab_size, max_new_tokens):
  support = enumeration.all_continuations(vocab_size, max_new_tokens,
                                          eos_id=0)
  assert enumeration.support_size(vocab_size, max_new_tokens) == len(
      support.tokens)


def test_support_size_values():
  # V = 4, N = 3: 1 + 3 + 9 sequences with EOS, 27 capped.
  assert enumeration.support_size(4, 3) == 40
  assert enumeration.support_size(27, 4) > enumeration.MAX_SUPPORT
  assert enumeration.MAX_SUPPORT == 100_000
