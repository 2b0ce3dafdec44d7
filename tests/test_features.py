"""Token-level and host-side text features, the registry and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiv_jax import targets
from fdiv_jax.targets import features

PAD = 0


def encode(text):
  return list(text.encode("utf-8"))


def decode(tokens, mask):
  return [bytes(int(t) for t, m in zip(row, mrow) if m).decode(
      "utf-8", errors="replace") for row, mrow in zip(tokens, mask)]


def batch(texts, width=None):
  """Byte-level tokens [B, N] and mask [B, N] (right padding)."""
  ids = [encode(t) for t in texts]
  width = width or max(1, max(len(i) for i in ids))
  tokens = np.full((len(ids), width), PAD, np.int32)
  mask = np.zeros((len(ids), width), bool)
  for row, i in enumerate(ids):
    tokens[row, :len(i)] = i
    mask[row, :len(i)] = True
  return tokens, mask


# --------------------------------------------------------------------------
# Token-level features.
# --------------------------------------------------------------------------

TOKENS = np.array([[5, 3, 7, 2, 9],
                   [3, 3, 1, 3, 3],
                   [4, 4, 4, 4, 4],
                   [1, 2, 6, 6, 6]], np.int32)
MASK = np.array([[1, 1, 1, 1, 0],
                 [1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 1],
                 [1, 1, 0, 0, 0]], bool)


def test_token_features_exact():
  np.testing.assert_array_equal(
      features.contains_tokens(3)(TOKENS, MASK), [1, 1, 0, 0])
  np.testing.assert_array_equal(  # 9 and 6 only occur under the mask.
      features.contains_tokens([9, 6])(TOKENS, MASK), [0, 0, 0, 0])
  np.testing.assert_array_equal(
      features.count_tokens([3, 4])(TOKENS, MASK), [1, 2, 5, 0])
  np.testing.assert_array_equal(features.length()(TOKENS, MASK), [4, 3, 5, 2])
  np.testing.assert_array_equal(
      features.ends_with(2)(TOKENS, MASK), [1, 0, 0, 1])
  np.testing.assert_array_equal(
      features.contains_sequences([[3, 1], [7, 2, 9]])(TOKENS, MASK),
      [0, 1, 0, 0])
  np.testing.assert_array_equal(  # [7, 2, 9] crosses the mask in row 0.
      features.contains_sequences([[7, 2]])(TOKENS, MASK), [1, 0, 0, 0])
  np.testing.assert_array_equal(  # Longer than the sequence.
      features.contains_sequences([[4] * 6])(TOKENS, MASK), [0, 0, 0, 0])
  out = jax.jit(features.count_tokens(3))(TOKENS, MASK)
  assert out.dtype == jnp.float32 and out.shape == (4,)


def test_contains_words_matches_text_definition():
  texts = ["the atom split", "atomic", "no science here", "cell", "a cell"]
  tokens, mask = batch(texts, width=20)
  feat = features.contains_words(["atom", " cell"], encode, name="science")
  assert feat.name == "science" and feat.is_boolean
  np.testing.assert_array_equal(feat(tokens, mask), [1, 1, 0, 0, 1])


# --------------------------------------------------------------------------
# Host-side text features.
# --------------------------------------------------------------------------


def test_text_features_values():
  texts = [
      "She wrote her first novel at twenty.",
      "He said she was right, and his friends agreed with him.",
      "What a wonderful, lovely, happy day!",
      "The weather was sad and gloomy, a bad day.",
      "You are a fucking idiot.",
      "def f(x):\n    return x + 1\n",
      "def f(x) return x",
  ]
  tokens, mask = batch(texts)
  get = lambda name, **kw: features.get(name, decode=decode, **kw)
  np.testing.assert_array_equal(get("female")(tokens, mask),
                                [1, 0, 0, 0, 0, 0, 0])
  sent = np.asarray(get("sentiment")(tokens, mask))
  assert sent[2] > 0.5 and sent[3] < -0.5 and np.all(np.abs(sent) <= 1)
  assert get("positive_sentiment")(tokens, mask)[2] == 1
  assert get("positive_sentiment")(tokens, mask)[3] == 0
  off = np.asarray(get("offensive")(tokens, mask))
  np.testing.assert_array_equal(off, [0, 0, 0, 0, 1, 0, 0])
  prob = np.asarray(get("offensive", threshold=None)(tokens, mask))
  assert prob[4] > 0.9 and prob[2] < 0.5 and np.all((prob >= 0) & (prob <= 1))
  np.testing.assert_array_equal(get("python_compiles")(tokens, mask),
                                [0, 0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(
      get("word_list", words=["novel", "friends"])(tokens, mask),
      [1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(
      get("regex", pattern=r"^def \w+\(")(tokens, mask), [0, 0, 0, 0, 0, 1, 1])


def test_python_compiles_with_prompt_context():
  prompts, prompt_mask = batch(["def f(x):\n", "def g(y):\n", "x = ("], width=12)
  cont, mask = batch(["    return x\n", "y = 1", "1, 2)\n"])
  context = {"prompts": prompts,
             "prompt_lengths": prompt_mask.sum(-1).astype(np.int32)}
  feat = features.python_compiles(decode)
  np.testing.assert_array_equal(feat(cont, mask, context), [1, 0, 1])
  np.testing.assert_array_equal(feat(cont, mask), [0, 1, 0])  # No prompt.
  assert features.compiles("x = 1") and not features.compiles("x = \x00")


def test_host_feature_compiles_once_one_callback_per_call():
  traces, host_calls = [], []

  def text_fn(texts):
    host_calls.append(len(texts))
    return [float(len(t)) for t in texts]

  feat = features.text_feature("n_chars", text_fn, decode)
  target = targets.RewardTarget(feat, beta=2.0)

  @jax.jit
  def step(tokens, mask, log_base):
    traces.append(1)
    return target.log_prob(tokens, mask, log_base)

  texts = ["abc", "hello world", ""]
  tokens, mask = batch(texts, width=16)
  for i in range(4):
    log_base = jnp.full((3,), -float(i))
    out = step(tokens, mask, log_base)
    np.testing.assert_allclose(out, np.array([3, 11, 0]) / 2.0 - i)
  assert len(traces) == 1
  assert host_calls == [3] * 4
  assert step._cache_size() == 1


def test_text_fn_wrong_length_names_the_feature():
  feat = features.text_feature("broken", lambda ts: [0.0], decode)
  tokens, mask = batch(["a", "b"])
  with pytest.raises(Exception, match="feature 'broken'"):
    jax.block_until_ready(feat(tokens, mask))


def test_wrong_output_shape_names_the_feature():
  bad = features.Feature("two_per_sample", lambda t, m, c=None: t[:, :2])
  with pytest.raises(ValueError, match="'two_per_sample' returned shape"):
    bad(TOKENS, MASK)


# --------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------


def test_registry_errors():
  valid = "valid names: " + ", ".join(features.names())
  for build in (features.get, features.from_spec):
    with pytest.raises(ValueError, match="unknown feature 'sentimnt'") as e:
      build("sentimnt")
    assert valid in str(e.value)
  with pytest.raises(ValueError, match="'sentiment'.*missing.*decode"):
    features.get("sentiment")
  with pytest.raises(ValueError, match="'length'.*unknown argument.*'colour'"):
    features.get("length", colour="red")
  with pytest.raises(ValueError, match="needs decode"):
    features.sentiment(None)
  with pytest.raises(ValueError, match="no 'name' key"):
    features.from_spec({"token_ids": [1]})
  with pytest.raises(ValueError, match="regex.pattern"):
    features.regex("(", decode)
  assert "python_compiles" in features.names()


def test_from_spec_passes_shared_arguments():
  feat = features.from_spec({"name": "female", "label": "about_women"},
                            decode=decode, encode=encode)
  assert feat.name == "about_women"
  tokens, mask = batch(["she is", "he is"])
  np.testing.assert_array_equal(feat(tokens, mask), [1, 0])
  words = features.from_spec({"name": "contains_words", "words": ["is"]},
                             decode=decode, encode=encode)
  np.testing.assert_array_equal(words(tokens, mask), [1, 1])
  assert features.from_spec("length").name == "length"


def test_from_spec_reads_the_string_grammar():
  feat = features.from_spec("count_tokens:token_ids=3|4,label=three_four")
  assert feat.name == "three_four" and not feat.is_boolean
  np.testing.assert_array_equal(feat(TOKENS, MASK), [1, 2, 5, 0])
  words = features.from_spec("word_list:words=novel|friends",
                             decode=decode)
  tokens, mask = batch(["a novel", "my friends", "nothing"])
  np.testing.assert_array_equal(words(tokens, mask), [1, 1, 0])
  with pytest.raises(ValueError, match="not key=value"):
    features.from_spec("word_list:words")
  with pytest.raises(ValueError, match="'length'.*unknown argument.*'colour'"):
    features.from_spec("length:colour=red")


def test_parse_spec():
  parse = features.parse_spec
  assert parse("sentiment") == {"name": "sentiment"}
  assert parse("word_list:words=love|life,label=ll") == {
      "name": "word_list", "words": ("love", "life"), "label": "ll"}
  assert parse("contains_tokens:token_ids=1") == {
      "name": "contains_tokens", "token_ids": 1}
  assert parse("offensive:threshold=None") == {"name": "offensive",
                                               "threshold": None}
  assert parse(" length : max_length = 8 ") == {"name": "length",
                                                "max_length": 8}
  assert parse({"name": "regex", "pattern": "a{1,3}"}) == {
      "name": "regex", "pattern": "a{1,3}"}
  # Names are not looked up here (get / from_spec do that, once).
  assert parse("no_such_feature") == {"name": "no_such_feature"}
  for bad, why in (("", "non-empty"), ("  ", "non-empty"),
                   ("word_list:words", "not key=value"),
                   ("word_list:=x", "not key=value"),
                   ({"words": "x"}, "no 'name' key"), (3, "non-empty")):
    with pytest.raises(ValueError, match=why):
      parse(bad)
