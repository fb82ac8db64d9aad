"""Training: the train state, the per-device train step and the training loop.

`train_step` is written for one device: it draws timesteps t ~ U{0..T-1} (or, with
``training.timestep_sampler="loss_aware"``, importance-sampled from a loss history kept in
the train state: `ddpm_jax.timestep_sampling`) and
noise from a key derived from the run's key with ``fold_in(step)`` and
``fold_in(device)`` (the device's global index on the "data" axis, so every
device and every process draws different noise), computes the configured loss
(`diffusion.training_losses`) and its gradient, averages the gradient with
``lax.pmean`` over "data", clips it to a global norm, applies Adam with a
linear warm-up, and updates the EMA of the params after every step.
`make_train_fn` runs ``training.steps_per_call`` such steps per dispatch (the
step with no loop around it, or a ``lax.scan``; see `multi_step`) and compiles
the result with `parallel.DataParallel` (``jax.jit(jax.shard_map(...))`` or ``jax.pmap``),
donating the state.

Clipping: by default the averaged gradient is clipped (independent of the
device count). ``optim.clip_per_replica=True`` clips each device's gradient
before averaging, as the reference TPU code did.

`train_and_evaluate` is the loop behind ``run_train.py``: it validates the
config before compiling anything, locks the workdir (one trainer at a time,
`ddpm_jax.workdir`), refuses to resume checkpoints written with a config that
differs in what training means (`checkpoint.config_changes`; the override is
``allow_config_change``), resumes from the newest good checkpoint in
``WORKDIR/checkpoints`` (the data stream resumes at the same batch), logs
loss, gradient norm, learning rate, steps/s and images/s to stdout and
TensorBoard (``WORKDIR/tensorboard``), with an ``eval`` section FID and Inception Score
every ``eval.every`` steps (`ddpm_jax.metrics.in_training`), saves checkpoints every
``training.checkpoint_every`` steps, at the end and on SIGTERM, writes sample
grids drawn with the EMA params to ``WORKDIR/samples``, and stops with
`NonFiniteLossError` on a NaN or infinite loss (before saving anything from
that call). Only process 0 writes logs and images. SIGTERM before the last
step (or before the final samples are drawn) writes a checkpoint and exits
143 with a message; SIGTERM during the final sampling lets it finish and
returns normally, as training is complete.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ddpm_jax import (
    builders,
    checkpoint,
    config_lib,
    conv,
    diffusion,
    input_pipeline,
    parallel,
    sampling,
    timestep_sampling,
)
from ddpm_jax import summary as summary_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.metrics import in_training
from ddpm_jax.unet import UNet

PyTree = Any

class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the newest checkpoint is the last good state."""


class ConfigError(ValueError):
    """A config `train_and_evaluate` refuses before any work: a bad value, a batch that
    does not divide across the devices, or a change from the config the workdir's
    checkpoints were written with. Its message says what to change."""


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. Replicated over the devices.

    Attributes:
      step: int32 [] number of steps taken.
      params: the U-Net params.
      ema_params: exponential moving average of params (used for sampling).
      opt_state: the Adam state.
      loss_history: the loss-aware timestep sampler's history
        (``training.timestep_sampler="loss_aware"``), else None; a None field adds nothing
        to the pytree, so a uniform-sampler state (and checkpoint) is what it was before
        the field existed.
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: optax.OptState
    loss_history: timestep_sampling.LossHistory | None = None


# --------------------------------------------------------------------------- config


def validate_config(config: Any) -> config_lib.ExperimentConfig:
    """Checks a training config before anything compiles; returns its typed sections.

    ``config_lib.ExperimentConfig.from_config``: unknown or missing sections and
    fields, and bad values, raise ValueError naming the field. With evaluation
    during training on, also the Inception weights, the reference statistics and
    the sampler options (`in_training.validate_eval_config`).
    """
    typed = config_lib.ExperimentConfig.from_config(config)
    if typed.eval is not None and typed.eval.every:
        in_training.validate_eval_config(config, local_devices=jax.local_device_count())
    return typed


def loss_aware(config: Any) -> bool:
    """Whether the config draws timesteps with the loss-aware sampler."""
    return config_lib.TrainingConfig.from_config(config.training).timestep_sampler == "loss_aware"


def check_resume_sampler(config: Any, workdir: str) -> None:
    """Raises ValueError if the newest checkpoint in workdir was trained with the other
    timestep sampler: the loss-aware state has a loss history that a uniform one lacks, so
    neither restores into the other. Reads the checkpoint's saved config (JSON) only."""
    ckpt_dir = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_SUBDIR)
    steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(
        ckpt_dir) else []
    if not steps:
        return
    try:
        with open(os.path.join(ckpt_dir, str(steps[-1]), "meta", "metadata")) as f:
            saved = json.load(f)["config"]["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable: the restore reports it
    was = saved.get("timestep_sampler", "uniform")
    now = config_lib.TrainingConfig.from_config(config.training).timestep_sampler
    if was != now:
        raise ValueError(
            f"the checkpoints in {ckpt_dir} (newest: step {steps[-1]}) were trained with "
            f"training.timestep_sampler={was!r}, this config asks for {now!r}; the two train "
            f"states differ (the loss-aware one keeps a loss history). Resume with "
            f"--config.training.timestep_sampler={was}, or use a new workdir.")


def learning_rate_fn(config: Any) -> optax.Schedule:
    """lr * min(1, step / warmup_steps): linear warm-up from 0, then constant."""
    o = config_lib.OptimConfig.from_config(config.optim)
    if not o.warmup_steps:
        return optax.constant_schedule(o.lr)
    return optax.linear_schedule(0.0, o.lr, o.warmup_steps)


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """Global-norm clipping of the averaged gradient, then Adam with the warm-up schedule.

    The clipping is ``optax.clip_by_global_norm`` in the chain, unless it is off
    (``optim.grad_clip`` 0) or per replica (``optim.clip_per_replica``: then the
    step clips each device's gradient before the pmean). Either way the chain has
    the same two stages (``optax.identity`` in place of the clipping), so the
    optimizer state, and with it a checkpoint, does not depend on these options.
    """
    o = config_lib.OptimConfig.from_config(config.optim)
    clip = o.grad_clip and not o.clip_per_replica
    return optax.chain(
        optax.clip_by_global_norm(float(o.grad_clip)) if clip else optax.identity(),
        optax.adam(learning_rate_fn(config), b1=o.beta1, b2=o.beta2, eps=o.eps))


def init_train_state(config: Any, key: jax.Array) -> TrainState:
    """The initial state (params drawn with key, EMA = params, fresh Adam) as a pure function.

    jit-able and ``jax.eval_shape``-able: ``jax.eval_shape(functools.partial(
    init_train_state, config), key)`` gives the state's shapes without computing it.
    """
    model = UNet(builders.unet_config(config))
    size, channels = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = model.init(key, x, t)["params"]
    history = (timestep_sampling.init_history(config.diffusion.num_timesteps)
               if loss_aware(config) else None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=make_optimizer(config).init(params), loss_history=history)


def create_train_state(config: Any, key: jax.Array) -> TrainState:
    """`init_train_state` computed on the host CPU, as numpy arrays."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        state = jax.jit(functools.partial(init_train_state, config))(key)
    return jax.tree.map(np.asarray, state)


# --------------------------------------------------------------------------- the step


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               model: UNet, config: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimization step on one device (call inside shard_map / pmap over "data").

    Timesteps are uniform, or (``training.timestep_sampler="loss_aware"``) drawn from
    ``state.loss_history`` with the per-example losses weighted by 1 / (T p_t)
    (`ddpm_jax.timestep_sampling`); the history is then updated with the unweighted losses
    of the whole global batch, gathered over "data" in device order, so every device keeps
    the same history.

    Args:
      state: the replicated train state.
      batch: this device's examples: "image" uint8 [b, H, W, C], "label" int32 [b].
      key: the run's training key (the same on every device).
      model: the U-Net.
      config: the training config.

    Returns:
      (new state, metrics): metrics "loss" (the weighted loss for the loss-aware sampler),
      "grad_norm", "lr", averaged over devices.
    """
    d = config.diffusion
    sched = builders.schedule(config)
    device = jax.lax.axis_index(parallel.AXIS)
    key = jax.random.fold_in(jax.random.fold_in(key, state.step), device)
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    x = builders.from_uint8(batch["image"])
    b = x.shape[0]
    t, weights = _draw_timesteps(state, config, t_key, b, sched.num_timesteps)
    noise = jax.random.normal(noise_key, x.shape, jnp.float32)
    y = batch["label"] if model.config.num_classes is not None else None

    def loss_fn(params):
        def model_fn(x_t, t_):
            return model.apply({"params": params}, x_t, t_, y, train=True,
                               rngs={"dropout": dropout_key})

        losses = diffusion.training_losses(sched, model_fn, x, t, noise, mean_type=d.mean_type,
                                           var_type=d.var_type, loss_type=d.loss_type)
        return jnp.mean(losses if weights is None else losses * weights), losses

    # Differentiate with respect to a per-device ("varying") copy of the params: the gradient
    # of the invariant params themselves would already be summed over devices by shard_map.
    local_params = jax.lax.pcast(state.params, parallel.AXIS, to="varying")
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
    grads, grad_norm = _average_and_clip(grads, config.optim)
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # ema <- decay * ema + (1 - decay) * params
    ema = optax.incremental_update(params, state.ema_params, 1.0 - config.training.ema_decay)
    history = state.loss_history
    if weights is not None:
        history = timestep_sampling.update_history(
            history, _gather(t), _gather(jax.lax.stop_gradient(losses)))
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema,
                           opt_state=opt_state, loss_history=history)
    metrics = {"loss": jax.lax.pmean(loss, parallel.AXIS), "grad_norm": grad_norm,
               "lr": learning_rate_fn(config)(state.step)}
    return new_state, metrics


def _draw_timesteps(state: TrainState, config: Any, key: jax.Array, b: int, num_timesteps: int
                    ) -> tuple[jax.Array, jax.Array | None]:
    """(t int32 [b], importance weights float32 [b] or None for the uniform sampler)."""
    if not loss_aware(config):
        return jax.random.randint(key, (b,), 0, num_timesteps, dtype=jnp.int32), None
    if state.loss_history is None:
        raise ValueError("training.timestep_sampler='loss_aware' needs a train state with a "
                         "loss history; make the state with init_train_state(config, key).")
    return timestep_sampling.sample_timesteps(state.loss_history, key, b)


def _average_and_clip(grads: PyTree, o: Any) -> tuple[PyTree, jax.Array]:
    """The gradient averaged over devices (clipped per replica first if so configured) and
    its global norm; without per-replica clipping the optimizer chain clips the average."""
    if o.grad_clip and o.clip_per_replica:
        grad_norm = jax.lax.pmean(optax.tree.norm(grads), parallel.AXIS)
        clip = optax.clip_by_global_norm(float(o.grad_clip))
        return jax.lax.pmean(clip.update(grads, clip.init(grads))[0], parallel.AXIS), grad_norm
    grads = jax.lax.pmean(grads, parallel.AXIS)
    return grads, optax.tree.norm(grads)


def _gather(x: jax.Array) -> jax.Array:
    """[b] per device -> [n_devices * b], device 0's rows first, the same on every device.

    A psum of one-hot rows rather than ``lax.all_gather``: its result is invariant over
    "data" (as the replicated state must be), under shard_map and pmap alike, and exact
    (every sum adds zeros to one value).
    """
    n = jax.lax.axis_size(parallel.AXIS)
    rows = jnp.zeros((n, *x.shape), x.dtype).at[jax.lax.axis_index(parallel.AXIS)].set(x)
    return jax.lax.psum(rows, parallel.AXIS).reshape(n * x.shape[0], *x.shape[1:])


def multi_step(state: TrainState, batches: dict[str, jax.Array], key_data: jax.Array, *,
               model: UNet, config: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    """k train steps in one call; batches leaves are [k, b, ...]; metrics come out [k].

    k = 1 is the step itself, with no loop around it. k > 1 is a rolled
    ``lax.scan`` over the steps, one dispatch and one compiled step body
    whatever k is. On XLA:CPU the step's convolutions stay on the fast path
    inside the loop only because `ddpm_jax.conv` writes their gradients in
    canonical form (its docstring says why).
    """
    key = jax.random.wrap_key_data(key_data)
    step = functools.partial(train_step, key=key, model=model, config=config)
    if jax.tree.leaves(batches)[0].shape[0] == 1:
        state, metrics = step(state, jax.tree.map(lambda x: x[0], batches))
        return state, jax.tree.map(lambda m: jnp.asarray(m)[None], metrics)
    return jax.lax.scan(step, state, batches)


def make_train_fn(config: Any, dp: parallel.DataParallel) -> Callable:
    """The compiled ``(state, batches, key_data) -> (state, metrics)`` for all devices."""
    model = UNet(builders.unet_config(config))
    return dp.compile_step(functools.partial(multi_step, model=model, config=config))


# --------------------------------------------------------------------------- sampling


def make_sample_fn(config: Any) -> Callable[[PyTree, jax.Array, int], jax.Array]:
    """Jitted ``(params, key, n) -> uint8 [n, H, W, C]`` samples (use the EMA params)."""
    model = UNet(builders.unet_config(config))
    sched = builders.schedule(config)
    d, s = config.diffusion, config_lib.SamplingConfig.from_config(config.sampling)
    shape_hw = (config.data.image_size, config.data.image_size, config.data.channels)

    @functools.partial(jax.jit, static_argnums=2, compiler_options=conv.compiler_options())
    def sample(params, key, n):
        def model_fn(x, t):
            return model.apply({"params": params}, x, t)

        x = sampling.sample(sched, model_fn, key, (n, *shape_hw), mean_type=d.mean_type,
                            var_type=d.var_type, clip_denoised=s.clip_denoised,
                            sampler=s.sampler, num_steps=s.num_steps, spacing=s.spacing)
        return builders.to_uint8(x)

    return sample


def write_samples(workdir: str, step: int, images: np.ndarray) -> str:
    """Writes samples/step_<step>.png (a grid) and .npz (uint8 NHWC); returns the png path."""
    from PIL import Image

    out = os.path.join(workdir, "samples")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"step_{step:08d}")
    np.savez_compressed(base + ".npz", images=images)
    grid = builders.image_grid(images, border=1)
    scale = max(1, 256 // max(grid.shape[:2]))
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(base + ".png")
    return base + ".png"


# --------------------------------------------------------------------------- the loop


class _Preemption:
    """Sets a flag on SIGTERM (single process) so the loop can checkpoint and stop."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def _batches(it: Iterator[dict[str, np.ndarray]], k: int) -> dict[str, np.ndarray]:
    items = [next(it) for _ in range(k)]
    return {"image": np.stack([b["image"] for b in items]),
            "label": np.stack([b["label"] for b in items]).astype(np.int32)}


def train_and_evaluate(config: Any, workdir: str, *,
                       allow_config_change: bool = False) -> TrainState:
    """Trains (or resumes training) per config in workdir; see the module docstring.

    The workdir is locked for the whole run (`ddpm_jax.workdir.WorkdirLock`),
    and every way out waits for the pending checkpoint save, at most
    ``checkpoint.CLOSE_TIMEOUT_S`` seconds.

    Args:
      config: the training config.
      workdir: checkpoints, logs and samples go here.
      allow_config_change: resume even when the config differs from the one the
        checkpoints were written with in fields that change what training means
        (T, schedule, model, seed, batch size, optimizer, data...).

    Returns:
      The final train state in global form.

    Raises:
      ConfigError (a ValueError): a bad config (before anything compiles), or
        one that differs from the checkpoints' (unless allow_config_change).
      WorkdirBusyError: another process trains in workdir.
      NonFiniteLossError: the loss became NaN or infinite.
      SystemExit: 143 after SIGTERM, once the checkpoint is written.
    """
    try:
        validate_config(config)
        check_resume_sampler(config, workdir)
        dp = parallel.DataParallel(config.parallelism)
        dp.local_batch_size(config.training.batch_size)  # ValueError unless it divides
    except ValueError as e:
        raise ConfigError(str(e)) from e
    # Loads the Inception weights and reference statistics now, not at the first evaluation.
    evaluator = in_training.InTrainingEval(config) if in_training.enabled(config) else None
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.WorkdirLock(workdir):
        ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR),
                                            max_to_keep=config.training.keep_checkpoints)
        try:
            _check_resume_config(ckpt, config, allow_config_change)
            final = _train(config, workdir, ckpt, dp, evaluator)
        except BaseException:
            try:
                ckpt.close()
            except Exception as e:  # do not hide the error that got us here
                logging.error("closing the checkpoints after an error failed too: %s: %s",
                              type(e).__name__, e)
            raise
        ckpt.close()
    return final


def _check_resume_config(ckpt: checkpoint.TrainCheckpointer, config: Any,
                         allow_change: bool) -> None:
    """ValueError if config changes what the checkpoints' training meant (unless allowed)."""
    saved = ckpt.saved_config()
    if saved is None:
        return
    meaningful, harmless = checkpoint.config_changes(saved, config)
    if harmless:
        logging.info("resuming with changed settings: %s", "; ".join(harmless))
    if meaningful and not allow_change:
        raise ConfigError(
            f"the config differs from the one the checkpoints in {ckpt.directory} were written "
            "with, in field(s) that change what training means:\n  " + "\n  ".join(meaningful)
            + "\nResume with the config they were written with, train in a new workdir, or "
            "pass --allow_config_change to run_train.py (allow_config_change=True) to continue "
            "from them with the new values.")
    if meaningful:
        logging.warning("resuming with a changed config (allowed): %s", "; ".join(meaningful))


def _train(config: Any, workdir: str, ckpt: checkpoint.TrainCheckpointer,
           dp: parallel.DataParallel, evaluator: in_training.InTrainingEval | None = None
           ) -> TrainState:
    """The body of `train_and_evaluate`, in a locked workdir (the caller closes ckpt).

    Longer than 60 lines: it is the training loop, read top to bottom; the
    non-finite check and the end of training are `_check_finite` and `_finish`.
    """
    t_cfg = config.training
    lead = jax.process_index() == 0
    root = jax.random.key(config.seed)
    init_key, train_key, sample_key = (jax.random.fold_in(root, i) for i in range(3))
    data_seed = int(jax.random.randint(jax.random.fold_in(root, 3), (), 0, 2**31 - 1))
    state = dp.replicate(create_train_state(config, init_key))
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored[0]
        logging.info("resumed from the checkpoint at step %d", restored[1]["step"])
    step = int(dp.first(state.step))
    data_iter = input_pipeline.create_input_iter(
        config.data, batch_size=dp.local_batch_size(t_cfg.batch_size), train=True,
        seed=data_seed, start_step=step)

    def meta(at_step):
        return {"step": at_step, "data": {"seed": data_seed, "position": at_step},
                "inference": checkpoint.meta_from_config(config, step=at_step),
                "config": config.to_dict()}

    train_fn = make_train_fn(config, dp)
    sample = functools.partial(_sample, make_sample_fn(config), dp, key=sample_key,
                               n=t_cfg.num_samples, workdir=workdir, lead=lead)
    key_data = dp.replicate(jax.random.key_data(train_key))
    state = dp.to_device(state)
    writer = summary_lib.SummaryWriter(os.path.join(workdir, "tensorboard")) if lead else None
    bar = _progress_bar(step, t_cfg.num_train_steps) if lead else None
    preempt = _Preemption()
    sampled_at = preempted_at = None
    try:
        k = min(t_cfg.steps_per_call, t_cfg.num_train_steps - step)
        batches = _batches(data_iter, k) if k > 0 else None
        tick, tick_step = time.perf_counter(), step
        while step < t_cfg.num_train_steps:
            state, metrics = train_fn(state, dp.shard_batch(batches), key_data)
            before, step = step, step + k
            k = min(t_cfg.steps_per_call, t_cfg.num_train_steps - step)
            batches = _batches(data_iter, k) if k > 0 else None  # overlaps the device work
            metrics = dp.first(metrics)
            _check_finite(metrics["loss"], before, ckpt)
            if bar is not None:
                bar.update(step - before)
            if _crossed(before, step, t_cfg.log_every) or step == t_cfg.num_train_steps:
                now = time.perf_counter()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                scalars = {"loss": float(np.mean(metrics["loss"])),
                           "grad_norm": float(metrics["grad_norm"][-1]),
                           "lr": float(metrics["lr"][-1]), "steps_per_sec": rate,
                           "images_per_sec": rate * t_cfg.batch_size}
                tick, tick_step = now, step
                if lead:
                    _log(scalars, step, writer, bar)
            stop = preempt.requested or (jax.process_count() > 1
                                         and ckpt.reached_preemption(step))
            if _crossed(before, step, t_cfg.checkpoint_every) or stop:
                ckpt.save(step, dp.to_global(state), meta(step))
            if stop:
                logging.warning("preemption (SIGTERM) at step %d: checkpoint written; exiting.",
                                step)
                preempted_at = step
                break
            if t_cfg.num_samples and _crossed(before, step, t_cfg.sample_every):
                sample(state, step=step, writer=writer)
                sampled_at = step
            if evaluator is not None and evaluator.due(before, step):
                scalars = evaluator(dp.first(state.ema_params))
                if lead:
                    _log(scalars, step, writer, bar)
        final = dp.to_global(state)
        if preempted_at is None:  # training is complete
            ckpt.save(step, final, meta(step))
            need_samples = bool(t_cfg.num_samples) and sampled_at != step
            preempted_at = _finish(step, need_samples, preempt, ckpt,
                                   lambda: sample(state, step=step, writer=writer))
    finally:
        preempt.restore()
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    if preempted_at is not None:
        raise SystemExit(143)  # 128 + SIGTERM; the caller waits for the checkpoint
    return final


def _check_finite(losses: np.ndarray, before: int, ckpt: checkpoint.TrainCheckpointer) -> None:
    """NonFiniteLossError naming the first bad step and the last good checkpoint, if any."""
    if np.all(np.isfinite(losses)):
        return
    bad = before + int(np.argmin(np.isfinite(losses))) + 1
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f"The last good checkpoint is step {last} in {ckpt.directory}"
             if last is not None else
             f"No checkpoint was written yet (none in {ckpt.directory})")
    raise NonFiniteLossError(
        f"the loss became {losses[bad - before - 1]} at step {bad}; stopped "
        f"without saving. {where}. Lower optim.lr, raise optim.warmup_steps or "
        "enable optim.grad_clip, then resume (run_train.py needs "
        "--allow_config_change to resume with a changed optimizer)."
    )


def _finish(step: int, need_samples: bool, preempt: _Preemption,
            ckpt: checkpoint.TrainCheckpointer, sample: Callable[[], None]) -> int | None:
    """After the final checkpoint: draws the final samples unless SIGTERM came first.

    Returns the step to report as preempted (SIGTERM before the final samples,
    which a rerun then draws), or None when training ended normally.
    """
    # The same decision on every process (sampling is a collective).
    sigterm = (preempt.requested if jax.process_count() == 1
               else ckpt.reached_preemption(step))
    if need_samples and sigterm:
        logging.warning("preemption (SIGTERM) after the last step %d: checkpoint written; "
                        "the final samples are not drawn (run the same command again to "
                        "draw them); exiting.", step)
        return step
    if need_samples:
        sample()
    if preempt.requested:
        logging.warning("SIGTERM after the last step %d: training is complete, the "
                        "final checkpoint and samples are written; exiting normally.", step)
    return None


def _sample(sample_fn, dp, state, *, key, step, n, workdir, lead, writer=None) -> None:
    params = dp.first(state.ema_params)
    images = np.asarray(sample_fn(params, jax.random.fold_in(key, step), n))
    if lead:
        path = write_samples(workdir, step, images)
        if writer is not None:
            writer.images(step, {"samples": images})
        logging.info("samples at step %d: %s", step, path)


def _progress_bar(step: int, total: int):
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)


def _log(scalars: dict[str, float], step: int, writer, bar) -> None:
    line = f"step {step}: " + ", ".join(
        f"{k} {v:.4g}" if k != "lr" else f"{k} {v:.3e}" for k, v in scalars.items())
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
    writer.scalars(step, scalars)
