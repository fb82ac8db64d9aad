"""Shared helpers for the benchmarks: device facts, timing, and one JSON line per result."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

# Dense bf16 peak of common accelerators, in TFLOP/s (vendor figures, without sparsity).
BF16_PEAK_TFLOPS = {
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
    "TPU v3": 123.0,  # per chip
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
    return {
        "platform": dev.platform,
        "device_kind": kind,
        "device_count": jax.device_count(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "bf16_peak_tflops": peak,
    }


def versions() -> dict[str, str]:
    import flax
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__}


def peak_memory_bytes() -> int | None:
    """Peak device memory of device 0 where the backend reports it (GPU, TPU); else None."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> list[float]:
    """Wall times of `repeats` calls of fn (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def flops_of(compiled) -> float | None:
    """FLOPs of one call of a compiled XLA computation, from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):  # not on every backend
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    return float(cost.get("flops", 0.0)) or None


def emit(result: dict[str, Any], out: str | None) -> None:
    """Prints one JSON line and appends it to `out` (a .jsonl file) when given."""
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "device": device_info(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "versions": versions(),
        **result,
    }
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
