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


# Hugging Face model directories: generation_config.json's EOS ids and the
# chat template of tokenizer_config.json, from files the tests write.

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'"
          " + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
          " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHAT_SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
                 "<|im_end|>"]
CHAT_WORDS = ["user", "assistant", "the", "cat", "sat"]


def _chat_dir(tmp_path, template, eos_token_id=None, bos="<|begin_of_text|>"):
  """tokenizer.json (word level, the chat specials added), tokenizer_config.json
  with `template`, and generation_config.json when `eos_token_id` is given."""
  import json  # pylint: disable=g-import-not-at-top
  vocab = {w: i for i, w in enumerate(CHAT_SPECIALS + CHAT_WORDS)}
  tok = tokenizers.Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(CHAT_SPECIALS)
  tok.save(str(tmp_path / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
            "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>",
                          "special": True},
            "unk_token": "<unk>", "chat_template": template}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  if eos_token_id is not None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": eos_token_id}))
  return str(tmp_path)


def test_generation_config_eos_ids_one_or_a_list(tmp_path):
  tok = tokenization.HFTokenizer.from_directory(
      _chat_dir(tmp_path, None, eos_token_id=[2, 3]),
      eos_token="<|end_of_text|>")
  assert tok.eos_id == 2 and tok.eos_ids == (2, 3)
  # Every EOS id is special: decoding drops it.
  assert tok.decode([10, 3, 11, 2]) == "the cat"
  one = tokenization.HFTokenizer.from_directory(
      _chat_dir(tmp_path, None, eos_token_id=3), eos_token="<|end_of_text|>")
  assert one.eos_ids == (2, 3)
  missing = tmp_path / "generation_config.json"
  missing.unlink()
  assert tokenization.HFTokenizer.from_directory(
      str(tmp_path), eos_token="<|end_of_text|>").eos_ids == (2,)
  assert tokenization.ByteTokenizer().eos_ids == (258,)


def test_an_eos_id_outside_the_vocabulary_is_an_error_naming_the_file(tmp_path):
  path = _chat_dir(tmp_path, None, eos_token_id=[2, 99])
  with pytest.raises(ValueError, match=r"generation_config\.json: EOS id 99 is "
                                       r"not an id of the tokenizer \(vocabulary "
                                       r"of 13\)"):
    tokenization.HFTokenizer.from_directory(path, eos_token="<|end_of_text|>")
  (tmp_path / "generation_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="generation_config.json: not a readable "
                                       "JSON file"):
    tokenization.HFTokenizer.from_directory(path, eos_token="<|end_of_text|>")


@pytest.mark.parametrize("template", [CHATML, LLAMA3,
                                      [{"name": "default", "template": LLAMA3},
                                       {"name": "tool_use", "template": "x"}]])
def test_chat_template_renders_as_transformers_does(tmp_path, template):
  transformers = pytest.importorskip("transformers")
  path = _chat_dir(tmp_path, template)
  ours = tokenization.HFTokenizer.from_directory(path, eos_token="<|end_of_text|>")
  theirs = transformers.AutoTokenizer.from_pretrained(path)
  for text in ("the cat sat", "  the cat  "):
    messages = [{"role": "user", "content": text}]
    expected = theirs.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=True)
    assert ours.apply_chat_template(text) == expected
    expected_ids = theirs.apply_chat_template(messages, tokenize=True,
                                              add_generation_prompt=True)
    if hasattr(expected_ids, "keys"):  # newer transformers: a BatchEncoding
      expected_ids = expected_ids["input_ids"]
    assert ours.encode(ours.apply_chat_template(text)) == list(expected_ids)


def test_prompts_with_the_chat_template_are_encoded_without_an_extra_bos(tmp_path):
  from fdiv_jax.run import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  tok = tokenization.HFTokenizer.from_directory(
      _chat_dir(tmp_path, LLAMA3), eos_token="<|end_of_text|>",
      bos_token="<|begin_of_text|>")
  plain = prompts_lib.Prompts.encode(("the cat",), tok)
  assert plain.tokens.tolist() == [[1, 10, 11]]
  chat = prompts_lib.Prompts.encode(("the cat",), tok, chat_template=True)
  # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> the cat
  # <|eot_id|> <|start_header_id|> assistant <|end_header_id|>: one BOS.
  assert chat.tokens.tolist() == [[1, 4, 8, 5, 10, 11, 3, 4, 9, 5]]
  with pytest.raises(ValueError, match=r"^chat_template: needs a Hugging Face "
                                       r"tokenizer"):
    prompts_lib.Prompts.encode(("ab",), tokenization.ToyTokenizer(4),
                               chat_template=True)
  no_template = tokenization.HFTokenizer.from_directory(
      _chat_dir(tmp_path, None), eos_token="<|end_of_text|>")
  with pytest.raises(ValueError, match=r"^chat_template: the tokenizer has no "
                                       r"chat template"):
    prompts_lib.Prompts.encode(("the",), no_template, chat_template=True)
  failing = tokenization.HFTokenizer.from_directory(
      _chat_dir(tmp_path, "{{ raise_exception('no system role') }}"),
      eos_token="<|end_of_text|>")
  with pytest.raises(ValueError, match=r"^chat_template: the chat template "
                                       r"failed on 'the': no system role"):
    prompts_lib.Prompts.encode(("the",), failing, chat_template=True)


def test_the_sampler_stops_at_any_of_several_eos_ids():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fdiv_jax.lm import models, sampling  # pylint: disable=g-import-not-at-top
  assert sampling.SamplerConfig(max_new_tokens=2, eos_id=[5]).eos_id == 5
  assert sampling.SamplerConfig(max_new_tokens=2, eos_id=[5, 6]).eos_id == (5, 6)
  with pytest.raises(ValueError, match="^eos_id: "):
    sampling.SamplerConfig(max_new_tokens=2, eos_id=())
  model = models.GPT2LM(models.GPT2Config(vocab_size=6, n_positions=16,
                                          n_layer=1, n_head=2, n_embd=8))
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  prompts, lengths = np.zeros((64, 1), np.int32), np.ones(64, np.int32)
  config = sampling.SamplerConfig(max_new_tokens=12, eos_id=(1, 2), pad_id=0)
  out = sampling.make_sampler(model, config)(params, jax.random.key(1), prompts,
                                             lengths)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  ends = [tokens[r, lengths[r] - 1] for r in range(64) if lengths[r] < 12]
  assert {1, 2} <= set(ends) <= {1, 2}  # both ids end samples, nothing else
  for r in range(64):
    assert not np.isin(tokens[r, :lengths[r] - 1], [1, 2]).any()
    assert np.all(tokens[r, lengths[r]:] == 0)


def test_the_run_applies_the_chat_template_and_every_eos_id(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fdiv_jax.lm import models  # pylint: disable=g-import-not-at-top
  from fdiv_jax.lm.models import hf_export  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  from fdiv_jax.run import tasks  # pylint: disable=g-import-not-at-top
  model = models.GPT2LM(models.GPT2Config(
      vocab_size=len(CHAT_SPECIALS + CHAT_WORDS), n_positions=32, n_layer=1,
      n_head=2, n_embd=8))
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  path = tmp_path / "chat"
  hf_export.save_hf_checkpoint(model, params, str(path))
  _chat_dir(path, CHATML, eos_token_id=[2, 7])
  c = config_lib.tiny(config_lib.base_config())
  c.model.kind, c.model.path, c.tokenizer = "hf", str(path), "hf"
  c.target.kind = "pointwise"
  c.target.features = ("contains_tokens:token_ids=10",)
  c.prompts = ("the cat",)
  c.chat_template = True
  spec = tasks.describe(c)
  assert spec.sampler.eos_id == (2, 7)
  # <|im_start|> user \n the cat <|im_end|> \n <|im_start|> assistant \n
  assert spec.prompts.tokens.tolist() == [[6, 8, 10, 11, 7, 6, 9]]
  c.tokenizer, c.model.kind, c.model.path = "byte", "gpt2", ""
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.chat_template: needs a Hugging Face"):
    tasks.describe(c)
