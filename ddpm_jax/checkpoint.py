"""Checkpoints: orbax training checkpoints and the inference parameter format.

Training checkpoints live in ``WORKDIR/checkpoints/<step>/`` and hold two
orbax items: ``state`` (step, params, EMA params, optimizer state: the
replicated global arrays of the train state) and ``meta`` (JSON: the step, the
data seed and position, `meta_from_config`, the config). `TrainCheckpointer`
wraps an orbax ``CheckpointManager``: asynchronous saves, the newest
``max_to_keep`` kept, orbax's multi-host path (every process calls save and
restore; arrays are written once).

Restoring takes the newest checkpoint that orbax can read. One that fails to
restore (corrupt or partial files) is renamed to ``corrupt-<step>`` next to
the others, with a warning, and the one before it is tried: nothing readable is
ever deleted, and the next save of that step does not collide with it.
(Unfinished asynchronous saves never become step directories: orbax writes to
a temporary directory and renames it when complete.)

Inference format (used by sampling, generation and evaluation):
``save_params(directory, params, meta=...)`` writes ``directory/params``
(orbax) and ``directory/meta.json``; `load_params` reads such a directory, or
a training workdir, where it returns the EMA params of the newest good
checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any
CHECKPOINT_SUBDIR = "checkpoints"
META_FILE = "meta.json"
PARAMS_SUBDIR = "params"


def meta_from_config(config: Any, *, step: int = 0) -> dict[str, Any]:
    """The inference metadata of a training config (see the module docstring).

    Args:
      config: a full training ConfigDict (sections model, diffusion, data).
      step: the training step the params come from.

    Returns:
      ``{"model": UNetConfig fields, "diffusion": {...}, "data": {image_size,
      channels}, "step": step}``, JSON-serializable.
    """
    from ddpm_jax import builders  # Flax, only when metadata is built

    unet = builders.unet_config(config)
    diff = config.diffusion
    return {
        "model": unet.to_dict(),
        "diffusion": {
            "beta_schedule": str(diff.beta_schedule),
            "beta_start": float(diff.beta_start),
            "beta_end": float(diff.beta_end),
            "num_timesteps": int(diff.num_timesteps),
            "mean_type": str(diff.mean_type),
            "var_type": str(diff.var_type),
        },
        "data": {"image_size": int(config.data.image_size), "channels": int(config.data.channels)},
        "step": int(step),
    }


def out_channels(config: Any) -> int:
    """U-Net output channels: the data channels, doubled for learned variances.

    Kept for its callers; the definition is `ddpm_jax.builders.out_channels`.
    """
    from ddpm_jax import builders

    return builders.out_channels(config)


# --------------------------------------------------------------------------- inference format


def save_params(directory: str, params: PyTree, *, meta: dict[str, Any]) -> None:
    """Writes params (orbax) and meta.json into directory (created if needed).

    Every process calls it in a multi-process run; process 0 writes meta.json.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_SUBDIR), params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)


def load_params(path: str) -> tuple[PyTree, dict[str, Any]]:
    """Loads (params, meta) as numpy arrays.

    Args:
      path: a `save_params` directory, or a training workdir (then the EMA
        params and meta of its newest good checkpoint).

    Raises:
      FileNotFoundError: when path holds neither.
    """
    path = os.path.abspath(path)
    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        return _restore_numpy(os.path.join(path, PARAMS_SUBDIR)), meta
    ckpt_dir = os.path.join(path, CHECKPOINT_SUBDIR)
    if os.path.isdir(ckpt_dir):
        with TrainCheckpointer(ckpt_dir, read_only=True) as ckpt:
            restored = ckpt.restore_numpy()
        if restored is not None:
            state, meta = restored
            return state["ema_params"], meta["inference"]
    raise FileNotFoundError(
        f"{path!r} holds neither saved params ({META_FILE} + {PARAMS_SUBDIR}/) nor a training "
        f"workdir with checkpoints under {CHECKPOINT_SUBDIR}/."
    )


def _numpy_restore_args(metadata: PyTree) -> PyTree:
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)


def _restore_numpy(directory: str) -> PyTree:
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(directory).item_metadata.tree
        return ckptr.restore(
            directory, args=ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(metadata))
        )


# --------------------------------------------------------------------------- training checkpoints


class TrainCheckpointer:
    """Orbax CheckpointManager for the train state (see the module docstring).

    Args:
      directory: where the step directories go (created if needed).
      max_to_keep: newest checkpoints kept (older ones are deleted by orbax).
      async_save: save in a background thread (the next steps run meanwhile).
      read_only: open for restoring only.
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(
                f"training.keep_checkpoints must be >= 1, got {max_to_keep}; keeping none "
                "would make resuming impossible."
            )
        self.directory = os.path.abspath(directory)
        self._read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> bool:
        """Starts saving (asynchronously) the global-form state at step; False if it exists."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until the pending save is complete."""
        self._manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True on all processes once JAX's preemption notice has reached them (multi-host)."""
        return bool(self._manager.reached_preemption(step))

    def restore(self, target: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
        """Restores the newest readable checkpoint into target's structure and shardings.

        Args:
          target: a pytree like the saved state, of `jax.Array` s or
            ``jax.ShapeDtypeStruct`` s with shardings.

        Returns:
          (state, meta), or None if there is no readable checkpoint.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._restore_newest(
            lambda step: self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        )

    def restore_numpy(self) -> tuple[PyTree, dict[str, Any]] | None:
        """Restores the newest readable checkpoint as numpy arrays (no target needed)."""

        def load(step):
            step_dir = os.path.join(self.directory, str(step))
            with open(os.path.join(step_dir, "meta", "metadata")) as f:
                meta = json.load(f)
            return {"state": _restore_numpy(os.path.join(step_dir, "state")), "meta": meta}

        return self._restore_newest(load)

    def _restore_newest(self, load) -> tuple[PyTree, dict[str, Any]] | None:
        """Tries the steps newest first; sets aside broken ones newer than a good one."""
        steps = self.all_steps()
        broken: list[int] = []
        error: Exception | None = None
        for step in reversed(steps):
            try:
                restored = load(step)
                state, meta = restored["state"], restored["meta"]
                if state is None or meta is None:
                    raise ValueError(f"step {step} lacks the state or meta item")
            except Exception as e:  # any read failure: try the one before
                first_line = str(e).splitlines()[0] if str(e) else ""
                logging.warning("checkpoint at step %d in %s cannot be restored (%s: %s); "
                                "falling back to the one before it.", step, self.directory,
                                type(e).__name__, first_line[:500])
                broken.append(step)
                error = e
                continue
            for bad in broken:
                self._set_aside(bad)
            return state, meta
        if steps:
            # Nothing restores: more likely a config that does not match the checkpoints than
            # all of them broken, so nothing is moved.
            raise ValueError(
                f"none of the checkpoints {steps} in {self.directory} can be restored into the "
                f"train state of this config (the newest error: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:500] if str(error) else ''}). Use the config "
                "they were written with, or a new workdir."
            ) from error
        return None

    def _set_aside(self, step: int) -> None:
        """Renames a broken step directory to corrupt-<step> (process 0; never deletes)."""
        if self._read_only:
            return
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(self.directory, f"corrupt-{step}")
            n = 0
            while os.path.exists(dst):
                n += 1
                dst = os.path.join(self.directory, f"corrupt-{step}.{n}")
            if os.path.isdir(src):
                os.rename(src, dst)
                logging.warning("moved the unreadable checkpoint %s to %s.", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ddpm_jax_set_aside_{step}")
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
