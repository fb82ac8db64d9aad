"""Parity of the Flax FID Inception with pytorch-fid's InceptionV3 (random weights, no torch).

tests/fixtures/make_inception_fixture.py (run once with torch) stored pytorch-fid's outputs
for a few images and the seed of its random weights; here the same weights are regenerated
with numpy, converted, and our network must give the same pool3 features and logits.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from ddpm_jax.metrics import inception, torch_pickle

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
    extractor = inception.InceptionExtractor(params, batch_size=4, devices=jax.devices()[:4])
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


def test_resize_matrix_matches_half_pixel_bilinear():
    # 2 -> 4 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25.
    want = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(inception.resize_matrix(2, 4), want)
    np.testing.assert_allclose(inception.resize_matrix(5, 5), np.eye(5))
    m = inception.resize_matrix(32, 299)
    np.testing.assert_allclose(m.sum(1), 1.0)
    # Downsampling 4 -> 2 takes no antialiasing: sources 0.5 and 2.5.
    np.testing.assert_allclose(inception.resize_matrix(4, 2),
                               [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


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
