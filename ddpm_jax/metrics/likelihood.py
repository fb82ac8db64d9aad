"""Negative log-likelihood bound in bits/dim, and the paper's rate-distortion breakdown.

The bound is ``diffusion.calc_bpd_loop`` over all T terms (each draws its own x_t from
q(x_t | x_0)) plus the prior term, evaluated with a checkpoint's EMA params on uint8 images
(scaled to [-1, 1] as x / 127.5 - 1). Every example gets its own key, ``fold_in(key, index)``
with its index in the evaluated set, so the numbers do not depend on the batch size or on how
a batch is sharded over the devices.

Rate and distortion (the paper's Table 4 and Figure 5). With 0-indexed terms L_t (L_0 the
decoder's -log p(x_0 | x_1), L_t for t >= 1 the KL terms, L_prior the prior), reverse step k
(k = 1..T) consumes term t = T - k. After step k:

* rate(k) = L_prior + sum of L_t for t >= max(T - k, 1), in bits/dim: what a receiver has been
  sent so far (the decoder term is not a rate: at k = T the rate is the total minus L_0);
* distortion(k) = RMSE on the [0, 255] scale of the x_0 predicted at that step,
  ``127.5 * sqrt(mean mse_t)`` with t = T - k (mean over images and dimensions).

The paper's CIFAR-10 test values: rate 1.78 and distortion (L_0) 1.97 bits/dim; at k = 1000
the RMSE is 0.95.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ddpm_jax import builders, conv, diffusion
from ddpm_jax.unet import UNet, UNetConfig

DEFAULT_REVERSE_STEPS = (1000, 900, 800, 700, 600, 500, 400, 300, 200, 100)


def default_reverse_steps(num_timesteps: int) -> tuple[int, ...]:
    """The reverse steps tabulated by default: T, 0.9 T, ..., 0.1 T (rounded, at least 1).

    For T = 1000 this is ``DEFAULT_REVERSE_STEPS``, the paper's Table 4 rows.
    """
    steps = {max(1, round(num_timesteps * j / 10)) for j in range(1, 11)}
    return tuple(sorted(steps, reverse=True))


def check_reverse_steps(reverse_steps: Sequence[int], num_timesteps: int) -> tuple[int, ...]:
    """Returns reverse_steps as ints, or raises ValueError naming the first outside [1, T]."""
    steps = tuple(int(k) for k in reverse_steps)
    bad = [k for k in steps if not 1 <= k <= num_timesteps]
    if bad or not steps:
        raise ValueError(f"--reverse_steps must lie in [1, T={num_timesteps}] (the checkpoint's "
                         f"num_timesteps), got {bad[0] if bad else 'none'}; pass values in "
                         f"that range or leave the flag out for T, 0.9 T, ..., 0.1 T.")
    return steps


def model_and_schedule(meta: Mapping[str, Any]) -> tuple[UNet, diffusion.Schedule]:
    """The U-Net and schedule described by a checkpoint's meta (see ``checkpoint.load_params``)."""
    return builders.unet_from_meta(meta), builders.schedule(meta)


@functools.lru_cache(maxsize=4)
def _sharded_bpd(config: UNetConfig, diffusion_items: tuple, clip_denoised: bool,
                 devices: tuple[jax.Device, ...]):
    d = dict(diffusion_items)
    model = UNet(config)
    s = builders.schedule(d)
    data, replicated = builders.data_shardings(devices)

    def one(params, x_uint8, index, key):
        x0 = builders.from_uint8(x_uint8)[None]
        y = None
        if config.num_classes is not None:  # unconditional: the null class
            y = jnp.full((1,), config.num_classes, jnp.int32)

        def model_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, y=y, train=False)

        out = diffusion.calc_bpd_loop(
            s, model_fn, x0, jax.random.fold_in(key, index),
            mean_type=d["mean_type"], var_type=d["var_type"], clip_denoised=clip_denoised)
        return jax.tree.map(lambda v: v[0], out)

    fn = jax.vmap(one, in_axes=(None, 0, 0, None))
    return jax.jit(fn, in_shardings=(replicated, data, data, replicated),
                   out_shardings=data,
                   compiler_options=conv.compiler_options(devices)), data, replicated


class BpdEvaluator:
    """Jitted bits/dim of uint8 images under a model, batched and sharded over devices.

    Args:
      params: the model params (e.g. EMA params from ``checkpoint.load_params``).
      meta: the checkpoint's meta (model, diffusion, data sections).
      batch_size: global batch, rounded up to a multiple of the device count; the last batch
        is padded, so the function compiles once.
      clip_denoised: clip the predicted x_0 to [-1, 1] (the paper's evaluation does).
      devices: devices of the 1-D "data" mesh (default: all).
    """

    def __init__(self, params: Any, meta: Mapping[str, Any], *, batch_size: int = 64,
                 clip_denoised: bool = True, devices: Sequence[jax.Device] | None = None):
        devices = tuple(jax.devices() if devices is None else devices)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        model, self.schedule = model_and_schedule(meta)
        self.image_size = int(meta["data"]["image_size"])
        self.channels = int(meta["data"]["channels"])
        items = tuple(sorted((k, meta["diffusion"][k]) for k in (
            "beta_schedule", "beta_start", "beta_end", "num_timesteps", "mean_type", "var_type")))
        self._fn, self._data, replicated = _sharded_bpd(
            model.config, items, bool(clip_denoised), devices)
        self._params = jax.device_put(params, replicated)

    def __call__(self, images: np.ndarray, key: jax.Array, *, start_index: int = 0
                 ) -> dict[str, np.ndarray]:
        """Bits/dim terms of uint8 images [N, H, W, C].

        Args:
          images: uint8 [N, image_size, image_size, channels].
          key: the evaluation key; example i uses ``fold_in(key, start_index + i)``.
          start_index: index of ``images[0]`` in the whole evaluated set.

        Returns:
          float32 numpy arrays: "total_bpd" [N], "prior_bpd" [N], "terms_bpd" [N, T],
          "mse" [N, T].
        """
        images = np.asarray(images)
        want = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, {', '.join(map(str, want))}] (the "
                             f"checkpoint's data), got {images.dtype} {images.shape}.")
        outs: dict[str, list[np.ndarray]] = {}
        bs = self.batch_size
        for start in range(0, len(images), bs):
            batch = images[start:start + bs]
            m = len(batch)
            index = np.arange(start_index + start, start_index + start + bs, dtype=np.int32)
            if m < bs:
                batch = np.concatenate([batch, np.zeros((bs - m, *want), np.uint8)])
            x = jax.make_array_from_callback(batch.shape, self._data, lambda i, b=batch: b[i])
            idx = jax.make_array_from_callback(index.shape, self._data, lambda i, a=index: a[i])
            result = self._fn(self._params, x, idx, key)
            for k, v in result.items():
                outs.setdefault(k, []).append(np.asarray(jax.device_get(v))[:m])
        return {k: np.concatenate(v) for k, v in outs.items()}


def evaluate(evaluator: BpdEvaluator, batches: Iterable[np.ndarray], key: jax.Array, *,
             total: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Runs ``evaluator`` over a stream of uint8 batches; returns the concatenated terms."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="bits/dim", unit="img")
    outs: dict[str, list[np.ndarray]] = {}
    seen = 0
    for batch in batches:
        result = evaluator(batch, key, start_index=seen)
        seen += len(batch)
        for k, v in result.items():
            outs.setdefault(k, []).append(v)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(bpd=f"{np.mean(np.concatenate(outs['total_bpd'])):.4f}")
    if bar is not None:
        bar.close()
    if not outs:
        raise ValueError("no images to evaluate.")
    return {k: np.concatenate(v) for k, v in outs.items()}


def _shard_chunks(batches: Iterable[np.ndarray], size: int) -> Iterable[np.ndarray]:
    """Regroups a stream of image batches into chunks of `size` images (the last may be short)."""
    buf: list[np.ndarray] = []
    held = 0
    for batch in batches:
        buf.append(np.asarray(batch))
        held += len(batch)
        while held >= size:
            joined = np.concatenate(buf)
            yield joined[:size]
            buf, held = [joined[size:]], held - size
    if held:
        yield np.concatenate(buf)


def evaluate_in_shards(evaluator: BpdEvaluator, batches: Iterable[np.ndarray], key: jax.Array,
                       *, shard_dir: str, manifest: Mapping[str, Any], shard_batches: int = 4,
                       overwrite: bool = False, total: int | None = None, progress: bool = False,
                       stop: Any = None) -> dict[str, np.ndarray]:
    """`evaluate`, saving the terms every shard_batches batches so a rerun resumes.

    Shard k (``shard_dir/shard_NNNNN.npz``, written atomically) holds the terms of images
    [k S, (k + 1) S) with S = shard_batches * evaluator.batch_size; shards already there are
    read, not recomputed (the images are still read, to move the stream on). The manifest
    (the arguments that determine the numbers) is kept as ``shard_dir/manifest.json``; one of
    other arguments raises ValueError unless overwrite, which discards those shards. If
    ``stop.requested`` becomes true (SIGTERM), the current shard is saved and SystemExit(143)
    is raised with a message.
    """
    from ddpm_jax import fileio

    path = os.path.join(shard_dir, "manifest.json")
    old = None if overwrite else fileio.read_manifest(path)
    if old is not None and fileio.manifest_differences(old, dict(manifest)):
        raise ValueError(f"{shard_dir} holds bits/dim shards of other arguments "
                         f"({'; '.join(fileio.manifest_differences(old, dict(manifest)))}); use "
                         "another --out, or pass --overwrite to discard them.")
    if old is None and os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)
    os.makedirs(shard_dir, exist_ok=True)
    fileio.write_text(path, json.dumps(dict(manifest), indent=2) + "\n")
    size = shard_batches * evaluator.batch_size
    parts, seen = [], 0
    bar = tqdm(total=total, desc="bits/dim", unit="img", disable=not progress)
    for k, images in enumerate(_shard_chunks(batches, size)):
        shard_path = os.path.join(shard_dir, f"shard_{k:05d}.npz")
        part = None
        if os.path.exists(shard_path):
            try:
                part = fileio.load_npz(shard_path, "bits/dim terms")
            except ValueError as e:
                print(f"{e} Computing that shard again.", file=sys.stderr)
            if part is not None and len(part.get("total_bpd", ())) != len(images):
                part = None
        if part is None:
            part = evaluator(images, key, start_index=seen)
            fileio.write_npz(shard_path, **part)
        parts.append(part)
        seen += len(images)
        bar.update(len(images))
        if stop is not None and stop.requested and (total is None or seen < total):
            bar.close()
            print(f"SIGTERM: stopped after {seen} images, saved in {shard_dir}; run the same "
                  "command again to resume.", file=sys.stderr)
            raise SystemExit(143)
    bar.close()
    if not parts:
        raise ValueError("no images to evaluate.")
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def rate_distortion(terms_bpd: np.ndarray, prior_bpd: np.ndarray, mse: np.ndarray, *,
                    reverse_steps: Sequence[int] = DEFAULT_REVERSE_STEPS) -> dict[str, Any]:
    """The paper's rate-distortion breakdown (module docstring) from ``calc_bpd_loop`` terms.

    Args:
      terms_bpd: [N, T] per-example terms, column t = L_t.
      prior_bpd: [N] prior terms.
      mse: [N, T] mean squared error of the x_0 predicted at t ([-1, 1] scale).
      reverse_steps: the steps k in 1..T to tabulate.

    Returns:
      dict with "rate_bpd" (prior + KL terms), "distortion_bpd" (L_0), "total_bpd", the
      per-t means "terms_bpd_mean" [T], "mse_mean" [T], and "table": a list of
      {"reverse_step", "t", "rate_bpd", "distortion_rmse"} for each requested step.
    """
    terms = np.asarray(terms_bpd, np.float64)
    n, num_t = terms.shape
    if np.shape(mse) != (n, num_t) or np.shape(prior_bpd) != (n,):
        raise ValueError(f"terms_bpd [N, T]={terms.shape}, mse {np.shape(mse)} and prior_bpd "
                         f"{np.shape(prior_bpd)} must agree as [N, T], [N, T], [N].")
    term_means = terms.mean(axis=0)
    mse_means = np.asarray(mse, np.float64).mean(axis=0)
    prior = float(np.mean(np.asarray(prior_bpd, np.float64)))
    # rate_after[t] = prior + sum_{s >= max(t, 1)} L_s: the rate once term t is consumed.
    kl = term_means.copy()
    kl[0] = 0.0
    rate_after = prior + np.cumsum(kl[::-1])[::-1]
    table = []
    for k in reverse_steps:
        if not 1 <= k <= num_t:
            raise ValueError(f"reverse_steps must lie in [1, T={num_t}], got {k}.")
        t = num_t - k
        table.append({"reverse_step": int(k), "t": int(t), "rate_bpd": float(rate_after[t]),
                      "distortion_rmse": float(127.5 * np.sqrt(mse_means[t]))})
    return {
        "rate_bpd": float(rate_after[0]),
        "distortion_bpd": float(term_means[0]),
        "total_bpd": float(prior + term_means.sum()),
        "terms_bpd_mean": term_means,
        "mse_mean": mse_means,
        "table": table,
    }


def _check_cli_args(args, meta: Mapping[str, Any]) -> tuple[int, ...]:
    """Checks the bpd command's arguments against the checkpoint, before any work."""
    num_t = int(meta["diffusion"]["num_timesteps"])
    steps = (default_reverse_steps(num_t) if args.reverse_steps is None
             else check_reverse_steps(args.reverse_steps, num_t))
    size = int(meta["data"]["image_size"])
    if args.image_size is not None and args.image_size != size:
        raise ValueError(f"--image_size={args.image_size} but the checkpoint {args.checkpoint} "
                         f"models {size}x{size} images; leave --image_size out.")
    if args.dataset == "npz":
        if args.path is None:
            raise ValueError("--dataset npz needs --path, an .npz of uint8 images.")
        from ddpm_jax import fileio

        with fileio.open_npz(args.path, "uint8 images [N, H, W, C]"):
            pass
    return steps


def _bpd_manifest(args, meta: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """The arguments (and checkpoint step) that determine the bpd command's numbers."""
    return {"checkpoint": os.path.abspath(args.checkpoint), "step": meta.get("step"),
            "dataset": args.dataset, "split": args.split, "path": args.path,
            "data_dir": args.data_dir, "max_images": args.max_images, "batch_size": batch_size,
            "shard_batches": args.shard_batches, "seed": args.seed}


def run_cli(args, *, write_json) -> dict:
    """The ``bpd`` command of ``python -m ddpm_jax.metrics`` (see ``ddpm_jax.metrics.cli``).

    The arguments are checked before the evaluation: --batch_size and --max_images at once,
    --reverse_steps (default: T, 0.9 T, ..., 0.1 T of the checkpoint's T) and --image_size
    against the checkpoint as soon as it is read. The JSON and the ``_terms.npz`` beside it
    are written through a temporary file and a rename. With --out, progress is saved in
    ``<out>_shards/`` (`evaluate_in_shards`): the same command again resumes, SIGTERM saves
    the current shard and exits 143; the shards are removed once the results are written.
    """
    from ddpm_jax import checkpoint, fileio
    from ddpm_jax.metrics import fid

    for name in ("batch_size", "max_images", "shard_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    start = time.time()
    params, meta = checkpoint.load_params(args.checkpoint)
    reverse_steps = _check_cli_args(args, meta)
    cfg = {"name": args.dataset, "image_size": int(meta["data"]["image_size"]),
           "channels": int(meta["data"]["channels"]), "data_dir": args.data_dir,
           "path": args.path}
    evaluator = BpdEvaluator(params, meta, batch_size=args.batch_size)
    batches, total = fid.dataset_batches(cfg, args.split, batch_size=evaluator.batch_size,
                                         max_images=args.max_images)
    key = jax.random.key(args.seed)
    if args.out:
        shard_dir = os.path.splitext(args.out)[0] + "_shards"
        with fileio.StopOnSigterm() as stop:
            out = evaluate_in_shards(
                evaluator, batches, key, shard_dir=shard_dir,
                manifest=_bpd_manifest(args, meta, evaluator.batch_size),
                shard_batches=args.shard_batches, overwrite=args.overwrite, total=total,
                progress=True, stop=stop)
    else:
        out = evaluate(evaluator, batches, key, total=total, progress=True)
    rd = rate_distortion(out["terms_bpd"], out["prior_bpd"], out["mse"],
                         reverse_steps=reverse_steps)
    n = len(out["total_bpd"])
    result = {
        "bpd": float(np.mean(out["total_bpd"])),
        "bpd_stderr": float(np.std(out["total_bpd"]) / np.sqrt(n)),
        "rate_bpd": rd["rate_bpd"], "distortion_bpd": rd["distortion_bpd"],
        "prior_bpd": float(np.mean(out["prior_bpd"])),
        "rate_distortion": rd["table"], "num_images": n,
        "checkpoint": os.path.abspath(args.checkpoint), "step": meta.get("step"),
        "dataset": args.dataset, "split": args.split, "seed": args.seed,
        "seconds": round(time.time() - start, 1),
    }
    if args.out:
        terms_path = os.path.splitext(args.out)[0] + "_terms.npz"
        fileio.write_npz(terms_path, total_bpd=out["total_bpd"], prior_bpd=out["prior_bpd"],
                         terms_bpd_mean=rd["terms_bpd_mean"], mse_mean=rd["mse_mean"])
        result["terms"] = os.path.abspath(terms_path)
    write_json(args.out, result)
    if args.out:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return result
