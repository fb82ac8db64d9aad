r"""How much FID moves between the two Inception input resizes ("tf1" and "pytorch").

Computes Inception pool3 features of two image sets under both resizes of
``ddpm_jax.metrics.inception`` and reports, on the same images:

* ``fid_tf1`` and ``fid_pytorch``: FID between the two sets, each with one resize for both
  sides (what changes when a whole evaluation switches resize);
* ``fid_mixed_a`` and ``fid_mixed_b``: FID between one set's tf1 and its own pytorch features
  (what a reference made with one resize adds when the samples use the other).

Images: the digits data set resized to --image_size (train split = set A, test split = set B),
so it runs anywhere without downloads; or two ``.npz`` files of uint8 images (--a, --b), e.g.
CIFAR-10 training images and a model's samples. Weights: --inception (pytorch-fid's .pth or its
.npz), or "random" for the random-weight test fixture (tests/fixtures), whose FID values are
only a relative guide.

  python -m benchmarks.fid_resize --inception random --num_images 256 \
      --out benchmarks/results/fid_resize.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

from benchmarks import common

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "fixtures")


def _random_weights() -> dict:
    from ddpm_jax.metrics import inception

    spec = importlib.util.spec_from_file_location(
        "make_inception_fixture", os.path.join(FIXTURES, "make_inception_fixture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with np.load(os.path.join(FIXTURES, "inception_fixture.npz")) as f:
        keys, shapes = [str(k) for k in f["keys"]], json.loads(str(f["shapes"]))
    return inception.convert_state_dict(module.random_state_dict(keys, shapes))


def _image_sets(args) -> tuple[np.ndarray, np.ndarray]:
    from ddpm_jax import input_pipeline
    from ddpm_jax.metrics import fid

    if args.a or args.b:
        if not (args.a and args.b):
            raise ValueError("give both --a and --b, or neither (digits).")
        return (fid.load_images_npz(args.a)[:args.num_images],
                fid.load_images_npz(args.b)[:args.num_images])
    cfg = {"name": "digits", "image_size": args.image_size}
    return tuple(input_pipeline.load_numpy(cfg, split)[0][:args.num_images]
                 for split in ("train", "test"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inception", default="random",
                        help='pytorch-fid .pth / cached .npz, or "random" (the test fixture)')
    parser.add_argument("--a", default=None, help=".npz of uint8 images (set A)")
    parser.add_argument("--b", default=None, help=".npz of uint8 images (set B)")
    parser.add_argument("--num_images", type=int, default=256, help="images per set")
    parser.add_argument("--image_size", type=int, default=32, help="digits resolution")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON lines file to append the result to")
    args = parser.parse_args(argv)

    from ddpm_jax.metrics import fid, inception

    start = time.time()
    params = (_random_weights() if args.inception == "random"
              else inception.load_inception_params(args.inception))
    set_a, set_b = _image_sets(args)
    stats = {}
    for resize in inception.RESIZE_METHODS:
        extractor = inception.InceptionExtractor(params, batch_size=args.batch_size,
                                                 resize=resize)
        for name, images in (("a", set_a), ("b", set_b)):
            feats = fid.array_features(extractor, images, progress=True, desc=f"{resize}/{name}")
            stats[resize, name] = fid.activation_statistics(feats["pool3"])

    def score(x, y):  # "eigh": the sqrtm value in seconds instead of minutes per FID
        return fid.fid_from_statistics(stats[x], stats[y], method="eigh")

    result = {
        "benchmark": "fid_resize", "weights": args.inception,
        "images": ({"a": args.a, "b": args.b} if args.a else
                   f"digits train (a) / test (b) at {args.image_size}px"),
        "num_images": [len(set_a), len(set_b)],
        "fid_tf1": score(("tf1", "a"), ("tf1", "b")),
        "fid_pytorch": score(("pytorch", "a"), ("pytorch", "b")),
        "fid_mixed_a": score(("tf1", "a"), ("pytorch", "a")),
        "fid_mixed_b": score(("tf1", "b"), ("pytorch", "b")),
        "seconds": round(time.time() - start, 1),
    }
    result["fid_change_percent"] = 100.0 * (result["fid_pytorch"] / result["fid_tf1"] - 1.0)
    common.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
