"""FID and Inception Score while a run trains: the optional ``eval`` config section.

Every ``eval.every`` train steps the training loop (`ddpm_jax.train`) draws
``eval.num_samples`` images with the EMA params (`ddpm_jax.generation.generate`, sharded
over this process's devices, sampler ``eval.sampler`` with ``eval.num_steps`` steps, the
same seed ``eval.seed`` at every evaluation, so that the numbers move with the model and
not with the noise), computes their Inception features (`inception.InceptionExtractor`
with the weights at ``eval.inception``), and scores them against the reference
statistics ``eval.ref_stats`` (an ``.npz`` with ``mu`` and ``sigma``, e.g. made by
``python -m ddpm_jax.metrics stats``): FID (`fid.frechet_distance`, by default with
``method="eigh"``: seconds instead of about a minute for ``"sqrtm"``, equal to float64
round-off when there are more samples than features) and the Inception Score over
``eval.is_splits`` splits. The numbers go to TensorBoard as ``eval/fid``,
``eval/inception_score``, ``eval/inception_score_std`` and ``eval/seconds``, and to stdout.

Everything that could fail late is checked when training starts (`validate_eval_config`,
called by ``train.validate_config``, and `InTrainingEval`, built before anything
compiles): the weights and statistics files exist and load, the statistics are 2048-d,
and the sampler options trace. ``eval.every = 0`` (the default) turns evaluation off.

With several processes each process samples and scores the same images on its own
devices (the work is repeated, not split); process 0 logs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import config_lib
from ddpm_jax.metrics import fid, inception

EVAL_FIELDS = tuple(f.name for f in dataclasses.fields(config_lib.EvalConfig))
FID_METHODS = ("sqrtm", "eigh")


def enabled(config: Any) -> bool:
    """Whether a training config asks for evaluations (an ``eval`` section with every > 0)."""
    return "eval" in config and bool(config.eval.every)


def _check_int(e: Any, field: str, low: int) -> None:
    value = e[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"config.eval.{field} must be an int >= {low}, got {value!r}.")


def validate_eval_config(config: Any, *, local_devices: int) -> None:
    """Raises ValueError for a bad ``eval`` section; with evaluation on, also for missing or
    unreadable weights or statistics, and sampler options that the sampler refuses.

    Args:
      config: the full training config (the sampler check needs the model and diffusion).
      local_devices: this process's device count (the sampling batch is split over them).
    """
    e = config.eval
    _check_int(e, "every", 0)
    if not e.every:
        return
    _check_int(e, "num_samples", 2)
    _check_int(e, "batch_size", 1)
    _check_int(e, "is_splits", 1)
    if e.batch_size % local_devices:
        raise ValueError(f"config.eval.batch_size={e.batch_size} must be a multiple of this "
                         f"process's device count {local_devices}.")
    if e.is_splits > e.num_samples:
        raise ValueError(f"config.eval.is_splits={e.is_splits} must be <= "
                         f"config.eval.num_samples={e.num_samples}.")
    if e.fid_method not in FID_METHODS:
        raise ValueError(f"config.eval.fid_method={e.fid_method!r} is unknown; allowed: "
                         f"{list(FID_METHODS)}.")
    _check_file(e.inception, "inception", "the FID Inception weights "
                "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or its .npz)")
    _check_file(e.ref_stats, "ref_stats", "the reference statistics .npz (make them with "
                "`python -m ddpm_jax.metrics stats`)")
    try:
        mu, sigma = fid.load_statistics(e.ref_stats)
    except (OSError, ValueError) as err:
        raise ValueError(f"config.eval.ref_stats={e.ref_stats!r} cannot be read as FID "
                         f"statistics: {err}") from err
    d = inception.NUM_FEATURES
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(f"config.eval.ref_stats={e.ref_stats!r} holds statistics of shape "
                         f"mu {mu.shape}, sigma {sigma.shape}; the Inception pool3 features "
                         f"need ({d},) and ({d}, {d}).")
    _check_sampler(config)


def _check_file(path: str, field: str, what: str) -> None:
    if not path:
        raise ValueError(f"config.eval.{field} is empty; with config.eval.every > 0 it must "
                         f"name {what}. Set it, or set config.eval.every=0.")
    if not os.path.isfile(path):
        raise ValueError(f"config.eval.{field}={path!r} is not a file; it must name {what}. "
                         "Fix the path, or set config.eval.every=0.")


def _check_sampler(config: Any) -> None:
    """Traces (without running) the sampler with a stand-in network, so bad options fail now."""
    from ddpm_jax import builders, sampling

    e, d = config.eval, config.diffusion
    shape = (e.batch_size, config.data.image_size, config.data.image_size, config.data.channels)
    out_shape = (*shape[:-1], builders.out_channels(config))
    sched = builders.schedule(config)

    def run(key):
        return sampling.sample(sched, lambda x, t: jnp.zeros(out_shape, x.dtype), key, shape,
                               mean_type=d.mean_type, var_type=d.var_type,
                               sampler=e.sampler, num_steps=e.num_steps)

    try:
        jax.eval_shape(run, jax.random.key(0))
    except ValueError as err:
        raise ValueError(f"config.eval.sampler={e.sampler!r} with config.eval.num_steps="
                         f"{e.num_steps!r}: {err}") from err


def score_images(extractor, images: np.ndarray, ref: tuple[np.ndarray, np.ndarray], *,
                 fid_method: str = "eigh", is_splits: int = 10) -> dict[str, float]:
    """FID against reference statistics and Inception Score of uint8 images [N, H, W, C].

    Returns:
      {"fid", "inception_score", "inception_score_std"} as Python floats.
    """
    feats = fid.array_features(extractor, images)
    mu, sigma = fid.activation_statistics(feats["pool3"])
    score = fid.frechet_distance(mu, sigma, *ref, method=fid_method)
    is_mean, is_std = fid.inception_score(feats["logits"], splits=is_splits)
    return {"fid": float(score), "inception_score": is_mean, "inception_score_std": is_std}


class InTrainingEval:
    """Loads the weights and statistics once (at the start of training) and scores params.

    Args:
      config: a full training config with evaluation on (see `enabled`); validated with
        `validate_eval_config` first.
    """

    def __init__(self, config: Any):
        from ddpm_jax import checkpoint

        validate_eval_config(config, local_devices=jax.local_device_count())
        e = config.eval
        self.settings = e
        try:
            params = inception.load_inception_params(e.inception)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:  # any bad file
            raise ValueError(f"config.eval.inception={e.inception!r} cannot be loaded as FID "
                             f"Inception weights: {err}") from err
        self.extractor = inception.InceptionExtractor(params, batch_size=e.batch_size,
                                                      devices=jax.local_devices())
        self.ref = fid.load_statistics(e.ref_stats)
        self.meta = checkpoint.meta_from_config(config)

    def due(self, before: int, after: int) -> bool:
        """Whether the steps (before, after] cross a multiple of eval.every."""
        every = self.settings.every
        return after // every > before // every

    def sample(self, ema_params: Any) -> np.ndarray:
        """The evaluation's uint8 images [num_samples, H, W, C] from the EMA params."""
        from ddpm_jax import generation

        e = self.settings
        return generation.generate(ema_params, self.meta, num_samples=e.num_samples,
                                 batch_size=e.batch_size, seed=e.seed, sampler=e.sampler,
                                 num_steps=e.num_steps, progress=False)["images"]

    def __call__(self, ema_params: Any) -> dict[str, float]:
        """Samples, scores, and returns the TensorBoard scalars ``eval/...`` (see the module)."""
        start = time.perf_counter()
        e = self.settings
        scores = score_images(self.extractor, self.sample(ema_params), self.ref,
                              fid_method=e.fid_method, is_splits=e.is_splits)
        out = {f"eval/{k}": v for k, v in scores.items()}
        out["eval/seconds"] = time.perf_counter() - start
        return out
