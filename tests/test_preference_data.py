"""Preference data: the JSONL readers (a bad row names its file and line), the
tokenisation that matches the sampler's, the deterministic batches, the shipped
set (its labels are the ground-truth rule, its hashes those preferences.json
records) and a bad `config.preference` as a ConfigError before anything runs."""

import hashlib
import json
import os

import numpy as np
import pytest

from fdiv_jax.lm import tokenization
from fdiv_jax.run import config as config_lib
from fdiv_jax.run import preference_data, tasks
from fdiv_jax.targets import features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUND_TRUTH = ("word_list:words=love|life|man|time|money|work|never|people|"
                "world|good|you|your|know|think|day")
PAIR = {"prompt": "", "chosen": "you win", "rejected": "it rains"}
LIST = {"prompt": "Q:", "responses": ["a", "bb", "ccc"], "rewards": [1, 0.5, -2]}


def write_lines(path, lines):
  with open(path, "wb") as f:
    f.write(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n"
                     for x in lines))
  return str(path)


def test_pairs_and_lists_read_back_what_was_written(tmp_path):
  path = preference_data.write_pairs(tmp_path / "p.jsonl", ["", "Hi"], ["a", "é"],
                                     ["b", "c\n"])
  data = preference_data.read_pairs(path)
  assert (data.prompts, data.chosen, data.rejected) == (("", "Hi"), ("a", "é"),
                                                         ("b", "c\n"))
  path = preference_data.write_lists(tmp_path / "l.jsonl", ["x", ""],
                                     [["a", "b"], ["c", "d", "e"]],
                                     [[1.0, 0.0], [0.5, 2, -1]])
  data = preference_data.read_lists(path)
  assert data.responses == (("a", "b"), ("c", "d", "e"))
  assert data.rewards == ((1.0, 0.0), (0.5, 2.0, -1.0)) and data.max_responses == 3


BAD_PAIRS = [
    (b"\xff\xfe", 2, "invalid UTF-8"),
    (b"", 2, "empty line"),
    (b"{not json", 2, "not valid JSON"),
    (b"[1, 2]", 2, "must be a JSON object"),
    (json.dumps({"prompt": "", "chosen": "a"}), 2, "'rejected' is missing"),
    (json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}), 2,
     "'prompt' must be a string"),
    (json.dumps({"prompt": "", "chosen": "", "rejected": "b"}), 2, "'chosen' is empty"),
    (json.dumps({"prompt": "", "chosen": "a\0", "rejected": "b"}), 2, "NUL"),
    (json.dumps({"prompt": "", "chosen": "a", "rejected": "a"}), 2, "the same text"),
]


@pytest.mark.parametrize("bad,line,message", BAD_PAIRS)
def test_a_bad_pair_row_names_the_file_and_line(bad, line, message, tmp_path):
  path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(PAIR), bad, json.dumps(PAIR)])
  with pytest.raises(ValueError) as e:
    preference_data.read_pairs(path)
  assert str(e.value).startswith(f"{path}:{line}: "), str(e.value)
  assert message in str(e.value)


BAD_LISTS = [
    (dict(LIST, responses=["only"], rewards=[1]), "at least 2"),
    (dict(LIST, rewards=[1, 2]), "list of 3 numbers"),
    (dict(LIST, rewards=[1, True, 0]), "'rewards[1]' must be a finite number"),
    (dict(LIST, rewards=[1, "2", 0]), "'rewards[1]' must be a finite number"),
    (dict(LIST, responses=["a", 2, "c"]), "'responses[1]' must be a string"),
]


@pytest.mark.parametrize("bad,message", BAD_LISTS)
def test_a_bad_list_row_names_the_file_and_line(bad, message, tmp_path):
  path = write_lines(tmp_path / "lists.jsonl",
                     [json.dumps(LIST)] * 3 + [json.dumps(bad)])
  with pytest.raises(ValueError) as e:
    preference_data.read_lists(path)
  assert str(e.value).startswith(f"{path}:4: ") and message in str(e.value), str(e.value)
  # A non-finite reward (JSON's NaN / Infinity extension) is refused too.
  path = write_lines(tmp_path / "nan.jsonl", ['{"prompt": "", "responses": ["a", "b"], '
                                              '"rewards": [NaN, 1]}'])
  with pytest.raises(ValueError, match=r"nan.jsonl:1: 'rewards\[0\]' must be a finite"):
    preference_data.read_lists(path)


def test_missing_or_empty_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="nowhere.jsonl: cannot be read"):
    preference_data.read_pairs(str(tmp_path / "nowhere.jsonl"))
  empty = write_lines(tmp_path / "empty.jsonl", [])
  with pytest.raises(ValueError, match="empty.jsonl: holds no row"):
    preference_data.read_lists(empty)


def test_responses_are_tokenised_as_the_sampler_draws_them():
  tok = tokenization.ByteTokenizer()
  tokens, mask, cut = preference_data.encode_responses(["ab", "abcdef"], tok, 4)
  np.testing.assert_array_equal(tokens[0], [97, 98, tok.eos_id, tok.pad_id])
  np.testing.assert_array_equal(mask[0], [True, True, True, False])
  np.testing.assert_array_equal(tokens[1], [97, 98, 99, 100])  # cut: no EOS
  assert mask[1].all() and cut == 1
  prompts, lengths = preference_data.encode_prompts(["", "hi"], tok)
  np.testing.assert_array_equal(prompts, [[tok.pad_id, tok.pad_id, tok.bos_id],
                                          [tok.bos_id, 104, 105]])
  np.testing.assert_array_equal(lengths, [1, 3])


def test_batches_depend_only_on_seed_and_step_and_cover_every_epoch():
  n, b = 10, 4
  steps = [preference_data.batch_indices(n, b, s, seed=3) for s in range(5)]
  again = [preference_data.batch_indices(n, b, s, seed=3) for s in (4, 0, 2, 1, 3)]
  np.testing.assert_array_equal(steps[4], again[0])
  np.testing.assert_array_equal(steps[2], again[2])
  flat = np.concatenate(steps)  # 20 positions = exactly two epochs
  assert sorted(flat[:10]) == list(range(10)) == sorted(flat[10:])
  assert not np.array_equal(steps[0], preference_data.batch_indices(n, b, 0, seed=4))


def _rule():
  tok = tokenization.ByteTokenizer()
  rule = features.from_spec(GROUND_TRUTH, decode=tok.batch_decode)

  def b(texts):
    tokens, mask, _ = preference_data.encode_responses(texts, tok, 48)
    return np.asarray(rule(tokens, mask))

  return b


def test_the_shipped_set_is_labelled_by_the_ground_truth_rule():
  with open(preference_data.shipped("stats"), encoding="utf-8") as f:
    stats = json.load(f)
  assert stats["ground_truth"] == GROUND_TRUTH
  for name, info in stats["files"].items():
    with open(preference_data.shipped(name), "rb") as f:
      data = f.read()
    assert hashlib.sha256(data).hexdigest() == info["sha256"], name
  b = _rule()
  for key, rows in (("pairs_train", 1200), ("pairs_test", 200)):
    pairs = preference_data.read_pairs(preference_data.shipped(key))
    assert len(pairs) == rows
    assert b(pairs.chosen).all() and not b(pairs.rejected).any()
  for key, rows in (("lists_train", 256), ("lists_test", 64)):
    lists = preference_data.read_lists(preference_data.shipped(key))
    assert len(lists) == rows and lists.max_responses == 4
    texts = [t for r in lists.responses for t in r]
    np.testing.assert_array_equal(b(texts), np.concatenate(lists.rewards))
  # Every response is a base-model sample of at most 48 tokens (those of
  # exactly 48 did not end: no EOS, as the sampler draws them).
  tok = tokenization.ByteTokenizer()
  pairs = preference_data.read_pairs(preference_data.shipped("pairs_test"))
  assert max(len(tok.encode(t)) for t in pairs.chosen + pairs.rejected) == 48


def _pairs_config(**preference):
  c = config_lib.base_config()
  c.max_new_tokens = 48
  c.target.features = (GROUND_TRUTH,)
  c.preference.objective = "fdpo"
  c.preference.train_file = preference_data.shipped("pairs_train")
  c.preference.update(preference)
  return c


def test_a_bad_row_is_a_config_error_naming_field_file_and_line(tmp_path):
  path = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), '{"prompt": ""}'])
  with pytest.raises(config_lib.ConfigError) as e:
    tasks.describe(_pairs_config(eval_file=path))
  assert str(e.value).startswith(f"config.preference.eval_file: {path}:2: "), str(e.value)


@pytest.mark.parametrize("preference,message", [
    (dict(objective="ppo"), "config.preference.objective: must be one of"),
    (dict(train_file="/nowhere/p.jsonl"), "config.preference.train_file: pairs file "
     "/nowhere/p.jsonl: cannot be read"),
    (dict(train_file=""), "config.preference.train_file: objective 'fdpo' needs"),
    (dict(beta=0.0), "config.preference.beta"),
    (dict(objective="fpo"), "config.preference.train_file: "),  # pairs read as lists
])
def test_bad_preference_settings_are_config_errors(preference, message):
  with pytest.raises(config_lib.ConfigError) as e:
    tasks.describe(_pairs_config(**preference))
  assert str(e.value).startswith(message), str(e.value)


def test_a_prompt_past_the_model_positions_is_an_error_naming_its_line(tmp_path):
  """The demo model has 128 positions: a 100-byte prompt (101 tokens with BOS)
  + 48 new tokens does not fit, and is refused, never cut."""
  long = dict(PAIR, prompt="x" * 100)
  path = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), json.dumps(long),
                                            json.dumps(PAIR)])
  with pytest.raises(config_lib.ConfigError) as e:
    tasks.describe(_pairs_config(eval_file=path))
  message = str(e.value)
  assert message.startswith(f"config.preference.eval_file: {path}:2: "), message
  assert "101 tokens" in message and "128 positions" in message, message
  c = _pairs_config(eval_file=path)
  c.max_new_tokens = 27  # 101 + 27 = 128: fits
  assert tasks.describe(c).preference.heldout.prompts[1] == "x" * 100


def test_fdpo_with_tv_is_refused_by_name():
  c = _pairs_config()
  c.divergence = "tv"
  with pytest.raises(config_lib.ConfigError, match="config.divergence: f-DPO with tv"):
    tasks.describe(c)


@pytest.mark.slow
def test_the_script_rebuilds_the_shipped_files_byte_for_byte(request, tmp_path):
  """About 20 s of sampling on 2 cores: `pytest -m slow` only."""
  if "slow" not in (request.config.getoption("markexpr") or ""):
    pytest.skip("samples ~6,400 continuations; run with -m slow")
  from fdiv_jax.data import make_preferences  # pylint: disable=g-import-not-at-top
  make_preferences.build(str(tmp_path), seed=0, log=lambda *_: None)
  for name in preference_data.SHIPPED.values():
    with open(tmp_path / name, "rb") as f, open(preference_data.shipped(name), "rb") as g:
      assert f.read() == g.read(), name
