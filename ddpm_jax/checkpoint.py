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
a temporary directory and renames it when complete.) Metadata that parses but
lacks the ``step`` or ``inference`` field counts as unreadable too. When no
step can be read, the error lists each step's error and nothing is moved.
Reads of a broken step that finish after its restore has failed are dropped
quietly (see `_quiet_abandoned_reads`).

Resuming: `config_changes` compares the config saved in a checkpoint's
metadata with a new one, so that a resume with a different T, model, seed,
batch size... can be refused (`ddpm_jax.train`).

Inference format (used by sampling, generation and evaluation):
``save_params(directory, params, meta=...)`` writes ``directory/params``
(orbax) and ``directory/meta.json``; `load_params` reads such a directory, or
a training workdir, where it returns the EMA params of the newest good
checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any
CHECKPOINT_SUBDIR = "checkpoints"
META_FILE = "meta.json"
PARAMS_SUBDIR = "params"
# The longest a run waits, on its way out, for a pending checkpoint save.
CLOSE_TIMEOUT_S = 600.0
# Config fields that may change when a run is resumed: how long it runs, how often it logs,
# saves and samples, and how the same step is computed (dispatch, parallelism, remat).
RESUMABLE_CONFIG_CHANGES = (
    "training.num_train_steps", "training.log_every", "training.checkpoint_every",
    "training.keep_checkpoints", "training.sample_every", "training.num_samples",
    "training.steps_per_call", "sampling.sampler", "sampling.num_steps",
    "sampling.clip_denoised", "sampling.spacing", "parallelism", "model.remat", "data.data_dir",
    "eval",  # a whole section: evaluation during training does not change the training
)
# Fields added after checkpoints were first written: absent in an older checkpoint's config,
# they are unchanged when the new config has this (their default) value.
_ADDED_FIELD_DEFAULTS = {"training.timestep_sampler": "uniform", "sampling.spacing": None}
_META_FIELDS = ("step", "inference")


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
        errors: list[str] = []
        error: Exception | None = None
        for step in reversed(steps):
            try:
                with _quiet_abandoned_reads():
                    restored = load(step)
                state, meta = restored["state"], restored["meta"]
                if state is None or meta is None:
                    raise ValueError(f"step {step} lacks the state or meta item")
                _check_meta(meta, step)
            except Exception as e:  # any read failure: try the one before
                first_line = str(e).splitlines()[0] if str(e) else ""
                logging.warning("checkpoint at step %d in %s cannot be restored (%s: %s); "
                                "falling back to the one before it.", step, self.directory,
                                type(e).__name__, first_line[:500])
                broken.append(step)
                errors.append(f"step {step}: {type(e).__name__}: {first_line[:300]}")
                error = e
                continue
            for bad in broken:
                self._set_aside(bad)
            return state, meta
        if steps:
            # Nothing restores: nothing is moved, so the files stay as they were for a look.
            raise ValueError(
                f"the checkpoints in {self.directory} are unreadable: {'; '.join(errors)}. "
                "Nothing was moved or deleted. Train in a new workdir (or move these step "
                "directories away); a checkpoint of a different model or optimizer cannot be "
                "read into this config's train state either."
            ) from error
        return None

    def saved_config(self) -> dict[str, Any] | None:
        """The training config stored with the newest step whose metadata records one."""
        for step in reversed(self.all_steps()):
            path = os.path.join(self.directory, str(step), "meta", "metadata")
            try:
                with open(path) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
                return meta["config"]
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

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> None:
        """Waits for the pending save (at most timeout seconds) and releases the manager.

        The wait runs in a daemon thread, so a save that never finishes cannot keep
        the caller waiting past the limit.

        Raises:
          TimeoutError: the save did not finish within timeout seconds.
          The pending save's own error, if it failed (the manager is released anyway).
        """
        errors: list[BaseException] = []

        def finish():
            for step in (self._manager.wait_until_finished, self._manager.close):
                try:
                    step()
                except BaseException as e:  # reported below, in the caller
                    errors.append(e)

        thread = threading.Thread(target=finish, name="ddpm_jax_checkpoint_close", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(
                f"the pending checkpoint save in {self.directory} did not finish within "
                f"{timeout:.0f} s; the steps already on disk are complete (unfinished saves "
                "stay in temporary directories, which the next run removes)."
            )
        if errors:
            raise errors[0]


class _QuietLoop(asyncio.SelectorEventLoop):
    """An asyncio loop that drops callbacks handed to it from other threads once closed.

    Orbax runs a restore's reads on a new loop and closes the loop as soon as one
    read fails; tensorstore's threads then hand the results of the reads still in
    flight to that closed loop with ``call_soon_threadsafe``. The plain loop raises
    "Event loop is closed" there, which tensorstore reports through
    ``sys.unraisablehook``: one traceback per read (hundreds for a train state).
    Nothing would run those callbacks anyway, so this loop drops them and counts them.
    Likewise, the exceptions of its tasks that nobody retrieved ("Task exception was
    never retrieved", reported when such a task is collected after the loop closed)
    become one info line each instead of an error with a traceback.
    """

    dropped = 0  # callbacks dropped by all loops of this class

    def call_exception_handler(self, context):
        if not self.is_closed():
            return super().call_exception_handler(context)
        error = context.get("exception")
        logging.info("after a failed restore: %s (%s)", context.get("message"),
                     f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                     if error is not None and str(error) else repr(error))
        return None

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if not self.is_closed():
                raise
            _QuietLoop.dropped += 1
            return None


class _QuietLoopPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _QuietLoop


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """New asyncio loops in this block are `_QuietLoop` s (orbax creates one per restore).

    The dropping belongs to the loop object, which tensorstore's pending callbacks
    hold, so reads that finish after this block (during the fallback restore or
    later) stay quiet too; no hook is installed and no output is filtered. A failed
    read is still an error: orbax raises it as before. Steps are not checked before
    the restore instead, since a metadata check cannot see truncated or missing
    chunk data, which makes the same noise; nor are the reads waited for, since
    orbax keeps no handle on them. Uses the event loop policy API, which Python 3.14
    deprecates.
    """
    previous_policy, dropped = asyncio.get_event_loop_policy(), _QuietLoop.dropped
    asyncio.set_event_loop_policy(_QuietLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous_policy)
        if _QuietLoop.dropped > dropped:
            logging.info("dropped %d results of reads that finished after their restore had "
                         "failed.", _QuietLoop.dropped - dropped)


def _check_meta(meta: Any, step: int) -> None:
    """ValueError unless meta is a dict with the fields a restore needs, for this step."""
    missing = [k for k in _META_FIELDS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"the metadata of step {step} lacks the field(s) {missing}")
    if meta["step"] != step:
        raise ValueError(f"the metadata of step {step} says step {meta['step']!r}")


# --------------------------------------------------------------------------- resuming


def config_changes(saved: dict[str, Any], config: Any) -> tuple[list[str], list[str]]:
    """The fields in which config differs from a saved one, as "field: old -> new" lines.

    Args:
      saved: ``config.to_dict()`` of the run that wrote a checkpoint (as stored in its
        metadata).
      config: the new ConfigDict.

    Returns:
      (changes that alter what training means, changes listed in
      `RESUMABLE_CONFIG_CHANGES`); each a sorted list of lines.
    """
    old = _flatten(json.loads(json.dumps(saved)))
    new = _flatten(json.loads(json.dumps(config.to_dict())))
    meaningful, harmless = [], []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field, "<absent>"), new.get(field, "<absent>")
        if a == "<absent>" and field in _ADDED_FIELD_DEFAULTS and b == _ADDED_FIELD_DEFAULTS[field]:
            continue
        if a != b:
            line = f"{field}: {a!r} -> {b!r}"
            resumable = field in RESUMABLE_CONFIG_CHANGES or \
                field.split(".")[0] in RESUMABLE_CONFIG_CHANGES
            (harmless if resumable else meaningful).append(line)
    return meaningful, harmless


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
