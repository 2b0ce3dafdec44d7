"""What quasi-rejection sampling with the trained policy as proposal would give.

After training, π approximates the target p = P/Z without being p. QRS
(B. Eikema, G. Kruszewski, C. R. Dance, H. Elsahar, M. Dymetman, "An
approximate sampler for energy-based models with divergence diagnostics",
TMLR 2022; `fdiv_jax.core.qrs`) turns π into a sampler closer to p: draw
x ~ π(·|c) and accept it with probability min(1, P(x|c) / (β π(x|c))), β > 0.
The accepted samples follow exactly

    p_β(x|c) = min(P(x|c), β π(x|c)) / Z_β,c,   Z_β,c = Σ_x min(P(x|c), β π(x|c)),

which is p(·|c) once β ≥ max_x P(x|c)/π(x|c). For each β:

    acceptance rate   E_π[min(1, P/(βπ))] = Z_β,c / β,
    quality           TV(p_β(·|c), p(·|c)) ≤ 1 − Z_β,c / Z_c,
    alignment         E_{p_β}[alignment], what the accepted samples score.

`qrs_report(task, params, rng, num_samples=N, ...)` estimates these at a few
β, without running the sampler to completion.

**Which distribution is sampled.** N continuations x_i ~ π(·|c_i): the model
at `params`, untempered (`task.sampler.untempered()`: temperature 1, no top-k
or top-p, so that log π is the exact log-probability of what was drawn),
prompts c_i from `task.batch(0, B)`, `task.batch(1, B)`, ... (B = batch_size,
every prompt in the task's order; "cycle" prompts are covered equally). Each
is scored for log a(x_i|c_i) and log P(x_i|c_i) (`rollout.draw_and_score`)
and for the target's alignment.

**Estimators.** With w_i = P(x_i|c_i)/π(x_i|c_i) and, per context c, the n_c
samples i ∈ c:

    acceptance_c = (1/n_c) Σ_{i∈c} min(w_i, β)/β          = Ẑ_β,c / β
    tv_bound_c   = 1 − Σ_{i∈c} min(w_i, β) / Σ_{i∈c} w_i  = 1 − Ẑ_β,c / Ẑ_c
    alignment_c  = Σ_{i∈c} min(w_i, β) φ_i / Σ_{i∈c} min(w_i, β)

(Ẑ_c = mean_{i∈c} w_i and Ẑ_β,c = mean_{i∈c} min(w_i, β), the estimates of
`qrs.diagnostics`; with one context these are its values.) The TV bound is an
**estimate** of the bound: Ẑ_c is itself importance-sampled from the same
samples, so where π misses part of p (weights heavier than any sample shows)
Ẑ_c is low and so is the estimated bound. The alignment is the self-normalised
estimate of E_{p_β}[φ] with weights min(P, βπ)/π, which uses every proposal
(not only the accepted ones) and so has less variance than the mean over a
realised set of accepted samples.

**Standard errors** come from `fdiv_jax.core.uncertainty.expectation_per_context`
(delta method, asymptotic): the acceptance is a plain mean of
min(w, β)/β (unit weights: its sample variance over n_c); Z_β,c / Z_c =
E_{p_c}[min(1, βπ/P)] is the self-normalised mean of min(1, β/w) with weights
w, so the TV bound's error is the delta-method error of that ratio of means;
the alignment's is the delta-method error of its self-normalised mean with
weights min(w, β). All are conditional on β: a β picked from the same samples
is treated as fixed.

**Contexts** (conditional targets, several prompts). A QRS sampler has one β,
so each quantile gives one β, from the weights of all samples pooled; each
figure that needs a normaliser (the TV bound through Ẑ_c, the alignment
through Ẑ_β,c) uses its own context's samples only, and every figure is the
mean over the contexts present of its per-context value (each prompt weighs
the same, as in the evaluation's figures), its standard error
sqrt(Σ_c se_c²)/C. A context where no sample has P > 0 (Ẑ_c = 0) gets the
trivial TV bound 1 (standard error 0), is left out of the alignment's mean,
and is counted in `qrs/zero_z_contexts`.

**β.** log β = `qrs.log_beta_for_quantile` of log w over the samples with
P > 0 (the samples a pointwise target rejects have w = 0 and would otherwise
put low quantiles at β = 0). At quantile 1, β is the largest sampled weight:
no sampled x has P/(βπ) > 1, every sample with P > 0 is accepted with
probability exactly P/(βπ), and the estimated TV bound is 0 by construction
(the samples show no weight above β; the exact bound can still be > 0).

**Accepted samples.** `num_accepted` is the count of one realised QRS run over
the same proposals (`qrs.accept`; one uniform per proposal shared by every β,
so the sets accepted at larger β are nested in those at smaller β).

Keys of the returned dict (all floats, JSON-ready; `<q>` is `repr(float(q))`
of each quantile: `q0.5`, `q0.9`, `q0.99`, `q1.0`):

    qrs/num_samples, qrs/num_contexts, qrs/zero_z_contexts, qrs/log_z, qrs/seconds
    qrs/<q>/log_beta, qrs/<q>/acceptance, qrs/<q>/acceptance_se,
    qrs/<q>/tv_bound, qrs/<q>/tv_bound_se, qrs/<q>/alignment,
    qrs/<q>/alignment_se, qrs/<q>/num_accepted

`qrs/log_z` is the mean over contexts with Ẑ_c > 0 of log Ẑ_c (−inf if none).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import _values, estimators, qrs, uncertainty
from fdiv_jax.train import rollout

Array = jax.Array
DEFAULT_QUANTILES = (0.5, 0.9, 0.99, 1.0)
FIGURES = ("log_beta", "acceptance", "acceptance_se", "tv_bound", "tv_bound_se",
           "alignment", "alignment_se", "num_accepted")


class Proposals(NamedTuple):
  """Scored samples x_i ~ π(·|c_i), NumPy arrays [N]."""
  log_target: np.ndarray    # float32: log P(x_i|c_i) (−inf where P = 0)
  log_proposal: np.ndarray  # float32: log π(x_i|c_i), the proposal's
  alignment: np.ndarray     # float32: the target's alignment of x_i
  context_ids: np.ndarray   # int32: c_i


def quantile_key(quantile: float) -> str:
  """`qrs/q0.9`: the prefix of the figures at one quantile."""
  return f"qrs/q{float(quantile)!r}"


def draw_proposals(task, params, rng: Array, *, num_samples: int, batch_size: int,
                   base_params: Any = None) -> Proposals:
  """Draws `num_samples` continuations x ~ π (the model at `params`), scored.

  π is untempered (`task.sampler.untempered()`); the prompts are those of
  `task.batch(0, batch_size)`, `task.batch(1, batch_size)`, ..., the last
  batch cut to `num_samples` rows. One jitted function samples and scores
  every batch (compiled once: every batch has `batch_size` rows; with a
  hashable model, target and sampler, as the library's are, once per process
  for the same ones and shapes).

  Args:
    task: has `model`, `target`, `sampler`, `base_params` and
      `batch(step, batch_size)` (e.g. `run.tasks.Task`).
    params: the parameters of π.
    rng: PRNG key; batch i uses `fold_in(rng, i)`.
    num_samples: N > 0.
    batch_size: B > 0, rows per sampler call.
    base_params: the base model a (for log P = log a + energy); defaults to
      `task.base_params` (pass the train state's copy when the step donated
      the task's buffers).
  """
  num_samples = _values.integer("num_samples", num_samples, minimum=1)
  batch_size = _values.integer("batch_size", batch_size, minimum=1)
  model, target = task.model, task.target
  sampler = task.sampler.untempered()
  base = task.base_params if base_params is None else base_params
  try:   # hashable (as the library's are): reuse the compiled draw across calls
    hash((model, target, sampler))
    draw = functools.partial(_draw, model, target, sampler)
  except TypeError:
    draw = jax.jit(functools.partial(_draw.__wrapped__, model, target, sampler))
  chunks = []
  for i in range(math.ceil(num_samples / batch_size)):
    chunks.append(jax.device_get(draw(params, base, task.batch(i, batch_size),
                                      jax.random.fold_in(rng, i))))
  log_target, log_q, alignment, ids = (np.concatenate(x)[:num_samples]
                                       for x in zip(*chunks))
  return Proposals(log_target.astype(np.float32), log_q.astype(np.float32),
                   alignment.astype(np.float32), ids.astype(np.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draw(model, target, sampler, params, base_params, batch, key):
  """One batch x ~ π: (log P, log π, alignment, context ids), each [B]."""
  x = rollout.draw_and_score(model, target, sampler, params, base_params, batch,
                             key)
  alignment = target.alignment(x.tokens, x.mask, rollout.context(x))
  return (x.log_target, x.log_q, jnp.asarray(alignment, jnp.float32),
          jnp.asarray(x.context_ids, jnp.int32))


@functools.partial(jax.jit, static_argnames=("num_contexts",))
def _per_context(log_target, log_proposal, alignment, context_ids, log_beta, *,
                 num_contexts):
  """Per-context estimates and errors at one β (module docstring)."""
  log_w = log_target - log_proposal
  unit = jnp.zeros_like(log_w)
  capped = jnp.minimum(log_w, log_beta)                  # log min(w, β)
  each = functools.partial(uncertainty.expectation_per_context,
                           context_ids=context_ids, num_contexts=num_contexts)
  acceptance = each(jnp.exp(capped - log_beta), unit, unit)
  # Z_β,c / Z_c = E_{p_c}[min(1, β/w)], self-normalised with weights w = P/π.
  kept = each(jnp.exp(jnp.minimum(log_beta - log_w, 0.0)), log_target,
              log_proposal)
  alignment = each(alignment, capped, unit)
  counts = jax.ops.segment_sum(jnp.ones_like(log_w), context_ids,
                               num_segments=num_contexts)
  log_z = estimators.update_partition(estimators.init_partition(num_contexts),
                                      log_target, log_proposal,
                                      context_ids).log_z
  return acceptance, kept, alignment, counts, log_z


def _mean(values: np.ndarray, errors: np.ndarray, use: np.ndarray
          ) -> tuple[float, float]:
  """The mean over the contexts `use` of their values, and its error."""
  n = int(np.sum(use))
  if n == 0:
    return math.nan, math.nan
  return (float(np.sum(values[use]) / n),
          float(np.sqrt(np.sum(np.square(errors[use]))) / n))


def figures(proposals: Proposals, log_beta: float, *, num_contexts: int,
            accept_rng: Array | None = None) -> dict[str, float]:
  """The figures at one β (module docstring), keys without the prefix.

  Args:
    proposals: samples x_i ~ π with their scores.
    log_beta: log β, finite.
    num_contexts: C; `proposals.context_ids` are in [0, C).
    accept_rng: the key of the realised accept/reject decisions
      (`num_accepted`); None leaves `num_accepted` out.

  Returns:
    {"log_beta", "acceptance", "acceptance_se", "tv_bound", "tv_bound_se",
    "alignment", "alignment_se"[, "num_accepted"]}: floats.
  """
  log_beta = float(log_beta)
  if not math.isfinite(log_beta):
    raise ValueError(f"log_beta: must be finite, got {log_beta}.")
  p = proposals
  acceptance, kept, alignment, counts, log_z = jax.device_get(_per_context(
      jnp.asarray(p.log_target), jnp.asarray(p.log_proposal),
      jnp.asarray(p.alignment), jnp.asarray(p.context_ids),
      jnp.float32(log_beta), num_contexts=num_contexts))
  present = counts > 0
  informed = present & np.isfinite(log_z)               # Ẑ_c > 0
  tv_c = np.where(informed, 1.0 - kept.value, 1.0)      # Ẑ_c = 0: trivial bound
  tv_se_c = np.where(informed, kept.standard_error, 0.0)
  out = {"log_beta": log_beta}
  out["acceptance"], out["acceptance_se"] = _mean(
      acceptance.value, acceptance.standard_error, present)
  out["tv_bound"], out["tv_bound_se"] = _mean(tv_c, tv_se_c, present)
  out["alignment"], out["alignment_se"] = _mean(
      alignment.value, alignment.standard_error, informed)
  if accept_rng is not None:
    out["num_accepted"] = float(np.sum(jax.device_get(qrs.accept(
        accept_rng, jnp.asarray(p.log_target), jnp.asarray(p.log_proposal),
        log_beta))))
  return out


def _check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
  if isinstance(quantiles, (str, bytes)) or not len(quantiles):
    raise ValueError(f"quantiles: must be a non-empty sequence of numbers in "
                     f"[0, 1], got {quantiles!r}.")
  out = tuple(_values.real(f"quantiles[{i}]", q, low=0.0, high=1.0)
              for i, q in enumerate(quantiles))
  if len({quantile_key(q) for q in out}) != len(out):
    raise ValueError(f"quantiles: must be distinct, got {quantiles!r}.")
  return out


def report_from_proposals(proposals: Proposals, rng: Array, *, num_contexts: int,
                          quantiles: Sequence[float] = DEFAULT_QUANTILES
                          ) -> dict[str, float]:
  """`qrs_report`'s dict from given proposals (x_i ~ π, scored); `rng` draws
  the accept/reject decisions. `qrs/seconds` is left out."""
  quantiles = _check_quantiles(quantiles)
  p = proposals
  n = int(p.log_target.shape[0])
  positive = np.isfinite(p.log_target)                  # P > 0
  counts = np.bincount(p.context_ids, minlength=num_contexts)
  log_z = jax.device_get(estimators.update_partition(
      estimators.init_partition(num_contexts), jnp.asarray(p.log_target),
      jnp.asarray(p.log_proposal), jnp.asarray(p.context_ids)).log_z)
  informed = (counts > 0) & np.isfinite(log_z)
  out = {"qrs/num_samples": float(n), "qrs/num_contexts": float(num_contexts),
         "qrs/zero_z_contexts": float(np.sum((counts > 0) & ~informed)),
         "qrs/log_z": (float(np.mean(log_z[informed])) if informed.any()
                       else -math.inf)}
  for q in quantiles:
    prefix = quantile_key(q)
    if not positive.any():   # no sample has P > 0: nothing would be accepted
      fig = {"log_beta": math.nan, "acceptance": 0.0, "acceptance_se": 0.0,
             "tv_bound": 1.0, "tv_bound_se": 0.0, "alignment": math.nan,
             "alignment_se": math.nan, "num_accepted": 0.0}
    else:
      log_beta = float(qrs.log_beta_for_quantile(
          jnp.asarray(p.log_target[positive]),
          jnp.asarray(p.log_proposal[positive]), q))
      fig = figures(p, log_beta, num_contexts=num_contexts, accept_rng=rng)
    out.update({f"{prefix}/{k}": float(fig[k]) for k in FIGURES})
  return out


def qrs_report(task, params, rng: Array, *, num_samples: int,
               quantiles: Sequence[float] = DEFAULT_QUANTILES, batch_size: int,
               base_params: Any = None) -> dict[str, float]:
  """QRS with π (the model at `params`) as proposal for the task's target p.

  Draws `num_samples` x ~ π(·|c), untempered, over the task's prompts
  (`draw_proposals`), and at β = each quantile of the weights P/π estimates
  the acceptance rate Z_β/β, the bound 1 − Z_β/Z on TV(p_β, p) (Z
  importance-sampled from the same samples: an estimate of the bound), and
  E_{p_β}[alignment] of the accepted samples, p_β ∝ min(P, βπ), each with
  its standard error; see the module docstring for the estimators, the
  contexts and the keys.

  Args:
    task: has `model`, `target`, `sampler`, `base_params`, `num_contexts`
      and `batch(step, batch_size)` (e.g. `run.tasks.Task`).
    params: the parameters of π (e.g. `train.state.evaluated_params(state)`).
    rng: PRNG key.
    num_samples: N > 0 proposals.
    quantiles: distinct numbers in [0, 1].
    batch_size: rows per sampler call.
    base_params: the base model's parameters (default `task.base_params`).

  Returns:
    A flat dict of floats (module docstring), JSON-ready.
  """
  quantiles = _check_quantiles(quantiles)
  start = time.perf_counter()
  draw_rng, accept_rng = jax.random.split(rng)
  proposals = draw_proposals(task, params, draw_rng, num_samples=num_samples,
                             batch_size=batch_size, base_params=base_params)
  out = report_from_proposals(proposals, accept_rng,
                              num_contexts=int(task.num_contexts),
                              quantiles=quantiles)
  out["qrs/seconds"] = time.perf_counter() - start
  return out
