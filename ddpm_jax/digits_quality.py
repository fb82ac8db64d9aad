"""Are the samples of a digits model recognizable digits?

Exact form (1,000 samples, ancestral DDPM over all T = 1000 steps; about 17
minutes on 2 CPU cores)::

  python -m ddpm_jax.digits_quality WORKDIR [--num_samples 1000] [--seed 0]

Fast form (a few seconds: 200 samples, DPM-Solver++(2M) with 20 network
evaluations)::

  python -m ddpm_jax.digits_quality WORKDIR --sampler dpm++2m --num_steps 20 --num_samples 200

The whole sampler table (DDPM respaced, DDIM and DPM-Solver++(2M) at 10, 20,
50, 100 and 1000 network evaluations, each with its default spacing; one JSON
line per cell, also appended to --out)::

  python -m ddpm_jax.digits_quality WORKDIR --table --num_samples 200 [--out FILE.jsonl]

Loads the EMA params of the newest checkpoint in WORKDIR (or a `save_params`
directory), draws samples with the chosen sampler (default: ancestral DDPM,
all T steps; --num_steps fewer runs the respaced process for "ddpm"), with
the model's variance type, clipped to [-1, 1] and quantized to 0..255, and
classifies them with a small MLP (one hidden layer of 256, scikit-learn's
``MLPClassifier``, seed 0) trained on scikit-learn's 1,797 real 8x8 digits,
scaled the same way as the training data (0..16 -> 0..255, then / 255).
Prints JSON:

* ``confident``: the fraction of samples whose most likely class has
  probability >= 0.8;
* ``class_shares``: the fraction of samples assigned to each class 0..9
  (``max_class_share`` is the largest);
* ``real_heldout_accuracy`` and ``real_heldout_confident``: the same
  classifier trained on three quarters of the real digits, scored on the
  other quarter: what real digits get (about 0.99 and 0.98). The judge of the
  samples is trained on all of them.
* the sampler, its step count and spacing, ``compile_seconds`` and
  ``seconds_per_batch`` (the mean wall time of one compiled call drawing
  ``batch_size`` samples).

The bar for configs/digits.py: confident >= 0.9 and max_class_share <= 0.15.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from ddpm_jax import builders, checkpoint, commands, conv, sampling

CONFIDENCE = 0.8
TABLE_SAMPLERS = ("ddpm", "ddim", "dpm++2m")
TABLE_STEPS = (10, 20, 50, 100, 1000)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).reshape(len(d.target), 64) / 255.0
    return images, d.target


def fit_classifier(images: np.ndarray, labels: np.ndarray):
    """An MLP classifier of [N, 64] images in [0, 1]."""
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these matrices are tiny, and several threads on a busy machine are
    # orders of magnitude slower.
    with threadpool_limits(1):
        return MLPClassifier((256,), max_iter=2000, random_state=0).fit(images, labels)


@functools.cache
def _judge() -> tuple[Any, float, float]:
    """(the judge trained on all real digits, held-out accuracy, held-out confident)."""
    images, labels = _digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    cut = len(labels) * 3 // 4
    check = fit_classifier(images[order[:cut]], labels[order[:cut]])
    held_out = images[order[cut:]]
    test_acc = float(check.score(held_out, labels[order[cut:]]))
    test_conf = float(np.mean(check.predict_proba(held_out).max(axis=1) >= CONFIDENCE))
    return fit_classifier(images, labels), test_acc, test_conf


def score(samples: np.ndarray) -> dict[str, object]:
    """Scores uint8 [N, 8, 8, 1] samples (see the module docstring)."""
    judge, test_acc, test_conf = _judge()
    probs = judge.predict_proba(samples.reshape(len(samples), 64).astype(np.float64) / 255.0)
    top = probs.argmax(axis=1)
    shares = np.bincount(top, minlength=10) / len(samples)
    return {
        "num_samples": len(samples),
        "confident": float(np.mean(probs.max(axis=1) >= CONFIDENCE)),
        "class_shares": [round(float(s), 4) for s in shares],
        "max_class_share": float(shares.max()),
        "real_heldout_accuracy": test_acc,
        "real_heldout_confident": test_conf,
    }


def draw_samples(path: str, num_samples: int, seed: int, batch_size: int = 1000, *,
                 sampler: str = "ddpm", num_steps: int | None = None,
                 spacing: str | None = None, timing: dict | None = None,
                 loaded: tuple[Any, dict] | None = None) -> np.ndarray:
    """uint8 [num_samples, H, W, C] samples from the EMA params at path.

    Args:
      path: a training workdir or `save_params` directory.
      num_samples: how many samples.
      seed: the sampling key's seed; sample i is the same for any batch size.
      batch_size: samples per compiled call (at most num_samples are drawn per call).
      sampler, num_steps, spacing: as in `sampling.sample` (None: all steps; the
        sampler's default spacing).
      timing: if a dict, "compile_seconds", "seconds_per_batch" and
        "batch_size" are written into it.
      loaded: (params, meta) already loaded from path.

    Returns:
      uint8 [num_samples, H, W, C].
    """
    params, meta = checkpoint.load_params(path) if loaded is None else loaded
    model = builders.unet_from_meta(meta)
    d = meta["diffusion"]
    sched = builders.schedule(d)
    size, channels = meta["data"]["image_size"], meta["data"]["channels"]
    batch_size = min(batch_size, num_samples)

    def run(params, offset):
        x = sampling.sample(sched, lambda x, t: model.apply({"params": params}, x, t),
                            jax.random.key(seed), (batch_size, size, size, channels),
                            mean_type=d["mean_type"], var_type=d["var_type"],
                            sampler=sampler, num_steps=num_steps, spacing=spacing,
                            index_offset=offset)
        return builders.to_uint8(x)

    start = time.perf_counter()
    compiled = jax.jit(run, compiler_options=conv.compiler_options()).lower(params, 0).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out = [np.asarray(compiled(params, i)) for i in range(0, num_samples, batch_size)]
    if timing is not None:
        timing.update(compile_seconds=round(compile_seconds, 2), batch_size=batch_size,
                      seconds_per_batch=round((time.perf_counter() - start) / len(out), 3))
    return np.concatenate(out)[:num_samples]


def _measure(path: str, args: argparse.Namespace, sampler: str, num_steps: int | None,
             spacing: str | None, loaded=None) -> dict[str, object]:
    timing: dict[str, object] = {}
    samples = draw_samples(path, args.num_samples, args.seed, args.batch_size, sampler=sampler,
                           num_steps=num_steps, spacing=spacing, timing=timing, loaded=loaded)
    if args.save:
        np.savez_compressed(args.save, images=samples)
    if num_steps is None:
        spacing = "every step"
    elif spacing is None:
        spacing = sampling.default_spacing(sampler)
    return {"sampler": sampler, "num_steps": num_steps, "spacing": spacing,
            **score(samples), **timing}


def _table(args: argparse.Namespace) -> None:
    """One JSON line per (sampler, step count) cell, printed and appended to args.out."""
    loaded = checkpoint.load_params(args.path)
    command = "python -m ddpm_jax.digits_quality " + " ".join(sys.argv[1:])
    steps = args.table_steps or TABLE_STEPS
    for sampler in TABLE_SAMPLERS:
        for n in steps:
            row = {"command": command, "checkpoint_step": loaded[1].get("step"),
                   **_measure(args.path, args, sampler, n, args.spacing, loaded),
                   "machine": args.machine}
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = commands.parser("python -m ddpm_jax.digits_quality", __doc__.splitlines()[0])
    parser.add_argument("path", help="training workdir or save_params directory")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=1000,
                        help="samples per compiled call (default 1000)")
    parser.add_argument("--sampler", choices=sampling.SAMPLERS, default="ddpm")
    parser.add_argument("--num_steps", type=int, default=None,
                        help="network evaluations per sample (default: all T steps)")
    parser.add_argument("--spacing", choices=sampling.SPACINGS, default=None,
                        help="timestep spacing (default: the sampler's: linspace for ddpm "
                             "and ddim, logsnr for dpm++2m)")
    parser.add_argument("--save", default=None, help="also write the samples to this .npz")
    parser.add_argument("--table", action="store_true",
                        help="measure every sampler at 10, 20, 50, 100 and 1000 evaluations")
    parser.add_argument("--table_steps", type=int, nargs="+", default=None,
                        help="the step counts of --table (default 10 20 50 100 1000)")
    parser.add_argument("--out", default=None, help="--table: append the JSON lines here")
    parser.add_argument("--machine", default="", help="--table: a note on the hardware")
    args = parser.parse_args(argv)
    commands.setup_logging(None, verbose=args.verbose)
    if args.num_samples < 1:
        parser.error(f"--num_samples must be positive, got {args.num_samples}.")
    if args.table:
        if args.save:
            parser.error("--save draws one sample set; do not combine it with --table.")
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            parser.error(f"--out {args.out}: its directory does not exist; create it first.")
        start = time.perf_counter()
        _table(args)
        commands.finish("digits_quality", "the sampler table" + (
            f", appended to {commands.relpath(args.out)}" if args.out else ""), start=start)
        return
    start = time.perf_counter()
    result = _measure(args.path, args, args.sampler, args.num_steps, args.spacing)
    result["sampling_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    steps = "all T" if args.num_steps is None else args.num_steps
    commands.finish("digits_quality", f"{100 * result['confident']:.1f}% of {args.num_samples} "
                    f"samples ({args.sampler}, {steps} steps) classified with probability >= "
                    f"{CONFIDENCE}", start=start)


if __name__ == "__main__":
    main()
