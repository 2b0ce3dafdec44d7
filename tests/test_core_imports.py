"""The layers import only downward, and the pure core only JAX, NumPy and chex.

core/  ←  lm/  ←  targets/  ←  train/  ←  run/  ←  main.py
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "fdiv_jax")
# What each layer may import from the package (besides itself).
ALLOWED = {
    "core": {"core"},
    "lm": {"core", "lm"},
    "targets": {"core", "lm", "targets"},
    "train": {"core", "lm", "train"},
    "run": {"core", "lm", "targets", "train", "run"},
}
HEAVY = {"flax", "orbax", "ml_collections", "optax", "torch", "transformers"}


def _package_imports(path):
  """The fdiv_jax subpackages a file imports (any import statement in it)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module + "." + a.name for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] == "fdiv_jax" and len(parts) > 1:
        found.add(parts[1])
  return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downward(layer):
  wrong = {}
  for directory, _, files in os.walk(os.path.join(ROOT, layer)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        # `from fdiv_jax import targets` names the targets layer, and so on;
        # the top-level short aliases (fdiv_jax.models, ...) are not used inside.
        bad = _package_imports(path) - ALLOWED[layer]
        if bad:
          wrong[os.path.relpath(path, ROOT)] = sorted(bad)
  assert not wrong, wrong


def _loaded_after(setup, code):
  """Top-level modules that `code` loads beyond those `setup` loaded."""
  script = (f"import sys\n{setup}\nbefore = {{m.split('.')[0] for m in sys.modules}}\n"
            f"{code}\nafter = {{m.split('.')[0] for m in sys.modules}}\n"
            "print(','.join(sorted(after - before)))\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=False, env=dict(os.environ,
                                                        JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr
  return set(filter(None, out.stdout.strip().split(",")))


def test_core_imports_only_jax_numpy_and_chex():
  new = _loaded_after("import jax, numpy, chex",
                      "from fdiv_jax import baselines, divergences, estimators, "
                      "losses, qrs\nimport fdiv_jax.divergences, fdiv_jax.losses\n"
                      "assert float(divergences.get('js').f(0.0)) == 0.0")
  assert new == {"fdiv_jax"}, new


def test_train_layer_never_sees_a_config():
  new = _loaded_after("", "import fdiv_jax.train")
  assert "ml_collections" not in new
  assert not (HEAVY - {"flax", "optax", "orbax"}) & new
  out = subprocess.run([sys.executable, "-c",
                        "import sys, fdiv_jax.train\n"
                        "print(any(m.startswith('fdiv_jax.run') for m in sys.modules))"],
                       capture_output=True, text=True, check=False)
  assert out.stdout.strip() == "False", out.stderr
