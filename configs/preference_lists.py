r"""Offline listwise f-PO on the shipped ranked lists.

Data (`fdiv_jax/data/preference_lists.{train,test}.jsonl`, built by
`fdiv_jax/data/make_preferences.py`): 256 training and 64 held-out lists of
K = 4 unconditional 48-byte continuations of the shipped base model a, each
with its ground-truth reward r ∈ {0, 1} (1 iff it contains one of the
quickstart's 15 words; `configs/quickstart.py`).

Task. π starts from π_ref = a (frozen) and minimises the f-PO loss
(`losses.fpo_loss`, Han et al. 2024): per list, D_f(π̂_θ‖π̂*) between
π̂_θ ∝ π_θ^β·π_ref^(1−β) and π̂* ∝ π_ref·exp(r/T), both restricted to the K
responses, with the f of `divergence` (forward KL: the DPO family, a listwise
soft-label DPO; reverse KL: EXO's KL(π̂_θ‖π̂*); docs/mathematics.md) and
T = `preference.reward_temperature`. The target (the same rule as a
pointwise constraint) is the ground truth of the evaluation only; every
evaluation reports π's alignment with it on fresh samples, KL(π‖π_ref), the
divergences to p, the diversity and the held-out accuracy (the fraction of
ordered pairs r_i > r_j within a held-out list that π's implicit reward
log π/π_ref orders the same way).

Run:

  python -m fdiv_jax.main --config=configs/preference_lists.py --workdir=/tmp/exo
  python -m fdiv_jax.main --config=configs/preference_lists.py --workdir=/tmp/fpo_dpo \
      --config.divergence=forward_kl

Your own lists: --config.preference.train_file=lists.jsonl
--config.preference.eval_file=heldout.jsonl (one {"prompt", "responses",
"rewards"} object per line; `fdiv_jax/run/preference_data.py`).
"""

import ml_collections

from fdiv_jax.run import config as config_lib
from fdiv_jax.run import preference_data

# The quickstart's rule (`configs/quickstart.py`), the data's ground truth.
GROUND_TRUTH = ("word_list:words=love|life|man|time|money|work|never|people|"
                "world|good|you|your|know|think|day")


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The f-PO config; ``size`` "tiny" shrinks it for tests."""
  c = config_lib.base_config()
  c.seed = 0
  c.divergence = "reverse_kl"     # EXO's direction; forward_kl: the DPO family
  c.num_steps = 200
  c.batch_size = 16               # lists per step (64 responses)
  c.max_new_tokens = 48           # the data's responses: 48 bytes at most
  c.learning_rate = 1e-4
  c.lr_schedule = "constant"
  c.warmup_steps = 10
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval_batch_size = 512         # 256 from π and 256 from a
  c.log_every = 10
  c.model.kind = "pretrained"     # π_ref = a = the shipped demo model
  c.tokenizer = "byte"
  c.target.kind = "pointwise"     # the ground truth, for evaluation only
  c.target.features = (GROUND_TRUTH,)
  c.preference.objective = "fpo"
  c.preference.train_file = preference_data.shipped("lists_train")
  c.preference.eval_file = preference_data.shipped("lists_test")
  c.preference.beta = 0.1
  c.preference.reward_temperature = 0.25   # r/T ∈ {0, 4}
  return config_lib.sized(c, size)
