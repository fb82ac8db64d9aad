"""Drawing N images from params and checkpoint metadata over all local devices.

`generate` is the library function behind ``python -m ddpm_jax.generate`` (which
adds the files, shards and resuming) and FID during training
(`ddpm_jax.metrics.in_training`). Each image's noise comes from one key of the
run and its global index, so the images do not depend on the batch size or
the device count.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ddpm_jax import builders, conv, sampling
from ddpm_jax.unet import UNet


class _BatchSampler:
    """A jitted (params, key, offset, labels, w) -> uint8 [B, H, W, C] over a device mesh."""

    def __init__(self, model_config, diffusion_items, shape, sampler, num_steps, eta,
                 clip_denoised, guided, devices, spacing=None):
        dcfg = dict(diffusion_items)
        model = UNet(model_config)
        s = builders.schedule(dcfg)
        self.batch_sharding, self.param_sharding = builders.data_shardings(devices)

        def run(params, key, offset, labels, w):
            def model_fn(x, t, y=None):
                return model.apply({"params": params}, x, t, y)

            x = sampling.sample(
                s, model_fn, key, shape, mean_type=dcfg["mean_type"],
                var_type=dcfg["var_type"], clip_denoised=clip_denoised, sampler=sampler,
                num_steps=num_steps, eta=eta, spacing=spacing, labels=labels,
                guidance_scale=w if guided else None, null_label=model_config.num_classes,
                index_offset=offset, sharding=self.batch_sharding)
            return builders.to_uint8(x)

        self._run = jax.jit(run, out_shardings=self.batch_sharding,
                            compiler_options=conv.compiler_options(devices))

    def __call__(self, params, key, offset, labels, w):
        return self._run(params, key, offset, labels, w)


@functools.lru_cache(maxsize=8)
def _batch_sampler(*args) -> _BatchSampler:
    """One compiled sampler per model, schedule, shape and sampler options (reused across
    calls of `generate`)."""
    return _BatchSampler(*args)


def generate(
    params: Any,
    meta: dict[str, Any],
    *,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    class_label: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    start: int = 0,
    spacing: str | None = None,
) -> dict[str, np.ndarray]:
    """Draws num_samples images over all local devices.

    Args:
      params: the model's params pytree (variables["params"]).
      meta: checkpoint metadata (model, diffusion, data sections).
      num_samples: how many images (N).
      batch_size: images per compiled call, a multiple of the device count.
      seed: seed of the one key of the run.
      sampler: one of `sampling.SAMPLERS` ("ddpm", "ddim" with eta, "dpm++2m").
      num_steps: network evaluations per image (None: all T; "ddpm" with fewer runs
        the respaced process).
      eta: DDIM noise scale.
      clip_denoised: clip predicted x_0 to [-1, 1] at every step.
      class_label: class-conditional models: this class for every image
        (default: image i gets class i % num_classes).
      guidance_scale: classifier-free guidance weight w (conditional models).
      progress: show a tqdm progress bar.
      spacing: which timesteps num_steps visits, one of `sampling.SPACINGS` (None: the
        sampler's default, "logsnr" for "dpm++2m", else "linspace").
      start: global index of the first image: the images with indices start,
        ..., start + N - 1 of the run of this seed (a slice of a larger run is
        the same as that run's images there when start is a multiple of
        batch_size).

    Returns:
      {"images": uint8 [N, H, W, C]} plus "labels" int32 [N] for conditional
      models.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}.")
    devices = jax.local_devices()
    if batch_size < 1 or batch_size % len(devices):
        raise ValueError(f"batch_size must be a positive multiple of the device count "
                         f"({len(devices)}), got {batch_size}.")
    model = builders.unet_from_meta(meta)
    num_classes = model.config.num_classes
    if num_classes is None and (class_label is not None or guidance_scale is not None):
        raise ValueError("class_label and guidance_scale need a class-conditional model "
                         "(model.num_classes is None in this checkpoint).")
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ValueError(f"class_label must be in [0, {num_classes - 1}], got {class_label}.")
    size, channels = int(meta["data"]["image_size"]), int(meta["data"]["channels"])
    shape = (batch_size, size, size, channels)
    run = _batch_sampler(
        model.config, tuple(sorted(meta["diffusion"].items())), shape, sampler, num_steps,
        float(eta), bool(clip_denoised), guidance_scale is not None, tuple(devices), spacing)
    batch_sharding = run.batch_sharding
    params = jax.device_put(params, run.param_sharding)
    w = jnp.float32(0.0 if guidance_scale is None else guidance_scale)
    key = jax.random.key(seed)
    num_batches = math.ceil(num_samples / batch_size)
    images, labels_out = [], []
    bar = tqdm(total=num_samples, unit="img", disable=not progress, desc="sampling")
    for i in range(num_batches):
        offset = start + i * batch_size
        labels = None
        if num_classes is not None:
            index = np.arange(offset, offset + batch_size)
            labels = (np.full(batch_size, class_label) if class_label is not None
                      else index % num_classes).astype(np.int32)
            labels_out.append(labels)
            labels = jax.device_put(labels, batch_sharding)
        out = run(params, key, jnp.int32(offset), labels, w)
        images.append(np.asarray(out))
        bar.update(min(batch_size, start + num_samples - offset))
    bar.close()
    result = {"images": np.concatenate(images)[:num_samples]}
    if labels_out:
        result["labels"] = np.concatenate(labels_out)[:num_samples]
    return result
