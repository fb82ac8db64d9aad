"""Sample images from a checkpoint and write them as .npz and a PNG grid.

Usage::

  python -m ddpm_jax.generate --checkpoint WORKDIR_OR_PARAMS_DIR \\
      --num_samples 50000 --batch_size 256 --out samples/ \\
      [--sampler ddim --num_steps 50 --eta 0] [--seed 0]
  # 20 network evaluations with DPM-Solver++(2M) (log-SNR spacing by default):
  python -m ddpm_jax.generate ... --sampler dpm++2m --num_steps 20

The checkpoint is anything `ddpm_jax.checkpoint.load_params` reads: a
training workdir (its latest EMA params) or a converted params directory. The
model comes from ``meta["model"]``, the schedule from ``meta["diffusion"]``
(`ddpm_jax.builders.unet_from_meta`, `ddpm_jax.builders.schedule`).

Samples are drawn in batches of --batch_size over all local devices (the batch
is sharded on a 1-D "data" mesh), with one key for the whole run and each
image's noise tied to its global index, so the images do not depend on the
batch size or device count; the last batch is padded and cut, so exactly
--num_samples images come out. Outputs in --out:

- ``samples.npz``: ``images`` uint8 [N, H, W, C] (the format the FID tool
  reads), plus ``labels`` int32 [N] for class-conditional models.
- ``samples.png``: a grid of the first --grid_size images.
- ``samples.json``: the arguments that determine the images (checkpoint and its
  step, num_samples, batch_size, shard size, seed, sampler, num_steps, eta,
  clip, class_label, guidance_scale) and the images' shape.

Nothing is lost. Every file is written to a temporary name in its directory and
renamed over the old one, so a failed write (full disk, kill) leaves the old
file whole. While sampling, progress is saved every --shard_batches batches as
``shards/shard_NNNNN.npz`` beside ``shards/manifest.json`` (the same arguments);
the shards are removed once samples.npz is written. Running the same command
again resumes from the saved shards and gives exactly the images of an
uninterrupted run (each batch is computed with the same indices and keys);
with other arguments it refuses to mix the two runs and asks for a new --out
or --overwrite (which discards what --out holds of the other run). SIGTERM
(a preemption) finishes and saves the current shard, then exits with status
143 and a message saying to rerun the command.

Conversion to uint8 rounds (`ddpm_jax.builders.to_uint8`): ``round((x + 1) *
127.5)`` clipped to [0, 255], the inverse of the input scaling x / 127.5 - 1.

Several processes (``--coordinator_address HOST:PORT --num_processes N
--process_id I`` to each, or ``--multihost`` where JAX detects the cluster):
the shards are dealt out to the processes, each samples its shard over its
own devices, and process 0 gathers them and writes the one samples.npz and
grid (only process 0 needs --out on its disk). The images are those of a
single-process run with the same arguments (equal up to float rounding when
the number of devices per process differs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from ddpm_jax import builders, commands, fileio, sampling
from ddpm_jax.generation import generate  # the library function this command runs


def write_outputs(result: dict[str, np.ndarray], out_dir: str, *, grid_size: int = 64) -> None:
    """Writes samples.npz (images [, labels]) and samples.png into out_dir.

    Each file is written to a temporary name in out_dir and renamed over the old one, so a
    failed write (a full disk, a kill) leaves the previous file intact.
    """
    os.makedirs(out_dir, exist_ok=True)
    fileio.write_npz(os.path.join(out_dir, "samples.npz"), **result)
    grid = builders.image_grid(result["images"][:grid_size])
    with fileio.atomic_path(os.path.join(out_dir, "samples.png")) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")


# ---------------------------------------------------------------------------
# Resumable runs: shards of images and a manifest of the arguments that set them.

SHARD_DIR = "shards"
MANIFEST = "manifest.json"
DONE = "samples.json"


def run_manifest(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """The arguments (and checkpoint step) that determine a run's images and shards."""
    return {
        "checkpoint": os.path.abspath(args.checkpoint), "step": meta.get("step"),
        "num_samples": args.num_samples, "batch_size": args.batch_size,
        "shard_size": args.batch_size * args.shard_batches, "seed": args.seed,
        "sampler": args.sampler, "num_steps": args.num_steps, "eta": args.eta,
        "clip_denoised": not args.no_clip, "class_label": args.class_label,
        "guidance_scale": args.guidance_scale, "spacing": args.spacing,
    }


def check_out_dir(out_dir: str, manifest: dict[str, Any], *, overwrite: bool) -> bool:
    """Checks that out_dir holds nothing or a run of the same arguments; True if complete.

    A run with other arguments there raises ValueError listing the differences, unless
    overwrite, which removes its shards (samples.npz is replaced once the new run ends).
    """
    shards = os.path.join(out_dir, SHARD_DIR)
    for path in (os.path.join(shards, MANIFEST), os.path.join(out_dir, DONE)):
        try:
            old = fileio.read_manifest(path)
        except ValueError:
            if not overwrite:
                raise
            old = {}
        if old is None:
            continue
        diff = fileio.manifest_differences(old, manifest)
        if diff and not overwrite:
            raise ValueError(
                f"{out_dir} holds samples of other arguments ({'; '.join(diff)}; see {path}); "
                "use a new --out, or pass --overwrite to discard them.")
        if diff or overwrite:
            shutil.rmtree(shards, ignore_errors=True)
            return False
        return path.endswith(DONE) and os.path.exists(os.path.join(out_dir, "samples.npz"))
    return False


def _load_shard(path: str, count: int) -> dict[str, np.ndarray] | None:
    """A saved shard of `count` images, or None if absent or unreadable."""
    if not os.path.exists(path):
        return None
    try:
        shard = fileio.load_npz(path, "a shard of images")
    except ValueError as e:
        print(f"{e} Sampling that shard again.", file=sys.stderr)
        return None
    return shard if len(shard.get("images", ())) == count else None


def _all_processes(value: np.ndarray, reduce: str) -> np.ndarray:
    """process 0's value ("first") or the any-reduction ("any") over all processes."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    if reduce == "first":
        return np.asarray(multihost_utils.broadcast_one_to_all(value))
    return np.asarray(multihost_utils.process_allgather(value)).any(axis=0)


def _sample_shard(params, meta, args, begin: int, count: int) -> dict[str, np.ndarray]:
    return generate(
        params, meta, num_samples=count, batch_size=args.batch_size, seed=args.seed,
        sampler=args.sampler, num_steps=args.num_steps, eta=args.eta,
        clip_denoised=not args.no_clip, class_label=args.class_label,
        guidance_scale=args.guidance_scale, progress=False, start=begin, spacing=args.spacing)


def _gather_round(meta, size: int, shard: dict[str, np.ndarray] | None
                  ) -> list[dict[str, np.ndarray] | None]:
    """Every process's shard of this round (None where a process had none), on all processes.

    The shards are padded to `size` images so that all processes send equal shapes.
    """
    from jax.experimental import multihost_utils

    hw = (int(meta["data"]["image_size"]),) * 2 + (int(meta["data"]["channels"]),)
    local = {"images": np.zeros((size, *hw), np.uint8)}
    if meta["model"].get("num_classes") is not None:
        local["labels"] = np.zeros(size, np.int32)
    for name, value in (shard or {}).items():
        local[name][:len(value)] = value
    count = np.int32(0 if shard is None else len(shard["images"]))
    got, counts = multihost_utils.process_allgather((local, count))
    return [{name: np.asarray(v[q][:int(c)]) for name, v in got.items()} if c else None
            for q, c in enumerate(np.asarray(counts).reshape(-1))]


def sample_shards(params, meta, args, manifest, *, stop=None) -> dict[str, np.ndarray] | None:
    """Samples the run shard by shard into <out>/shards/, skipping shards already there.

    Shard k holds the images with global indices [k * S, min((k + 1) * S, N)), S =
    batch_size * shard_batches, each written atomically; so a resumed run computes every
    batch exactly as an uninterrupted one. On several processes the missing shards are dealt
    out in rounds, one per process, each sampled over the process's local devices; process 0
    gathers and writes them. If ``stop.requested`` becomes true on any process (SIGTERM),
    the current round is finished and saved and SystemExit(143) is raised with a message.

    Returns:
      on process 0 the whole run, as `generate` returns it; None on the others.
    """
    shards, lead = os.path.join(args.out, SHARD_DIR), jax.process_index() == 0
    n, size, nproc = args.num_samples, manifest["shard_size"], jax.process_count()
    starts = list(range(0, n, size))
    paths = [os.path.join(shards, f"shard_{k:05d}.npz") for k in range(len(starts))]
    saved = {}
    if lead:
        os.makedirs(shards, exist_ok=True)
        fileio.write_text(os.path.join(shards, MANIFEST), json.dumps(manifest, indent=2) + "\n")
        saved = {k: part for k, b in enumerate(starts)
                 if (part := _load_shard(paths[k], min(size, n - b))) is not None}
    done = _all_processes(np.array([k in saved for k in range(len(starts))], np.int32), "first")
    todo = [k for k in range(len(starts)) if not done[k]]
    bar = tqdm(total=n, initial=n - sum(min(size, n - starts[k]) for k in todo), unit="img",
               disable=args.no_progress or not lead, desc="sampling")
    for r in range(0, len(todo), nproc):
        round_ = todo[r:r + nproc]
        mine = round_[jax.process_index()] if jax.process_index() < len(round_) else None
        shard = None if mine is None else _sample_shard(
            params, meta, args, starts[mine], min(size, n - starts[mine]))
        parts = [shard] if nproc == 1 else _gather_round(meta, size, shard)
        for k, part in zip(round_, parts, strict=False):
            if lead:
                fileio.write_npz(paths[k], **part)
                saved[k] = part
            bar.update(len(part["images"]))
        flag = np.array(stop is not None and stop.requested, np.int32)
        if _all_processes(flag, "any") and r + nproc < len(todo):
            bar.close()
            left = sum(min(size, n - starts[k]) for k in todo[r + nproc:])
            print(f"SIGTERM: stopped with {n - left} of {n} images saved in {shards}; run the "
                  "same command again to resume.", file=sys.stderr)
            raise SystemExit(143)
    bar.close()
    if not lead:
        return None
    parts = [saved[k] for k in range(len(starts))]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = commands.parser("python -m ddpm_jax.generate", __doc__.split("\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training workdir (latest EMA params) or converted params dir")
    p.add_argument("--num_samples", type=int, required=True)
    p.add_argument("--batch_size", type=int, default=64,
                   help="images per call, a multiple of the device count")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sampler", choices=sampling.SAMPLERS, default="ddpm")
    p.add_argument("--num_steps", type=int, default=None,
                   help="network evaluations per image (default: all T; ddpm with fewer runs "
                        "the respaced process)")
    p.add_argument("--spacing", choices=sampling.SPACINGS, default=None,
                   help="timesteps visited with --num_steps (default: logsnr for dpm++2m, "
                        "else linspace)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_clip", action="store_true", help="do not clip predicted x_0")
    p.add_argument("--class_label", type=int, default=None,
                   help="conditional models: one class for all (default: i %% num_classes)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance weight w: (1+w) eps(y) - w eps(null)")
    p.add_argument("--grid_size", type=int, default=64, help="images in samples.png")
    p.add_argument("--shard_batches", type=int, default=4,
                   help="batches per saved shard (progress is saved every shard)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard samples or shards of other arguments in --out")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() with the cluster JAX detects")
    p.add_argument("--coordinator_address", default=None,
                   help="HOST:PORT of process 0 (several processes)")
    p.add_argument("--num_processes", type=int, default=None, help="number of processes")
    p.add_argument("--process_id", type=int, default=None, help="this process's index")
    args = p.parse_args(argv)
    for name in ("num_samples", "batch_size", "shard_batches", "grid_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return args


def _check_out_dir_everywhere(args, manifest) -> bool:
    """`check_out_dir` on process 0, its verdict shared with all processes (True: complete)."""
    status, error = np.int32(0), None
    if jax.process_index() == 0:
        try:
            status = np.int32(check_out_dir(args.out, manifest, overwrite=args.overwrite))
        except ValueError as e:
            status, error = np.int32(2), e
    status = int(_all_processes(status, "first"))
    if error is not None:
        raise error
    if status == 2:
        raise SystemExit(f"process 0 refused --out {args.out}; see its message.")
    return status == 1


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (exits 143 after saving progress on SIGTERM)."""
    args = _parse(argv)
    start = time.perf_counter()
    commands.setup_logging(None, verbose=args.verbose)
    from ddpm_jax import parallel
    from ddpm_jax.checkpoint import load_params  # the training stack, only for the CLI

    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id, auto=args.multihost)
    # Only process 0 needs --out on its disk (it writes everything there), so only it logs there.
    log_file = commands.setup_logging(
        os.path.join(args.out, "generate.log") if jax.process_index() == 0 else None,
        verbose=args.verbose)
    params, meta = load_params(args.checkpoint)
    manifest = run_manifest(args, meta)
    samples = os.path.join(args.out, "samples.npz")
    if _check_out_dir_everywhere(args, manifest):
        commands.finish("generate", f"{commands.relpath(samples)} already holds these samples; "
                        "nothing to do")
        return
    with fileio.StopOnSigterm() as stop:
        result = sample_shards(params, meta, args, manifest, stop=stop)
        if result is not None:
            write_outputs(result, args.out, grid_size=args.grid_size)
            fileio.write_text(os.path.join(args.out, DONE), json.dumps(
                {**manifest, "shape": list(result["images"].shape)}, indent=2) + "\n")
            shutil.rmtree(os.path.join(args.out, SHARD_DIR), ignore_errors=True)
            if jax.process_index() == 0:
                commands.finish(
                    "generate", f"{len(result['images'])} images {result['images'].shape[1:]} "
                    f"from checkpoint step {meta.get('step')} ({jax.process_count()} processes) "
                    f"to {commands.relpath(samples)} and samples.png", start=start,
                    log_file=commands.relpath(log_file))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ddpm_jax.generate: outputs written")


if __name__ == "__main__":
    main()
