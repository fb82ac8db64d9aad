"""Tests for ddpm_jax.metrics.fid against independent float64 numpy/scipy computations."""

import numpy as np
import pytest
from scipy import linalg as sla

from ddpm_jax.metrics import fid


def _random_cov(rng, d, n):
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    return np.cov(a, rowvar=False)


def _reference_fid(mu1, s1, mu2, s2):
    """Independent closed form: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), via eigh."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = sla.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sum(np.sqrt(np.clip(inner, 0, None)))
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_distance_matches_eigen_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d, 4 * d + 3), _random_cov(rng, d, 4 * d + 5)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    want = _reference_fid(mu1, np.atleast_2d(s1), mu2, np.atleast_2d(s2))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d", [3, 64])
def test_eigh_method_matches_sqrtm_method(d):
    rng = np.random.default_rng(10 + d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d, 3 * d), _random_cov(rng, d, 5 * d)
    got = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    np.testing.assert_allclose(got, fid.frechet_distance(mu1, s1, mu2, s2), rtol=1e-9)
    np.testing.assert_allclose(got, _reference_fid(mu1, s1, mu2, s2), rtol=1e-9)
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(mu1, s1, mu2, s2, method="svd")


def test_frechet_distance_of_commuting_diagonal_gaussians():
    # Diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_frechet_distance_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(300, 32)).astype(np.float32)
    mu, sigma = fid.activation_statistics(acts)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_singular_product_falls_back_to_eps_offset(monkeypatch):
    # Force the first square root to be non-finite, as for a singular product: the result must
    # then be the closed form with eps added to both diagonals, with a warning.
    calls = []
    real_sqrtm = fid._sqrtm

    def flaky_sqrtm(a):
        calls.append(a)
        out = real_sqrtm(a)
        return np.full_like(out, np.inf) if len(calls) == 1 else out

    monkeypatch.setattr(fid, "_sqrtm", flaky_sqrtm)
    rng = np.random.default_rng(1)
    d, eps = 5, 1e-2
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d, 3), _random_cov(rng, d, 40)  # s1 has rank 2
    with pytest.warns(RuntimeWarning, match="singular"):
        got = fid.frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert len(calls) == 2
    # The offset enters only the sqrt term; the traces use the raw covariances.
    off = np.eye(d) * eps
    want = _reference_fid(mu1, s1 + off, mu2, s2 + off) - 2 * d * eps
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_frechet_distance_rejects_large_imaginary_part(monkeypatch):
    monkeypatch.setattr(fid, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 0.5j))
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_frechet_distance_drops_small_imaginary_part(monkeypatch):
    monkeypatch.setattr(fid, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 1e-5j))
    got = fid.frechet_distance(np.zeros(3), 2 * np.eye(3), np.zeros(3), 2 * np.eye(3))
    np.testing.assert_allclose(got, 12.0 - 6.0)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_activation_statistics_float64_mean_and_unbiased_cov():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(50, 6)).astype(np.float32)
    mu, sigma = fid.activation_statistics(acts)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    x = acts.astype(np.float64)
    centered = x - x.sum(0) / 50
    np.testing.assert_allclose(mu, x.sum(0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.activation_statistics(acts[:1])


def test_inception_score_uniform_logits_is_one():
    mean, std = fid.inception_score(np.zeros((100, 1008)), splits=10)
    np.testing.assert_allclose(mean, 1.0, rtol=1e-12)
    assert std < 1e-12


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_inception_score_confident_even_predictions_equals_class_count(num_classes):
    n = 10 * num_classes
    labels = np.arange(n) % num_classes  # every split holds every class equally often
    logits = np.full((n, 1008), -1e4)
    logits[np.arange(n), labels] = 0.0
    mean, std = fid.inception_score(logits, splits=10)
    np.testing.assert_allclose(mean, num_classes, rtol=1e-9)
    assert std < 1e-9 * num_classes


def test_inception_score_matches_direct_kl():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(37, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    bounds = [(i * 37 // 4, (i + 1) * 37 // 4) for i in range(4)]
    scores = []
    for lo, hi in bounds:
        part = p[lo:hi]
        marg = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / marg)) for q in part])))
    mean, std = fid.inception_score(logits, splits=4)
    np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(logits, splits=0)


def test_statistics_roundtrip_and_bad_file(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=4), np.eye(4)
    path = tmp_path / "sub" / "stats.npz"
    fid.save_statistics(path, mu, sigma)
    mu2, sigma2 = fid.load_statistics(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a statistics file"):
        fid.load_statistics(tmp_path / "bad.npz")


@pytest.mark.parametrize("name, value", [("mu", np.nan), ("sigma", np.inf), ("sigma", -np.inf)])
def test_load_statistics_refuses_non_finite_values(tmp_path, name, value):
    mu, sigma = np.zeros(4), np.eye(4)
    (mu if name == "mu" else sigma)[1] = value
    path = tmp_path / "corrupt_stats.npz"
    fid.save_statistics(path, mu, sigma)
    with pytest.raises(ValueError, match=rf"corrupt_stats\.npz: {name} holds \d+ NaN or inf"):
        fid.load_statistics(path)


def test_frechet_distance_refuses_non_finite_input():
    with pytest.raises(ValueError, match="sigma2 holds NaN"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, np.nan]))


def test_garbage_statistics_files_name_the_file(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("mu,sigma\n1,2\n")
    cases = [(text, r"text\.npz is not a readable \.npz")]
    with pytest.raises(FileNotFoundError, match=r"absent\.npz: no such file"):
        fid.load_statistics(tmp_path / "absent.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    cases.append((pickled, r"pickled\.npz is not a readable \.npz"))
    with pytest.raises(ValueError, match=r"\(ValueError: Object arrays cannot be loaded"):
        fid.load_statistics(pickled)
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, mu=np.zeros(3), sigma=np.eye(2))
    cases.append((shapes, r"shapes\.npz: expected mu \[D\] and sigma \[D, D\]"))
    truncated = tmp_path / "truncated.npz"
    fid.save_statistics(truncated, np.zeros(64), np.eye(64))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    cases.append((truncated, r"truncated\.npz is not a readable \.npz"))
    for path, message in cases:
        with pytest.raises(ValueError, match=message + " of a statistics file"
                           if "shapes" not in message else message):
            fid.load_statistics(path)
    with pytest.raises(ValueError, match=r"text\.npz is not a readable \.npz"):
        fid.is_statistics_file(text)
    with pytest.raises(ValueError, match=r"text\.npz is not a readable \.npz of uint8 images"):
        fid.load_images_npz(text)


def test_statistics_record_the_resize_and_refuse_the_other(tmp_path):
    path = tmp_path / "stats.npz"
    fid.save_statistics(path, np.zeros(3), np.eye(3), resize="pytorch")
    fid.load_statistics(path, resize="pytorch")
    fid.load_statistics(path)  # no resize asked: not checked
    with pytest.raises(ValueError, match=r"stats\.npz: made with --resize pytorch, but these "
                                         r"features use --resize tf1"):
        fid.load_statistics(path, resize="tf1")
    # TTUR / pytorch-fid files record no resize and are accepted with either.
    np.savez(tmp_path / "ttur.npz", mu=np.zeros(3), sigma=np.eye(3))
    for resize in ("tf1", "pytorch"):
        fid.load_statistics(tmp_path / "ttur.npz", resize=resize)


def test_load_images_npz_keys_and_dtype(tmp_path):
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "one.npz", whatever=imgs)
    assert fid.load_images_npz(tmp_path / "one.npz").shape == (3, 8, 8, 3)
    np.savez(tmp_path / "two.npz", images=imgs, labels=np.zeros(3))
    assert fid.load_images_npz(tmp_path / "two.npz").shape == (3, 8, 8, 3)
    with pytest.raises(ValueError, match="no array named"):
        fid.load_images_npz(tmp_path / "two.npz", key="nope")
    np.savez(tmp_path / "float.npz", images=imgs.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.load_images_npz(tmp_path / "float.npz")


def _random_inception_npz(path):
    """Writes random FID Inception weights (torch names) as the cached .npz format."""
    import importlib.util
    import json
    import os

    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    spec = importlib.util.spec_from_file_location(
        "make_inception_fixture", os.path.join(fixtures, "make_inception_fixture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with np.load(os.path.join(fixtures, "inception_fixture.npz")) as f:
        keys, shapes = [str(k) for k in f["keys"]], json.loads(str(f["shapes"]))
    np.savez(path, **module.random_state_dict(keys, shapes))


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    weights = tmp_path_factory.mktemp("weights") / "inception.npz"
    _random_inception_npz(weights)
    return weights


def test_stats_and_fid_commands(tmp_path, random_weights):
    import json

    from ddpm_jax import input_pipeline
    from ddpm_jax.metrics import cli, inception

    weights = random_weights
    stats = tmp_path / "ref" / "digits_test.npz"
    common = ["--inception", str(weights), "--batch_size", "8"]
    cli.main(["stats", *common, "--dataset", "digits", "--split", "test", "--max_images", "8",
              "--out", str(stats)])
    meta = json.loads((tmp_path / "ref" / "digits_test.json").read_text())
    assert meta["num_images"] == 8
    assert meta["resize"] == "tf1" and meta["is_logits"] == "unbiased"  # the defaults

    images, _ = input_pipeline.load_numpy({"name": "digits", "image_size": 8}, "test")
    images = images[:8]
    feats = inception.InceptionExtractor(inception.load_inception_params(weights),
                                         batch_size=8)(images)
    acts = feats["pool3"].astype(np.float64)
    mu, sigma = fid.load_statistics(stats)
    np.testing.assert_allclose(mu, acts.mean(0), rtol=1e-6, atol=1e-7)
    centered = acts - acts.mean(0)
    np.testing.assert_allclose(sigma, centered.T @ centered / 7, rtol=1e-6, atol=1e-8)

    # Samples = the reference images: FID ~ 0. Samples = the reference images shifted by a
    # few levels: FID > 0 and equal to the closed form on their features.
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images)
    out = tmp_path / "res" / "fid.json"
    cli.main(["fid", *common, "--samples", str(samples), "--ref", str(stats), "--splits", "2",
              "--fid_method", "eigh", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["num_samples"] == 8 and result["resize"] == "tf1"
    assert abs(result["fid"]) < 1e-3 * np.trace(sigma)
    p = np.exp(feats["logits_unbiased"].astype(np.float64))
    p /= p.sum(1, keepdims=True)
    split_scores = [np.exp(np.mean(np.sum(q * np.log(q / q.mean(0)), 1))) for q in (p[:4], p[4:])]
    np.testing.assert_allclose(result["inception_score"], np.mean(split_scores), rtol=1e-5)


def test_fid_command_refuses_bad_reference_before_the_work(tmp_path, random_weights,
                                                           monkeypatch):
    from ddpm_jax.metrics import cli

    def no_features(*args, **kwargs):
        raise AssertionError("Inception features computed before the reference was checked")

    monkeypatch.setattr(fid, "array_features", no_features)
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((4, 8, 8, 1), np.uint8))
    args = ["fid", "--inception", str(random_weights), "--samples", str(samples),
            "--batch_size", "8", "--out", str(tmp_path / "fid.json")]
    nan_stats = tmp_path / "nan_stats.npz"
    fid.save_statistics(nan_stats, np.full(2048, np.nan), np.eye(2048))
    with pytest.raises(ValueError, match=r"nan_stats\.npz: mu holds 2048 NaN or inf values"):
        cli.main([*args, "--ref", str(nan_stats)])
    other = tmp_path / "pytorch_stats.npz"
    fid.save_statistics(other, np.zeros(2048), np.eye(2048), resize="pytorch")
    with pytest.raises(ValueError, match=r"pytorch_stats\.npz: made with --resize pytorch"):
        cli.main([*args, "--ref", str(other)])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"garbage\.npz is not a readable \.npz"):
        cli.main([*args, "--ref", str(garbage)])
    assert not (tmp_path / "fid.json").exists()
