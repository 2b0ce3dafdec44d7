"""TargetSpec: every invalid target field is refused at construction, named.

The invalid cases are the ``target.*`` cases of tests/test_config.py (same
values, same expected text): each must be raised by ``TargetSpec`` itself,
with a message that starts with the spec field (``features[0]: ...``), so a
run config can prefix ``config.target.``.
"""

import dataclasses

import numpy as np
import pytest

from fdiv_jax import targets
from fdiv_jax.lm import tokenization
from fdiv_jax.targets import features

TargetSpec = targets.TargetSpec
NAMES = ", ".join(features.names())

POINTWISE = dict(kind="pointwise", features=("word_list:words=love|life",))
DISTRIBUTIONAL = dict(kind="distributional", features=("female",),
                      moments=(0.5,))
REWARD = dict(kind="reward", reward="sentiment")

# (base spec, field set, value, field the message starts with, text in it)
CASES = [
    (POINTWISE, "kind", "ranking", "kind",
     "pointwise, distributional, reward"),
    (POINTWISE, "features", (), "features", "word_list"),
    (POINTWISE, "features", ("no_such_feature",), "features[0]",
     "valid names: " + NAMES),
    (POINTWISE, "features", ("word_list:colour=red",), "features[0]",
     "colour"),
    (POINTWISE, "features", ("word_list:words",), "features[0]", "key=value"),
    (POINTWISE, "features", ("word_list",), "features[0]", "missing argument"),
    (POINTWISE, "features", ("regex:pattern=(",), "features[0]",
     "invalid regular expression"),
    (POINTWISE, "features", ("word_list:words=a", "sentiment"), "features[1]",
     "not boolean"),
    (POINTWISE, "moments", (0.5,), "moments", "distributional"),
    (POINTWISE, "lambdas", (1.0,), "lambdas", "distributional"),
    (POINTWISE, "reward", "sentiment", "reward", "reward target"),
    (DISTRIBUTIONAL, "moments", (0.5, 0.5), "moments",
     "one target moment per feature (1)"),
    (DISTRIBUTIONAL, "moments", (1.5,), "moments", "range (0.0, 1.0)"),
    (DISTRIBUTIONAL, "moments", (1.0,), "moments", "pointwise constraint"),
    (DISTRIBUTIONAL, "lambdas", (1.0, 2.0), "lambdas", "1 finite numbers"),
    (DISTRIBUTIONAL, "fit_samples", 8, "fit_samples", ">= 16"),
    (REWARD, "beta", -1.0, "beta", "> 0"),
    (REWARD, "beta", 0.0, "beta", "> 0"),
    (REWARD, "reward", "", "reward", "sentiment"),
    (REWARD, "reward", "sentimental", "reward", "valid names"),
    (REWARD, "features", ("female",), "features", "unused"),
    # Beyond test_config's table.
    (POINTWISE, "features", "word_list:words=a", "features", "must be a tuple"),
    (DISTRIBUTIONAL, "moments", (float("nan"),), "moments",
     "entry 0 must be a finite number"),
    (DISTRIBUTIONAL, "moments", ("0.5",), "moments",
     "entry 0 must be a finite number"),
    (DISTRIBUTIONAL, "moments", (0.0,), "moments", "strictly inside"),
    (DISTRIBUTIONAL, "lambdas", (float("inf"),), "lambdas", "finite numbers"),
    (DISTRIBUTIONAL, "fit_samples", 64.0, "fit_samples", "integer"),
    (REWARD, "beta", float("inf"), "beta", "finite"),
    (REWARD, "beta", "0.1", "beta", "finite number"),
    (REWARD, "reward", "regex:pattern=(", "reward",
     "invalid regular expression"),
    (REWARD, "reward", {"pattern": "a"}, "reward", "no 'name' key"),
]


@pytest.mark.parametrize("base, field, value, named, text", CASES,
                         ids=[f"{c[1]}={c[2]!r}" for c in CASES])
def test_invalid_field_is_named(base, field, value, named, text):
  with pytest.raises((ValueError, TypeError)) as e:
    TargetSpec(**{**base, field: value})
  message = str(e.value)
  assert message.startswith(f"{named}: "), message
  assert text in message, message


def test_valid_specs_of_each_kind_are_normalised():
  pointwise = TargetSpec(**POINTWISE)
  assert pointwise.features == ("word_list:words=love|life",)
  assert not pointwise.fits_lambdas
  dist = TargetSpec("distributional", ["female", {"name": "length"}],
                    moments=[0.5, 3], fit_samples=16)
  assert dist.features == ("female", {"name": "length"})
  assert dist.moments == (0.5, 3.0) and isinstance(dist.moments[1], float)
  assert dist.lambdas == () and dist.fits_lambdas
  fixed = TargetSpec(**DISTRIBUTIONAL, lambdas=[1], fit_samples=0)
  assert fixed.lambdas == (1.0,) and not fixed.fits_lambdas
  reward = TargetSpec(**REWARD, beta=2)
  assert reward.beta == 2.0 and isinstance(reward.beta, float)
  with pytest.raises(dataclasses.FrozenInstanceError):
    reward.beta = 3.0


def test_config_dict_specs_become_plain_dicts():
  ml_collections = pytest.importorskip("ml_collections")
  reward = ml_collections.ConfigDict({"name": "regex", "pattern": "a+"})
  spec = TargetSpec("reward", reward=reward)
  assert spec.reward == {"name": "regex", "pattern": "a+"}
  assert type(spec.reward) is dict


# --------------------------------------------------------------------------
# build() on a real tokenizer.
# --------------------------------------------------------------------------

BYTES = tokenization.ByteTokenizer()


def _batch(texts):
  """Byte tokens [B, N] and mask [B, N], right-padded with pad_id."""
  ids = [BYTES.encode(t) for t in texts]
  width = max(len(i) for i in ids)
  tokens = np.full((len(ids), width), BYTES.pad_id, np.int32)
  mask = np.zeros((len(ids), width), bool)
  for row, i in enumerate(ids):
    tokens[row, :len(i)] = i
    mask[row, :len(i)] = True
  return tokens, mask


def _build(spec, **kwargs):
  return spec.build(decode=BYTES.batch_decode, encode=BYTES.encode, **kwargs)


def test_build_pointwise_uses_real_decode_and_encode():
  spec = TargetSpec("pointwise", ("word_list:words=love|life",
                                  "contains_words:words=it"))
  target = _build(spec)
  assert isinstance(target, targets.PointwiseTarget)
  tokens, mask = _batch(["i love it", "life", "hate it"])
  # word_list: [1, 1, 0]; contains_words "it": [1, 0, 1].
  log_p = np.asarray(target.log_prob(tokens, mask, np.full(3, -2.0)))
  np.testing.assert_array_equal(log_p, [-2.0, -np.inf, -np.inf])
  np.testing.assert_array_equal(target.feature_values(tokens, mask),
                                [[1, 1], [1, 0], [0, 1]])


def test_build_distributional_fixed_and_unfitted_lambdas():
  tokens, mask = _batch(["she ran", "he ran", "her hat"])
  fixed = _build(TargetSpec(**DISTRIBUTIONAL, lambdas=(2.0,)))
  assert fixed.lambdas == (2.0,) and fixed.moments == (0.5,)
  np.testing.assert_allclose(fixed.log_prob(tokens, mask, np.zeros(3)),
                             [2.0, 0.0, 2.0])
  unfitted = _build(TargetSpec(**DISTRIBUTIONAL))
  assert isinstance(unfitted, targets.DistributionalTarget)
  assert unfitted.lambdas is None
  with pytest.raises(ValueError, match="lambdas is not fitted"):
    unfitted.log_prob(tokens, mask, np.zeros(3))


def test_build_reward():
  tokens, mask = _batch(["ab", "abcd", "a"])
  target = _build(TargetSpec("reward", reward="length", beta=0.5))
  assert isinstance(target, targets.RewardTarget)
  np.testing.assert_allclose(target.log_prob(tokens, mask, np.ones(3)),
                             1.0 + np.array([2, 4, 1]) / 0.5)
  sentiment = _build(TargetSpec(**REWARD))
  values = np.asarray(sentiment.alignment(*_batch(["a lovely happy day",
                                                   "a sad awful day"])))
  assert values[0] > 0.3 and values[1] < -0.3


def test_build_conditional_needs_a_context():
  target = _build(TargetSpec(**POINTWISE), conditional=True)
  assert isinstance(target, targets.ConditionalTarget)
  assert isinstance(target.target, targets.PointwiseTarget)
  tokens, mask = _batch(["love", "none"])
  with pytest.raises(ValueError, match="context is required"):
    target.log_prob(tokens, mask, np.zeros(2))
  context = {"prompts": np.full((2, 1), BYTES.bos_id, np.int32),
             "prompt_lengths": np.ones(2, np.int32)}
  np.testing.assert_array_equal(
      target.log_prob(tokens, mask, np.zeros(2), context), [0.0, -np.inf])


def test_build_names_a_feature_the_real_encode_refuses():
  # Valid with the stand-in (byte) encode; the toy tokenizer has no "z".
  spec = TargetSpec("pointwise", ("ends_with:token_id=0",
                                  "contains_words:words=az"))
  toy = tokenization.ToyTokenizer(4)
  with pytest.raises(ValueError) as e:
    spec.build(decode=toy.batch_decode, encode=toy.encode)
  message = str(e.value)
  assert message.startswith("features[1]: "), message
  assert "'z'" in message and "vocab_size 4" in message, message
