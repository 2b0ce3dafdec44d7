"""Prints every divergence's exact value next to its Monte-Carlo estimate.

A small random problem over K outcomes: a policy π, an unnormalised target P and a
proposal q. The exact D_f(π‖p) comes from enumeration (`divergences.exact`); the
estimate importance-samples N draws from q with log Ẑ estimated from the same
draws (`estimators.log_partition`, `estimators.divergence`).

  python examples/divergence_table.py [--k 50] [--n 100000] [--seed 0]
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from fdiv_jax.core import divergences, estimators


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--k", type=int, default=50, help="number of outcomes")
  parser.add_argument("--n", type=int, default=100_000, help="samples from q")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  log_pi = jnp.log(jnp.asarray(rng.dirichlet(np.ones(args.k)), jnp.float32))
  log_q = jnp.log(jnp.asarray(rng.dirichlet(4 * np.ones(args.k)), jnp.float32))
  log_target = jnp.asarray(np.log(rng.dirichlet(np.ones(args.k))) + 2.0, jnp.float32)
  log_z = jax.scipy.special.logsumexp(log_target)

  x = jax.random.categorical(jax.random.key(args.seed), log_q, shape=(args.n,))
  log_z_hat = estimators.log_partition(log_target[x], log_q[x])
  print(f"K = {args.k} outcomes, N = {args.n} samples from q")
  print(f"log Z exact {float(log_z):.5f}   IS estimate {float(log_z_hat):.5f}\n")
  print(f"{'divergence':<16}{'exact':>12}{'estimate':>12}{'abs error':>12}")
  cases = [divergences.get(n) for n in divergences.NAMES if n != "alpha"]
  cases += [divergences.get("alpha", alpha=a) for a in (0.5, 2.0)]
  for d in cases:
    exact = float(divergences.exact(d, log_pi, log_target - log_z))
    estimate = float(estimators.divergence(d, log_pi[x], log_target[x], log_q[x],
                                           log_z_hat))
    error = abs(estimate - exact) if math.isfinite(exact) else float("nan")
    print(f"{str(d):<16}{exact:>12.5f}{estimate:>12.5f}{error:>12.2e}")
  ess = estimators.effective_sample_size(log_target[x] - log_q[x])
  print(f"\neffective sample size of the weights P/q: {float(ess):.0f} of {args.n}")


if __name__ == "__main__":
  main()
