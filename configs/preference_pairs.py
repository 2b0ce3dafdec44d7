r"""Offline f-DPO on the shipped preference pairs (DPO with reverse KL).

Data (`fdiv_jax/data/preference_pairs.{train,test}.jsonl`, built by
`fdiv_jax/data/make_preferences.py`): 1,200 training and 200 held-out pairs of
unconditional 48-byte continuations of the shipped base model a, chosen ≻
rejected by the quickstart's rule (the chosen one contains one of its 15 words,
the rejected one none; the base model's rate is 37.8%).

Task. π starts from π_ref = a (frozen) and minimises the f-DPO loss
(`losses.fdpo_loss`) with the f of `divergence` (reverse KL = DPO; any f of
the registry but tv) and β = `preference.beta`. The target is the ground truth
(the same rule as a pointwise constraint, p ∝ a·b): training never sees it;
every evaluation reports π's alignment with it (the fraction of fresh samples
that satisfy it), KL(π‖π_ref), the divergences to p and the diversity, each
with its standard error, as f-DPG does, and the held-out preference accuracy.

Run:

  python -m fdiv_jax.main --config=configs/preference_pairs.py --workdir=/tmp/dpo
  python -m fdiv_jax.main --config=configs/preference_pairs.py --workdir=/tmp/fdpo_js \
      --config.divergence=js
  python -m fdiv_jax.study --config=configs/preference_pairs.py --workdir=/tmp/fdpo \
      --divergences=reverse_kl,forward_kl,js,alpha:0.5 --seeds=0,1,2

The reward model of the same pairs (the first step of RLHF, README "Preference
data: offline f-DPO / f-PO, and a reward model for RLHF"; then
`configs/rlhf_learned_reward.py`):

  python -m fdiv_jax.reward --config=configs/preference_pairs.py --workdir=runs/reward_model

Your own pairs: --config.preference.train_file=pairs.jsonl
--config.preference.eval_file=heldout.jsonl (one {"prompt", "chosen",
"rejected"} object per line; set --config.prompts to the prompts to evaluate
on). A GPU run with an imported model: as the other configs
(--config.model.kind=hf --config.model.path=... --config.tokenizer=hf, LoRA
with --config.lora.rank=16), with pairs in its domain.
"""

import ml_collections

from fdiv_jax.run import config as config_lib
from fdiv_jax.run import preference_data

# The quickstart's rule (`configs/quickstart.py`), the data's ground truth.
GROUND_TRUTH = ("word_list:words=love|life|man|time|money|work|never|people|"
                "world|good|you|your|know|think|day")


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The f-DPO config; ``size`` "tiny" shrinks it for tests."""
  c = config_lib.base_config()
  c.seed = 0
  c.divergence = "reverse_kl"     # DPO
  c.num_steps = 300
  c.batch_size = 32               # pairs per step
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
  c.preference.objective = "fdpo"
  c.preference.train_file = preference_data.shipped("pairs_train")
  c.preference.eval_file = preference_data.shipped("pairs_test")
  c.preference.beta = 0.1
  return config_lib.sized(c, size)
