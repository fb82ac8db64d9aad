"""Tests of the Flax FID Inception: parity with pytorch-fid, the two input resizes, weights.

tests/fixtures/make_inception_fixture.py (run once with torch) stored pytorch-fid's outputs
for a few images and the seed of its random weights; here the same weights are regenerated
with numpy, converted, and our network (with pytorch-fid's resize) must give the same pool3
features and logits. The "tf1" resize is checked against TensorFlow's own op, the "pytorch"
one against an independent float64 formula.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from ddpm_jax.metrics import fid, inception, torch_pickle

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fixture_module():
    spec = importlib.util.spec_from_file_location(
        "make_inception_fixture", os.path.join(FIXTURES, "make_inception_fixture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(FIXTURES, "inception_fixture.npz")) as f:
        data = {k: f[k] for k in f.files}
    keys = [str(k) for k in data["keys"]]
    shapes = json.loads(str(data["shapes"]))
    state_dict = _fixture_module().random_state_dict(keys, shapes, int(data["seed"]))
    return data, state_dict


def test_features_match_pytorch_fid(reference):
    data, state_dict = reference
    params = inception.convert_state_dict(state_dict)
    extractor = inception.InceptionExtractor(params, batch_size=4, devices=jax.devices()[:4],
                                             resize="pytorch")
    assert extractor.batch_size == 4
    out = extractor(data["images"])
    for name in ("pool3", "logits"):
        ref = data[name].astype(np.float64)
        err = np.max(np.abs(out[name] - ref)) / np.max(np.abs(ref))
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
    assert out["pool3"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    # The Inception Score's logits are pool3 @ W, without the bias.
    np.testing.assert_allclose(out["logits"] - out["logits_unbiased"],
                               np.broadcast_to(state_dict["fc.bias"], (3, 1008)), atol=2e-5)

    # fid.image_features hands the Inception Score the unbiased logits by default; the two
    # choices differ by exactly the final layer's bias. (A stand-in replays the network's
    # outputs, so the network runs once.)
    class Replay:
        batch_size = 4

        def __call__(self, images):
            assert images.shape == data["images"].shape
            return out

    default = fid.array_features(Replay(), data["images"])
    biased = fid.array_features(Replay(), data["images"], is_logits="biased")
    np.testing.assert_array_equal(default["logits"], out["logits_unbiased"])
    np.testing.assert_array_equal(biased["logits"], out["logits"])
    np.testing.assert_array_equal(biased["pool3"], default["pool3"])
    np.testing.assert_allclose(biased["logits"] - default["logits"],
                               np.broadcast_to(state_dict["fc.bias"], (3, 1008)), atol=2e-5)
    with pytest.raises(ValueError, match="is_logits"):
        fid.array_features(Replay(), data["images"], is_logits="softmax")


def test_resize_matrix_matches_half_pixel_bilinear():
    # 2 -> 4 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25.
    want = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(inception.resize_matrix(2, 4, "pytorch"), want)
    np.testing.assert_allclose(inception.resize_matrix(5, 5, "pytorch"), np.eye(5))
    m = inception.resize_matrix(32, 299, "pytorch")
    np.testing.assert_allclose(m.sum(1), 1.0)
    # Downsampling 4 -> 2 takes no antialiasing: sources 0.5 and 2.5.
    np.testing.assert_allclose(inception.resize_matrix(4, 2, "pytorch"),
                               [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


def test_resize_matrix_tf1_has_no_half_pixel_offset():
    # 2 -> 4 in TensorFlow 1: sources 0, 0.5, 1, 1.5 (the last clamped to the border pixel).
    want = np.array([[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    np.testing.assert_allclose(inception.resize_matrix(2, 4, "tf1"), want)
    np.testing.assert_allclose(inception.resize_matrix(2, 4), want)  # the default
    # Downsampling 4 -> 2: sources 0 and 2, i.e. plain subsampling.
    np.testing.assert_allclose(inception.resize_matrix(4, 2, "tf1"),
                               [[1, 0, 0, 0], [0, 0, 1, 0]])
    with pytest.raises(ValueError, match="resize must be one of"):
        inception.resize_matrix(2, 4, "area")


def _images(rng, shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 8, 8, 1), (1, 7, 12, 3), (1, 333, 310, 3)])
def test_tf1_preprocess_matches_tensorflow_resize_bilinear(shape):
    """"tf1" = TF1's ResizeBilinear (no half-pixel centres) of [0, 255], then (x - 128) / 128.

    The reference is TensorFlow's own kernel, as the 2015-12-05 graph (fed at ExpandDims by the
    TTUR and Inception Score code) and TF-GAN's preprocess_image run it.
    """
    import tensorflow as tf

    images = _images(np.random.default_rng(sum(shape)), shape)
    rgb = np.repeat(images, 3, axis=-1) if shape[-1] == 1 else images
    want = tf.compat.v1.image.resize_bilinear(
        rgb.astype(np.float32), [299, 299], align_corners=False, half_pixel_centers=False)
    want = (want.numpy().astype(np.float64) - 128.0) / 128.0
    got = np.asarray(jax.jit(inception.preprocess, static_argnums=1)(images, "tf1"))
    assert got.shape == want.shape == (shape[0], 299, 299, 3)
    # Same weights; the sums are float32 in a different order.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(inception.preprocess(images)), got, atol=1e-6)  # default


def _half_pixel_bilinear_float64(images: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent float64 bilinear resize with half-pixel centres, per output pixel.

    The formula of ``torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bilinear",
    align_corners=False)`` (antialias off), which pytorch-fid applies to x / 255 in [0, 1]:
    source coordinate ``s = max((d + 0.5) * in / out - 0.5, 0)``, neighbours ``floor(s)`` and
    ``min(floor(s) + 1, in - 1)``, weights ``1 - frac(s)`` and ``frac(s)``, first along rows
    and then along columns.
    """
    x = images.astype(np.float64)
    n, in_h, in_w, c = x.shape
    out = np.empty((n, out_h, out_w, c))
    for oy in range(out_h):
        sy = max((oy + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = int(np.floor(sy))
        y1, ly = min(y0 + 1, in_h - 1), sy - np.floor(sy)
        for ox in range(out_w):
            sx = max((ox + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = int(np.floor(sx))
            x1, lx = min(x0 + 1, in_w - 1), sx - np.floor(sx)
            out[:, oy, ox] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                              + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
    return out


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 7, 12, 1)])
def test_pytorch_preprocess_matches_half_pixel_formula(shape):
    images = _images(np.random.default_rng(sum(shape)), shape)
    rgb = np.repeat(images, 3, axis=-1) if shape[-1] == 1 else images
    want = 2.0 * _half_pixel_bilinear_float64(rgb / 255.0, 299, 299) - 1.0
    got = np.asarray(jax.jit(inception.preprocess, static_argnums=1)(images, "pytorch"))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # The two resizes really differ (by up to half a source pixel's shift).
    tf1 = np.asarray(inception.preprocess(images, "tf1"))
    assert np.max(np.abs(tf1 - got)) > 0.1


def test_convert_state_dict_rejects_wrong_keys_and_shapes(reference):
    _, state_dict = reference
    partial = dict(state_dict)
    partial.pop("fc.bias")
    with pytest.raises(ValueError, match="missing"):
        inception.convert_state_dict(partial)
    extra = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="unexpected"):
        inception.convert_state_dict(extra)
    bad = dict(state_dict, **{"fc.bias": np.zeros(1000, np.float32)})
    with pytest.raises(ValueError, match="fc.bias"):
        inception.convert_state_dict(bad)


def test_load_inception_params_caches_npz_beside_pth(reference, tmp_path, monkeypatch):
    _, state_dict = reference
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    pth.write_bytes(b"stand-in")
    reads = []
    monkeypatch.setattr(torch_pickle, "load_state_dict",
                        lambda path: reads.append(path) or dict(state_dict))
    params = inception.load_inception_params(pth)
    cache = tmp_path / "pt_inception-2015-12-05-6726825d.npz"
    assert cache.exists() and len(reads) == 1
    again = inception.load_inception_params(pth)  # from the cache, not the .pth
    assert len(reads) == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
    with pytest.raises(ValueError, match="not found"):
        inception.load_inception_params(tmp_path / "missing.pth")


def _cached_hash(cache):
    with np.load(cache) as f:
        return str(f[inception.SOURCE_HASH_KEY]) if inception.SOURCE_HASH_KEY in f.files else None


def test_stale_or_garbage_weights_cache_is_rebuilt(reference, tmp_path, monkeypatch, capsys):
    import hashlib

    _, state_dict = reference
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    cache = tmp_path / "pt_inception-2015-12-05-6726825d.npz"
    reads = []
    # The stand-in reader returns weights that depend on the .pth bytes, so a stale cache shows.
    monkeypatch.setattr(torch_pickle, "load_state_dict", lambda path: reads.append(path) or dict(
        state_dict, **{"fc.bias": np.full(1008, len(open(path, "rb").read()), np.float32)}))

    pth.write_bytes(b"first")
    inception.load_inception_params(pth)
    assert _cached_hash(cache) == hashlib.sha256(b"first").hexdigest() and len(reads) == 1

    # The .pth changed after the cache was made (a new download, another file of that name):
    # the cache no longer matches and is rebuilt from the new bytes.
    pth.write_bytes(b"second, longer")
    params = inception.load_inception_params(pth)
    assert len(reads) == 2 and "rebuilding" in capsys.readouterr().err
    np.testing.assert_array_equal(params["fc"]["bias"], np.full(1008, 14.0))
    assert _cached_hash(cache) == hashlib.sha256(b"second, longer").hexdigest()
    inception.load_inception_params(pth)
    assert len(reads) == 2  # now it matches

    # A cache without a recorded source (older format), and a garbage one: rebuilt as well.
    np.savez(cache, **state_dict)
    inception.load_inception_params(pth)
    assert len(reads) == 3 and _cached_hash(cache) is not None
    cache.write_bytes(b"\x00garbage" * 10)
    params = inception.load_inception_params(pth)
    assert len(reads) == 4
    np.testing.assert_array_equal(params["fc"]["bias"], np.full(1008, 14.0))
    assert not list(tmp_path.glob("*.tmp*"))


def test_garbage_weights_files_name_the_file(tmp_path):
    garbage = tmp_path / "weights.npz"
    garbage.write_bytes(b"not an npz at all")
    with pytest.raises(ValueError, match=r"weights\.npz is not a readable \.npz of "
                                         r"Inception weights: pytorch-fid's"):
        inception.load_inception_params(garbage)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"fc.weight": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match=r"pickled\.npz is not a readable \.npz of Incep"):
        inception.load_inception_params(pickled)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(ValueError, match=r"foreign\.npz: Not a pytorch-fid FID Inception"):
        inception.load_inception_params(foreign)

    rng = np.random.default_rng(0)
    for name, data in [("empty.pth", b""), ("random.pth", rng.bytes(4096)),
                       ("text.pth", b"<html>404 Not Found</html>"),
                       ("truncated.pth", open(os.path.join(
                           FIXTURES, "inception_tiny_zip.pth"), "rb").read()[:300])]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name} is not a readable PyTorch state dict"):
            inception.load_inception_params(path)
        assert not (tmp_path / name.replace(".pth", ".npz")).exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_free_pth_reader(fmt):
    sd = torch_pickle.load_state_dict(os.path.join(FIXTURES, f"inception_tiny_{fmt}.pth"))
    with np.load(os.path.join(FIXTURES, "inception_tiny_expected.npz")) as want:
        assert list(sd) == list(want.files)
        for k in want.files:
            assert sd[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


def test_torch_pickle_refuses_foreign_globals(tmp_path):
    import pickle
    import zipfile

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": os.getcwd}))
    with pytest.raises(ValueError, match="refusing"):
        torch_pickle.load_state_dict(path)


def test_extractor_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        inception.InceptionExtractor({}, batch_size=0)
    extractor = inception.InceptionExtractor({}, batch_size=3)
    assert extractor.batch_size == 8  # rounded up to the 8 devices
    with pytest.raises(ValueError, match="C in"):
        extractor(np.zeros((2, 8, 8, 4), np.uint8))
