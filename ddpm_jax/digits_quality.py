"""Are the samples of a digits model recognizable digits?

``python -m ddpm_jax.digits_quality WORKDIR [--num_samples 1000] [--seed 0]``

Loads the EMA params of the newest checkpoint in WORKDIR (or a `save_params`
directory), draws samples with ancestral DDPM sampling (all T steps, the
model's variance type, clipped to [-1, 1] and quantized to 0..255), and
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

The bar for configs/digits.py: confident >= 0.9 and max_class_share <= 0.15.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from ddpm_jax import builders, checkpoint, sampling

CONFIDENCE = 0.8


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


def score(samples: np.ndarray) -> dict[str, object]:
    """Scores uint8 [N, 8, 8, 1] samples (see the module docstring)."""
    images, labels = _digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    cut = len(labels) * 3 // 4
    check = fit_classifier(images[order[:cut]], labels[order[:cut]])
    held_out = images[order[cut:]]
    test_acc = float(check.score(held_out, labels[order[cut:]]))
    test_conf = float(np.mean(check.predict_proba(held_out).max(axis=1) >= CONFIDENCE))
    judge = fit_classifier(images, labels)
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


def draw_samples(path: str, num_samples: int, seed: int, batch_size: int = 1000) -> np.ndarray:
    """uint8 [num_samples, H, W, C] DDPM samples from the EMA params at path."""
    params, meta = checkpoint.load_params(path)
    model = builders.unet_from_meta(meta)
    d = meta["diffusion"]
    sched = builders.schedule(d)
    size, channels = meta["data"]["image_size"], meta["data"]["channels"]

    @jax.jit
    def run(params, offset):
        x = sampling.sample(sched, lambda x, t: model.apply({"params": params}, x, t),
                            jax.random.key(seed), (batch_size, size, size, channels),
                            mean_type=d["mean_type"], var_type=d["var_type"],
                            index_offset=offset)
        return builders.to_uint8(x)

    out = [np.asarray(run(params, i)) for i in range(0, num_samples, batch_size)]
    return np.concatenate(out)[:num_samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="training workdir or save_params directory")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="also write the samples to this .npz")
    args = parser.parse_args()
    start = time.perf_counter()
    samples = draw_samples(args.path, args.num_samples, args.seed)
    result = score(samples)
    result["sampling_seconds"] = round(time.perf_counter() - start, 1)
    if args.save:
        np.savez_compressed(args.save, images=samples)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
