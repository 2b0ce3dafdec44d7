"""Shared test set-up. JAX runs on the CPU; float64 is enabled per test with
``jax.enable_x64(True)`` (a context manager), never globally."""
