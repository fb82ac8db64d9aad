r"""Ours against the PyTorch peer, side by side: train images/s and sampling image-steps/s.

Starts two worker processes, one running our train call (`train.make_train_fn`, as
``run_train.py`` uses it) and sampler (`sampling.sample`, one ``lax.scan``), one running the
PyTorch peer (`benchmarks.peer_torch.Peer`: diffusers' UNet2DModel in the paper's layout,
L_simple + Adam + clip), on the same config, batch and dtype. Each worker builds and warms up
its model first; then the parent asks them in turn, alternating which goes first, for a timed
train measurement and a timed sampling measurement, so both see the same machine state. Only
one worker computes at a time. It prints a table with the best and median rates and the
ratios ours / peer, and JSON lines (one per framework and measurement, plus the ratios),
appended to --out.

  # CIFAR-10 U-Net, float32, batch 8, on this machine (torch and diffusers in another venv):
  python -m benchmarks.compare --config configs/default.py --batch 8 \
      --peer_python .torchenv/bin/python --out benchmarks/results/compare_cpu.jsonl

The peer needs torch and diffusers, which ddpm-jax does not depend on; install them in the
same environment or point --peer_python at an interpreter that has them (and numpy):
``python3 -m venv .torchenv && .torchenv/bin/pip install torch diffusers numpy``.
This module imports neither jax nor torch at the top, so each worker loads only its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

PRESET_OF_SIZE = {32: "cifar10", 256: "celebahq256"}


# --------------------------------------------------------------------------- workers


def _serve(measure: dict, info: dict) -> None:
    """Worker loop: prints "ready" with info, then answers "train N" / "sample N" / "quit"."""
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        what, _, n = line.strip().partition(" ")
        if what == "quit":
            return
        start = time.perf_counter()
        measure[what](int(n))
        print("done " + json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def _first_calls(run_train, run_sample, warmup: int) -> tuple[float, float]:
    """Seconds of the first train and sampling measurement (compilation), then `warmup`
    more of each, untimed: both frameworks reach their steady speed after a few calls (ours
    after about 3 train calls, while the allocator settles)."""
    seconds = []
    for run in (run_train, run_sample):
        start = time.perf_counter()
        run(1)
        seconds.append(time.perf_counter() - start)
        run(warmup)
    return seconds[0], seconds[1]


def _jax_worker(args) -> None:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax import builders, config_lib, conv, parallel, sampling, train
    from ddpm_jax.unet import UNet

    config = config_lib.load_config(args.config)
    config.training.batch_size = args.batch
    config.training.steps_per_call = args.steps_per_call
    config.model.dtype = args.dtype
    train.validate_config(config)
    dp = parallel.DataParallel(config.parallelism)
    local = dp.local_batch_size(args.batch)
    k = args.steps_per_call
    size, channels = config.data.image_size, config.data.channels
    state = dp.to_device(dp.replicate(train.create_train_state(config, jax.random.key(0))))
    train_fn = train.make_train_fn(config, dp)
    rng = np.random.default_rng(0)
    batches = dp.shard_batch({
        "image": rng.integers(0, 256, (k, local, size, size, channels), dtype=np.uint8),
        "label": np.zeros((k, local), np.int32)})
    key_data = dp.replicate(jax.random.key_data(jax.random.key(1)))

    def run_train(n):
        nonlocal state
        for _ in range(n):
            state, metrics = train_fn(state, batches, key_data)
        jax.block_until_ready(metrics)

    model = UNet(builders.unet_config(config))
    sched = builders.schedule(config)
    d = config.diffusion
    shape = (args.batch, size, size, channels)
    steps = args.sample_steps

    # Compiled as the project's samplers are (make_sample_fn, generate): conv.compiler_options.
    @functools.partial(jax.jit, compiler_options=conv.compiler_options())
    def sample(params, key, x_init):
        return sampling.sample(sched, lambda x, t: model.apply({"params": params}, x, t), key,
                               shape, mean_type=d.mean_type, var_type=d.var_type,
                               x_init=x_init, t_start=steps - 1)

    params = jax.tree.map(jnp.asarray, dp.first(state.ema_params))
    x_init = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def run_sample(n):
        for _ in range(n):
            out = sample(params, jax.random.key(2), x_init)
        jax.block_until_ready(out)

    train_first_s, sample_first_s = _first_calls(run_train, run_sample, args.warmup_calls)
    import flax

    info = {"framework": "jax", "num_params": sum(x.size for x in jax.tree.leaves(params)),
            "train_first_call_s": round(train_first_s, 2),
            "sample_first_call_s": round(sample_first_s, 2),
            "images_per_train_call": args.batch * k,
            "image_steps_per_sample_call": args.batch * steps,
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "parallelism": config.parallelism, "steps_per_call": k,
            "versions": {"jax": jax.__version__, "flax": flax.__version__}}
    _serve({"train": run_train, "sample": run_sample}, info)


def _torch_worker(args) -> None:
    import torch

    from benchmarks.peer_torch import Peer

    preset = args.peer_preset
    peer = Peer(preset, "bf16" if args.dtype == "bfloat16" else "fp32", args.peer_compile)
    x0, t = peer.inputs(args.batch)
    steps = args.sample_steps

    def run_train(n):
        peer.model.train()
        for _ in range(n):
            peer.train_step(x0)
        peer.sync()

    def run_sample(n):
        peer.model.eval()
        for _ in range(n * steps):
            peer.forward(x0, t)
        peer.sync()

    train_first_s, sample_first_s = _first_calls(run_train, run_sample, args.warmup_calls)
    import diffusers

    info = {"framework": "torch", "num_params": peer.num_params, "preset": preset,
            "compiled": args.peer_compile, "train_first_call_s": round(train_first_s, 2),
            "sample_first_call_s": round(sample_first_s, 2),
            "images_per_train_call": args.batch, "image_steps_per_sample_call": args.batch * steps,
            "threads": torch.get_num_threads(), "device_kind": str(peer.device),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    _serve({"train": run_train, "sample": run_sample}, info)


# --------------------------------------------------------------------------- parent


class _Worker:
    def __init__(self, python: str, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(
            [python, "-m", "benchmarks.compare", "--worker", name, *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.info = self._read("ready")

    def _read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        raise RuntimeError(f"the {self.name} worker exited (code {self.proc.wait()}) before "
                           f"answering {tag!r}; its error is above.")

    def ask(self, what: str, n: int) -> float:
        self.proc.stdin.write(f"{what} {n}\n")
        self.proc.stdin.flush()
        return self._read("done")["seconds"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


def _rates(times: list[float], units: int) -> dict:
    rates = [units / s for s in times]
    return {"best": max(rates), "median": statistics.median(rates),
            "seconds": [round(s, 3) for s in times]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--batch", type=int, default=8, help="global batch, both frameworks")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps_per_call", type=int, default=1, help="ours: steps per dispatch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train_calls", type=int, default=2,
                        help="train calls (ours) / steps (peer) per timed measurement")
    parser.add_argument("--sample_steps", type=int, default=5,
                        help="reverse steps (network evaluations) per timed sampling call")
    parser.add_argument("--sample_calls", type=int, default=1)
    parser.add_argument("--warmup_calls", type=int, default=3,
                        help="untimed train and sampling measurements per worker after the "
                             "first (compiling) one, before the timed rounds")
    parser.add_argument("--peer_python", default=sys.executable,
                        help="interpreter with torch and diffusers for the peer")
    parser.add_argument("--peer_preset", default=None,
                        help="peer model preset (default: from the config's image size)")
    parser.add_argument("--peer_compile", action="store_true", help="torch.compile the peer")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_preset is None:
        from ddpm_jax import config_lib

        size = config_lib.load_config(args.config).data.image_size
        if size not in PRESET_OF_SIZE:
            parser.error(f"no peer preset for image size {size}; pass --peer_preset.")
        args.peer_preset = PRESET_OF_SIZE[size]
    if args.worker == "jax":
        return _jax_worker(args)
    if args.worker == "torch":
        return _torch_worker(args)

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    passthrough += ["--peer_preset", args.peer_preset]
    load_before = os.getloadavg()
    workers = {"jax": _Worker(sys.executable, "jax", passthrough)}
    try:
        workers["torch"] = _Worker(args.peer_python, "torch", passthrough)
        times = {(f, w): [] for f in workers for w in ("train", "sample")}
        for r in range(args.rounds):
            order = ["jax", "torch"] if r % 2 == 0 else ["torch", "jax"]
            for what, n in (("train", args.train_calls), ("sample", args.sample_calls)):
                for f in order:
                    times[(f, what)].append(workers[f].ask(what, n))
    finally:
        for w in workers.values():
            w.close()
    load_after = os.getloadavg()
    if workers["jax"].info["num_params"] != workers["torch"].info["num_params"]:
        print(f"warning: the models differ: {workers['jax'].info['num_params']:,} parameters "
              f"(ours) against {workers['torch'].info['num_params']:,} (peer).", file=sys.stderr)
    common = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.compare " + " ".join(shlex.quote(a) for a in passthrough
                                                              if a != args.peer_preset
                                                              and a != "--peer_preset"),
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                 "load_average_before": [round(v, 2) for v in load_before],
                 "load_average_after": [round(v, 2) for v in load_after]},
        "config": args.config, "batch": args.batch, "dtype": args.dtype, "rounds": args.rounds,
    }
    records, summary = [], {}
    for (f, what), ts in times.items():
        info = workers[f].info
        per_call = info["images_per_train_call"] * args.train_calls if what == "train" else \
            info["image_steps_per_sample_call"] * args.sample_calls
        rates = _rates(ts, per_call)
        unit = "images_per_s" if what == "train" else "image_steps_per_s"
        summary[(f, what)] = rates
        records.append({**common, "benchmark": what, "framework": f, "worker": info,
                        unit: rates["best"], f"median_{unit}": rates["median"],
                        "seconds_per_measurement": rates["seconds"]})
    for what in ("train", "sample"):
        ours, peer = summary[("jax", what)], summary[("torch", what)]
        records.append({**common, "benchmark": what, "framework": "ratio jax/torch",
                        "ratio_best": ours["best"] / peer["best"],
                        "ratio_median": ours["median"] / peer["median"]})
    print(f"\n{args.config}, batch {args.batch}, {args.dtype}, {args.rounds} rounds; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'':28}{'ours (jax)':>14}{'peer (torch)':>14}{'ratio':>8}")
    for what, unit in (("train", "images/s"), ("sample", "image-steps/s")):
        ours, peer = summary[("jax", what)], summary[("torch", what)]
        for stat in ("best", "median"):
            label = f"{what} {unit}, {stat}"
            print(f"{label:28}{ours[stat]:14.3f}{peer[stat]:14.3f}"
                  f"{ours[stat] / peer[stat]:8.2f}")
    for record in records:
        line = json.dumps(record, sort_keys=True)
        print(line)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
