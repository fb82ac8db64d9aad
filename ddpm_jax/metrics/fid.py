"""Frechet Inception Distance and Inception Score, computed as the paper's evaluation did.

The numbers follow the TTUR FID code and the original Inception Score code, both run on the
2015-12-05 Inception graph (``ddpm_jax.metrics.inception``):

* activation statistics are the float64 mean and (unbiased, ``np.cov``) covariance of the
  2048-d pool3 features;
* the Frechet distance is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``; when the
  matrix square root is not finite, ``eps`` is added to both diagonals and it is taken again;
  an imaginary part on the diagonal above 1e-3 is an error, smaller ones are dropped;
* the Inception Score is ``exp(E_x KL(p(y|x) || p(y)))`` over 10 consecutive splits, reported as
  mean and standard deviation over the splits, from the 1008-way softmax of the logits
  without the final layer's bias (as the original code multiplies pool3 by the weights only).

Statistics files are ``.npz`` with arrays ``mu`` [D] and ``sigma`` [D, D], the same layout as
the TTUR and pytorch-fid statistics files, so either can be used as a reference. Ours also
record the Inception input resize they were made with ("tf1" or "pytorch", see
``ddpm_jax.metrics.inception``), and loading one for features of the other resize is an error,
as are unreadable files and NaN or inf statistics.

The command line (``python -m ddpm_jax.metrics --help``, in ``cli.py``) has two commands for
these: ``stats`` writes reference statistics of a data set, ``fid`` scores a samples ``.npz``
against them.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from scipy import linalg, special

from ddpm_jax import fileio

STATS_KEYS = ("mu", "sigma")


def activation_statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of feature vectors, in float64.

    Args:
      activations: [N, D] features (N >= 2), e.g. Inception pool3 features.

    Returns:
      (mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance (``np.cov``).
    """
    acts = np.asarray(activations, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(
            f"activations must have shape [N, D] with N >= 2, got shape {acts.shape}."
        )
    mu = np.mean(acts, axis=0)
    sigma = np.cov(acts, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal matrix square root; a poorly conditioned input is handled by the caller."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(sigma1 @ sigma2) = sum sqrt(eig(sigma1^1/2 sigma2 sigma1^1/2)), for PSD inputs."""
    w, v = linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root @ sigma2 @ root
    return float(np.sum(np.sqrt(np.clip(linalg.eigvalsh((inner + inner.T) / 2), 0.0, None))))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Frechet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))``, with the
    TTUR code's numerics: if ``sqrtm`` of the product is not finite (singular product), ``eps``
    is added to both covariance diagonals and it is recomputed; a complex result is accepted
    only if the imaginary part of its diagonal is within 1e-3 of zero, and its real part is
    kept.

    Args:
      mu1: [D] mean of the first set.
      sigma1: [D, D] covariance of the first set.
      mu2: [D] mean of the second set.
      sigma2: [D, D] covariance of the second set.
      eps: diagonal offset used only when the product is singular.
      method: "sqrtm" (default): the TTUR computation above, with ``scipy.linalg.sqrtm``
        (slow: about a minute for D = 2048 on two CPU cores). "eigh": the same quantity as
        ``tr sqrt(sigma1^1/2 sigma2 sigma1^1/2)`` from symmetric eigendecompositions (negative
        round-off eigenvalues clipped to 0), seconds for D = 2048; it agrees with "sqrtm" to
        float64 round-off for covariance matrices of more samples than dimensions.

    Returns:
      The squared Frechet distance (what papers call FID) as a Python float.

    Raises:
      ValueError: on mismatched shapes, NaN or inf inputs, or a square root with a large
        imaginary component.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and "
                         f"{mu2.shape}.")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape {(d, d)} to match the means, got {s.shape}.")

    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}.")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"Frechet distance: {name} holds NaN or inf values.")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                     - 2.0 * _trace_sqrt_product(sigma1, sigma2))
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Frechet distance: singular covariance product; adding {eps} to the diagonals.",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                "Frechet distance: sqrtm(sigma1 @ sigma2) has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the statistics are likely too few samples "
                "or not covariance matrices."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits, over consecutive splits.

    Split i holds rows ``[i * N // splits, (i + 1) * N // splits)``; its score is
    ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``. Softmax and logs are in float64.

    Args:
      logits: [N, K] logits (for the paper's protocol: ``pool3 @ W`` of the Inception
        network's 1008-way softmax layer, without bias; see ``InceptionV3``).
      splits: number of splits (the paper's protocol uses 10).

    Returns:
      (mean, std) of the per-split scores.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {logits.shape}.")
    if not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits must be in [1, N={logits.shape[0]}], got {splits}.")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - special.logsumexp(logp, axis=1, keepdims=True)
    p = np.exp(logp)
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        part_logp = logp[i * n // splits:(i + 1) * n // splits]
        part_p = p[i * n // splits:(i + 1) * n // splits]
        # log p(y) by log-sum-exp, so classes that no image predicts stay finite.
        log_marginal = special.logsumexp(part_logp, axis=0) - np.log(part_logp.shape[0])
        kl = np.sum(part_p * (part_logp - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
                    *, resize: str | None = None, **extra: np.ndarray) -> None:
    """Writes ``mu`` and ``sigma`` (and any extra arrays) to an ``.npz`` file.

    ``resize`` (the Inception input resize the features were made with, "tf1" or "pytorch")
    is stored as the array "resize", so that ``load_statistics`` can refuse to mix the two.
    The write goes through a temporary file and a rename, so a reader never sees half a file.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if resize is not None:
        extra = {**extra, "resize": np.asarray(resize)}
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
    os.replace(tmp, path)


def open_npz(path: str | os.PathLike, expected: str):
    """`ddpm_jax.fileio.open_npz`: the open ``.npz`` (in a ``with`` block), or one ValueError."""
    return fileio.open_npz(path, expected)


def read_npz(path: str | os.PathLike, expected: str) -> dict[str, np.ndarray]:
    """`ddpm_jax.fileio.load_npz`: all arrays of an ``.npz``, or one ValueError naming it."""
    return fileio.load_npz(path, expected)


_STATS_EXPECTED = ("a statistics file with arrays mu [D] and sigma [D, D], from `python -m "
                   "ddpm_jax.metrics stats`, TTUR or pytorch-fid")


def is_statistics_file(path: str | os.PathLike) -> bool:
    """Whether an ``.npz`` holds "mu" and "sigma" (ValueError naming it if it is unreadable)."""
    with open_npz(path, f"{_STATS_EXPECTED}, or uint8 images") as f:
        return all(k in f.files for k in STATS_KEYS)


def load_statistics(path: str | os.PathLike, *, resize: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu [D], sigma [D, D])`` from an ``.npz`` (ours, TTUR's or pytorch-fid's).

    Args:
      path: the statistics file.
      resize: the Inception input resize the caller's features use; if the file records a
        different one (files made by ``save_statistics(..., resize=...)``), ValueError.
        TTUR and pytorch-fid files record none and are accepted.

    Raises:
      ValueError: naming the file, if it is unreadable, lacks mu or sigma, has the wrong
        shapes, holds NaN or inf, or was made with another resize.
    """
    path = os.fspath(path)
    arrays = read_npz(path, _STATS_EXPECTED)
    missing = [k for k in STATS_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: not a statistics file; it lacks {missing} (has "
                         f"{sorted(arrays)}). Make one with `python -m ddpm_jax.metrics stats`.")
    try:
        mu, sigma = (np.asarray(arrays[k], np.float64) for k in STATS_KEYS)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: mu and sigma must be numeric arrays ({e}).") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: expected mu [D] and sigma [D, D], got shapes {mu.shape} and "
                         f"{sigma.shape}.")
    for name, value in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(value).all():
            raise ValueError(
                f"{path}: {name} holds {np.sum(~np.isfinite(value))} NaN or inf values; the "
                "statistics are corrupt (remake them with `python -m ddpm_jax.metrics stats`).")
    if resize is not None and "resize" in arrays and str(arrays["resize"]) != resize:
        raise ValueError(
            f"{path}: made with --resize {arrays['resize']}, but these features use --resize "
            f"{resize}; FID across the two is meaningless. Pass --resize {arrays['resize']} or "
            "remake the statistics.")
    return mu, sigma


def load_images_npz(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Loads uint8 images [N, H, W, C] from an ``.npz`` (e.g. what the sampler writes).

    Args:
      path: the ``.npz`` file.
      key: the array's name; by default the file's only array, else the first of
        "images", "samples", "arr_0" that it has.

    Returns:
      uint8 [N, H, W, C] with C in {1, 3}.
    """
    path = os.fspath(path)
    expected = "uint8 images [N, H, W, C], e.g. the samples.npz that ddpm_jax.generate writes"
    with open_npz(path, expected) as f:
        if key is None:
            if len(f.files) == 1:
                key = f.files[0]
            else:
                key = next((k for k in ("images", "samples", "arr_0") if k in f.files), None)
            if key is None:
                raise ValueError(f"{path}: which array holds the images? Pass key= one of "
                                 f"{f.files}.")
        elif key not in f.files:
            raise ValueError(f"{path}: no array named {key!r}; it has {f.files}.")
        try:
            images = f[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}[{key}]: unreadable ({type(e).__name__}: {e}); expected "
                             f"{expected}.") from e
    return check_images(images, name=f"{path}[{key}]")


def check_images(images: np.ndarray, *, name: str = "images") -> np.ndarray:
    """Checks for uint8 NHWC images with 1 or 3 channels and returns them as a numpy array."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be [N, H, W, C] with C in (1, 3), got {images.shape}.")
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 in [0, 255] (the sampler's output), got "
                         f"{images.dtype}; convert with np.round((x + 1) * 127.5).clip(0, 255)"
                         ".astype(np.uint8) from [-1, 1].")
    return images


def fid_from_statistics(a: Mapping[str, np.ndarray] | tuple, b: Mapping[str, np.ndarray] | tuple,
                        *, method: str = "sqrtm") -> float:
    """FID between two statistics, each a (mu, sigma) pair or a mapping with those keys."""
    def unpack(s):
        return (s["mu"], s["sigma"]) if isinstance(s, Mapping) else tuple(s)
    (mu1, s1), (mu2, s2) = unpack(a), unpack(b)
    return frechet_distance(mu1, s1, mu2, s2, method=method)


# ---------------------------------------------------------------------------------------------
# Features of image sets and data sets.

DEFAULT_IMAGE_SIZES = {"digits": 8, "cifar10": 32, "celeb_a_hq": 256, "lsun_church": 256,
                       "lsun_bedroom": 256, "lsun_cat": 256}


def image_features(extractor: Callable[..., Mapping[str, np.ndarray]],
                   batches: Iterable[np.ndarray], *, total: int | None = None,
                   progress: bool = False, desc: str = "Inception",
                   is_logits: str = "unbiased") -> dict[str, np.ndarray]:
    """Inception features of a stream of uint8 image batches.

    Args:
      extractor: an ``inception.InceptionExtractor`` (or any callable with its signature).
      batches: uint8 [b, H, W, C] arrays, of any sizes b.
      total: number of images expected, for the progress bar.
      progress: show a progress bar (counted in images).
      desc: its label.
      is_logits: the Inception Score's logits: "unbiased" (default; pool3 @ W, as the
        original Inception Score code computes them) or "biased" (the final layer with its
        bias).

    Returns:
      "pool3" float32 [N, 2048] and "logits" float32 [N, 1008] (those chosen by
      ``is_logits``).
    """
    if is_logits not in ("unbiased", "biased"):
        raise ValueError(f"is_logits must be 'unbiased' or 'biased', got {is_logits!r}.")
    logits_key = "logits_unbiased" if is_logits == "unbiased" else "logits"
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit="img")
    pool3, logits = [], []
    for batch in batches:
        out = extractor(check_images(batch))
        pool3.append(out["pool3"])
        logits.append(out[logits_key])
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not pool3:
        raise ValueError("no images to compute Inception features of.")
    return {"pool3": np.concatenate(pool3), "logits": np.concatenate(logits)}


def _chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start:start + size]


def array_features(extractor, images: np.ndarray, *, progress: bool = False,
                   desc: str = "Inception", is_logits: str = "unbiased"
                   ) -> dict[str, np.ndarray]:
    """``image_features`` of an in-memory uint8 array [N, H, W, C]."""
    images = check_images(images)
    size = getattr(extractor, "batch_size", 200)
    return image_features(extractor, _chunks(images, size), total=len(images),
                          progress=progress, desc=desc, is_logits=is_logits)


def dataset_batches(data_cfg: Mapping[str, Any], split: str, *, batch_size: int,
                    max_images: int | None = None) -> tuple[Iterator[np.ndarray], int]:
    """All images of a data set split, in order, as uint8 batches, read by this process.

    Uses ``ddpm_jax.input_pipeline`` (tfds, digits, image folders, .npz), so images are
    cropped and resized exactly as for training. Every process reads the whole split.

    Returns:
      (iterator of uint8 [b, H, W, C] batches, number of images it yields).
    """
    from ddpm_jax import input_pipeline

    total = input_pipeline.num_examples(data_cfg, split)
    if max_images is not None:
        total = min(total, max_images)

    def gen():
        left = total
        it = input_pipeline.create_input_iter(
            data_cfg, batch_size=batch_size, train=False, seed=0, split=split,
            process_index=0, process_count=1)
        for batch in it:
            if left <= 0:
                break
            images = batch["image"][batch["mask"]][:left]
            left -= len(images)
            yield images

    return gen(), total


def fid_between(extractor, images_a: np.ndarray, images_b: np.ndarray, *,
                method: str = "sqrtm") -> float:
    """FID between two uint8 image sets [N, H, W, C] (sizes may differ)."""
    stats = [activation_statistics(array_features(extractor, x)["pool3"])
             for x in (images_a, images_b)]
    return fid_from_statistics(stats[0], stats[1], method=method)
