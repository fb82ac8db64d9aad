"""Evaluation commands: ``python -m ddpm_jax.metrics {stats,fid,bpd} ...``.

* ``stats``: Inception reference statistics (mu, sigma) of a data set split or of an
  ``.npz`` of uint8 images, written to an ``.npz`` (plus a JSON with the count and the data's
  Inception Score).
* ``fid``: FID and Inception Score of a samples ``.npz`` (what the sampler writes) against
  reference statistics (or against an ``.npz`` of images, whose statistics are then cached).
* ``bpd``: bits/dim of a checkpoint's EMA params on a data set split (see
  ``ddpm_jax.metrics.likelihood``).

Each writes a JSON result file (``--out``; for ``stats`` beside the ``.npz``) and prints it.
Every output file is written to a temporary name and renamed, so a failed write leaves the old
file whole; input ``.npz`` files are checked before the work, and one that is missing or not
an ``.npz`` gives one error naming it. ``bpd`` with ``--out`` saves its progress in shards
beside the JSON and resumes from them when run again with the same arguments (SIGTERM saves
the current shard and exits 143).
Examples (the Inception weights: see ``ddpm_jax.metrics.inception``)::

  python -m ddpm_jax.metrics stats --inception pt_inception-2015-12-05-6726825d.pth \\
      --dataset cifar10 --split train --out stats/cifar10_train.npz
  python -m ddpm_jax.metrics fid --inception pt_inception-2015-12-05-6726825d.pth \\
      --samples samples.npz --ref stats/cifar10_train.npz --out results/fid.json
  python -m ddpm_jax.metrics bpd --checkpoint runs/cifar10 --dataset cifar10 --split test \\
      --out results/bpd.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence


def _write_json(path: str | None, result: dict) -> None:
    """Prints the result and writes it to path through a temporary file and a rename."""
    from ddpm_jax import fileio

    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if path:
        fileio.write_text(path, text + "\n")


def _extractor(args):
    from ddpm_jax.metrics import inception

    params = inception.load_inception_params(args.inception)
    return inception.InceptionExtractor(params, batch_size=args.batch_size, resize=args.resize)


def _data_cfg(args) -> dict:
    from ddpm_jax.metrics import fid

    image_size = args.image_size or fid.DEFAULT_IMAGE_SIZES.get(args.dataset)
    if image_size is None:
        raise ValueError(f"--image_size is needed for --dataset={args.dataset}.")
    cfg = {"name": args.dataset, "image_size": image_size, "data_dir": args.data_dir,
           "path": args.path}
    if args.dataset in ("image_folder", "npz"):
        cfg["channels"] = args.channels
    return cfg


_IMAGES = "uint8 images [N, H, W, C]"


def _is_stats_file(path: str) -> bool:
    """True for an .npz of statistics (mu, sigma); a missing or garbage file is one error."""
    from ddpm_jax.metrics import fid

    return fid.is_statistics_file(path)


def _check_images_npz(path: str) -> None:
    """Raises one clear error for a missing or garbage .npz of images, before the work."""
    from ddpm_jax import fileio

    with fileio.open_npz(path, _IMAGES):
        pass


def _cached_statistics(path: str, resize: str):
    """(mu, sigma) from a statistics cache, or None if absent or unreadable (then rebuilt)."""
    from ddpm_jax.metrics import fid

    if not os.path.exists(path):
        return None
    try:
        if _is_stats_file(path):
            return fid.load_statistics(path, resize=resize)
    except ValueError as e:
        print(f"{e} Computing the statistics again.", file=sys.stderr)
        return None
    print(f"{path} lacks mu and sigma; computing the statistics again.", file=sys.stderr)
    return None


def cmd_stats(args) -> dict:
    from ddpm_jax.metrics import fid

    start = time.time()
    if (args.dataset is None) == (args.images is None):
        raise ValueError("stats: give exactly one of --dataset or --images.")
    if args.images is not None:
        _check_images_npz(args.images)
    extractor = _extractor(args)
    if args.images is not None:
        images = fid.load_images_npz(args.images, args.key)[:args.max_images]
        feats = fid.array_features(extractor, images, progress=True, desc="reference",
                                   is_logits=args.is_logits)
        source = {"images": os.path.abspath(args.images)}
    else:
        cfg = _data_cfg(args)
        batches, total = fid.dataset_batches(cfg, args.split, batch_size=extractor.batch_size,
                                             max_images=args.max_images)
        feats = fid.image_features(extractor, batches, total=total, progress=True,
                                   desc=f"{args.dataset}/{args.split}", is_logits=args.is_logits)
        source = {"dataset": args.dataset, "split": args.split,
                  "image_size": cfg["image_size"]}
    mu, sigma = fid.activation_statistics(feats["pool3"])
    fid.save_statistics(args.out, mu, sigma, resize=args.resize)
    is_mean, is_std = fid.inception_score(feats["logits"], splits=min(10, len(feats["logits"])))
    result = {"stats": os.path.abspath(args.out), "num_images": len(feats["pool3"]),
              "inception_score": is_mean, "inception_score_std": is_std,
              "seconds": round(time.time() - start, 1), "resize": args.resize,
              "is_logits": args.is_logits, **source}
    _write_json(os.path.splitext(args.out)[0] + ".json", result)
    return result


def cmd_fid(args) -> dict:
    from ddpm_jax.metrics import fid

    start = time.time()
    _check_images_npz(args.samples)
    is_stats = _is_stats_file(args.ref)
    extractor = _extractor(args)
    samples = fid.load_images_npz(args.samples, args.key)
    if args.num_samples is not None:
        if args.num_samples > len(samples):
            raise ValueError(f"--num_samples={args.num_samples} but {args.samples} holds "
                             f"{len(samples)} images.")
        samples = samples[:args.num_samples]
    if is_stats:
        ref_stats = fid.load_statistics(args.ref, resize=args.resize)
    else:
        cache = os.path.splitext(args.ref)[0] + f"_inception_stats_{args.resize}.npz"
        ref_stats = _cached_statistics(cache, args.resize)
        if ref_stats is None:
            ref_images = fid.load_images_npz(args.ref)
            ref_feats = fid.array_features(extractor, ref_images, progress=True,
                                           desc="reference")
            ref_stats = fid.activation_statistics(ref_feats["pool3"])
            fid.save_statistics(cache, *ref_stats, resize=args.resize)
    feats = fid.array_features(extractor, samples, progress=True, desc="samples",
                               is_logits=args.is_logits)
    mu, sigma = fid.activation_statistics(feats["pool3"])
    if args.save_stats:
        fid.save_statistics(args.save_stats, mu, sigma, resize=args.resize)
    score = fid.frechet_distance(mu, sigma, *ref_stats, method=args.fid_method)
    is_mean, is_std = fid.inception_score(feats["logits"], splits=args.splits)
    result = {"fid": score, "inception_score": is_mean, "inception_score_std": is_std,
              "num_samples": len(samples), "splits": args.splits, "fid_method": args.fid_method,
              "resize": args.resize, "is_logits": args.is_logits,
              "samples": os.path.abspath(args.samples), "reference": os.path.abspath(args.ref),
              "seconds": round(time.time() - start, 1)}
    _write_json(args.out, result)
    return result


def cmd_bpd(args) -> dict:
    from ddpm_jax.metrics import likelihood

    return likelihood.run_cli(args, write_json=_write_json)


def _add_data_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--dataset", required=required,
                   help="data set: digits, cifar10, celeb_a_hq, lsun_church, lsun_bedroom, "
                        "lsun_cat, image_folder, npz (read as for training)")
    p.add_argument("--split", default="train", help="split (default train)")
    p.add_argument("--data_dir", default=None, help="tfds data_dir")
    p.add_argument("--path", default=None, help="folder or .npz for image_folder / npz")
    p.add_argument("--image_size", type=int, default=None,
                   help="resolution (default: the data set's, e.g. 32 for cifar10)")
    p.add_argument("--channels", type=int, default=3, help="channels for image_folder / npz")


def _add_inception_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", choices=("tf1", "pytorch"), default="tf1",
                   help="Inception input resize: tf1 (default; TensorFlow 1 bilinear and "
                        "(x - 128) / 128, as the TTUR/TF-GAN code behind the paper's numbers) "
                        "or pytorch (half-pixel bilinear and x / 127.5 - 1, as pytorch-fid)")
    p.add_argument("--is_logits", choices=("unbiased", "biased"), default="unbiased",
                   help="Inception Score logits: unbiased (default; pool3 @ W as the original "
                        "IS code) or biased (the final layer with its bias)")


def build_parser() -> argparse.ArgumentParser:
    from ddpm_jax import commands

    parser = argparse.ArgumentParser(prog="python -m ddpm_jax.metrics",
                                     description="FID / IS / bits-per-dim evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="Inception reference statistics of a data set")
    p.add_argument("--inception", required=True,
                   help="pt_inception-2015-12-05-6726825d.pth or its cached .npz")
    _add_data_args(p, required=False)
    p.add_argument("--images", default=None, help="instead of --dataset: .npz of uint8 images")
    p.add_argument("--key", default=None, help="array name in --images")
    p.add_argument("--max_images", type=int, default=None, help="use the first N images")
    p.add_argument("--out", required=True, help="statistics .npz to write")
    p.add_argument("--batch_size", type=int, default=200, help="global Inception batch")
    _add_inception_args(p)
    commands.add_verbose_flag(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("fid", help="FID and IS of samples against reference statistics")
    p.add_argument("--inception", required=True,
                   help="pt_inception-2015-12-05-6726825d.pth or its cached .npz")
    p.add_argument("--samples", required=True, help=".npz of uint8 samples [N, H, W, C]")
    p.add_argument("--key", default=None, help="array name in --samples")
    p.add_argument("--ref", required=True,
                   help="statistics .npz (from `stats`, TTUR or pytorch-fid), or an .npz of "
                        "reference images (statistics cached beside it)")
    p.add_argument("--num_samples", type=int, default=None,
                   help="use the first N samples (the paper: 50000)")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    p.add_argument("--fid_method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="sqrtm: the TTUR computation (about a minute on CPU); eigh: the same "
                        "value from symmetric eigendecompositions (seconds)")
    p.add_argument("--save_stats", default=None, help="also write the samples' statistics")
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--batch_size", type=int, default=200, help="global Inception batch")
    _add_inception_args(p)
    commands.add_verbose_flag(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("bpd", help="bits/dim (NLL bound) of a checkpoint on a data set")
    p.add_argument("--checkpoint", required=True,
                   help="params directory (checkpoint.save_params) or training workdir")
    _add_data_args(p, required=True)
    p.add_argument("--max_images", type=int, default=None, help="use the first N images")
    p.add_argument("--batch_size", type=int, default=64, help="global batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the q(x_t|x_0) draws")
    p.add_argument("--reverse_steps", type=lambda s: [int(v) for v in s.split(",")],
                   default=None, help="comma-separated reverse steps k in [1, T] of the "
                   "rate-distortion table (default: T, 0.9 T, ..., 0.1 T)")
    p.add_argument("--out", default=None, help="JSON result file; per-t terms go to a .npz "
                   "beside it, progress to <out>_shards/ (a rerun resumes)")
    p.add_argument("--shard_batches", type=int, default=4,
                   help="batches per saved shard of progress (with --out)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard saved shards of other arguments")
    commands.add_verbose_flag(p)
    p.set_defaults(func=cmd_bpd)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    from ddpm_jax import commands

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    commands.setup_logging(None, verbose=args.verbose)
    result = args.func(args)
    commands.finish(f"metrics {args.command}", _what_was_done(args, result), start=start)
    return result


def _what_was_done(args, result: dict) -> str:
    from ddpm_jax import commands

    if args.command == "stats":
        line = (f"Inception statistics of {result['num_images']} images to "
                f"{commands.relpath(args.out)}")
    elif args.command == "fid":
        line = (f"FID {result['fid']:.4g}, IS {result['inception_score']:.4g} of "
                f"{result['num_samples']} samples")
    else:
        line = f"{result['bpd']:.4f} bits/dim"
    out = getattr(args, "out", None)
    json_path = os.path.splitext(out)[0] + ".json" if args.command == "stats" else out
    return line + (f"; result {commands.relpath(json_path)}" if json_path else "")


if __name__ == "__main__":
    main(sys.argv[1:])
