"""Tests for ddpm_jax.metrics.likelihood: rate/distortion against numpy, bits/dim of a tiny
digits model trained here with plain optax, sharding independence and the bpd command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import diffusion, input_pipeline, schedules
from ddpm_jax.metrics import likelihood
from ddpm_jax.unet import UNet, UNetConfig

TRAIN_STEPS = 200


def test_rate_distortion_matches_numpy_loop():
    rng = np.random.default_rng(0)
    n, num_t = 5, 12
    terms = rng.uniform(0, 0.3, (n, num_t))
    prior = rng.uniform(0, 1e-3, n)
    mse = rng.uniform(0, 0.5, (n, num_t))
    rd = likelihood.rate_distortion(terms, prior, mse, reverse_steps=(12, 7, 1))
    for row in rd["table"]:
        k = row["reverse_step"]
        t = num_t - k
        rate = np.mean(prior) + sum(np.mean(terms[:, s]) for s in range(max(t, 1), num_t))
        np.testing.assert_allclose(row["rate_bpd"], rate, rtol=1e-12)
        np.testing.assert_allclose(row["distortion_rmse"], 127.5 * np.sqrt(mse[:, t].mean()),
                                   rtol=1e-12)
    np.testing.assert_allclose(rd["rate_bpd"] + rd["distortion_bpd"], rd["total_bpd"], rtol=1e-12)
    np.testing.assert_allclose(rd["total_bpd"], np.mean(terms.sum(1) + prior), rtol=1e-12)
    np.testing.assert_allclose(rd["distortion_bpd"], terms[:, 0].mean(), rtol=1e-12)
    with pytest.raises(ValueError, match="reverse_steps"):
        likelihood.rate_distortion(terms, prior, mse, reverse_steps=(13,))
    with pytest.raises(ValueError, match="agree"):
        likelihood.rate_distortion(terms, prior[:2], mse)


@pytest.fixture(scope="module")
def trained_digits():
    """A tiny U-Net trained for TRAIN_STEPS steps on the digits with L_simple."""
    config = UNetConfig(ch=32, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        dropout=0.0, resamp_with_conv=True)
    model = UNet(config)
    s = diffusion.make_schedule(schedules.get_beta_schedule("linear"))
    images, _ = input_pipeline.load_numpy({"name": "digits", "image_size": 8}, "train")
    data = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    key = jax.random.key(0)
    params = model.init(jax.random.fold_in(key, 0), data[:2], jnp.zeros(2, jnp.int32))["params"]
    opt = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, step_key):
        # A jitted step in a Python loop: on CPU, gradients inside a rolled lax.scan are slow.
        kb, kt, kn = jax.random.split(step_key, 3)
        x = data[jax.random.randint(kb, (32,), 0, data.shape[0])]
        t = jax.random.randint(kt, (32,), 0, s.num_timesteps)
        noise = jax.random.normal(kn, x.shape)

        def loss_fn(p):
            fn = lambda xt, tt: model.apply({"params": p}, xt, tt)
            return diffusion.training_losses(s, fn, x, t, noise, mean_type="eps",
                                             var_type="fixedlarge", loss_type="mse").mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    train_key = jax.random.fold_in(key, 1)
    for i in range(TRAIN_STEPS):
        params, opt_state = step(params, opt_state, jax.random.fold_in(train_key, i))
    meta = {"model": config.to_dict(),
            "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                          "num_timesteps": 1000, "mean_type": "eps", "var_type": "fixedlarge"},
            "data": {"image_size": 8, "channels": 1}, "step": TRAIN_STEPS}
    test_images, _ = input_pipeline.load_numpy({"name": "digits", "image_size": 8}, "test")
    return params, meta, test_images[:8]


def test_bpd_of_trained_digits_model_is_finite_and_well_below_uniform(trained_digits):
    params, meta, images = trained_digits
    evaluator = likelihood.BpdEvaluator(params, meta, batch_size=8)
    out = evaluator(images, jax.random.key(2))
    assert out["terms_bpd"].shape == (8, 1000) and out["mse"].shape == (8, 1000)
    assert np.all(np.isfinite(out["total_bpd"]))
    np.testing.assert_allclose(out["total_bpd"],
                               out["terms_bpd"].astype(np.float64).sum(1) + out["prior_bpd"],
                               rtol=1e-5)
    # A uniform model over 256 levels costs 8 bits/dim.
    assert np.mean(out["total_bpd"]) < 6.5, np.mean(out["total_bpd"])
    # Closed form of the prior term: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dim.
    abar = np.cumprod(1 - schedules.get_beta_schedule("linear"))[-1]
    x0 = images.astype(np.float64) / 127.5 - 1
    kl = 0.5 * (-np.log(1 - abar) + (1 - abar) + abar * x0**2 - 1)
    np.testing.assert_allclose(out["prior_bpd"], kl.mean((1, 2, 3)) / np.log(2), rtol=1e-3,
                               atol=1e-7)

    # Example i always uses fold_in(key, i), whatever batch or device it lands on.
    part = evaluator(images[3:6], jax.random.key(2), start_index=3)
    np.testing.assert_allclose(part["terms_bpd"], out["terms_bpd"][3:6], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        evaluator(images.astype(np.float32), jax.random.key(2))


def test_bpd_command(trained_digits, tmp_path):
    from ddpm_jax import checkpoint
    from ddpm_jax.metrics import cli

    params, meta, images = trained_digits
    checkpoint.save_params(str(tmp_path / "ckpt"), params, meta=meta)
    out = tmp_path / "res" / "bpd.json"
    cli.main(["bpd", "--checkpoint", str(tmp_path / "ckpt"), "--dataset", "digits",
              "--split", "test", "--max_images", "8", "--batch_size", "8", "--seed", "2",
              "--out", str(out)])
    result = json.loads(out.read_text())
    direct = likelihood.BpdEvaluator(params, meta, batch_size=8)(images, jax.random.key(2))
    assert result["num_images"] == 8
    np.testing.assert_allclose(result["bpd"], np.mean(direct["total_bpd"]), rtol=1e-5)
    assert [r["reverse_step"] for r in result["rate_distortion"]] == list(
        likelihood.DEFAULT_REVERSE_STEPS)
    with np.load(result["terms"]) as terms:
        assert terms["terms_bpd_mean"].shape == (1000,)
        np.testing.assert_allclose(terms["total_bpd"], direct["total_bpd"], rtol=1e-5)


def test_default_reverse_steps():
    assert likelihood.default_reverse_steps(1000) == likelihood.DEFAULT_REVERSE_STEPS
    assert likelihood.default_reverse_steps(20) == (20, 18, 16, 14, 12, 10, 8, 6, 4, 2)
    assert likelihood.default_reverse_steps(4) == (4, 3, 2, 1)


@pytest.fixture(scope="module")
def tiny_t20_checkpoint(tmp_path_factory):
    """A random tiny U-Net for 8x8 digits on a T = 20 schedule, saved as a params dir."""
    from ddpm_jax import checkpoint

    config = UNetConfig(ch=32, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        dropout=0.0)
    shapes = jax.eval_shape(UNet(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros((1,), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: 0.05 * rng.standard_normal(leaf.shape, np.float32),
                          shapes)
    meta = {"model": config.to_dict(),
            "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.2,
                          "num_timesteps": 20, "mean_type": "eps", "var_type": "fixedlarge"},
            "data": {"image_size": 8, "channels": 1}, "step": 1}
    path = tmp_path_factory.mktemp("t20") / "params"
    checkpoint.save_params(str(path), params, meta=meta)
    return str(path)


def test_bpd_command_defaults_follow_the_checkpoint_t(tiny_t20_checkpoint, tmp_path):
    from ddpm_jax.metrics import cli

    out = tmp_path / "bpd.json"
    result = cli.main(["bpd", "--checkpoint", tiny_t20_checkpoint, "--dataset", "digits",
                       "--split", "test", "--max_images", "2", "--batch_size", "8",
                       "--out", str(out)])
    assert [r["reverse_step"] for r in result["rate_distortion"]] == list(range(20, 0, -2))
    assert json.loads(out.read_text())["num_images"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpd.json", "bpd_terms.npz"]


@pytest.mark.parametrize("flags,match", [
    (["--reverse_steps", "1000"], r"--reverse_steps must lie in \[1, T=20\].*got 1000"),
    (["--reverse_steps", "20,0"], r"--reverse_steps must lie in \[1, T=20\].*got 0"),
    (["--image_size", "32"], r"--image_size=32 but the checkpoint .* models 8x8"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--dataset", "npz", "--path", "missing.npz"], "missing.npz: no such file"),
])
def test_bpd_command_checks_arguments_before_the_work(tiny_t20_checkpoint, monkeypatch,
                                                      flags, match):
    from ddpm_jax.metrics import cli

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started before the arguments were checked")

    monkeypatch.setattr(likelihood, "BpdEvaluator", no_work)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        cli.main(["bpd", "--checkpoint", tiny_t20_checkpoint, "--dataset", "digits", *flags])


def test_bpd_command_resumes_after_sigterm(tiny_t20_checkpoint, tmp_path, monkeypatch):
    import os
    import signal

    from ddpm_jax import fileio
    from ddpm_jax.metrics import cli

    def run(out, *extra):
        return cli.main(["bpd", "--checkpoint", tiny_t20_checkpoint, "--dataset", "digits",
                         "--split", "test", "--max_images", "20", "--batch_size", "8",
                         "--shard_batches", "1", "--out", str(out), *extra])

    whole = run(tmp_path / "whole.json")
    write_npz = fileio.write_npz

    def write_then_sigterm(path, **arrays):
        write_npz(path, **arrays)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fileio, "write_npz", write_then_sigterm)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "bpd.json")
    assert exit_info.value.code == 143
    assert sorted(os.listdir(tmp_path / "bpd_shards")) == ["manifest.json", "shard_00000.npz"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"other arguments \(seed: 0 there, 1 now"):
        run(tmp_path / "bpd.json", "--seed", "1")

    calls = []
    original = likelihood.BpdEvaluator.__call__
    monkeypatch.setattr(likelihood.BpdEvaluator, "__call__", lambda self, images, key, **kw: (
        calls.append(kw["start_index"]) or original(self, images, key, **kw)))
    resumed = run(tmp_path / "bpd.json")
    assert calls == [8, 16]  # the first shard was read back, not recomputed
    assert resumed["bpd"] == whole["bpd"] and resumed["rate_distortion"] == whole[
        "rate_distortion"]
    with np.load(tmp_path / "whole_terms.npz") as a, np.load(tmp_path / "bpd_terms.npz") as b:
        np.testing.assert_array_equal(a["total_bpd"], b["total_bpd"])
    assert not (tmp_path / "bpd_shards").exists()
