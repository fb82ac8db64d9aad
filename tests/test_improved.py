"""Improved-DDPM training: the config, the loss-aware timestep sampler, its unbiasedness,
its state in the train state and checkpoints, and the untouched uniform step."""

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import tiny_config  # the tiny train config the train tests share

from ddpm_jax import (
    builders,
    checkpoint,
    diffusion,
    parallel,
    schedules,
    timestep_sampling,
    train,
)
from ddpm_jax.config_lib import load_config
from ddpm_jax.unet import UNet

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
H = timestep_sampling.HISTORY


# --------------------------------------------------------------------------- the config


def test_cifar10_improved_config():
    c = load_config(CONFIG_DIR / "cifar10_improved.py")
    train.validate_config(c)
    d = c.diffusion
    assert (d.beta_schedule, d.num_timesteps, d.mean_type, d.var_type, d.loss_type) == (
        "cosine", 4000, "eps", "learned_range", "hybrid")
    assert diffusion.HYBRID_VB_WEIGHT == 0.001
    m = c.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.dropout) == (
        128, (1, 2, 2, 2), 3, (16, 8), 0.3)
    o, t = c.optim, c.training
    assert (o.lr, o.warmup_steps, o.grad_clip) == (1e-4, 0, 0.0)
    assert (t.batch_size, t.num_train_steps, t.ema_decay, t.timestep_sampler) == (
        128, 500_000, 0.9999, "uniform")
    assert builders.out_channels(c) == 6
    text = (CONFIG_DIR / "cifar10_improved.py").read_text()
    assert "run_train.py" in text and "Expected result" in text and "ime" in text


def test_timestep_sampler_is_validated():
    c = load_config(CONFIG_DIR / "test.py")
    c.training.timestep_sampler = "importance"
    with pytest.raises(ValueError, match="timestep_sampler"):
        train.validate_config(c)
    del c.training["timestep_sampler"]  # configs written before the field: uniform
    train.validate_config(c)
    assert not train.loss_aware(c)


# --------------------------------------------------------------------------- the sampler


def _one_at_a_time(num_timesteps, ts, losses):
    """The reference's bookkeeping: append, shifting out the oldest once 10 are held."""
    hist = [[] for _ in range(num_timesteps)]
    for t, loss in zip(ts, losses, strict=True):
        hist[t] = (hist[t] + [float(loss)])[-H:]
    return hist


def test_update_history_matches_one_at_a_time():
    rng = np.random.default_rng(0)
    num_timesteps = 5
    h = timestep_sampling.init_history(num_timesteps)
    ts_all, losses_all = [], []
    # Batches with many repeats of one timestep (more than HISTORY in one batch) and some
    # timesteps absent, so that slots wrap inside a batch.
    for size, probs in [(7, [0.5, 0.5, 0, 0, 0]), (31, [0.6, 0.1, 0.1, 0.1, 0.1]),
                        (3, [0, 0, 0, 0, 1.0]), (40, [0.2] * 5), (25, [0, 0, 1.0, 0, 0])]:
        ts = rng.choice(num_timesteps, size=size, p=probs).astype(np.int32)
        losses = rng.uniform(0.1, 5.0, size).astype(np.float32)
        h = jax.jit(timestep_sampling.update_history)(h, jnp.asarray(ts), jnp.asarray(losses))
        ts_all += list(ts)
        losses_all += list(losses)
        want = _one_at_a_time(num_timesteps, ts_all, losses_all)
        for t in range(num_timesteps):
            n = len(want[t])
            got = np.asarray(h.losses[t])
            seen = sum(1 for s in ts_all if s == t)
            assert int(h.counts[t]) % H == seen % H and (int(h.counts[t]) >= H) == (seen >= H)
            kept = np.sort(got if n == H else got[:n])
            np.testing.assert_array_equal(kept, np.sort(np.asarray(want[t], np.float32)))
        assert bool(timestep_sampling.is_warm(h)) == all(len(w) == H for w in want)
    assert bool(timestep_sampling.is_warm(h))


def test_probabilities_and_weights_closed_form():
    rng = np.random.default_rng(1)
    num_timesteps = 6
    losses = rng.uniform(0.0, 3.0, (num_timesteps, H))
    cold = timestep_sampling.LossHistory(losses=jnp.asarray(losses, jnp.float32),
                                         counts=jnp.asarray([H] * 5 + [H - 1], jnp.int32))
    np.testing.assert_array_equal(timestep_sampling.probabilities(cold),
                                  np.full(num_timesteps, 1 / num_timesteps, np.float32))
    _, w = timestep_sampling.sample_timesteps(cold, jax.random.key(0), 64)
    np.testing.assert_array_equal(w, np.ones(64, np.float32))  # exactly 1 before warm

    warm = cold.replace(counts=jnp.full((num_timesteps,), H + 3, jnp.int32))
    zeros = warm.replace(losses=jnp.zeros_like(warm.losses))  # no information: stay uniform
    np.testing.assert_array_equal(timestep_sampling.probabilities(zeros),
                                  np.full(num_timesteps, 1 / num_timesteps, np.float32))
    np.testing.assert_array_equal(
        timestep_sampling.sample_timesteps(zeros, jax.random.key(0), 8)[1], np.ones(8))
    root_mean_sq = np.sqrt(np.mean(losses**2, axis=1))
    u = timestep_sampling.UNIFORM_PROB
    want = (1 - u) * root_mean_sq / root_mean_sq.sum() + u / num_timesteps
    np.testing.assert_allclose(timestep_sampling.probabilities(warm), want, rtol=1e-6)
    t, w = timestep_sampling.sample_timesteps(warm, jax.random.key(0), 200_000)
    t = np.asarray(t)
    np.testing.assert_allclose(w, 1.0 / (num_timesteps * want[t]), rtol=1e-5)
    freq = np.bincount(t, minlength=num_timesteps) / t.size
    np.testing.assert_allclose(freq, want, atol=5 * np.sqrt(want.max() / t.size))


# ------------------------------------------------------------- unbiasedness (oracle model)


ORACLE_T = 20
ORACLE_V = 0.3  # the learned_range variance output, everywhere


def _oracle_delta():
    return 0.05 * (np.arange(ORACLE_T) + 1) / ORACLE_T  # the x0 prediction's error at t


def _oracle_terms_np(x0):
    """L_t(x0_i) in bits/dim, float64 [B, T], computed from the betas alone.

    The oracle predicts x_0 + delta_t ("xstart") and the variance output v, so every term is
    deterministic: for t > 0 a KL between Gaussians whose means differ by coef1_t delta_t,
    for t = 0 the discretized decoder at mean x_0 + delta_0.
    """
    betas = schedules.get_beta_schedule("cosine", num_timesteps=ORACLE_T)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_lv = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    frac = (ORACLE_V + 1) / 2
    lv_p = frac * np.log(betas) + (1 - frac) * post_lv
    delta = _oracle_delta()
    kl = 0.5 * (-1 + lv_p - post_lv + np.exp(post_lv - lv_p)
                + (coef1 * delta) ** 2 * np.exp(-lv_p)) / math.log(2)

    def cdf(z):
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    inv_s = np.exp(-0.5 * lv_p[0])
    plus = cdf(inv_s * (-delta[0] + 1 / 255))
    minus = cdf(inv_s * (-delta[0] - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(max(plus, 1e-12)),
                    np.where(x0 > 0.999, np.log(max(1 - minus, 1e-12)),
                             np.log(max(plus - minus, 1e-12))))
    decoder = -logp.reshape(len(x0), -1).mean(axis=1) / math.log(2)
    terms = np.tile(kl, (len(x0), 1))
    terms[:, 0] = decoder
    return terms


def _estimates(history, x0, num_draws):
    """The train step's weighted loss mean(w_i L_{t_i}) for num_draws independent draws."""
    sched = diffusion.make_schedule(schedules.get_beta_schedule("cosine",
                                                                num_timesteps=ORACLE_T))
    x0 = jnp.asarray(x0, jnp.float32)
    delta = jnp.asarray(_oracle_delta(), jnp.float32)

    def model_fn(x_t, t):
        mean = x0 + delta[t][:, None, None, None]
        return jnp.concatenate([mean, jnp.full_like(x_t, ORACLE_V)], axis=-1)

    def one(key):
        t_key, noise_key = jax.random.split(key)
        t, w = timestep_sampling.sample_timesteps(history, t_key, x0.shape[0])
        noise = jax.random.normal(noise_key, x0.shape)
        losses = diffusion.training_losses(sched, model_fn, x0, t, noise, mean_type="xstart",
                                           var_type="learned_range", loss_type="kl")
        return jnp.mean(losses * w), jnp.mean(losses)

    keys = jax.random.split(jax.random.key(42), num_draws)
    weighted, unweighted = jax.jit(jax.vmap(one))(keys)
    return np.asarray(weighted, np.float64), np.asarray(unweighted, np.float64)


def test_importance_sampled_vlb_is_unbiased():
    rng = np.random.default_rng(3)
    x0 = rng.integers(0, 256, (4, 4, 4, 1)) / 127.5 - 1.0
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # both edge bins
    terms = _oracle_terms_np(x0)  # [B, T]
    target = terms.mean(axis=0).mean()  # E over uniform t of the batch-mean loss
    per_t = terms.mean(axis=0)
    # A warm history that is deliberately not proportional to the true L_t (factors 0.1..10),
    # so that the weights 1 / (T p_t) must do the work.
    factors = np.exp(rng.uniform(np.log(0.1), np.log(10.0), ORACLE_T))
    history = timestep_sampling.LossHistory(
        losses=jnp.asarray(np.tile((per_t * factors)[:, None], (1, H)), jnp.float32),
        counts=jnp.full((ORACLE_T,), H, jnp.int32))
    num_draws = 20_000
    weighted, unweighted = _estimates(history, x0, num_draws)
    mean, std = weighted.mean(), weighted.std(ddof=1)
    se = std / math.sqrt(num_draws)
    print(f"\nunbiasedness: mean {mean:.6f}, target {target:.6f}, std {std:.4f}, "
          f"standard error {se:.2e}, |mean - target| / se = {abs(mean - target) / se:.2f}")
    assert abs(mean - target) < 4 * se
    # Without the weights the same draws estimate a different quantity: the test can fail.
    assert abs(unweighted.mean() - target) > 20 * unweighted.std(ddof=1) / math.sqrt(num_draws)

    # With the exact L_t in the history (the sampler's intended state) the estimator's
    # spread falls far below uniform sampling's.
    exact = history.replace(losses=jnp.asarray(np.tile(per_t[:, None], (1, H)), jnp.float32))
    tuned, _ = _estimates(exact, x0, 2000)
    cold = history.replace(counts=jnp.zeros((ORACLE_T,), jnp.int32))
    uniform, _ = _estimates(cold, x0, 2000)
    print(f"std with the exact history {tuned.std():.4f}, uniform {uniform.std():.4f}")
    assert abs(tuned.mean() - target) < 4 * tuned.std(ddof=1) / math.sqrt(2000) + 1e-6
    assert tuned.std() < 0.2 * uniform.std()


# --------------------------------------------------------------------------- the train step


def _step_before_loss_aware(state, batch, key, *, model, config):
    """train.train_step as it was before the loss-aware sampler existed (a frozen copy of its
    path for the default clipping: the optimizer chain clips the averaged gradient)."""
    d = config.diffusion
    sched = builders.schedule(config)
    device = jax.lax.axis_index(parallel.AXIS)
    key = jax.random.fold_in(jax.random.fold_in(key, state.step), device)
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    x = builders.from_uint8(batch["image"])
    b = x.shape[0]
    t = jax.random.randint(t_key, (b,), 0, sched.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x.shape, jnp.float32)

    def loss_fn(params):
        def model_fn(x_t, t_):
            return model.apply({"params": params}, x_t, t_, None, train=True,
                               rngs={"dropout": dropout_key})

        losses = diffusion.training_losses(sched, model_fn, x, t, noise, mean_type=d.mean_type,
                                           var_type=d.var_type, loss_type=d.loss_type)
        return jnp.mean(losses)

    local_params = jax.lax.pcast(state.params, parallel.AXIS, to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(local_params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = train.make_optimizer(config).update(grads, state.opt_state,
                                                             state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, 1.0 - config.training.ema_decay)
    new_state = train.TrainState(step=state.step + 1, params=params, ema_params=ema,
                                 opt_state=opt_state)
    metrics = {"loss": jax.lax.pmean(loss, parallel.AXIS), "grad_norm": grad_norm,
               "lr": train.learning_rate_fn(config)(state.step)}
    return new_state, metrics


def _multi_step_before(state, batches, key_data, *, model, config):
    """train.multi_step for one step per call, around the frozen step."""
    state, metrics = _step_before_loss_aware(state, jax.tree.map(lambda x: x[0], batches),
                                             jax.random.wrap_key_data(key_data), model=model,
                                             config=config)
    return state, jax.tree.map(lambda m: jnp.asarray(m)[None], metrics)


def test_uniform_step_is_bit_identical_to_the_step_before():
    config = tiny_config(steps_per_call=1)
    dp = parallel.DataParallel("shard_map")
    init = train.create_train_state(config, jax.random.key(0))
    assert init.loss_history is None  # the same pytree (and checkpoints) as before
    model = UNet(builders.unet_config(config))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (1, 16, 8, 8, 1), dtype=np.uint8),
                "label": np.zeros((1, 16), np.int32)} for _ in range(2)]
    key_data = dp.replicate(jax.random.key_data(jax.random.key(1)))
    outs = []
    for multi in (train.multi_step, _multi_step_before):
        fn = dp.compile_step(functools.partial(multi, model=model, config=config))
        state = dp.replicate(init)
        for b in batches:
            state, metrics = fn(state, dp.shard_batch(b), key_data)
        outs.append(jax.tree.leaves(dp.first((state, metrics))))
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


def _read_history(workdir):
    with checkpoint.TrainCheckpointer(str(workdir / "checkpoints"), read_only=True) as ckpt:
        state, meta = ckpt.restore_numpy()
    return state, meta


def test_loss_aware_training_resumes_with_the_same_history(tmp_path):
    config = tiny_config(batch_size=32, steps_per_call=2, checkpoint_every=4, log_every=4,
                         timestep_sampler="loss_aware")
    config.diffusion.num_timesteps = 10
    config.diffusion.loss_type = "kl"
    train.train_and_evaluate(config, str(tmp_path / "straight"))

    config.training.num_train_steps = 4
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    halfway, _ = _read_history(tmp_path / "resumed")
    config.training.num_train_steps = 8
    train.train_and_evaluate(config, str(tmp_path / "resumed"))

    a, meta = _read_history(tmp_path / "straight")
    b, _ = _read_history(tmp_path / "resumed")
    assert meta["step"] == 8
    assert int(np.sum(halfway["loss_history"]["counts"])) > 0
    for name in ("losses", "counts"):
        np.testing.assert_array_equal(a["loss_history"][name], b["loss_history"][name])
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    # 8 steps of 32 on T = 10: every t has its 10 losses, so the later steps importance-sample.
    assert np.all(a["loss_history"]["counts"] >= timestep_sampling.HISTORY)

    # A different sampler on the same workdir is refused before anything compiles.
    config.training.timestep_sampler = "uniform"
    config.training.num_train_steps = 12
    with pytest.raises(ValueError, match="timestep_sampler='loss_aware'"):
        train.train_and_evaluate(config, str(tmp_path / "resumed"))


def test_loss_aware_step_agrees_between_shard_map_and_pmap():
    config = tiny_config(steps_per_call=2, timestep_sampler="loss_aware")
    config.diffusion.num_timesteps = 4
    config.diffusion.loss_type = "kl"
    config.optim.eps = 1e-3  # damp Adam steps of pure rounding noise (see test_train)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (2, 16, 8, 8, 1), dtype=np.uint8),
                "label": np.zeros((2, 16), np.int32)} for _ in range(3)]
    states = []
    for mode in ("shard_map", "pmap"):
        dp = parallel.DataParallel(mode)
        state = dp.to_device(dp.replicate(train.create_train_state(config, jax.random.key(0))))
        fn = dp.compile_step(functools.partial(train.multi_step,
                                               model=UNet(builders.unet_config(config)),
                                               config=config))
        key_data = dp.replicate(jax.random.key_data(jax.random.key(1)))
        for b in batches:
            state, _ = fn(state, dp.shard_batch(b), key_data)
        states.append(dp.first(state))
    a, b = states
    # 6 steps x 16 examples on T = 4: warm after the first steps, so both paths ran.
    assert bool(timestep_sampling.is_warm(a.loss_history))
    np.testing.assert_array_equal(a.loss_history.counts, b.loss_history.counts)
    np.testing.assert_allclose(a.loss_history.losses, b.loss_history.losses, rtol=1e-5)
