"""benchmarks.tpu_aot: the digits train call compiled for a TPU v5e slice by libtpu, no TPU.

The compile runs in a subprocess: this process already initialized JAX on CPU with 8 fake
devices (tests/conftest.py), and libtpu must be loaded by a fresh one. The figures checked
here are computed independently in this process (state bytes from ``jax.eval_shape``, the
forward FLOPs from XLA's analysis of the unoptimized HLO on CPU).
"""

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import builders, train
from ddpm_jax.config_lib import load_config
from ddpm_jax.unet import UNet

REPO = pathlib.Path(__file__).resolve().parent.parent
# The README's test command installs libtpu into this folder rather than the environment, so
# that the environment's JAX does not probe for a TPU (and print libtpu's warnings) in every
# command; only the compile subprocess below puts it on its path.
LIBTPU_DIR = REPO / ".tpu-aot"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not (LIBTPU_DIR / "libtpu").is_dir(),
    reason='libtpu is not installed: pip install --no-deps --target .tpu-aot "libtpu==0.0.42.1" '
           '(no TPU needed)',
)

_SCRIPT = """
import json
from benchmarks import tpu_aot
from ddpm_jax.config_lib import load_config
config = load_config("digits")
config.training.steps_per_call = 1
config.model.remat = "none"
record = tpu_aot.compile_one(config, "v5e:2x2", "shard_map", "train", 128, with_forward=False)
print("RECORD " + json.dumps(record))
"""


@pytest.fixture(scope="module")
def record():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(LIBTPU_DIR), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RECORD "):])


def _digits_config():
    config = load_config("digits")
    config.training.steps_per_call = 1
    config.model.remat = "none"
    return config


def test_memory_is_the_state_plus_the_batch_and_fits_the_hbm(record):
    state = jax.eval_shape(functools.partial(train.init_train_state, _digits_config()),
                           jax.random.key(0))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    batch_bytes = 32 * 8 * 8 * 1 * 1 + 32 * 4  # per device: 32 uint8 images and labels
    mem = record["memory_per_device_bytes"]
    assert record["devices"] == 4 and record["per_device_batch"] == 32
    assert record["device_kind"] == "TPU v5 lite"
    # Arguments: the whole (replicated, not sharded) state, this device's batch and the key.
    # The TPU pads small arrays to its (8, 128) tiles: 1.8x for this tiny model's biases and
    # norms; about 1.0x for the CIFAR-10 U-Net.
    assert state_bytes + batch_bytes <= mem["arguments"] <= 2.5 * (state_bytes + batch_bytes)
    # The state is donated: the compiled call reuses its buffers for the new state.
    assert 0.95 * state_bytes <= mem["aliases"] <= mem["arguments"]
    assert 0 < mem["total"] < record["hbm_per_device_bytes"] == 16 * 2**30
    assert record["fits_hbm"]


def test_flops_are_about_three_forward_passes(record):
    config = _digits_config()
    model = UNet(builders.unet_config(config))
    params = jax.eval_shape(functools.partial(train.init_train_state, config),
                            jax.random.key(0)).params
    x = jax.ShapeDtypeStruct((32, 8, 8, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((32,), jnp.int32)
    cost = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(
        params, x, t).cost_analysis()
    forward_per_image = cost["flops"] / 32
    ratio = record["gflop_per_image"] * 1e9 / (3 * forward_per_image)
    assert 0.8 < ratio < 1.5, ratio
    assert np.isclose(record["gflop_per_image"] * 1e9 * 32, record["flops_per_device"])


def test_roofline_and_hlo_facts(record):
    roof = record["roofline"]
    chip = record["chip_figures"]
    expect = max(record["flops_per_device"] / (chip["bf16_tflops"] * 1e12),
                 record["bytes_accessed_per_device"] / (chip["hbm_gbps"] * 1e9))
    assert np.isclose(roof["seconds"], expect)
    assert np.isclose(roof["images_per_s"], 128 / expect)
    # k = 1: the step without a loop; its convolutions are all in the compiled HLO.
    assert record["while_loops"] == 0
    assert sum(record["dim_labels"].values()) >= 3 * 10  # forward, input and weight grads
    assert record["compile_s"] > 0


def test_unknown_topology_and_missing_libtpu_messages():
    script = """
from benchmarks import tpu_aot
try:
    tpu_aot.topology_devices("v5e:banana")
except ValueError as e:
    print("VALUE_ERROR", e)
print("MISSING", tpu_aot.LIBTPU_MISSING)
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(LIBTPU_DIR), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "VALUE_ERROR unknown TPU topology 'v5e:banana'" in out and "v5e:2x4" in out
    assert "pip install" in out.split("MISSING", 1)[1]
