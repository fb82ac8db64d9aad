"""Tests for ddpm_jax.generate: batching, padding, outputs, the command line."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import builders, diffusion, generate, sampling, schedules
from ddpm_jax.unet import UNet, UNetConfig

T = 8
SIZE, CHANNELS = 8, 3


def tiny_meta(num_classes=None, var_type="fixedlarge"):
    out_ch = CHANNELS * (2 if var_type in ("learned", "learned_range") else 1)
    cfg = UNetConfig(ch=32, out_ch=out_ch, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_classes=num_classes)
    return {
        "model": cfg.to_dict(),
        "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.2,
                      "num_timesteps": T, "mean_type": "eps", "var_type": var_type},
        "data": {"image_size": SIZE, "channels": CHANNELS},
        "step": 7,
    }


def random_params(model, *args, seed=1):
    """Random params of the right shapes without compiling model.init (slow on CPU):
    kernels N(0, 1/fan_in), norm scales 1, biases and embeddings small."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1])
        if leaf.ndim >= 2 and "embedding" not in name:
            return rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        return 0.1 * rng.standard_normal(leaf.shape, np.float32)

    return jax.tree.map_with_path(fill, shapes)


@functools.cache
def tiny_params(num_classes=None):
    meta = tiny_meta(num_classes)
    cfg = dict(meta["model"])
    model = UNet(UNetConfig.from_config(cfg, out_ch=cfg.pop("out_ch")))
    x = jnp.zeros((1, SIZE, SIZE, CHANNELS))
    y = None if num_classes is None else jnp.zeros((1,), jnp.int32)
    return random_params(model, x, jnp.zeros((1,), jnp.int32), y)


def np_uint8(x):
    return np.clip(np.round((np.asarray(x, np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def test_exactly_n_images_independent_of_batch_size():
    meta, params = tiny_meta(), tiny_params()
    a = generate.generate(params, meta, num_samples=13, batch_size=8, seed=3, progress=False)
    b = generate.generate(params, meta, num_samples=16, batch_size=16, seed=3, progress=False)
    assert set(a) == {"images"}
    assert a["images"].shape == (13, SIZE, SIZE, CHANNELS) and a["images"].dtype == np.uint8
    diff = np.abs(a["images"].astype(int) - b["images"][:13].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # float noise at rounding edges only
    assert a["images"].std() > 10  # real images, not a constant
    c = generate.generate(params, meta, num_samples=13, batch_size=8, seed=4, progress=False)
    assert (a["images"] != c["images"]).mean() > 0.5


@pytest.mark.parametrize("options", [dict(sampler="ddim", num_steps=3, eta=0.5),
                                     dict(sampler="dpm++2m", num_steps=4, spacing="quadratic")])
def test_matches_sampler_on_one_device(options):
    """The sharded, batched run equals sampling.sample on the whole batch."""
    meta, params = tiny_meta(), tiny_params()
    got = generate.generate(params, meta, num_samples=8, batch_size=8, seed=5, progress=False,
                            **options)["images"]
    s = diffusion.make_schedule(schedules.get_beta_schedule(
        "linear", beta_start=1e-4, beta_end=0.2, num_timesteps=T))
    model = builders.unet_from_meta(meta)
    x = jax.jit(lambda k: sampling.sample(
        s, lambda x, t: model.apply({"params": params}, x, t), k, (8, SIZE, SIZE, CHANNELS),
        mean_type="eps", var_type="fixedlarge", **options))(jax.random.key(5))
    diff = np.abs(got.astype(int) - np_uint8(x).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_class_conditional_with_guidance():
    meta, params = tiny_meta(num_classes=3), tiny_params(num_classes=3)
    out = generate.generate(params, meta, num_samples=10, batch_size=8, guidance_scale=1.5,
                            progress=False)
    assert out["images"].shape == (10, SIZE, SIZE, CHANNELS)
    np.testing.assert_array_equal(out["labels"], np.arange(10) % 3)
    fixed = generate.generate(params, meta, num_samples=8, batch_size=8, class_label=2,
                              guidance_scale=0.0, progress=False)
    np.testing.assert_array_equal(fixed["labels"], np.full(8, 2))


def test_write_outputs(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (13, SIZE, SIZE, CHANNELS), dtype=np.uint8)
    generate.write_outputs({"images": images}, str(tmp_path / "out"), grid_size=64)
    with np.load(tmp_path / "out" / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], images)
    grid = np.asarray(Image.open(tmp_path / "out" / "samples.png"))
    assert grid.shape == (4 * SIZE, 4 * SIZE, CHANNELS)  # 13 images: 4 x 4 tiles
    np.testing.assert_array_equal(grid[SIZE:2 * SIZE, :SIZE], images[4])  # row 1, column 0
    assert not grid[3 * SIZE:, SIZE:].any()  # unused tiles stay black
    gray = images[:5, :, :, :1]
    generate.write_outputs({"images": gray}, str(tmp_path / "gray"), grid_size=4)
    assert np.asarray(Image.open(tmp_path / "gray" / "samples.png")).shape == (2 * SIZE, 2 * SIZE)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"batch_size": 12}, "batch_size"),
        ({"num_samples": 0}, "num_samples"),
        ({"class_label": 1}, "class-conditional"),
        ({"sampler": "plms"}, "sampler"),
    ],
)
def test_bad_input(kw, match):
    kw = {"num_samples": 4, "batch_size": 8, "progress": False, **kw}
    with pytest.raises(ValueError, match=match):
        generate.generate(tiny_params(), tiny_meta(), **kw)


def test_command_line(tmp_path):
    from ddpm_jax import checkpoint

    meta, params = tiny_meta(), tiny_params()
    checkpoint.save_params(str(tmp_path / "ckpt"), params, meta=meta)
    out = tmp_path / "samples"
    generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--num_samples", "5",
                   "--batch_size", "8", "--seed", "3", "--out", str(out), "--no_progress"])
    with np.load(out / "samples.npz") as f:
        images = f["images"]
    assert images.shape == (5, SIZE, SIZE, CHANNELS) and images.dtype == np.uint8
    direct = generate.generate(params, meta, num_samples=5, batch_size=8, seed=3, progress=False)
    np.testing.assert_array_equal(images, direct["images"])
    assert np.asarray(Image.open(out / "samples.png")).shape == (2 * SIZE, 3 * SIZE, CHANNELS)


def _cli(ckpt, out, *extra):
    return ["--checkpoint", str(ckpt), "--num_samples", "13", "--batch_size", "8",
            "--shard_batches", "1", "--seed", "3", "--out", str(out), "--no_progress", *extra]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    from ddpm_jax import checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "params"
    checkpoint.save_params(str(path), tiny_params(), meta=tiny_meta())
    return path


def test_sigterm_saves_a_shard_and_a_rerun_resumes_to_the_same_images(
        tmp_path, saved_checkpoint, monkeypatch, capsys):
    import os
    import signal

    whole = tmp_path / "whole"
    generate.main(_cli(saved_checkpoint, whole))
    with np.load(whole / "samples.npz") as f:
        expected = f["images"]
    assert not (whole / "shards").exists()  # removed once samples.npz is written

    # A real SIGTERM while the first of two shards (8 + 5 images) is being written.
    write_npz = generate.fileio.write_npz
    calls = []

    def write_then_sigterm(path, **arrays):
        write_npz(path, **arrays)
        calls.append(path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(generate.fileio, "write_npz", write_then_sigterm)
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as exit_info:
        generate.main(_cli(saved_checkpoint, out))
    assert exit_info.value.code == 143
    assert "stopped with 8 of 13 images saved" in capsys.readouterr().err
    assert len(calls) == 1 and not (out / "samples.npz").exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "manifest.json", "shard_00000.npz"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    monkeypatch.undo()

    sampled = []
    original = generate.generate
    monkeypatch.setattr(generate, "generate",
                        lambda *a, **kw: sampled.append(kw["start"]) or original(*a, **kw))
    generate.main(_cli(saved_checkpoint, out))
    assert sampled == [8]  # only the missing shard was sampled
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], expected)
    generate.main(_cli(saved_checkpoint, out))  # complete: nothing to do
    assert sampled == [8]
    assert "nothing to do" in capsys.readouterr().out


def test_other_arguments_refuse_to_mix(tmp_path, saved_checkpoint):
    import json

    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    manifest = generate.run_manifest(generate._parse(_cli(saved_checkpoint, out)), tiny_meta())
    (out / "shards" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"other arguments \(seed: 3 there, 4 now.*--overwrite"):
        generate.main(_cli(saved_checkpoint, out, "--seed", "4"))
    assert (out / "shards" / "manifest.json").exists()
    generate.main(_cli(saved_checkpoint, out, "--seed", "4", "--num_samples", "4",
                       "--overwrite"))
    with pytest.raises(ValueError, match="num_samples: 4 there, 13 now"):
        generate.main(_cli(saved_checkpoint, out, "--seed", "4"))


def test_a_failing_write_keeps_the_old_file(tmp_path, monkeypatch):
    images = np.zeros((3, SIZE, SIZE, CHANNELS), np.uint8)
    generate.write_outputs({"images": images}, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def savez_then_fail(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="No space left"):
        generate.write_outputs({"images": images + 1}, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary left
    with np.load(tmp_path / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], images)


def test_two_processes_write_the_images_of_one(tmp_path, saved_checkpoint):
    """Two localhost processes of 4 CPU devices each (as in test_multihost): process 0 writes
    the one samples.npz, equal to a single-process run of the same arguments."""
    import os
    import socket
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo + os.pathsep + os.environ.get(
               "PYTHONPATH", "")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "multi"
    args = ["--checkpoint", str(saved_checkpoint), "--num_samples", "21", "--batch_size", "8",
            "--shard_batches", "1", "--seed", "3", "--no_progress",
            "--coordinator_address", address, "--num_processes", "2"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ddpm_jax.generate", *args, "--process_id", str(i),
         "--out", str(out if i == 0 else tmp_path / "unused")],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert "2 processes" in logs[0] and not (tmp_path / "unused").exists()
    with np.load(out / "samples.npz") as f:
        got = f["images"]
    direct = generate.generate(tiny_params(), tiny_meta(), num_samples=21, batch_size=8, seed=3,
                               progress=False)["images"]
    assert got.shape == direct.shape
    diff = np.abs(got.astype(int) - direct.astype(int))  # 4 vs 8 devices: float rounding only
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
