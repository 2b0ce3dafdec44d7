"""Same step, any devices: 8 simulated CPU devices give the 1-device result."""

import json
import os
import subprocess
import sys

import jax
import pytest

from fdiv_jax.train import sharding

HERE = os.path.dirname(__file__)


def test_data_parallel_and_fsdp_match_one_device(subprocess_env):
  env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_step.py")],
                       capture_output=True, text=True, env=env, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8
  for name in ("data8", "data2_fsdp4"):
    r = result[name]
    assert r["devices_used"] == 8, r
    assert r["max_abs_diff"] <= 1e-5, (name, r)
    assert r["loss_diff"] <= 1e-5, (name, r)
  assert result["data8"]["sharded_param_leaves"] == 0
  assert result["data2_fsdp4"]["sharded_param_leaves"] > 0


def test_mesh_errors_name_the_field():
  with pytest.raises(ValueError, match="mesh_fsdp: must be an integer >= 1"):
    sharding.make_mesh(1, 0)
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"needs {2 * n} devices"):
    sharding.make_mesh(2 * n, 1)
