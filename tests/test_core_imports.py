"""The pure core imports without Flax, Optax, Orbax or ml_collections."""

import subprocess
import sys


def test_core_does_not_import_heavy_frameworks():
  code = (
      "import sys\n"
      "from fdiv_jax import baselines, divergences, estimators, losses\n"
      "import fdiv_jax.core.divergences, fdiv_jax.core.estimators, fdiv_jax.core.losses\n"
      "heavy = {'flax', 'orbax', 'ml_collections', 'optax', 'torch', 'transformers'}\n"
      "loaded = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
      "assert not loaded, loaded\n"
      "d = divergences.get('js')\n"
      "print(float(d.f(0.0)))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "0.0"
