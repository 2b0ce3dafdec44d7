"""Shared test set-up. JAX runs on the CPU; float64 is enabled per test with
``jax.enable_x64(True)`` (a context manager), never globally."""

import os

import pytest


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory):
  """Environment for tests that start Python processes: CPU JAX with a
  persistent compilation cache shared by those processes, so each compiles the
  same step once per test session instead of once per process."""
  cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
  cache.mkdir(exist_ok=True)
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
