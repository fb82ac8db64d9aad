"""FID and Inception Score during training (ddpm_jax.metrics.in_training) with a
random-weight FID Inception (the fixture of tests/test_inception.py): the scores against
numpy, the logged values against a recomputation, and the errors at start."""

import importlib.util
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest

from ddpm_jax import checkpoint, generate, input_pipeline, train
from ddpm_jax.config_lib import load_config
from ddpm_jax.metrics import fid, in_training, inception

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
BATCH = 8  # one image per fake device; every Inception call has this shape (one compile)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random FID Inception weights (torch names) written as the cached .npz format."""
    spec = importlib.util.spec_from_file_location(
        "make_inception_fixture", FIXTURES / "make_inception_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with np.load(FIXTURES / "inception_fixture.npz") as f:
        keys, shapes = [str(k) for k in f["keys"]], json.loads(str(f["shapes"]))
    path = tmp_path_factory.mktemp("inception") / "inception.npz"
    np.savez(path, **module.random_state_dict(keys, shapes))
    return path


@pytest.fixture(scope="module")
def extractor(weights):
    params = inception.load_inception_params(weights)
    return inception.InceptionExtractor(params, batch_size=BATCH, devices=jax.local_devices())


@pytest.fixture(scope="module")
def ref_stats(extractor, tmp_path_factory):
    """Statistics of 16 held-out digits, as `python -m ddpm_jax.metrics.fid stats` writes."""
    images, _ = input_pipeline.load_numpy({"name": "digits", "image_size": 8}, "test")
    mu, sigma = fid.activation_statistics(extractor(images[:16])["pool3"])
    path = tmp_path_factory.mktemp("ref") / "digits_test.npz"
    fid.save_statistics(path, mu, sigma)
    return path


def _numpy_fid(acts, mu2, sigma2):
    """Independent float64 closed form: tr sqrt(S1 S2) = sum sqrt(eig(S2^1/2 S1 S2^1/2))."""
    acts = np.asarray(acts, np.float64)
    mu1 = acts.mean(0)
    centered = acts - mu1
    sigma1 = centered.T @ centered / (len(acts) - 1)
    w, v = np.linalg.eigh(sigma2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ sigma1 @ root)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def _numpy_is(logits, splits):
    scores = []
    for part in np.array_split(np.asarray(logits, np.float64), splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        marginal = p.mean(0)
        scores.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))
    return np.mean(scores), np.std(scores)


def test_score_images_matches_numpy(extractor, ref_stats):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, 8, 8, 1), dtype=np.uint8)
    ref = fid.load_statistics(ref_stats)
    got = in_training.score_images(extractor, images, ref, fid_method="eigh", is_splits=2)
    feats = extractor(images)
    want_fid = _numpy_fid(feats["pool3"], *ref)
    want_is = _numpy_is(feats["logits_unbiased"], 2)
    assert want_fid > 0
    np.testing.assert_allclose(got["fid"], want_fid, rtol=1e-6)
    np.testing.assert_allclose([got["inception_score"], got["inception_score_std"]], want_is,
                               rtol=1e-6)


def eval_config(weights_path, stats_path, **fields):
    c = load_config(CONFIG_DIR / "test.py")
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    c.training.num_samples = 0
    c.eval.update(dict(every=4, num_samples=BATCH, batch_size=BATCH, sampler="ddim",
                       num_steps=3, seed=5, inception=str(weights_path),
                       ref_stats=str(stats_path),
                       fid_method="eigh", is_splits=2))
    c.eval.update(fields)
    return c


def test_fid_and_is_are_logged_during_training(tmp_path, weights, ref_stats, extractor,
                                               capsys):
    from tensorboard.backend.event_processing import event_accumulator

    config = eval_config(weights, ref_stats)
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))  # 8 steps: evaluations at 4 and 8
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "eval/fid" in line]
    assert [line.split(":")[0] for line in lines] == ["step 4", "step 8"]

    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    logged = {tag: {e.step: e.value for e in acc.Scalars(tag)}
              for tag in ("eval/fid", "eval/inception_score", "eval/inception_score_std",
                          "eval/seconds")}
    assert all(sorted(v) == [4, 8] for v in logged.values())

    # Recompute step 8 independently: the same samples from the final EMA params, their
    # features, and the numpy closed forms.
    params, meta = checkpoint.load_params(str(workdir))
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray,
                                                                     final.ema_params))
    images = generate.generate(params, meta, num_samples=BATCH, batch_size=BATCH, seed=5,
                               sampler="ddim", num_steps=3, progress=False)["images"]
    feats = extractor(images)
    ref = fid.load_statistics(ref_stats)
    want_fid = _numpy_fid(feats["pool3"], *ref)
    want_is, want_is_std = _numpy_is(feats["logits_unbiased"], 2)
    print(f"\nstep 8: logged FID {logged['eval/fid'][8]:.6g} (numpy {want_fid:.6g}), "
          f"IS {logged['eval/inception_score'][8]:.6g} (numpy {want_is:.6g})")
    np.testing.assert_allclose(logged["eval/fid"][8], want_fid, rtol=1e-5)
    np.testing.assert_allclose(logged["eval/inception_score"][8], want_is, rtol=1e-5)
    np.testing.assert_allclose(logged["eval/inception_score_std"][8], want_is_std, rtol=1e-4,
                               atol=1e-6)
    assert math.isfinite(logged["eval/fid"][4]) and logged["eval/seconds"][4] > 0


def test_missing_or_bad_files_fail_at_start(tmp_path, weights, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating")

    ref_stats = tmp_path / "ok.npz"  # well-formed; only its shape is checked at start
    fid.save_statistics(ref_stats, np.zeros(2048), np.eye(2048))

    monkeypatch.setattr(train, "make_train_fn", no_compile)
    monkeypatch.setattr(train, "create_train_state", no_compile)
    workdir = str(tmp_path / "run")
    bad_stats = tmp_path / "small.npz"
    fid.save_statistics(bad_stats, np.zeros(16), np.eye(16))
    not_stats = tmp_path / "images.npz"
    np.savez(not_stats, images=np.zeros((2, 8, 8, 1), np.uint8))
    cases = [
        (dict(inception=""), r"config.eval.inception is empty"),
        (dict(inception=str(tmp_path / "nope.pth")), r"config.eval.inception=.*is not a file"),
        (dict(ref_stats=""), r"config.eval.ref_stats is empty"),
        (dict(ref_stats=str(tmp_path / "nope.npz")), r"config.eval.ref_stats=.*is not a file"),
        (dict(ref_stats=str(bad_stats)), r"mu \(16,\).*need \(2048,\)"),
        (dict(ref_stats=str(not_stats)), r"cannot be read as FID statistics"),
        (dict(num_steps=50), r"config.eval.sampler=.ddim. with config.eval.num_steps=50"),
        (dict(sampler="heun"), r"config.eval.sampler='heun'"),
        (dict(num_samples=1), r"config.eval.num_samples must be an int >= 2"),
        (dict(batch_size=12), r"config.eval.batch_size=12 must be a multiple"),
        (dict(is_splits=9), r"is_splits=9 must be <= config.eval.num_samples=8"),
        (dict(fid_method="svd"), r"config.eval.fid_method='svd'"),
    ]
    for fields, match in cases:
        config = eval_config(weights, ref_stats, **fields)
        with pytest.raises(ValueError, match=match):
            train.validate_config(config)
        with pytest.raises(ValueError, match=match):
            train.train_and_evaluate(config, workdir)
    # Weights that exist but are not Inception weights: at start, from loading them.
    junk = tmp_path / "junk.npz"
    np.savez(junk, x=np.zeros(3))
    with pytest.raises(ValueError, match="config.eval.inception=.*cannot be loaded"):
        train.train_and_evaluate(eval_config(weights, ref_stats, inception=str(junk)), workdir)
    assert not os.path.exists(workdir)  # nothing written


def test_eval_is_optional_and_off_by_default():
    c = load_config(CONFIG_DIR / "default.py")
    assert c.eval.every == 0 and not in_training.enabled(c)
    c.eval.inception = "/does/not/exist"  # not looked at while off
    train.validate_config(c)
    del c["eval"]  # configs written before the section
    train.validate_config(c)
    assert not in_training.enabled(c)
    c = load_config(CONFIG_DIR / "default.py")
    c.eval.extra = 1
    with pytest.raises(ValueError, match="eval.extra"):
        train.validate_config(c)
