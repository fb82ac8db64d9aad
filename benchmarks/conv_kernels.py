r"""Per-convolution speed of the CIFAR-10 U-Net's 3x3 convolutions: ours against PyTorch's.

Times the forward pass, the input gradient and the kernel gradient of each distinct 3x3
convolution shape of configs/default.py at batch 8 (float32, NHWC), alone, best of
--repeats calls, and prints GFLOP/s (the direct convolution's FLOPs over the time, so
Winograd's rate can exceed the machine's peak). The JAX side runs what the project compiles
("project": `ddpm_jax.conv.conv_general_dilated`, Winograd on CPU for these shapes, with
`ddpm_jax.conv.compiler_options`), the direct convolution with the same options ("direct"),
and the direct convolution with XLA's default options ("xla_default"); the PyTorch
side runs ``aten.convolution_backward`` on channels-last tensors, as the peer
(benchmarks/peer_torch.py) trains. Each run appends JSON lines to --out.

  python -m benchmarks.conv_kernels --out benchmarks/results/conv_cpu.jsonl
  .torchenv/bin/python -m benchmarks.conv_kernels --framework torch \
      --out benchmarks/results/conv_cpu.jsonl

Only numpy and the framework measured are imported (the peer's environment has no JAX).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

# (batch, height, width, in channels, out channels, count): the stride-1 3x3 convolutions of
# the CIFAR-10 U-Net (ch 128, ch_mult 1,2,2,2) at batch 8 and how often each shape occurs in
# one forward pass (48 of its 52 convolutions; the others are the 3-channel input and
# output convolutions and the three stride-2 downsamplings), counted in the compiled train
# step's HLO.
SHAPES = [(8, 32, 32, 128, 128, 7), (8, 32, 32, 256, 128, 2), (8, 32, 32, 384, 128, 1),
          (8, 32, 32, 256, 256, 1), (8, 16, 16, 128, 256, 1), (8, 16, 16, 256, 256, 7),
          (8, 16, 16, 384, 256, 1), (8, 16, 16, 512, 256, 2), (8, 8, 8, 256, 256, 8),
          (8, 8, 8, 512, 256, 3), (8, 4, 4, 256, 256, 11), (8, 4, 4, 512, 256, 3)]


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _jax_rows(repeats: int) -> list[dict]:
    import jax
    import numpy as np

    from ddpm_jax import conv

    rows = []
    pad = ((1, 1), (1, 1))
    variants = (("project", "auto", conv.compiler_options()),
                ("direct", "direct", conv.compiler_options()),
                ("xla_default", "direct", None))
    for variant, algorithm, options in variants:
        for n, h, w, ci, co, _ in SHAPES:
            rng = np.random.default_rng(0)
            x = jax.numpy.asarray(rng.standard_normal((n, h, w, ci), np.float32))
            k = jax.numpy.asarray(rng.standard_normal((3, 3, ci, co), np.float32))
            g = jax.numpy.asarray(rng.standard_normal((n, h, w, co), np.float32))

            def fwd(x, k):
                return conv.conv_general_dilated(x, k, (1, 1), pad,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

            def grads(x, k, g):
                return jax.vjp(fwd, x, k)[1](g)

            fns = {
                "forward": (jax.jit(fwd, compiler_options=options), (x, k)),
                "input_grad": (jax.jit(lambda x, k, g: grads(x, k, g)[0],
                                       compiler_options=options), (x, k, g)),
                "kernel_grad": (jax.jit(lambda x, k, g: grads(x, k, g)[1],
                                        compiler_options=options), (x, k, g)),
            }
            for what, (f, args) in fns.items():
                with conv.cpu_algorithm(algorithm):  # traced on the first call
                    t = _best(lambda f=f, args=args: f(*args).block_until_ready(), repeats)
                rows.append(_row("jax", variant, (n, h, w, ci, co, _), what, t))
    return rows


def _torch_rows(repeats: int) -> list[dict]:
    import torch

    rows = []
    cl = torch.channels_last
    for n, h, w, ci, co, _ in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, ci, h, w).contiguous(memory_format=cl)
        k = torch.randn(co, ci, 3, 3).contiguous(memory_format=cl)
        g = torch.randn(n, co, h, w).contiguous(memory_format=cl)
        conv_args = (None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        with torch.no_grad():
            def backward(mask, x=x, k=k, g=g, conv_args=conv_args):
                return torch.ops.aten.convolution_backward(g, x, k, *conv_args, mask)

            fns = {
                "forward": lambda x=x, k=k: torch.nn.functional.conv2d(x, k, padding=1),
                "input_grad": lambda: backward([True, False, False]),
                "kernel_grad": lambda: backward([False, True, False]),
            }
            for what, f in fns.items():
                rows.append(_row("torch", f"threads={torch.get_num_threads()}",
                                 (n, h, w, ci, co, _), what, _best(f, repeats)))
    return rows


def _row(framework: str, variant: str, shape, what: str, seconds: float) -> dict:
    n, h, w, ci, co, count = shape
    flops = 2 * n * h * w * ci * co * 9
    return {"framework": framework, "variant": variant, "shape_nhwc_in_out": [n, h, w, ci, co],
            "count_per_forward": count, "op": what, "seconds": seconds,
            "gflop_per_s": flops / seconds / 1e9}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_kernels",
                                description=__doc__.split("\n")[0])
    p.add_argument("--framework", choices=("jax", "torch"), default="jax")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="Append JSON lines to this file.")
    args = p.parse_args(argv)
    before = os.getloadavg()
    rows = _jax_rows(args.repeats) if args.framework == "jax" else _torch_rows(args.repeats)
    common = {"benchmark": "conv_kernels",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in sys.argv),
              "cpu_count": os.cpu_count(), "load_average_before": [round(v, 2) for v in before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    # Summary: the seconds these convolutions take in one train step (3 ops each, times
    # their count), and the FLOP-weighted rate, per variant.
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        seconds = sum(r["seconds"] * r["count_per_forward"] for r in mine)
        flops = sum(r["gflop_per_s"] * r["seconds"] * r["count_per_forward"] for r in mine)
        rows.append({"framework": mine[0]["framework"], "variant": variant,
                     "op": "train_step_total", "seconds": seconds,
                     "gflop_per_s": flops / seconds})
    lines = [json.dumps({**common, **r}, sort_keys=True) for r in rows]
    for r in rows:
        print(f"{r['framework']:5s} {r['variant']:12s} {r.get('shape_nhwc_in_out', '')!s:24s} "
              f"{r['op']:11s} {r['seconds'] * 1e3:7.2f} ms {r['gflop_per_s']:6.1f} GFLOP/s")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
