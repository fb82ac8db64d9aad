r"""Training throughput of the real train step (`ddpm_jax.train.make_train_fn`).

Times the compiled train call (steps_per_call train steps per dispatch: the step alone
for 1, a lax.scan for more; state donated, data parallel over all devices) on synthetic
uint8 batches, so the input pipeline is not measured. FLOPs are 3x the forward pass of the
global batch (forward + backward), from XLA's cost analysis. Prints one JSON line per batch
size (also appended to --out).

  python -m benchmarks.bench_train --config configs/default.py --batch_sizes 8 \
      --config.training.steps_per_call=4 --out benchmarks/results/cpu.jsonl
  # seconds per step for several steps_per_call, timed in alternation:
  python -m benchmarks.bench_train --config configs/default.py --batch_sizes 8 \
      --compare_steps_per_call 1,4,10 --repeats 3 --out benchmarks/results/cpu.jsonl
  # the train call compiled with ddpm_jax.conv.compiler_options (what the project uses on
  # CPU) against XLA's default options, timed in alternation:
  python -m benchmarks.bench_train --config configs/default.py --batch_sizes 8 \
      --compare_compiler_options --repeats 6 --out benchmarks/results/cpu.jsonl
  # the train call traced with Winograd convolutions on CPU ("auto") and without ("direct"):
  python -m benchmarks.bench_train --config configs/default.py --batch_sizes 8 \
      --compare_cpu_algorithms --repeats 8 --out benchmarks/results/cpu.jsonl
  # the digits U-Net, which "auto" leaves direct, forced to Winograd:
  python -m benchmarks.bench_train --config digits --batch_sizes 128 \
      --compare_cpu_algorithms winograd,direct --repeats 10 --out benchmarks/results/cpu.jsonl
  # on a GPU, bf16 compute, and the largest batch that fits:
  python -m benchmarks.bench_train --config configs/default.py --config.model.dtype=bfloat16 \
      --batch_sizes 128,256 --find_max_batch --out benchmarks/results/h100.jsonl
"""

from __future__ import annotations

import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, flops_of, peak_memory_bytes, time_calls
from ddpm_jax import builders, commands, parallel, train
from ddpm_jax.unet import UNet


def make_parser():
    p = commands.parser("python -m benchmarks.bench_train", __doc__.split("\n")[0])
    commands.add_config_flag(p, "configs/default.py")
    p.add_argument("--batch_sizes", default="8", help="Comma-separated global batch sizes.")
    p.add_argument("--repeats", type=int, default=3, help="Timed calls per batch size.")
    p.add_argument("--find_max_batch", action="store_true",
                   help="Double the batch until it no longer fits (accelerators).")
    p.add_argument("--out", default=None, help="Append JSON lines to this file.")
    p.add_argument("--compare_steps_per_call", default=None,
                   help="Comma-separated steps_per_call values (e.g. 1,4,10): compile one train "
                        "call for each and time them in alternation, --repeats rounds, at the "
                        "first batch size; reports seconds per train step for each.")
    p.add_argument("--compare_compiler_options", action="store_true",
                   help="Time the train call compiled with ddpm_jax.conv.compiler_options (the "
                        "project's choice on CPU) and with XLA's defaults, in alternation, "
                        "--repeats rounds, at the first batch size.")
    p.add_argument("--compare_cpu_algorithms", nargs="?", const="auto,direct", default=None,
                   help="Comma-separated ddpm_jax.conv.cpu_algorithm names (default "
                        "auto,direct: the project's choice and no Winograd): trace the train "
                        "call with each and time them in alternation, --repeats rounds, at the "
                        "first batch size (CPU).")
    return p


def _setup(config, batch: int, k: int):
    """Mesh helper, state, compiled train call, batches and key for k steps per call."""
    config = config.copy_and_resolve_references()
    config.training.batch_size = batch
    config.training.steps_per_call = k
    dp = parallel.DataParallel(config.parallelism)
    local = dp.local_batch_size(batch)
    state = dp.to_device(dp.replicate(train.create_train_state(config, jax.random.key(0))))
    train_fn = train.make_train_fn(config, dp)
    size, channels = config.data.image_size, config.data.channels
    rng = np.random.default_rng(0)
    batches = dp.shard_batch({
        "image": rng.integers(0, 256, (k, local, size, size, channels), dtype=np.uint8),
        "label": np.zeros((k, local), np.int32),
    })
    return dp, state, train_fn, batches, jax.random.key_data(jax.random.key(1))


def _time_in_alternation(runs: dict, rounds: int) -> None:
    """Calls each run's train call once per round, in turn (the same load for each), and
    appends the seconds of each call to its "times"; the state is carried through."""
    for r in runs.values():
        r["times"] = []
    for _ in range(rounds):
        for r in runs.values():
            start = time.perf_counter()
            r["state"], metrics = r["fn"](r["state"], r["batches"], r["key"])
            jax.block_until_ready(metrics)
            r["times"].append(time.perf_counter() - start)


def compare_steps_per_call(config, batch: int, ks: list[int], rounds: int) -> list[dict]:
    """Seconds per step of the train call for each k, timed in alternation (same load)."""
    runs = {}
    for k in ks:
        _, state, fn, batches, key_data = _setup(config, batch, k)
        start = time.perf_counter()
        state, metrics = fn(state, batches, key_data)
        jax.block_until_ready(metrics)
        runs[k] = {"state": state, "fn": fn, "batches": batches, "key": key_data,
                   "first_call_s": time.perf_counter() - start}
    _time_in_alternation(runs, rounds)
    for k in ks:
        runs[k]["per_step"] = [t / k for t in runs[k]["times"]]
    return [{"benchmark": "train_steps_per_call", "framework": "jax",
             "config": {"model": config.model.to_dict(), "image_size": config.data.image_size,
                        "parallelism": config.parallelism},
             "dtype": str(config.model.dtype), "batch": batch, "steps_per_call": k,
             "rounds": rounds, "first_call_s": round(runs[k]["first_call_s"], 3),
             "seconds_per_step": [round(t, 4) for t in runs[k]["per_step"]],
             "best_seconds_per_step": min(runs[k]["per_step"]),
             "median_seconds_per_step": float(np.median(runs[k]["per_step"])),
             "images_per_s": batch / min(runs[k]["per_step"])} for k in ks]


def bench_one(config, batch: int, repeats: int) -> dict:
    """Compiles and times the train call at one global batch size."""
    config.training.batch_size = batch
    k = config.training.steps_per_call
    size, channels = config.data.image_size, config.data.channels
    dp, state, train_fn, batches, key_data = _setup(config, batch, k)

    start = time.perf_counter()
    state, metrics = train_fn(state, batches, key_data)
    jax.block_until_ready(metrics)
    first_call_s = time.perf_counter() - start

    def call():
        nonlocal state
        state, m = train_fn(state, batches, key_data)
        jax.block_until_ready(m)

    times = time_calls(call, warmup=1, repeats=repeats)
    best = min(times)
    model = UNet(builders.unet_config(config))
    params = {"params": jax.tree.map(np.asarray, dp.first(state).params)}
    forward = jax.jit(model.apply).lower(
        params, jnp.zeros((batch, size, size, channels)), jnp.zeros((batch,), jnp.int32))
    forward_flops = flops_of(forward.compile())
    train_flops_per_image = 3 * forward_flops / batch if forward_flops else None
    images_per_s = batch * k / best
    record = {
        "benchmark": "train",
        "framework": "jax",
        "config": {"model": config.model.to_dict(), "image_size": size, "channels": channels,
                   "parallelism": config.parallelism, "steps_per_call": k},
        "dtype": str(config.model.dtype),
        "batch": batch,
        "first_call_s": round(first_call_s, 3),
        "seconds_per_call": [round(t, 4) for t in times],
        "images_per_s": images_per_s,
        "steps_per_s": k / best,
        "gflop_per_train_image": train_flops_per_image / 1e9 if forward_flops else None,
        "tflops_per_s": (train_flops_per_image * images_per_s / 1e12
                         if forward_flops else None),
        "peak_memory_bytes": peak_memory_bytes(),
        "final_loss": float(np.asarray(metrics["loss"]).ravel()[-1]),
    }
    return record


def _compiled_run(config, batch: int, context) -> dict:
    """A run for _time_in_alternation: the one-step train call set up and compiled inside
    `context` (which changes how it compiles), called once; with compile seconds, the
    first step's loss and the compiled HLO text."""
    with context:
        _, state, fn, batches, key_data = _setup(config, batch, 1)
        start = time.perf_counter()
        compiled = fn.lower(state, batches, key_data).compile()
        compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batches, key_data)
    return {"fn": compiled, "state": state, "batches": batches, "key": key_data,
            "compile_s": compile_s, "loss": float(np.asarray(metrics["loss"])[0]),
            "text": compiled.as_text()}


def _alternation_record(r: dict, batch: int, rounds: int) -> dict:
    """The fields every alternation record shares, from a timed run."""
    return {"framework": "jax", "batch": batch, "rounds": rounds,
            "compile_s": round(r["compile_s"], 2), "first_step_loss": r["loss"],
            "seconds_per_step": [round(t, 4) for t in r["times"]],
            "best_seconds_per_step": min(r["times"]),
            "median_seconds_per_step": float(np.median(r["times"])),
            "images_per_s": batch / min(r["times"])}


def compare_compiler_options(config, batch: int, rounds: int) -> list[dict]:
    """Seconds per step of the train call with the project's compiler options and without."""
    from ddpm_jax import conv

    variants = {"project": conv.compiler_options(), "xla_default": None}
    runs = {name: _compiled_run(config, batch, mock.patch.object(
                conv, "compiler_options", lambda *_, o=options: o))
            for name, options in variants.items()}
    _time_in_alternation(runs, rounds)
    return [{"benchmark": "train_compiler_options", "variant": name,
             "compiler_options": variants[name] or {}, "dtype": str(config.model.dtype),
             "ynn_fusions": r["text"].count("__ynn_fusion"),
             **_alternation_record(r, batch, rounds)} for name, r in runs.items()]


def compare_cpu_algorithms(config, batch: int, rounds: int, names: list[str]) -> list[dict]:
    """Seconds per step of the train call traced with each CPU convolution algorithm."""
    from ddpm_jax import conv

    runs = {name: _compiled_run(config, batch, conv.cpu_algorithm(name)) for name in names}
    _time_in_alternation(runs, rounds)
    return [{"benchmark": "train_cpu_algorithm", "variant": name,
             "winograd_min_channels": conv.WINOGRAD_MIN_CHANNELS,
             "dtype": str(config.model.dtype),
             "convolution_ops": r["text"].count(" convolution("),
             **_alternation_record(r, batch, rounds)} for name, r in runs.items()]


def main(argv: list[str] | None = None) -> None:
    args, config = commands.parse_with_config(make_parser(), argv)
    train.validate_config(config)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.compare_compiler_options:
        for record in compare_compiler_options(config, batches[0], args.repeats):
            emit(record, args.out)
        return
    if args.compare_cpu_algorithms:
        names = args.compare_cpu_algorithms.split(",")
        for record in compare_cpu_algorithms(config, batches[0], args.repeats, names):
            emit(record, args.out)
        return
    if args.compare_steps_per_call:
        ks = [int(k) for k in args.compare_steps_per_call.split(",")]
        for record in compare_steps_per_call(config, batches[0], ks, args.repeats):
            emit(record, args.out)
        return
    for batch in batches:
        emit(bench_one(config, batch, args.repeats), args.out)
    if args.find_max_batch:
        batch, largest = batches[-1] * 2, batches[-1]
        while True:
            try:
                bench_one(config, batch, 1)
            except (RuntimeError, ValueError, MemoryError) as e:  # XLA OOM is a RuntimeError
                if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
                    raise
                break
            largest, batch = batch, batch * 2
        emit({"benchmark": "train_max_batch", "dtype": str(config.model.dtype),
              "largest_batch_that_fits": largest, "first_failing_batch": batch}, args.out)


if __name__ == "__main__":
    main()
