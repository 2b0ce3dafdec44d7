"""Targets p(x) = P(x)/Z: energy-based models defined by a preference.

=================  ==============================  =============================
module             idea                            main names
=================  ==============================  =============================
``energies``       log P as pure array formulas    ``pointwise_log_prob``,
                                                   ``distributional_log_prob``,
                                                   ``reward_log_prob``
``ebms``           target objects (frozen)         ``PointwiseTarget``,
                                                   ``DistributionalTarget``,
                                                   ``RewardTarget``,
                                                   ``ProductTarget``,
                                                   ``ConditionalTarget``
``lambdas``        λ of distributional targets     ``fit_lambdas``, ``LambdaFit``
``features``       b(x), φ(x), r(x) catalogue      ``Feature``, ``get``,
                                                   ``from_spec``
``reward_model``   Bradley–Terry reward model      ``RewardModel``
``ground_truth``   a rule reported as alignment    ``GroundTruthTarget``
``spec``           targets from a description      ``TargetSpec``,
                                                   ``from_config``
=================  ==============================  =============================

``from fdiv_jax import targets`` gives every name above.
"""

from fdiv_jax.targets import features
from fdiv_jax.targets.ebms import (ConditionalTarget, DistributionalTarget,
                                   PointwiseTarget, ProductTarget, RewardTarget,
                                   check_context)
from fdiv_jax.targets.energies import (distributional_log_prob,
                                       log_partition_per_context,
                                       pointwise_log_prob, reward_log_prob)
from fdiv_jax.targets.ground_truth import GroundTruthTarget
from fdiv_jax.targets.lambdas import LambdaFit, LambdaFitWarning, fit_lambdas
from fdiv_jax.targets.spec import TargetSpec, from_config

__all__ = [
    "ConditionalTarget", "DistributionalTarget", "GroundTruthTarget", "LambdaFit",
    "LambdaFitWarning", "PointwiseTarget", "ProductTarget", "RewardTarget",
    "TargetSpec",
    "check_context", "distributional_log_prob", "features", "fit_lambdas",
    "from_config", "log_partition_per_context", "pointwise_log_prob",
    "reward_log_prob",
]
