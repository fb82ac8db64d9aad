r"""Sampling throughput: image network evaluations (image-steps) per second.

Runs `ddpm_jax.sampling.sample` (one lax.scan) for --num_steps reverse steps starting at
t = num_steps - 1, for each batch size, with the model of a config file, and prints one JSON
line per batch size (also appended to --out).

  python -m benchmarks.bench_sample --config configs/default.py --batch_sizes 1,2 \
      --num_steps 4 --out benchmarks/results/cpu.jsonl
  # on a GPU (bf16 compute):
  python -m benchmarks.bench_sample --config configs/default.py --config.model.dtype=bfloat16 \
      --batch_sizes 64,256,1024 --num_steps 50 --out benchmarks/results/h100.jsonl
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import emit, flops_of, peak_memory_bytes, time_calls
from ddpm_jax import builders, sampling
from ddpm_jax.unet import UNet

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "1,2", "Comma-separated global batch sizes.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 4, "Reverse steps per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per batch size.")
_OUT = flags.DEFINE_string("out", None, "Append JSON lines to this file.")


def main(argv):
    del argv
    config = _CONFIG.value
    channels = config.data.channels
    size = config.data.image_size
    model = UNet(builders.unet_config(config))
    s = builders.schedule(config)
    params = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32))
    steps = _NUM_STEPS.value
    sharding, _ = builders.data_shardings()

    for batch in [int(b) for b in _BATCH_SIZES.value.split(",")]:
        if batch % jax.device_count():
            raise ValueError(f"batch size {batch} must be a multiple of the "
                             f"{jax.device_count()} devices.")
        emit(bench_one(config, model, s, params, sharding, batch, steps), _OUT.value)


def bench_one(config, model, s, params, sharding, batch, steps) -> dict:
    """Times `steps` reverse steps of one batch; returns the result record."""
    size, channels = config.data.image_size, config.data.channels
    shape = (batch, size, size, channels)

    def run(params, key, x_init):
        return sampling.sample(
            s, lambda x, t: model.apply(params, x, t), key, shape,
            mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type,
            x_init=x_init, t_start=steps - 1, sharding=sharding)

    x_init = jax.device_put(jnp.asarray(
        np.random.default_rng(0).standard_normal(shape), jnp.float32), sharding)
    start = time.perf_counter()
    compiled = jax.jit(run).lower(params, jax.random.key(1), x_init).compile()
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: compiled(params, jax.random.key(1), x_init).block_until_ready(),
                       repeats=_REPEATS.value)
    best = min(times)
    # XLA's cost analysis counts a loop body once, so count one forward pass and scale.
    forward = jax.jit(model.apply).lower(params, x_init, jnp.zeros((batch,), jnp.int32))
    forward_flops = flops_of(forward.compile())
    return {
        "benchmark": "sample",
        "config": {"model": config.model.to_dict(), "image_size": size, "channels": channels},
        "dtype": str(config.model.dtype),
        "batch": batch,
        "num_steps": steps,
        "compile_s": round(compile_s, 3),
        "seconds_per_call": [round(t, 4) for t in times],
        "image_steps_per_s": batch * steps / best,
        "seconds_per_image_step": best / (batch * steps),
        "gflop_per_image_step": forward_flops / batch / 1e9 if forward_flops else None,
        "tflops_per_s": forward_flops * steps / best / 1e12 if forward_flops else None,
        "peak_memory_bytes": peak_memory_bytes(),
    }


if __name__ == "__main__":
    app.run(main)
