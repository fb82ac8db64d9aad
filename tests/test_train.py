"""Tests for ddpm_jax.train on 8 fake CPU devices, with a minimal U-Net config."""

import functools
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import builders, checkpoint, diffusion, parallel, schedules, summary, train
from ddpm_jax.config_lib import load_config
from ddpm_jax.unet import UNet

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def tiny_config(**training):
    c = load_config(CONFIG_DIR / "test.py")
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    c.model.dropout = 0.0
    c.training.num_samples = 0
    for k, v in training.items():
        c.training[k] = v
    return c


def _batches(n_calls, k, batch, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (k, batch, 8, 8, 1), dtype=np.uint8),
             "label": np.zeros((k, batch), np.int32)} for _ in range(n_calls)]


def _run(config, mode, batches, traced=None):
    dp = parallel.DataParallel(mode)
    state = dp.to_device(dp.replicate(train.create_train_state(config, jax.random.key(0))))
    fn = functools.partial(train.multi_step, model=UNet(builders.unet_config(config)),
                           config=config)
    def per_device(state, batches, key_data):
        return fn(state, batches, key_data)

    step = dp.compile_step(traced(per_device) if traced else per_device)
    key_data = dp.replicate(jax.random.key_data(jax.random.key(1)))
    for b in batches:
        state, metrics = step(state, dp.shard_batch(b), key_data)
    return dp.first(state), dp.first(metrics)


def test_shard_map_and_pmap_agree_and_compile_once():
    config = tiny_config(steps_per_call=2)
    # Params whose gradient is pure rounding noise (biases before a GroupNorm) get Adam steps
    # of size lr from noise that depends on the reduction order; a larger eps damps them.
    config.optim.eps = 1e-3
    batches = _batches(3, 2, 16)
    a, ma = _run(config, "shard_map", batches, traced=chex.assert_max_traces(n=1))
    chex.clear_trace_counter()
    b, mb = _run(config, "pmap", batches, traced=chex.assert_max_traces(n=1))
    assert int(a.step) == int(b.step) == 6
    assert ma["loss"].shape == (2,)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(a.ema_params, b.ema_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    init = train.create_train_state(config, jax.random.key(0))
    moved = jax.tree.leaves(jax.tree.map(lambda p, q: np.abs(p - q).max(), a.params, init.params))
    assert max(moved) > 0


def test_steps_per_call_is_the_same_training():
    """k = 3 steps in one call (a rolled scan) = three calls of one step (no loop)."""
    batches = _batches(1, 3, 16, seed=5)
    one_call, m3 = _run(tiny_config(steps_per_call=3), "shard_map", batches)
    split = [{k: v[i:i + 1] for k, v in batches[0].items()} for i in range(3)]
    three_calls, m1 = _run(tiny_config(steps_per_call=1), "shard_map", split)
    assert int(one_call.step) == int(three_calls.step) == 3
    chex.assert_trees_all_close(one_call.params, three_calls.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one_call.ema_params, three_calls.ema_params, rtol=1e-5,
                                atol=1e-6)
    assert m3["loss"].shape == (3,) and m1["loss"].shape == (1,)


def _reference_update(config, batch, clip_per_replica):
    """One step by hand: per-device losses/grads on a single device, then clip, Adam, EMA."""
    model = UNet(builders.unet_config(config))
    init = train.create_train_state(config, jax.random.key(0))
    sched = diffusion.make_schedule(schedules.get_beta_schedule(
        "linear", num_timesteps=config.diffusion.num_timesteps))
    key = jax.random.fold_in(jax.random.key(1), 0)  # run key, step 0
    x_all = batch.astype(np.float32) / 127.5 - 1.0
    per_dev = x_all.shape[0] // 8
    grads = []
    for i in range(8):
        t_key, n_key, _ = jax.random.split(jax.random.fold_in(key, i), 3)
        x = jnp.asarray(x_all[i * per_dev:(i + 1) * per_dev])
        t = jax.random.randint(t_key, (per_dev,), 0, sched.num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(n_key, x.shape)

        def loss(p, x=x, t=t, noise=noise):
            eps = model.apply({"params": p}, diffusion.q_sample(sched, x, t, noise), t)
            return jnp.mean((noise - eps) ** 2)

        grads.append(jax.tree.map(np.float64, jax.grad(loss)(init.params)))

    def norm(g):
        return np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))

    c = config.optim.grad_clip
    if clip_per_replica:
        grads = [jax.tree.map(lambda x, g=g: x * min(1.0, c / norm(g)), g) for g in grads]
    g = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *grads)
    if not clip_per_replica:
        g = jax.tree.map(lambda x: x * min(1.0, c / norm(g)), g)
    lr, eps, d = config.optim.lr, config.optim.eps, config.training.ema_decay
    # First Adam step: bias-corrected m = g, v = g^2.
    params = jax.tree.map(lambda p, x: p - lr * x / (np.abs(x) + eps), init.params, g)
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, init.params, params)
    return params, ema


@pytest.mark.parametrize("clip_per_replica", [False, True])
def test_one_step_matches_hand_computation(clip_per_replica):
    config = tiny_config(steps_per_call=1, ema_decay=0.5)
    config.optim.warmup_steps = 0
    config.optim.lr = 1e-2
    config.optim.eps = 1e-3  # keeps g / (|g| + eps) well conditioned for the comparison
    config.optim.grad_clip = 0.05  # active: the gradient norms are larger
    config.optim.clip_per_replica = clip_per_replica
    batch = _batches(1, 1, 16, seed=3)[0]
    state, metrics = _run(config, "shard_map", [batch])
    params, ema = _reference_update(config, batch["image"][0], clip_per_replica)
    assert float(metrics["grad_norm"][0]) > config.optim.grad_clip
    chex.assert_trees_all_close(state.params, params, rtol=1e-4, atol=2e-6)
    chex.assert_trees_all_close(state.ema_params, ema, rtol=1e-4, atol=2e-6)


def test_learning_rate_warmup():
    config = tiny_config()
    config.optim.lr, config.optim.warmup_steps = 2e-4, 5000
    lr = train.learning_rate_fn(config)
    np.testing.assert_allclose([lr(0), lr(2500), lr(5000), lr(10**6)], [0, 1e-4, 2e-4, 2e-4],
                               rtol=1e-6)


def test_train_and_evaluate_end_to_end(tmp_path):
    config = tiny_config(num_train_steps=6, steps_per_call=2, checkpoint_every=4,
                         num_samples=4, sample_every=100)
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(config, workdir)
    assert int(np.asarray(final.step)) == 6
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
    samples = np.load(os.path.join(workdir, "samples", "step_00000006.npz"))["images"]
    assert samples.dtype == np.uint8 and samples.shape == (4, 8, 8, 1)
    assert os.path.isfile(os.path.join(workdir, "samples", "step_00000006.png"))
    params, meta = checkpoint.load_params(workdir)
    chex.assert_trees_all_close(params, jax.tree.map(np.asarray, final.ema_params))
    assert meta["step"] == 6 and meta["data"] == {"image_size": 8, "channels": 1}
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(num_train_steps=2, steps_per_call=2), workdir)
    config = tiny_config(num_train_steps=8, steps_per_call=2, checkpoint_every=2)
    config.optim.lr = 1e30  # params blow up after one step
    config.optim.grad_clip = 0.0
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint is step"):
        train.train_and_evaluate(config, workdir, allow_config_change=True)  # a new lr
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    assert steps and steps[-1] <= 4
    with checkpoint.TrainCheckpointer(ckpt_dir, read_only=True) as ckpt:
        state, _ = ckpt.restore_numpy()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_bad_inputs_fail_before_compiling(tmp_path, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(train, "make_train_fn", no_compile)
    monkeypatch.setattr(train, "create_train_state", no_compile)
    c = tiny_config(batch_size=12)
    with pytest.raises(ValueError, match="batch_size=8"):
        train.train_and_evaluate(c, str(tmp_path))
    c = tiny_config()
    c.data.name = "imagenet"
    with pytest.raises(ValueError, match="data.name"):
        train.train_and_evaluate(c, str(tmp_path))
    c = tiny_config()
    c.model.ch_mult = (1, 2, 2, 2)  # 8 -> 4 -> 2 -> 1: fine; 4 levels need a multiple of 8
    c.data.image_size = 12
    with pytest.raises(ValueError, match="image size 12"):
        train.train_and_evaluate(c, str(tmp_path))
    # Non-finite optimizer settings and T = 1 used to start training (a NaN grad_clip
    # silently disabled clipping); they fail in validation now.
    for field, value in (("lr", float("nan")), ("lr", float("inf")),
                         ("grad_clip", float("nan"))):
        c = tiny_config()
        c.optim[field] = value
        message = fr"optim\.{field} must be a finite number, got {value}"
        with pytest.raises(ValueError, match=message):
            train.train_and_evaluate(c, str(tmp_path))
    c = tiny_config()
    c.diffusion.num_timesteps = 1
    with pytest.raises(ValueError, match="num_timesteps must be >= 2"):
        train.train_and_evaluate(c, str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing written


def test_summary_writer_records(tmp_path):
    import io

    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    logdir = tmp_path / "run" / "tensorboard"  # where train_and_evaluate puts it
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 1), dtype=np.uint8)
    w = summary.SummaryWriter(str(logdir))
    w.scalars(3, {"loss": 0.5, "grad_norm": np.float32(2.25)})
    w.scalars(5, {"loss": 0.25})
    w.images(7, {"samples": images})
    with pytest.raises(ValueError, match=r"images\['bad'\] must be uint8"):
        w.images(7, {"bad": images.astype(np.float32)})
    w.close()
    assert os.listdir(logdir) == [os.path.basename(w.path)]
    assert w.path.startswith(str(logdir / "events.out.tfevents."))

    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 0.5), (5, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm")] == [(3, 2.25)]
    assert acc.SummaryMetadata("samples").plugin_data.plugin_name == "images"
    (event,) = acc.Tensors("samples")
    width, height, *pngs = tensor_util.make_ndarray(event.tensor_proto)
    assert event.step == 7 and (int(width), int(height)) == (6, 8)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pngs])[..., None]
    assert decoded.shape == (3, 8, 6, 1)
    np.testing.assert_array_equal(decoded, images)
