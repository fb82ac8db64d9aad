"""Files that are not what they should be: each gives one ValueError naming the file, fast,
and a failed write leaves the old file whole (ddpm_jax.fileio, convert, torch_pickle and the
metrics command's inputs)."""

import os
import pickle
import struct
import time

import numpy as np
import pytest

from ddpm_jax import convert, fileio
from ddpm_jax.metrics import torch_pickle

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def garbage(tmp_path):
    """A function writing 4 KiB of random bytes under a name."""
    rng = np.random.default_rng(0)

    def write(name, data=None):
        path = tmp_path / name
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
                         if data is None else data)
        return str(path)

    return write


@pytest.fixture(autouse=True)
def within_seconds(request):
    """Every error here comes at once (importing TensorFlow, when a test needs it, aside)."""
    if "official" in request.node.name:
        import tensorflow  # noqa: F401
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < 5


def _one_sentence(err, path):
    msg = str(err.value)
    assert msg.startswith(path) and "\n" not in msg and msg.endswith("."), msg


def test_npz_garbage_truncated_and_object_arrays(garbage, tmp_path):
    for data in (None, b"", b"PK\x03\x04truncated"):
        path = garbage("x.npz", data)
        with pytest.raises(ValueError, match="is not a readable .npz of uint8 images") as err:
            fileio.load_npz(path, "uint8 images")
        _one_sentence(err, path)
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="objects.npz is not a readable .npz"):
        fileio.load_npz(str(tmp_path / "objects.npz"), "arrays")
    with pytest.raises(FileNotFoundError, match="no such file"):
        fileio.load_npz(str(tmp_path / "missing.npz"), "arrays")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array"):
        fileio.load_npz(str(tmp_path / "single.npy"), "arrays")


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.npz"
    fileio.write_npz(path, a=np.arange(3))
    with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp:
        assert tmp.endswith(".npz") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["out.npz"]
    np.testing.assert_array_equal(fileio.load_npz(path, "a")["a"], np.arange(3))


def test_pth_garbage_and_truncated(garbage):
    with open(os.path.join(FIXTURES, "inception_tiny_zip.pth"), "rb") as f:
        zipped = f.read()
    with open(os.path.join(FIXTURES, "inception_tiny_legacy.pth"), "rb") as f:
        legacy = f.read()
    for data in (None, b"", zipped[:len(zipped) // 2], legacy[:len(legacy) // 2]):
        path = garbage("x.pth", data)
        with pytest.raises(ValueError, match="is not a readable PyTorch state dict") as err:
            torch_pickle.load_state_dict(path)
        _one_sentence(err, path)
    assert set(torch_pickle.load_state_dict(garbage("ok.pth", legacy)))  # the whole file reads


def test_pth_legacy_header_cannot_run_code(garbage):
    class Evil:
        def __reduce__(self):
            return (os.remove, (__file__ + ".never",))

    path = garbage("evil.pth", pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="refusing to unpickle posix.remove|refusing to "
                                         "unpickle os.remove"):
        torch_pickle.load_state_dict(path)


def test_safetensors_garbage(garbage):
    header = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    cases = {
        "only 3 bytes": b"abc",
        "exceeds the file": None,  # random bytes: a header length of ~10^18
        "not JSON": struct.pack("<Q", 4) + b"\xff\xfe{x",
        "does not fit its data_offsets": struct.pack("<Q", len(header)) + header + bytes(8),
        "malformed entry": struct.pack("<Q", 13) + b'{"a": [1, 2]}',
    }
    for reason, data in cases.items():
        path = garbage("model.safetensors", data)
        with pytest.raises(ValueError, match=f"is not a .safetensors file .*{reason}") as err:
            convert.read_safetensors(path)
        _one_sentence(err, path)
        with pytest.raises(ValueError, match="is not a .safetensors file"):
            convert.load_state_dict(path)


def test_convert_other_inputs(garbage, tmp_path):
    with pytest.raises(ValueError, match="x.npz is not a readable .npz of U-Net tensors"):
        convert.load_state_dict(garbage("x.npz"))
    with pytest.raises(ValueError, match="x.bin is not a readable PyTorch state dict"):
        convert.load_state_dict(garbage("x.bin"))
    state = convert.load_state_dict(os.path.join(FIXTURES, "inception_tiny_zip.pth"))
    assert state and all(isinstance(v, np.ndarray) for v in state.values())  # no torch needed


def test_official_checkpoint_missing_or_garbage(garbage, tmp_path):
    from ddpm_jax.unet import UNetConfig

    config = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    prefix = str(tmp_path / "model.ckpt-790000")
    with pytest.raises(ValueError, match="model.ckpt-790000: no TensorFlow checkpoint there"):
        convert.unet_params_from_official(prefix, config)
    with pytest.raises(ValueError, match="a directory without a TensorFlow 'checkpoint' file"):
        convert.unet_params_from_official(str(tmp_path), config)
    garbage("model.ckpt-790000.index")
    with pytest.raises(ValueError, match="model.ckpt-790000 is not a readable TensorFlow "
                                         "checkpoint") as err:
        convert.unet_params_from_official(prefix, config)
    _one_sentence(err, prefix)


def test_metrics_commands_check_their_npz_inputs_first(garbage, tmp_path):
    from ddpm_jax.metrics import cli

    bad = garbage("samples.npz")
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, mu=np.zeros(2), sigma=np.eye(2))
    missing_inception = str(tmp_path / "no_inception.pth")  # read only after the checks
    with pytest.raises(ValueError, match="samples.npz is not a readable .npz of uint8 images"):
        cli.main(["fid", "--inception", missing_inception, "--samples", bad, "--ref", ref])
    images = str(tmp_path / "images.npz")
    np.savez(images, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="ref_garbage.npz is not a readable .npz of a "
                                         "statistics file with arrays mu"):
        cli.main(["fid", "--inception", missing_inception, "--samples", images,
                  "--ref", garbage("ref_garbage.npz")])
    with pytest.raises(ValueError, match="samples.npz is not a readable .npz of uint8 images"):
        cli.main(["stats", "--inception", missing_inception, "--images", bad,
                  "--out", str(tmp_path / "stats.npz")])


class _PixelFeatures:
    """A stand-in for the Inception extractor: 4 pixel values as features, flat logits."""

    batch_size = 8

    def __call__(self, images):
        x = images.reshape(len(images), -1)[:, :4].astype(np.float32)
        return {"pool3": x, "logits_unbiased": np.zeros((len(images), 3), np.float32)}


def test_fid_rebuilds_a_garbage_reference_cache(garbage, tmp_path, monkeypatch, capsys):
    from ddpm_jax.metrics import cli, fid

    monkeypatch.setattr(cli, "_extractor", lambda args: _PixelFeatures())
    rng = np.random.default_rng(1)
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8))
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8))
    cache = garbage("ref_inception_stats_tf1.npz")
    args = ["fid", "--inception", "unused.pth", "--samples", str(samples), "--ref", str(ref),
            "--splits", "1", "--fid_method", "eigh"]
    first = cli.main(args)
    err = capsys.readouterr().err
    assert "ref_inception_stats_tf1.npz is not a readable .npz" in err and "again" in err
    mu, sigma = fid.load_statistics(cache)  # rebuilt
    with np.load(ref) as f:
        feats = f["images"].reshape(6, -1)[:, :4].astype(np.float64)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-6)
    assert cli.main(args)["fid"] == first["fid"]  # from the cache now
    assert "again" not in capsys.readouterr().err
