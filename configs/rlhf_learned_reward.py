r"""RLHF with a learned reward: f-DPG toward P(x) = a(x)·exp(r(x)/β).

The second half of the chain pairs → reward model → f-DPG (README, "Preference
data: offline f-DPO / f-PO, and a reward model for RLHF"):

  # 1. The Bradley–Terry reward model r on the shipped pairs (README figures).
  python -m fdiv_jax.reward --config=configs/preference_pairs.py \
      --workdir=runs/reward_model
  # 2. f-DPG toward a(x)·exp(r(x)/β); reverse KL is RLHF (KL-regularised RL).
  python -m fdiv_jax.main --config=configs/rlhf_learned_reward.py \
      --workdir=runs/rlhf --config.divergence=reverse_kl

Task. The base model a is the shipped demo model; r is the reward model that
step 1 wrote to `REWARD_MODEL` (`runs/reward_model/model`, relative to the
current directory; another one with
--config.target.reward=learned_reward:path=DIR/model). The target is the
reward target p(x) ∝ a(x)·exp(r(x)/β) (`targets.RewardTarget`): with reverse
KL, min_π KL(π‖p) = max_π E_π[r] − β·KL(π‖a) + const, which is RLHF; any other
f of the registry trains toward the same p with a different trade-off (JS,
forward KL = DPG, α). r is trained on pairs labelled by the quickstart's rule
b(x) (one of 15 words present), which the policy never sees:
`ground_truth` makes every evaluation report E_π[b] as its `alignment`
(± its standard error) while r is reported as `moment/learned_reward`.

β. The reward model of step 1 (600 steps, seed 0) orders 95.5% ± 1.5% of the
200 held-out pairs correctly, with a mean margin r(chosen) − r(rejected) of
4.9 nats (rewards of about +2.5 and −2.4, sd 3.0); β = 1 makes p weigh a
typical satisfying sample about e^4.9 ≈ 130 times a violating one.

The target and the ground truth are read when the run starts; a missing
reward model is a config error (exit 2) that says how to train one.
"""

import ml_collections

from fdiv_jax.run import config as config_lib

# Where step 1 above writes the model (relative to the current directory).
REWARD_MODEL = "runs/reward_model/model"
# The quickstart's rule (`configs/quickstart.py`): the pairs' labels.
GROUND_TRUTH = ("word_list:words=love|life|man|time|money|work|never|people|"
                "world|good|you|your|know|think|day")


def get_config(size: str = "") -> ml_collections.ConfigDict:
  """The RLHF-with-a-learned-reward config; ``size`` "tiny" shrinks it."""
  c = config_lib.base_config()
  c.seed = 0
  c.divergence = "reverse_kl"      # RLHF; try js, forward_kl, alpha
  c.num_steps = 300
  c.batch_size = 32
  c.max_new_tokens = 48
  c.learning_rate = 1e-4
  c.lr_schedule = "constant"
  c.warmup_steps = 10
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval_batch_size = 512          # 256 from π and 256 from a
  c.log_every = 10
  c.model.kind = "pretrained"      # the shipped demo model
  c.tokenizer = "byte"
  c.target.kind = "reward"
  c.target.reward = "learned_reward:path=" + REWARD_MODEL
  c.target.beta = 1.0
  c.ground_truth = GROUND_TRUTH
  return config_lib.sized(c, size)
