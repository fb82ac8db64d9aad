"""What every command builds: the U-Net, the schedule, the data mesh, uint8 images, grids.

Training (`ddpm_jax.train`), sampling from a checkpoint (`ddpm_jax.generate`),
evaluation (`ddpm_jax.metrics`), `ddpm_jax.digits_quality` and the benchmarks
all build these the same way, here:

* `unet_config` / `unet_from_meta`: the U-Net from a training config or from a
  checkpoint's inference metadata (`checkpoint.meta_from_config`); the output
  channels are the data channels, doubled for learned variances
  (`out_channels`).
* `schedule`: the `diffusion.Schedule` of a config's ``diffusion`` section (or
  of a checkpoint's meta, which has the same fields).
* `data_mesh`: the 1-D device mesh whose axis is ``parallel.AXIS`` ("data");
  `data_shardings`: the batch-sharded and the replicated sharding on it.
* `from_uint8` / `to_uint8`: images are uint8 at the edges and float32 in
  [-1, 1] inside the model. ``from_uint8`` is ``x / 127.5 - 1`` (exact:
  0 -> -1, 255 -> 1); ``to_uint8`` *rounds* ``(x + 1) * 127.5`` to the nearest
  level and clips to [0, 255], so ``to_uint8(from_uint8(u)) == u`` for every
  uint8 value (truncation would map 255 to 254 whenever float32 lands just
  below it).
* `image_grid`: a batch of images tiled into one image, with an optional
  border.

This module imports no command-line module; they import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax import diffusion, parallel, schedules
from ddpm_jax.unet import UNet, UNetConfig


def out_channels(config: Any) -> int:
    """U-Net output channels: the data channels C, or 2C for learned variances.

    Args:
      config: a training config or a checkpoint's meta: anything with
        ``["data"]["channels"]`` and ``["diffusion"]["var_type"]``.
    """
    factor = 2 if config["diffusion"]["var_type"] in diffusion.LEARNED_VAR_TYPES else 1
    return int(config["data"]["channels"]) * factor


def unet_config(config: Any) -> UNetConfig:
    """The U-Net's typed config from a training config's ``model`` section and data channels."""
    return UNetConfig.from_config(config.model, out_ch=out_channels(config))


def unet_config_from_meta(meta: Mapping[str, Any]) -> UNetConfig:
    """The U-Net's typed config from a checkpoint's inference metadata.

    Args:
      meta: ``{"model": UNetConfig fields, "diffusion": {...}, "data": {...}}`` as
        written by `checkpoint.meta_from_config` (``load_params`` returns it).
        ``model.out_ch`` may be absent (then it is `out_channels` of the meta).
    """
    model_cfg = dict(meta["model"])
    out_ch = model_cfg.pop("out_ch", None)
    return UNetConfig.from_config(
        model_cfg, out_ch=out_channels(meta) if out_ch is None else int(out_ch))


def unet_from_meta(meta: Mapping[str, Any]) -> UNet:
    """The `UNet` described by a checkpoint's inference metadata (see `unet_config_from_meta`)."""
    return UNet(unet_config_from_meta(meta))


def schedule(config: Any) -> diffusion.Schedule:
    """The diffusion tables of a config, a checkpoint's meta, or their ``diffusion`` section.

    Args:
      config: a mapping (dict or ConfigDict) with a ``diffusion`` section, or the
        section itself, holding beta_schedule, beta_start, beta_end and num_timesteps.

    Returns:
      ``diffusion.make_schedule`` of ``schedules.get_beta_schedule`` of those fields:
      float32 tables [T] computed in float64.
    """
    d = config["diffusion"] if "diffusion" in config else config
    betas = schedules.get_beta_schedule(
        d["beta_schedule"], beta_start=float(d["beta_start"]), beta_end=float(d["beta_end"]),
        num_timesteps=int(d["num_timesteps"]))
    return diffusion.make_schedule(betas)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 1-D mesh over devices (default: all of ``jax.devices()``) on axis ``parallel.AXIS``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (parallel.AXIS,))


def data_shardings(devices: Sequence[jax.Device] | None = None
                   ) -> tuple[NamedSharding, NamedSharding]:
    """(batch sharding, replicated sharding) on `data_mesh` of devices.

    The first splits an array's leading (batch) axis over the devices, the
    second puts a whole copy on each (params).
    """
    mesh = data_mesh(devices)
    return NamedSharding(mesh, PartitionSpec(parallel.AXIS)), NamedSharding(mesh, PartitionSpec())


def from_uint8(images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 [..., H, W, C] in 0..255 -> float32 [..., H, W, C] in [-1, 1], as x / 127.5 - 1.

    Raises:
      ValueError: images are not uint8.
    """
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}.")
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    """float [..., H, W, C] in [-1, 1] -> uint8: ``round((x + 1) * 127.5)`` clipped to [0, 255].

    Rounds to the nearest level (the inverse of `from_uint8`); values outside
    [-1, 1] are clipped.
    """
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def image_grid(images: np.ndarray, *, border: int = 0) -> np.ndarray:
    """Tiles images row by row into a near-square grid.

    Args:
      images: [N, H, W, C], N >= 1 (any dtype; the result has the same).
      border: pixels of zeros around and between the images.

    Returns:
      [rows * (H + border) + border, cols * (W + border) + border, C] with
      ``cols = ceil(sqrt(N))`` and ``rows = ceil(N / cols)``; image i sits in
      row ``i // cols``, column ``i % cols``; empty cells are zeros.
    """
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise ValueError(f"images must be [N, H, W, C] with N >= 1, got {images.shape}.")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}.")
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    b = border
    grid = np.zeros((rows * (h + b) + b, cols * (w + b) + b, c), images.dtype)
    for i, image in enumerate(images):
        top, left = b + (i // cols) * (h + b), b + (i % cols) * (w + b)
        grid[top:top + h, left:left + w] = image
    return grid
