"""Two processes on one CPU machine train like one process with the same global batch.

Each worker process has 4 fake CPU devices and joins a localhost coordinator
(gloo CPU collectives); together they have the 8 devices of this test
process, so the global device indices (and with them the noise keys) and the
per-device rows of each global batch are the same as in a single-process run.
"""

import os
import socket
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np

from ddpm_jax import checkpoint, train
from ddpm_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import importlib.util, sys
    from ddpm_jax import parallel, train
    from ddpm_jax.config_lib import load_config
    address, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    parallel.initialize_distributed(address, 2, pid)
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    config = load_config("configs/test.py")
    {overrides}
    train.train_and_evaluate(config, workdir)
""")

OVERRIDES = dict(num_train_steps=4, steps_per_call=2, checkpoint_every=2, num_samples=0)


def _tiny():
    c = load_config(os.path.join(REPO, "configs", "test.py"))
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    # Params whose gradient is rounding noise (biases before a GroupNorm) get Adam steps of
    # size lr from noise that depends on the reduction order; a larger eps damps them.
    c.optim.eps = 1e-3
    for k, v in OVERRIDES.items():
        c.training[k] = v
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    overrides = "; ".join(
        ["config.model.ch_mult = (1,)", "config.model.attn_resolutions = ()",
         "config.optim.eps = 1e-3"]
        + [f"config.training.{k} = {v!r}" for k, v in OVERRIDES.items()])
    script = WORKER.replace("{overrides}", overrides)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    address = f"127.0.0.1:{_free_port()}"
    multi = str(tmp_path / "multi")
    procs = [subprocess.Popen([sys.executable, "-c", script, address, str(i), multi], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]

    single = str(tmp_path / "single")
    final = train.train_and_evaluate(_tiny(), single)
    with checkpoint.TrainCheckpointer(os.path.join(multi, "checkpoints"), read_only=True) as c:
        assert c.all_steps() == [2, 4]
        state, meta = c.restore_numpy()
    assert meta["step"] == 4
    chex.assert_trees_all_close(state["params"], jax.tree.map(np.asarray, final.params),
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state["ema_params"], jax.tree.map(np.asarray, final.ema_params),
                                rtol=1e-5, atol=1e-6)
