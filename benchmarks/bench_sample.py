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

from benchmarks.common import emit, flops_of, peak_memory_bytes, time_calls
from ddpm_jax import builders, commands, conv, sampling
from ddpm_jax.unet import UNet


def make_parser():
    p = commands.parser("python -m benchmarks.bench_sample", __doc__.split("\n")[0])
    commands.add_config_flag(p, "configs/default.py")
    p.add_argument("--batch_sizes", default="1,2", help="Comma-separated global batch sizes.")
    p.add_argument("--num_steps", type=int, default=4, help="Reverse steps per timed call.")
    p.add_argument("--repeats", type=int, default=3, help="Timed calls per batch size.")
    p.add_argument("--out", default=None, help="Append JSON lines to this file.")
    return p


def main(argv: list[str] | None = None) -> None:
    args, config = commands.parse_with_config(make_parser(), argv)
    channels = config.data.channels
    size = config.data.image_size
    model = UNet(builders.unet_config(config))
    s = builders.schedule(config)
    params = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32))
    steps = args.num_steps
    sharding, _ = builders.data_shardings()

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        if batch % jax.device_count():
            raise ValueError(f"batch size {batch} must be a multiple of the "
                             f"{jax.device_count()} devices.")
        emit(bench_one(config, model, s, params, sharding, batch, steps, args.repeats),
             args.out)


def bench_one(config, model, s, params, sharding, batch, steps, repeats=3) -> dict:
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
    compiled = jax.jit(run, compiler_options=conv.compiler_options()).lower(
        params, jax.random.key(1), x_init).compile()
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: compiled(params, jax.random.key(1), x_init).block_until_ready(),
                       repeats=repeats)
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
    main()
