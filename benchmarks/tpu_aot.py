r"""Compiles the train call and the sampler for Cloud TPU slices, with no TPU attached.

libtpu (from PyPI) compiles for a described topology ahead of time: the devices of
``jax.experimental.topologies.get_topology_desc("v5e:2x4", platform="tpu")`` make a mesh,
and ``jax.jit(...).lower(<ShapeDtypeStructs with shardings>).compile()`` runs the real TPU
compiler on this host. Nothing is executed. Per compile, one JSON line goes to --out:

* compile seconds (on this host's CPUs);
* per-device bytes from ``compiled.memory_analysis()`` (arguments, outputs, temporaries,
  generated code, aliases) against the device's share of the chip's HBM;
* FLOPs and bytes accessed per device from ``compiled.cost_analysis()``, FLOPs per image and
  their ratio to 3x the forward pass (the forward compiled for the same topology and
  per-device batch);
* a roofline bound: per device, step time >= max(FLOPs / peak, bytes accessed / HBM
  bandwidth), given as images/s for the whole slice;
* the convolutions' ``dim_labels`` in the compiled HLO;
* with two per-device batch sizes compiled for the same setup (in this run or earlier
  records of --out), a linear fit bytes = a + b * per_device_batch and the largest global
  batch it predicts below the HBM less a reserve.

Setup (no TPU needed; the libtpu version jax[tpu]==0.10.2 pins; 0.0.52 also works)::

  pip install "libtpu==0.0.42.1"                 # or: pip install -e ".[tpu-aot]"
  # or, as the test command does, outside the environment: PYTHONPATH=.tpu-aot after
  #   pip install --no-deps --target .tpu-aot "libtpu==0.0.42.1"
  python -m benchmarks.tpu_aot --config configs/digits.py --topology v5e:2x2
  python -m benchmarks.tpu_aot --config configs/default.py --topology v5e:2x4 \
      --what train,sample --out benchmarks/results/tpu_aot.jsonl
  python -m benchmarks.tpu_aot --config configs/celebahq256.py --topology v5e:2x4 \
      --remat full --batch 64,128 --out benchmarks/results/tpu_aot.jsonl
  python -m benchmarks.tpu_aot --table benchmarks/results/tpu_aot.jsonl   # markdown table

Topology names are ``<generation>:<chips per dimension>``: v2:2x2, v3:2x2 (a v3-8),
v3:4x4 (v3-32), v4:2x2x1 (v4-8), v4:2x2x2 (v4-16), v5e:2x2, v5e:2x4 (v5e-8), v5e:4x8
(v5e-32), v5p:2x2x1 (v5p-8), v6e:2x2. On v2, v3 and v4 the compile-only topology has one
device per TensorCore (two per chip), so those figures are per core with half a chip's HBM;
a real v4 runs JAX with one (megacore) device per chip.

Measured on a shared 2-core host (libtpu 0.0.42.1): the TPU compile of the CIFAR-10 train
call takes about 14 minutes, the 256x256 one about 15-17 (and the forward pass for the
FLOP ratio 4-8 more; --no_forward skips it); the digits config compiles in 15-30 s.
"""

from __future__ import annotations

import os

# Before jax (and with it libtpu) is loaded: compile on this host without opening a local
# TPU. The accelerator type and worker hostnames only quiet libtpu's probe of the cloud
# metadata (the topology comes from --topology). libtpu holds /tmp/libtpu_lockfile so that
# one process owns a TPU; this tool opens none, so several may compile at once (and the
# tests may run beside a compile).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import collections
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import pathlib
import re
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import builders, commands, parallel, sampling, train
from ddpm_jax.config_lib import load_config
from ddpm_jax.unet import UNet

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures of a TPU generation."""

    name: str
    bf16_tflops: float  # dense peak per chip
    hbm_gib: float  # HBM per chip
    hbm_gbps: float  # HBM bandwidth per chip, 1e9 bytes/s
    source: str


# Keyed by jax's device_kind. Sources: the "system architecture" tables of the Cloud TPU
# docs, one page per generation (https://cloud.google.com/tpu/docs/v3, .../v4, .../v5e,
# .../v5p, .../v6e). v5e's page gives "16 GB" in one table and "16 GiB" in another; 16 GiB
# is used. On TPU a float32 matmul or convolution at JAX's default precision runs as one
# bf16 pass on the MXU, so the bf16 peak is the bound for float32 models too.
CHIPS = {
    "TPU v2": Chip("v2", 45.0, 16.0, 600.0, "https://cloud.google.com/tpu/docs/v2"),
    "TPU v3": Chip("v3", 123.0, 32.0, 900.0, "https://cloud.google.com/tpu/docs/v3"),
    "TPU v4": Chip("v4", 275.0, 32.0, 1200.0, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 197.0, 16.0, 819.0, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 459.0, 95.0, 2765.0, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 918.0, 32.0, 1640.0, "https://cloud.google.com/tpu/docs/v6e"),
}

# Bytes kept free below the HBM when predicting the largest batch (runtime buffers,
# fragmentation, the input pipeline's device buffers).
HBM_RESERVE_BYTES = GIB // 2

TOPOLOGY_EXAMPLES = ("v3:2x2", "v4:2x2x1", "v5e:2x2", "v5e:2x4", "v5e:4x8", "v5p:2x2x1")

LIBTPU_MISSING = (
    "libtpu is not importable, so nothing can be compiled for a TPU. Install it (no TPU "
    'needed): pip install "libtpu==0.0.42.1"  (jax[tpu]==0.10.2 pins 0.0.42.*), or '
    'pip install -e ".[tpu-aot]"; or into a folder: pip install --no-deps --target DIR '
    '"libtpu==0.0.42.1" and run with PYTHONPATH=DIR.'
)


# --------------------------------------------------------------------------- topology


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None if it cannot be imported."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU topology such as "v5e:2x4".

    Raises:
      RuntimeError: libtpu is missing (the message says how to install it).
      ValueError: libtpu does not know the topology name.
    """
    if libtpu_version() is None:
        raise RuntimeError(LIBTPU_MISSING)
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # libtpu raises JaxRuntimeError (INVALID_ARGUMENT) for bad names
        raise ValueError(
            f"unknown TPU topology {name!r} ({str(e).splitlines()[0][:300]}); names are "
            f"<generation>:<chips per dimension>, e.g. {', '.join(TOPOLOGY_EXAMPLES)}."
        ) from e


def chip_of(devices: list) -> tuple[Chip, int]:
    """(published chip figures, devices per chip) of a topology's devices."""
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ValueError(f"no published figures for device kind {kind!r}; known: {list(CHIPS)}.")
    chips = len({tuple(d.coords) for d in devices})
    return CHIPS[kind], len(devices) // chips


# --------------------------------------------------------------------------- what to compile


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _stacked(tree, n):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), tree)


def state_shapes(config) -> Any:
    """The train state's shapes and dtypes, without computing it."""
    return jax.eval_shape(functools.partial(train.init_train_state, config), jax.random.key(0))


def lower_train(config, dp: parallel.DataParallel, global_batch: int):
    """The project's train call (`train.make_train_fn`) lowered for dp's devices."""
    k = config.training.steps_per_call
    size, channels = config.data.image_size, config.data.channels
    n = dp.num_devices
    state = state_shapes(config)
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32)
    fn = train.make_train_fn(config, dp)
    if dp.parallelism == "shard_map":
        batch_sharding = NamedSharding(dp.mesh, P(None, parallel.AXIS))
        batches = {
            "image": jax.ShapeDtypeStruct((k, global_batch, size, size, channels), jnp.uint8,
                                          sharding=batch_sharding),
            "label": jax.ShapeDtypeStruct((k, global_batch), jnp.int32, sharding=batch_sharding),
        }
        key_data = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=dp.replicated)
        return fn.lower(_abstract(state, dp.replicated), batches, key_data)
    b = global_batch // n
    batches = {"image": jax.ShapeDtypeStruct((n, k, b, size, size, channels), jnp.uint8),
               "label": jax.ShapeDtypeStruct((n, k, b), jnp.int32)}
    return fn.lower(_stacked(state, n), batches, key_data)


def lower_sample(config, dp: parallel.DataParallel, global_batch: int):
    """The ancestral sampler (one lax.scan over all T steps) lowered for dp's devices."""
    model = UNet(builders.unet_config(config))
    sched = builders.schedule(config)
    d, s = config.diffusion, config.sampling
    size, channels = config.data.image_size, config.data.channels
    sharding = NamedSharding(dp.mesh, P(parallel.AXIS))

    def sample(params, key_data):
        x = sampling.sample(sched, lambda x, t: model.apply({"params": params}, x, t),
                            jax.random.wrap_key_data(key_data),
                            (global_batch, size, size, channels), mean_type=d.mean_type,
                            var_type=d.var_type, clip_denoised=s.clip_denoised,
                            sharding=sharding)
        return builders.to_uint8(x)

    params = _abstract(state_shapes(config).ema_params, dp.replicated)
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=dp.replicated)
    return jax.jit(sample, out_shardings=sharding).lower(params, key_data)


def lower_forward(config, dp: parallel.DataParallel, global_batch: int):
    """One forward pass of the U-Net (eval mode) at this global batch, sharded over dp."""
    model = UNet(builders.unet_config(config))
    size, channels = config.data.image_size, config.data.channels
    sharding = NamedSharding(dp.mesh, P(parallel.AXIS))
    params = _abstract(state_shapes(config).params, dp.replicated)
    x = jax.ShapeDtypeStruct((global_batch, size, size, channels), jnp.float32, sharding=sharding)
    t = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding)
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t), out_shardings=sharding)
    return fwd.lower(params, x, t)


# --------------------------------------------------------------------------- analysis


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return dict(cost or {})


def memory_bytes(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled executable, and their sum as "total".

    total = arguments + outputs - aliases (donated inputs reused as outputs) + temporaries
    + generated code: the device memory the call needs while it runs.
    """
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliases": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
    }
    out["total"] = (out["arguments"] + out["outputs"] - out["aliases"] + out["temporaries"]
                    + out["generated_code"])
    return out


def dim_labels(hlo_text: str) -> dict[str, int]:
    """How many convolutions of the HLO text use each dim_labels (layout) string."""
    return dict(collections.Counter(re.findall(r"dim_labels=([^ ,\n}]+)", hlo_text)))


def count_while_loops(hlo_text: str) -> int:
    return len(re.findall(r"\bwhile\(", hlo_text))


def roofline(flops: float, bytes_accessed: float, chip: Chip, devices_per_chip: int) -> dict:
    """Lower bound on one call's time per device: max(FLOPs / peak, bytes / bandwidth)."""
    peak = chip.bf16_tflops * 1e12 / devices_per_chip
    bandwidth = chip.hbm_gbps * 1e9 / devices_per_chip
    t_flops, t_bytes = flops / peak, bytes_accessed / bandwidth
    return {"seconds": max(t_flops, t_bytes), "flops_seconds": t_flops,
            "bytes_seconds": t_bytes, "bound": "compute" if t_flops >= t_bytes else "memory"}


# --------------------------------------------------------------------------- one compile


class DoesNotFit(RuntimeError):
    """The TPU compiler ran out of HBM; ``record`` says for what."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def setup(config, what: str) -> dict[str, Any]:
    """The fields that identify a compiled setup apart from its batch size."""
    return {
        "image_size": config.data.image_size,
        "channels": config.data.channels,
        "model": config.model.to_dict(),
        "remat": config.model.get("remat", "none"),
        "dtype": str(config.model.dtype),
        "steps_per_call": config.training.steps_per_call if what == "train" else None,
        "num_timesteps": config.diffusion.num_timesteps,
    }


def compile_one(config, topology: str, parallelism: str, what: str,
                global_batch: int | None = None, *, with_forward: bool = True) -> dict:
    """Compiles the train call ("train") or the sampler ("sample") for a TPU topology.

    Args:
      config: a loaded config (configs/*.py), overrides applied.
      topology: a TPU topology name, e.g. "v5e:2x4".
      parallelism: "shard_map" or "pmap" (the train call; the sampler is always jit).
      what: "train" or "sample".
      global_batch: images per train step, or per sampler call; default the config's
        training.batch_size for "train" and 256 (<= 64x64 images) or 128 for "sample".
      with_forward: also compile the forward pass to compare FLOPs against.

    Returns:
      the record (see the module docstring), without the run's metadata.
    """
    if what not in ("train", "sample"):
        raise ValueError(f"what={what!r}; allowed: 'train', 'sample'.")
    devices = topology_devices(topology)
    chip, per_chip = chip_of(devices)
    n = len(devices)
    if global_batch is None:
        if what == "train":
            global_batch = config.training.batch_size
        else:
            global_batch = 256 if config.data.image_size <= 64 else 128
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not a multiple of the {n} devices "
                         f"of {topology}.")
    per_device = global_batch // n
    dp = parallel.DataParallel(parallelism if what == "train" else "shard_map", devices=devices)

    start = time.perf_counter()
    lowered = (lower_train if what == "train" else lower_sample)(config, dp, global_batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses a program that does not fit the HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(str(e), {
            "what": what, "topology": topology, "device_kind": devices[0].device_kind,
            "chip": chip.name, "devices": n, "devices_per_chip": per_chip,
            "parallelism": dp.parallelism if what == "train" else "jit",
            "global_batch": global_batch, "per_device_batch": per_device,
            "setup": setup(config, what), "compile_s": round(time.perf_counter() - start, 2),
            "hbm_per_device_bytes": int(chip.hbm_gib * GIB / per_chip), "fits_hbm": False,
            "error": str(e)[:3000]}) from e
    compile_s = time.perf_counter() - start

    text = compiled.as_text()
    cost = _cost(compiled)
    mem = memory_bytes(compiled)
    hbm_device = chip.hbm_gib * GIB / per_chip
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    # XLA's cost analysis counts a while loop's body once, whatever its trip count (measured:
    # the digits train call with k = 2 scanned steps reports the FLOPs of k = 1). So with a
    # loop the figures are those of one train step / one reverse step; without one (k = 1,
    # no loop) they are the whole call.
    loops = count_while_loops(text)
    if what == "train":
        k = config.training.steps_per_call
        steps_in_cost = 1 if (k > 1 and loops) else k
    else:
        steps_in_cost = 1 if loops else config.diffusion.num_timesteps
    images_per_device = per_device * steps_in_cost
    record = {
        "what": what,
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "chip": chip.name,
        "devices": n,
        "devices_per_chip": per_chip,
        "parallelism": dp.parallelism if what == "train" else "jit",
        "global_batch": global_batch,
        "per_device_batch": per_device,
        "setup": setup(config, what),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "memory_per_device_bytes": mem,
        "hbm_per_device_bytes": int(hbm_device),
        "fits_hbm": mem["total"] <= hbm_device,
        "flops_per_device": flops,
        "bytes_accessed_per_device": bytes_accessed,
        "transcendentals_per_device": float(cost.get("transcendentals", 0.0)),
        "compiler_optimal_seconds": cost.get("optimal_seconds"),
        "steps_in_cost": steps_in_cost,
        "gflop_per_image": flops / images_per_device / 1e9,
        "dim_labels": dim_labels(text),
        "while_loops": loops,
        "chip_figures": dataclasses.asdict(chip),
    }
    if what == "sample":
        record["sample_steps"] = config.diffusion.num_timesteps
    if with_forward:
        start = time.perf_counter()
        fwd = lower_forward(config, dp, global_batch).compile()
        fwd_cost = _cost(fwd)
        fwd_flops = float(fwd_cost.get("flops", 0.0))
        record["forward"] = {
            "compile_s": round(time.perf_counter() - start, 2),
            "flops_per_device": fwd_flops,
            "bytes_accessed_per_device": float(fwd_cost.get("bytes accessed", 0.0)),
            "gflop_per_image": fwd_flops / per_device / 1e9,
            "dim_labels": dim_labels(fwd.as_text()),
        }
        if fwd_flops:
            # train: FLOPs per image / 3 forward passes; sample: per image-step / 1 forward.
            passes = 3 if what == "train" else 1
            record["flops_ratio"] = flops / (passes * fwd_flops * steps_in_cost)
            record["flops_ratio_of"] = f"{passes}x forward"
    bound = roofline(flops, bytes_accessed, chip, per_chip)
    if what == "train":
        bound["images_per_s"] = global_batch * steps_in_cost / bound["seconds"]
    else:
        # gflop_per_image is per image-step; a sample takes num_timesteps steps.
        steps = config.diffusion.num_timesteps
        bound["image_steps_per_s"] = global_batch * steps_in_cost / bound["seconds"]
        bound["images_per_s"] = bound["image_steps_per_s"] / steps
    record["roofline"] = bound
    return record


# --------------------------------------------------------------------------- batch fit


def setup_key(record: dict) -> str:
    return json.dumps([record["config"], record["topology"], record["parallelism"],
                       record["what"], record["setup"]], sort_keys=True)


def linear_fit(records: list[dict]) -> dict | None:
    """Fits per-device bytes = a + b * per_device_batch over records of one setup.

    Uses the two most recent records with different per-device batches; returns None when
    there are not two. The largest batch is where the line meets the HBM less
    HBM_RESERVE_BYTES.
    """
    by_batch: dict[int, dict] = {}
    for r in records:
        by_batch[r["per_device_batch"]] = r
    if len(by_batch) < 2:
        return None
    (b0, r0), (b1, r1) = sorted(by_batch.items())[-2:]
    y0, y1 = r0["memory_per_device_bytes"]["total"], r1["memory_per_device_bytes"]["total"]
    slope = (y1 - y0) / (b1 - b0)
    intercept = y0 - slope * b0
    hbm = r1["hbm_per_device_bytes"]
    limit = hbm - HBM_RESERVE_BYTES
    max_per_device = int((limit - intercept) // slope) if slope > 0 else None
    return {
        "method": "linear fit of memory_per_device_bytes.total over 2 compiled batch sizes",
        # a < 0 means the memory grew faster than linearly between the two batches (the
        # compiler chose differently), so the line does not extrapolate.
        "linear": intercept >= 0,
        "per_device_batches": [b0, b1],
        "a_bytes": intercept,
        "b_bytes_per_image": slope,
        "hbm_reserve_bytes": HBM_RESERVE_BYTES,
        "max_per_device_batch": max_per_device,
        "max_global_batch": None if max_per_device is None else max_per_device * r1["devices"],
    }


def read_records(path: str | os.PathLike) -> list[dict]:
    p = pathlib.Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- table


def _gib(x: float) -> str:
    return f"{x / GIB:.3g}"


def table(records: list[dict]) -> str:
    """Markdown table of tpu_aot records (one row per record)."""
    head = ("| config | topology | parallelism | what | remat | global batch | compile s "
            "| per-device GiB: args / temp / code / total of HBM | GFLOP per image "
            "| ratio | roofline images/s (bound) | largest global batch (linear fit) |")
    rows = [head, "|" + "---|" * 12]
    order = lambda r: (r["config"], r["what"], r["chip"], r["devices"], r["parallelism"],
                       r["setup"]["remat"], r["global_batch"])
    for r in sorted(records, key=order):
        if "error" in r:
            rows.append(
                f"| {r['config']} | {r['topology']} ({r['devices']} devices) "
                f"| {r['parallelism']} | {r['what']} | {r['setup']['remat']} "
                f"| {r['global_batch']} | {r['compile_s']:.0f} | does not fit the HBM "
                f"(the compiler's RESOURCE_EXHAUSTED) | - | - | - | - |")
            continue
        m = r["memory_per_device_bytes"]
        mem = (f"{_gib(m['arguments'])} / {_gib(m['temporaries'])} / "
               f"{_gib(m['generated_code'])} / {_gib(m['total'])} of "
               f"{_gib(r['hbm_per_device_bytes'])}")
        ratio = r.get("flops_ratio")
        ratio = f"{ratio:.2f} of {r['flops_ratio_of']}" if ratio is not None else "-"
        gflop = f"{r['gflop_per_image']:.2f}"
        if r["what"] == "sample":
            gflop += " per image-step"
        roof = r["roofline"]
        speed = f"{roof['images_per_s']:,.0f} ({roof['bound']})"
        if r["what"] == "sample":
            speed += f"; {roof['image_steps_per_s']:,.0f} image-steps/s"
        what = r["what"]
        if what == "train" and r["setup"]["steps_per_call"] > 1:
            what += f" (k={r['setup']['steps_per_call']}, scan)"
        fit = r.get("batch_fit")
        if fit and fit["a_bytes"] < 0:
            fit = (f"none: not linear (per-device {fit['per_device_batches']} give "
                   f"a = {fit['a_bytes'] / GIB:.1f} GiB)")
        elif fit and fit.get("max_global_batch") is not None:
            fit = f"{fit['max_global_batch']} (fit on per-device {fit['per_device_batches']})"
        else:
            fit = "-"
        rows.append(
            f"| {r['config']} | {r['topology']} ({r['devices']} devices) | {r['parallelism']} "
            f"| {what} | {r['setup']['remat']} | {r['global_batch']} "
            f"| {r['compile_s']:.0f} | {mem} | {gflop} | {ratio} | {speed} | {fit} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- command line


def git_state() -> dict[str, Any]:
    """HEAD, and the files of ddpm_jax/ and configs/ that differ from it (or are new)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=pathlib.Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, check=False).stdout

    status = git("status", "--porcelain", "--untracked-files=all", "--", "ddpm_jax", "configs")
    return {"head": git("rev-parse", "HEAD").strip() or None,
            "changed": [line[3:] for line in status.splitlines() if line.strip()]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tpu_aot", description=__doc__.split("\n")[0],
        epilog="Config fields: --config.FIELD=VALUE, e.g. --config.model.dtype=bfloat16.")
    parser.add_argument("--config", default="configs/default.py", help="Config file or name.")
    parser.add_argument("--topology", default="v5e:2x4",
                        help="Comma-separated TPU topologies, e.g. v5e:2x4,v4:2x2x1,v3:2x2.")
    parser.add_argument("--parallelism", default="shard_map",
                        help="Comma-separated: shard_map,pmap (the train call only).")
    parser.add_argument("--what", default="train", help="Comma-separated: train,sample.")
    parser.add_argument("--remat", default=None, help="Sets config.model.remat: none|full|dots.")
    parser.add_argument("--batch", default=None,
                        help="Comma-separated global batch sizes (default: the config's "
                             "training.batch_size for train; 256, or 128 above 64x64, for "
                             "sample). Two sizes give the linear memory fit.")
    parser.add_argument("--steps_per_call", type=int, default=1,
                        help="training.steps_per_call for the train call (default 1: one step).")
    parser.add_argument("--no_forward", action="store_true",
                        help="Skip compiling the forward pass (no FLOP ratio).")
    parser.add_argument("--out", default=None, help="Append one JSON line per compile here.")
    parser.add_argument("--table", metavar="JSONL", default=None,
                        help="Print the markdown table of a results file and exit.")
    rest, overrides = commands.split_config_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)

    if args.table:
        print(table(read_records(args.table)))
        return 0
    try:  # bad overrides stop here, before any compile
        commands.apply_config_overrides(load_config(args.config), overrides, source=args.config)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    versions = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
                "libtpu": libtpu_version()}
    if versions["libtpu"] is None:
        print(LIBTPU_MISSING, file=sys.stderr)
        return 2
    command = "python -m benchmarks.tpu_aot " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    batches = [int(b) for b in split(args.batch)] if args.batch else [None]
    previous = read_records(args.out) if args.out else []
    for topology in split(args.topology):
        for what in split(args.what):
            for parallelism in (split(args.parallelism) if what == "train" else ["jit"]):
                for batch in batches:
                    config = load_config(args.config)
                    with config.unlocked():
                        config.training.steps_per_call = args.steps_per_call
                        if args.remat is not None:
                            config.model.remat = args.remat
                        if "remat" not in config.model:
                            config.model.remat = "none"
                    commands.apply_config_overrides(config, overrides)
                    try:
                        record = compile_one(config, topology,
                                             parallelism if what == "train" else "shard_map",
                                             what, batch, with_forward=not args.no_forward)
                    except DoesNotFit as e:
                        record = e.record
                    record = {
                        "benchmark": "tpu_aot",
                        "config": pathlib.Path(args.config).stem,
                        "overrides": [f"--config.{k}" + ("" if v is None else f"={v}")
                                      for k, v in overrides],
                        **record,
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                            timespec="seconds"),
                        "command": command,
                        "versions": versions,
                        "git": git_state(),
                        "host_cpu_count": os.cpu_count(),
                    }
                    same = [r for r in previous
                            if setup_key(r) == setup_key(record) and "error" not in r]
                    fit = None if "error" in record else linear_fit([*same, record])
                    if fit:
                        record["batch_fit"] = fit
                    previous.append(record)
                    line = json.dumps(record, sort_keys=True)
                    print(line, flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
