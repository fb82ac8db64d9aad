"""Tests for ddpm_jax.input_pipeline: in-memory sources, tfds on mock data, errors."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from ddpm_jax import input_pipeline as ip

DIGITS = {"name": "digits", "image_size": 8, "channels": 1, "random_flip": False}


def _take(it, n):
    return list(itertools.islice(it, n))


def _stream(cfg, n, **kwargs):
    kwargs = {"batch_size": 16, "train": True, "seed": 0, "process_index": 0,
              "process_count": 1, **kwargs}
    return _take(ip.create_input_iter(cfg, **kwargs), n)


def _sorted_rows(images):
    flat = images.reshape(len(images), -1)
    return flat[np.lexsort(flat.T[::-1])]


def _digits_expected():
    """Independent float64 construction of the digits images (0..16 -> 0..255)."""
    d = load_digits()
    images = np.round(d.images.astype(np.float64) / 16.0 * 255.0).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int32)


# ----------------------------------------------------------------------------
# digits


def test_digits_arrays_match_sklearn_scaled():
    images, labels = _digits_expected()
    train_x, train_y = ip.load_numpy(DIGITS, "train")
    test_x, test_y = ip.load_numpy(DIGITS, "test")
    np.testing.assert_array_equal(np.concatenate([train_x, test_x]), images)
    np.testing.assert_array_equal(np.concatenate([train_y, test_y]), labels)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
    assert len(train_x) == ip.num_examples(DIGITS, "train") == 1500
    assert ip.num_examples(DIGITS, "test") == 297
    assert train_x.max() == 255 and train_x.min() == 0


def test_digits_train_batches_shapes_and_range():
    batches = _stream(dict(DIGITS, random_flip=True), 3, batch_size=32)
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (32, 8, 8, 1) and b["image"].dtype == np.uint8
        assert b["label"].shape == (32,) and b["label"].dtype == np.int32
        assert 0 <= b["label"].min() and b["label"].max() <= 9
    allx = np.concatenate([b["image"] for b in batches])
    assert allx.max() == 255


def test_digits_resized_to_image_size():
    b = _stream(dict(DIGITS, image_size=16), 1)[0]
    assert b["image"].shape == (16, 16, 16, 1)


def test_same_seed_same_stream_other_seed_differs():
    a = _stream(dict(DIGITS, random_flip=True), 4, seed=3)
    b = _stream(dict(DIGITS, random_flip=True), 4, seed=3)
    c = _stream(dict(DIGITS, random_flip=True), 4, seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c, strict=True))


def test_two_processes_disjoint_and_cover_an_epoch():
    # 1500 train digits, 2 processes x 75 = 150 per global step: 10 steps = one epoch.
    per_proc = [_stream(DIGITS, 10, batch_size=75, process_index=p, process_count=2)
                for p in (0, 1)]
    assert not np.array_equal(per_proc[0][0]["image"], per_proc[1][0]["image"])
    seen = np.concatenate([b["image"] for bs in per_proc for b in bs])
    seen_labels = np.concatenate([b["label"] for bs in per_proc for b in bs])
    images, labels = ip.load_numpy(DIGITS, "train")
    np.testing.assert_array_equal(_sorted_rows(seen), _sorted_rows(images))
    np.testing.assert_array_equal(np.bincount(seen_labels, minlength=10),
                                  np.bincount(labels, minlength=10))


def test_npz_ids_each_epoch_is_a_permutation_split_across_processes(tmp_path):
    n = 24
    images = np.zeros((n, 4, 4, 3), np.uint8)
    path = tmp_path / "ids.npz"
    np.savez(path, images=images, labels=np.arange(n))
    cfg = {"name": "npz", "path": str(path), "image_size": 4, "channels": 3}
    # 3 processes x 4 = 12 per global step: epochs end after steps 2 and 4.
    ids = np.stack([[b["label"] for b in _stream(cfg, 6, batch_size=4, process_index=p,
                                                  process_count=3)] for p in range(3)])
    # ids[p, step] -> [4]; global order of a step is process 0, 1, 2.
    stream = ids.transpose(1, 0, 2).reshape(-1)
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(stream[epoch * n:(epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    # The global stream does not depend on the number of processes.
    single = np.concatenate([b["label"] for b in _stream(cfg, 6, batch_size=12)])
    np.testing.assert_array_equal(single, stream)


@pytest.mark.parametrize("process_index", [0, 1])
def test_start_step_resumes_the_stream(process_index):
    cfg = dict(DIGITS, random_flip=True)
    kw = {"batch_size": 64, "process_index": process_index, "process_count": 2, "seed": 7}
    full = _stream(cfg, 16, **kw)  # 128 per global step: crosses the epoch at 1500
    resumed = _stream(cfg, 6, start_step=10, **kw)
    for x, y in zip(full[10:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def _check_flips(flipped, plain):
    """Each flipped image is its plain twin or np.flip of it along W; both occur."""
    x = np.concatenate([b["image"] for b in flipped])
    u = np.concatenate([b["image"] for b in plain])
    mirrored = np.flip(u, axis=2)
    same = np.all(x == u, axis=(1, 2, 3))
    mirror = np.all(x == mirrored, axis=(1, 2, 3))
    assert np.all(same | mirror)
    asym = ~np.all(u == mirrored, axis=(1, 2, 3))
    frac = np.mean(mirror[asym])
    assert 0.3 < frac < 0.7, frac


def test_random_flip_flips_half_of_the_images():
    _check_flips(_stream(dict(DIGITS, random_flip=True), 20, seed=5),
                 _stream(dict(DIGITS, random_flip=False), 20, seed=5))


def test_eval_covers_each_example_once_with_padded_last_batch():
    images, labels = ip.load_numpy(DIGITS, "test")  # 297 examples
    got_x, got_y, counts = [], [], []
    for p in (0, 1):
        batches = list(ip.create_input_iter(DIGITS, batch_size=40, train=False, seed=0,
                                            process_index=p, process_count=2))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (40, 8, 8, 1) and b["mask"].dtype == bool
            assert np.all(b["image"][~b["mask"]] == 0)
            got_x.append(b["image"][b["mask"]])
            got_y.append(b["label"][b["mask"]])
    # 297 = 149 + 148: ceil(149 / 40) = 4 batches on both processes.
    assert counts == [4, 4]
    np.testing.assert_array_equal(np.concatenate(got_x), images)
    np.testing.assert_array_equal(np.concatenate(got_y), labels)


def test_eval_single_process_partial_last_batch():
    batches = list(ip.create_input_iter(DIGITS, batch_size=100, train=False, seed=0,
                                        process_index=0, process_count=1))
    assert [int(b["mask"].sum()) for b in batches] == [100, 100, 97]
    assert np.all(batches[-1]["mask"][:97]) and not np.any(batches[-1]["mask"][97:])


# ----------------------------------------------------------------------------
# npz and image folder


def test_npz_first_array_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    np.savez(path, images)
    x, y = ip.load_numpy({"name": "npz", "path": str(path), "image_size": 6, "channels": 3})
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, np.zeros(5, np.int32))


def test_npz_center_crop_and_resize(tmp_path):
    # 6 x 10 images whose central 6 x 6 square is constant; the outer columns are not.
    images = np.full((2, 6, 10, 1), 255, np.uint8)
    images[0, :, 2:8] = 40
    images[1, :, 2:8] = 200
    path = tmp_path / "wide.npz"
    np.savez(path, images=images[..., 0], labels=np.array([3, 4]))
    cfg = {"name": "npz", "path": str(path), "image_size": 3, "channels": 1}
    x, y = ip.load_numpy(cfg)
    assert x.shape == (2, 3, 3, 1)
    np.testing.assert_array_equal(x[0], np.full((3, 3, 1), 40))
    np.testing.assert_array_equal(x[1], np.full((3, 3, 1), 200))
    np.testing.assert_array_equal(y, [3, 4])


def test_npz_bad_dtype_or_channels(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ip.load_numpy({"name": "npz", "path": str(path), "image_size": 4, "channels": 3})
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        ip.load_numpy({"name": "npz", "path": str(path), "image_size": 4, "channels": 1})


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    arrays = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    Image.fromarray(arrays[1]).save(tmp_path / "b.PNG")
    Image.fromarray(arrays[2]).save(tmp_path / "sub" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = {"name": "image_folder", "path": str(tmp_path), "image_size": 8, "channels": 3,
           "random_flip": True}
    x, y = ip.load_numpy(cfg)
    np.testing.assert_array_equal(x, arrays)  # sorted by path: a, b, sub/c
    np.testing.assert_array_equal(y, np.zeros(3, np.int32))
    gray, _ = ip.load_numpy(dict(cfg, channels=1, image_size=4))
    assert gray.shape == (3, 4, 4, 1) and gray.dtype == np.uint8
    b = _stream(cfg, 2, batch_size=5)
    assert b[0]["image"].shape == (5, 8, 8, 3)


def test_image_folder_missing_or_empty(tmp_path):
    cfg = {"name": "image_folder", "path": str(tmp_path), "image_size": 8, "channels": 3}
    with pytest.raises(FileNotFoundError, match="no .png"):
        ip.load_numpy(cfg)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ip.load_numpy(dict(cfg, path=str(tmp_path / "nope")))


# ----------------------------------------------------------------------------
# tfds (mock data: random examples, no download)


@pytest.fixture
def mock_cifar(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # Mocked data sets are generated on the fly; let the prepared-data check pass.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=10):
        yield {"name": "cifar10", "image_size": 32, "channels": 3,
               "data_dir": str(tmp_path), "random_flip": False, "shuffle_buffer": 10}


def test_tfds_train_stream(mock_cifar):
    kw = {"batch_size": 4, "seed": 2}
    full = _stream(mock_cifar, 6, **kw)  # 10 examples per pass: batches cross passes
    for b in full:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32
    again = _stream(mock_cifar, 6, **kw)
    resumed = _stream(mock_cifar, 3, start_step=3, **kw)
    for x, y in zip(full, again, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    for x, y in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    # The first 10 examples (one pass) are the 10 examples of the split, shuffled.
    import tensorflow_datasets as tfds

    ds = tfds.builder("cifar10", data_dir=mock_cifar["data_dir"]).as_dataset(split="train")
    raw = np.stack([ex["image"] for ex in tfds.as_numpy(ds)])
    stream = np.concatenate([b["image"] for b in full])
    first, second = stream[:10], stream[10:20]
    np.testing.assert_array_equal(_sorted_rows(first), _sorted_rows(raw))
    np.testing.assert_array_equal(_sorted_rows(second), _sorted_rows(raw))
    assert not np.array_equal(first, raw)
    assert not np.array_equal(first, second)  # each pass has its own order


def test_tfds_random_flip(mock_cifar):
    _check_flips(_stream(dict(mock_cifar, random_flip=True), 25, seed=1),
                 _stream(mock_cifar, 25, seed=1))


def test_tfds_resize_for_other_image_size(mock_cifar):
    b = _stream(dict(mock_cifar, image_size=16), 1, batch_size=2)[0]
    assert b["image"].shape == (2, 16, 16, 3)


def test_tfds_eval_one_padded_pass(mock_cifar):
    import tensorflow_datasets as tfds

    ds = tfds.builder("cifar10", data_dir=mock_cifar["data_dir"]).as_dataset(split="test")
    raw = list(tfds.as_numpy(ds))
    batches = list(ip.create_input_iter(mock_cifar, batch_size=4, train=False, seed=0,
                                        process_index=0, process_count=1))
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]),
                                  np.stack([ex["image"] for ex in raw]))
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                  np.array([ex["label"] for ex in raw]))


# ----------------------------------------------------------------------------
# tfds on real files: a tiny data set written under the name cifar10 (no download)


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (22, 32, 32, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)}
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10),
    })
    splits = {name: tf.data.Dataset.from_tensor_slices(
        {"id": [f"{name}{i}" for i in range(len(x))], "image": x, "label": np.arange(len(x)) % 10})
        for name, x in arrays.items()}
    tfds.dataset_builders.TfDataBuilder(
        name="cifar10", version="3.0.2", split_datasets=splits, features=features,
        data_dir=str(data_dir), description="fake").download_and_prepare()
    cfg = {"name": "cifar10", "image_size": 32, "channels": 3, "data_dir": str(data_dir),
           "random_flip": True, "shuffle_buffer": 1000}
    return cfg, arrays


def test_tfds_files_two_processes_shard_and_resume(fake_cifar):
    cfg, arrays = fake_cifar
    assert ip.num_examples(cfg, "train") == 22 and ip.num_examples(cfg, "test") == 9
    plain = dict(cfg, random_flip=False)
    firsts = []
    for p in (0, 1):  # 11 examples per process: a pass ends inside batch 3
        kw = {"batch_size": 4, "seed": 9, "process_index": p, "process_count": 2}
        stream = np.concatenate([b["image"] for b in _stream(plain, 6, **kw)])
        first, second = stream[:11], stream[11:22]
        np.testing.assert_array_equal(_sorted_rows(first), _sorted_rows(second))
        assert not np.array_equal(first, second)
        firsts.append(first)
        full = _stream(cfg, 6, **kw)
        resumed = _stream(cfg, 3, start_step=3, **kw)
        for x, y in zip(full[3:], resumed, strict=True):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])
    # The two shards are disjoint and together hold the whole split.
    np.testing.assert_array_equal(_sorted_rows(np.concatenate(firsts)),
                                  _sorted_rows(arrays["train"]))


def test_tfds_files_eval_two_processes(fake_cifar):
    cfg, arrays = fake_cifar
    got, counts = [], []
    for p in (0, 1):  # 9 = 5 + 4 examples: 2 batches of 4 on both processes
        batches = list(ip.create_input_iter(cfg, batch_size=4, train=False, seed=0,
                                            process_index=p, process_count=2))
        counts.append([int(b["mask"].sum()) for b in batches])
        got += [b["image"][b["mask"]] for b in batches]
    assert counts == [[4, 1], [4, 0]]
    np.testing.assert_array_equal(_sorted_rows(np.concatenate(got)), _sorted_rows(arrays["test"]))


def test_tfds_files_lsun_center_crop_and_resize(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    # Gray 40 x 56 JPEGs: the central 40 x 40 square (columns 8..47, on JPEG block
    # edges) is one value per image, the 8 columns on each side are 250.
    values = np.array([30, 90, 160], np.uint8)
    images = np.full((3, 40, 56, 3), 250, np.uint8)
    images[:, :, 8:48] = values[:, None, None, None]
    split = tf.data.Dataset.from_tensor_slices({"id": ["a", "b", "c"], "image": images})
    features = tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                           "image": tfds.features.Image(encoding_format="jpeg")})
    tfds.dataset_builders.TfDataBuilder(
        name="lsun", config="cat", version="3.1.0", split_datasets={"train": split},
        features=features, data_dir=str(tmp_path), description="fake").download_and_prepare()
    cfg = {"name": "lsun_cat", "image_size": 20, "channels": 3, "data_dir": str(tmp_path)}
    for size in (20, 40):  # resampled, and cropped only
        batch = next(ip.create_input_iter(dict(cfg, image_size=size), batch_size=3, train=False,
                                          seed=0, process_index=0, process_count=1))
        assert batch["image"].shape == (3, size, size, 3) and batch["image"].dtype == np.uint8
        np.testing.assert_array_equal(batch["label"], np.zeros(3, np.int32))
        got = np.sort(batch["image"].reshape(3, -1).astype(int).mean(axis=1))
        np.testing.assert_allclose(got, values, atol=2)
        assert np.ptp(batch["image"].reshape(3, -1), axis=1).max() <= 6  # no 250 border left


# ----------------------------------------------------------------------------
# errors


def test_missing_tfds_data_names_the_fix(tmp_path):
    cfg = {"name": "cifar10", "image_size": 32, "channels": 3, "data_dir": str(tmp_path)}
    with pytest.raises(FileNotFoundError) as err:
        ip.create_input_iter(cfg, batch_size=4, train=True, seed=0, process_index=0,
                             process_count=1)
    assert f"tfds build cifar10 --data_dir={tmp_path}" in str(err.value)
    assert os.listdir(tmp_path) == []  # nothing downloaded or created
    hq = dict(cfg, name="celeb_a_hq", image_size=256)
    with pytest.raises(FileNotFoundError, match="data256x256.tar"):
        ip.num_examples(hq)
    lsun = dict(cfg, name="lsun_bedroom", image_size=256)
    with pytest.raises(FileNotFoundError, match="tfds build lsun/bedroom"):
        ip.create_input_iter(lsun, batch_size=4, train=False, seed=0, process_index=0,
                             process_count=1)


def test_bad_config_and_arguments():
    with pytest.raises(ValueError, match="digits, cifar10"):
        ip.create_input_iter(dict(DIGITS, name="mnist"), batch_size=4, train=True, seed=0)
    with pytest.raises(ValueError, match="data.channels"):
        ip.create_input_iter(dict(DIGITS, channels=3), batch_size=4, train=True, seed=0)
    with pytest.raises(ValueError, match="data.image_size"):
        ip.create_input_iter(dict(DIGITS, image_size=0), batch_size=4, train=True, seed=0)
    with pytest.raises(ValueError, match="data.path"):
        ip.create_input_iter({"name": "npz", "image_size": 8}, batch_size=4, train=True, seed=0)
    with pytest.raises(ValueError, match="split"):
        ip.create_input_iter(DIGITS, batch_size=4, train=False, seed=0, split="validation",
                             process_index=0, process_count=1)
    with pytest.raises(ValueError, match="batch_size"):
        ip.create_input_iter(DIGITS, batch_size=0, train=True, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        ip.create_input_iter(DIGITS, batch_size=4, train=True, seed=0, process_index=2,
                             process_count=2)
    with pytest.raises(ValueError, match="start_step"):
        ip.create_input_iter(DIGITS, batch_size=4, train=False, seed=0, start_step=3)


def test_config_dict_and_default_process():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(dict(DIGITS, path="", data_dir="", shuffle_buffer=1000))
    b = next(ip.create_input_iter(cfg, batch_size=8, train=True, seed=0))
    assert b["image"].shape == (8, 8, 8, 1)
    assert ip.default_eval_split(cfg) == "test"
    assert ip.default_eval_split(dict(cfg.to_dict(), name="lsun_cat", channels=3)) == "train"


def test_import_does_not_load_tensorflow():
    code = ("import sys, ddpm_jax.input_pipeline as ip; "
            "next(ip.create_input_iter({'name': 'digits', 'image_size': 8}, batch_size=2, "
            "train=True, seed=0, process_index=0, process_count=1)); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=120)
