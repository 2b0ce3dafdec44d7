"""The run layer: from a config file to a trained, evaluated, reported run.

``config`` (defaults of every field and the task sizes), ``tasks`` (the
config turned into typed objects once, then into a model, target and prompts),
``evaluation`` (one sampled evaluation: metrics, diversity, samples),
``reporting`` and ``metrics`` (what a run writes and prints), ``experiment``
(train and evaluate in a workdir). ``fdiv_jax.main`` is its command line.
"""
