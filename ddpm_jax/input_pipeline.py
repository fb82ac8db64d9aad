"""Input pipelines: uint8 NHWC batches for one process.

Sources (``config.data.name``):

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped
  with scikit-learn, no download). Pixel values 0..16 become
  ``round(v * 255 / 16)``, so 16 maps to 255; label = digit. Split ``"train"``
  is the first 1,500 images, ``"test"`` the last 297.
* ``"cifar10"``: tfds ``cifar10`` (32x32).
* ``"celeb_a_hq"``: tfds ``celeb_a_hq/256`` (manual download; train only).
* ``"lsun_church"``, ``"lsun_bedroom"``, ``"lsun_cat"``: tfds
  ``lsun/church_outdoor``, ``lsun/bedroom``, ``lsun/cat``. The images come in
  various sizes; like the reference data preparation (StyleGAN2's
  ``dataset_tool.py create_lsun``, which the DDPM authors used) each image is
  cropped to the central square of side ``min(H, W)`` and resized to
  ``image_size`` with an antialiased Lanczos filter (``tf.image.resize`` with
  ``lanczos3``; the reference used PIL's Lanczos, so pixels may differ by one
  or two levels). An image whose central square already has side
  ``image_size`` is not resampled.
* ``"image_folder"``: every ``.png``/``.jpg``/``.jpeg`` under ``data.path``
  (recursively, sorted by path), center-cropped and resized the same way,
  label 0.
* ``"npz"``: an ``.npz`` file at ``data.path`` holding a uint8 ``[N, H, W, C]``
  (or ``[N, H, W]``) array under key ``"images"`` (else its first array) and
  optionally int ``[N]`` ``"labels"``.

The last three load the whole split into host memory (use tfds for data sets
that do not fit). Every source goes through the same center-crop-and-resize
when its images are not ``image_size`` square.

Training streams (``train=True``) are infinite, shuffled, randomly flipped
left-right when ``data.random_flip``, cut into full batches, and deterministic:
the same arguments give the same batches in every run.
``start_step=k`` yields exactly the batches a fresh iterator would yield from
its k-th batch on:

* In-memory sources: the examples form one global stream, epoch after epoch,
  each epoch a permutation (and a set of flip decisions) drawn from
  ``SeedSequence([seed, epoch])``. Global batch ``j`` holds stream positions
  ``[j * G, (j + 1) * G)`` with ``G = batch_size * process_count``, and process
  ``p`` takes the ``p``-th slice of ``batch_size`` of them. The processes thus
  read disjoint examples, cover each epoch together, and the global stream
  does not depend on how it is split across processes. Resuming costs nothing.
* tfds sources: each process reads its own shard
  (``tfds.split_for_jax_process``). Each pass over the shard is shuffled with
  a buffer of ``data.shuffle_buffer`` encoded examples, seeded by
  (seed, process_index, epoch); flips are drawn from the same seed and the
  position in the pass. Resuming starts directly at the right pass and skips
  the first ``(start_step * batch_size) % shard_size`` encoded records of it
  (read, not decoded): at most one pass over the shard, e.g. a few seconds for
  CIFAR-10 and a few minutes for LSUN Bedroom.

Evaluation streams (``train=False``) make one pass in data set order, without
flips. Process ``p`` reads the ``p``-th of ``process_count`` contiguous, nearly
equal parts of the split. Every batch has exactly ``batch_size`` rows and an
extra ``"mask"`` (bool ``[B]``, True for real examples): the last batch is
padded with zero images, and every process yields the same number of batches,
``ceil(ceil(N / process_count) / batch_size)``, so fixed shapes compile once
and collectives across processes stay in step. Real examples are
``batch["image"][batch["mask"]]``.

TensorFlow is imported only when a tfds source is used, and is then kept off
GPUs and TPUs (they belong to JAX). Nothing here downloads data: a missing
tfds data set raises ``FileNotFoundError`` at once with the command that
prepares it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

DATASET_NAMES = (
    "digits",
    "cifar10",
    "celeb_a_hq",
    "lsun_church",
    "lsun_bedroom",
    "lsun_cat",
    "image_folder",
    "npz",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_SHUFFLE_BUFFER = 50_000
_DIGITS_NUM_TRAIN = 1500
_IN_MEMORY = ("digits", "image_folder", "npz")
_EPOCH_SEED_STRIDE = 1_000_003  # per-pass tf.data seed: process seed * stride + epoch

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    tfds_name: str
    native_size: int | None  # None: images of various sizes
    splits: tuple[str, ...]
    eval_split: str
    instructions: str  # how to prepare it; formatted with data_dir


_TFDS_BUILD = "  tfds build {tfds_name} --data_dir={data_dir}\n"
_LSUN_HELP = (
    "Prepare it once (needs internet, `pip install tensorflow-io`, and a large download "
    "from the LSUN servers):\n" + _TFDS_BUILD + "or copy an already prepared "
    "`{tfds_name}` folder (e.g. from a GCS bucket) into {data_dir}."
)
_TFDS_SPECS = {
    "cifar10": _TfdsSpec(
        "cifar10", 32, ("train", "test"), "test",
        "Prepare it once (needs internet, about 160 MB):\n" + _TFDS_BUILD
        + "or copy a prepared `cifar10` folder into {data_dir}.",
    ),
    "celeb_a_hq": _TfdsSpec(
        "celeb_a_hq/256", 256, ("train",), "train",
        "CelebA-HQ needs a manual download: build the 256x256 images with the "
        "progressive_growing_of_gans instructions "
        "(https://github.com/tkarras/progressive_growing_of_gans#preparing-datasets-for-training), "
        "put `data256x256.tar` into {data_dir}/downloads/manual/, then run:\n"
        "  tfds build celeb_a_hq/256 --data_dir={data_dir} "
        "--manual_dir={data_dir}/downloads/manual",
    ),
    "lsun_church": _TfdsSpec(
        "lsun/church_outdoor", None, ("train", "validation"), "validation", _LSUN_HELP
    ),
    "lsun_bedroom": _TfdsSpec(
        "lsun/bedroom", None, ("train", "validation"), "validation", _LSUN_HELP
    ),
    "lsun_cat": _TfdsSpec("lsun/cat", None, ("train",), "train", _LSUN_HELP),
}


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The validated fields of ``config.data`` that the pipelines use."""

    name: str
    image_size: int
    channels: int
    random_flip: bool = False
    path: str | None = None
    data_dir: str | None = None
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER

    @classmethod
    def from_config(cls, data_cfg: Any) -> DataSettings:
        """Reads and checks a ``config.data`` ConfigDict (or a plain dict)."""

        def get(field, default=None):
            if isinstance(data_cfg, dict):
                return data_cfg.get(field, default)
            return getattr(data_cfg, field, default)

        name = get("name")
        if name not in DATASET_NAMES:
            raise ValueError(f"data.name={name!r} is unknown; allowed: {', '.join(DATASET_NAMES)}.")
        image_size = get("image_size")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"data.image_size must be a positive int, got {image_size!r}.")
        channels = get("channels", 1 if name == "digits" else 3)
        native_channels = {"digits": 1, "image_folder": None, "npz": None}.get(name, 3)
        if channels not in (1, 3) or native_channels not in (None, channels):
            allowed = (1, 3) if native_channels is None else (native_channels,)
            raise ValueError(f"data.channels={channels!r} is not allowed for {name!r}; "
                             f"allowed: {allowed}.")
        path = get("path")
        if name in ("image_folder", "npz") and not path:
            raise ValueError(f"data.path must name the {name} to read for data.name={name!r}.")
        shuffle_buffer = get("shuffle_buffer", None) or DEFAULT_SHUFFLE_BUFFER
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be a positive int, got {shuffle_buffer!r}.")
        return cls(name=name, image_size=image_size, channels=channels,
                   random_flip=bool(get("random_flip", False)), path=path,
                   data_dir=get("data_dir") or None, shuffle_buffer=shuffle_buffer)


def default_eval_split(data_cfg: Any) -> str:
    """The held-out split of a data set ("train" where it has none)."""
    settings = DataSettings.from_config(data_cfg)
    if settings.name in _TFDS_SPECS:
        return _TFDS_SPECS[settings.name].eval_split
    return "test" if settings.name == "digits" else "train"


def num_examples(data_cfg: Any, split: str = "train") -> int:
    """Number of examples in a split, over all processes.

    In-memory sources are loaded to count them; tfds sources read their
    metadata (the data set must be prepared).
    """
    settings = DataSettings.from_config(data_cfg)
    if settings.name in _TFDS_SPECS:
        builder = _tfds_builder(settings)
        _check_split(settings.name, split)
        return int(builder.info.splits[split].num_examples)
    return len(load_numpy(data_cfg, split)[1])


def create_input_iter(
    data_cfg: Any,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str | None = None,
) -> Iterator[Batch]:
    """Batches of this process's share of the data (see the module docstring).

    Args:
      data_cfg: ``config.data`` (name, path, data_dir, image_size, channels,
        random_flip, shuffle_buffer).
      batch_size: examples per batch on this process (the per-process batch).
      train: infinite shuffled (and flipped) stream if True, else one ordered,
        padded pass.
      seed: seed of the shuffling and the flips (train only).
      start_step: number of batches to skip (train only): resumes the stream.
      process_index: this process; default ``jax.process_index()``.
      process_count: number of processes; default ``jax.process_count()``.
      split: default "train" for training, ``default_eval_split`` otherwise.

    Yields:
      Dicts of numpy arrays: ``"image"`` uint8 [B, H, W, C], ``"label"`` int32
      [B], and for ``train=False`` also ``"mask"`` bool [B].

    Raises:
      ValueError: for bad config fields or arguments.
      FileNotFoundError: when the data are missing (with how to prepare them).
    """
    settings = DataSettings.from_config(data_cfg)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative int, got {start_step!r}.")
    if not train and start_step:
        raise ValueError("start_step applies to training streams only (train=True).")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count}).")
    if split is None:
        split = "train" if train else default_eval_split(data_cfg)
    seed = int(seed) % 2**63

    if settings.name in _TFDS_SPECS:
        builder = _tfds_builder(settings)
        _check_split(settings.name, split)
        make = _tfds_train_iter if train else _tfds_eval_iter
        return make(builder, settings, split=split, batch_size=batch_size, seed=seed,
                    start_step=start_step, process_index=process_index,
                    process_count=process_count)
    images, labels = load_numpy(data_cfg, split)
    if train:
        return _array_train_iter(images, labels, batch_size=batch_size, seed=seed,
                                 start_step=start_step, process_index=process_index,
                                 process_count=process_count, random_flip=settings.random_flip)
    return _array_eval_iter(images, labels, batch_size=batch_size,
                            process_index=process_index, process_count=process_count)


# ----------------------------------------------------------------------------
# In-memory sources.


def load_numpy(data_cfg: Any, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """All examples of an in-memory source (digits, image_folder, npz).

    Returns:
      ``(images, labels)``: uint8 [N, image_size, image_size, channels] and
      int32 [N], in data set order.
    """
    settings = DataSettings.from_config(data_cfg)
    if settings.name not in _IN_MEMORY:
        raise ValueError(f"load_numpy reads {', '.join(_IN_MEMORY)}; data.name="
                         f"{settings.name!r} is a tfds source (use create_input_iter).")
    allowed = ("train", "test") if settings.name == "digits" else ("train",)
    if split not in allowed:
        raise ValueError(f"split={split!r} is not available for {settings.name!r}; "
                         f"allowed: {allowed}.")
    if settings.name == "digits":
        images, labels = _load_digits(split)
    elif settings.name == "npz":
        images, labels = _load_npz(settings.path, settings.channels)
    else:
        images, labels = _load_image_folder(settings.path, settings.channels,
                                            settings.image_size)
    images = _resize_all(images, settings.image_size)
    return images, labels


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    part = slice(None, _DIGITS_NUM_TRAIN) if split == "train" else slice(_DIGITS_NUM_TRAIN, None)
    return images[part], labels[part]


def _load_npz(path: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r}: no such .npz file.")
    with np.load(path) as archive:
        if not archive.files:
            raise ValueError(f"data.path={path!r}: the .npz file holds no arrays.")
        key = "images" if "images" in archive.files else archive.files[0]
        images = archive[key]
        labels = archive["labels"] if "labels" in archive.files else None
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
        raise ValueError(f"data.path={path!r}: array {key!r} must be uint8 [N, H, W, "
                         f"{channels}] (data.channels={channels}); got {images.dtype} "
                         f"{images.shape}.")
    if labels is None:
        labels = np.zeros(len(images), np.int32)
    elif labels.shape != (len(images),):
        raise ValueError(f"data.path={path!r}: 'labels' must have shape [{len(images)}], got "
                         f"{labels.shape}.")
    return images, labels.astype(np.int32)


def _list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data.path={folder!r}: no such folder.")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"data.path={folder!r}: no {'/'.join(IMAGE_EXTENSIONS)} files.")
    return files


def _load_image_folder(folder: str, channels: int,
                       image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    def read(file):
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            return _square_resize(np.asarray(img), image_size)

    files = _list_images(folder)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        images = np.stack(list(pool.map(read, files)))
    if images.ndim == 3:
        images = images[..., None]
    return images, np.zeros(len(files), np.int32)


def _square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Central square crop of side min(H, W), then a resize to [size, size].

    Lanczos when shrinking (as the reference LSUN preparation), bicubic when
    enlarging. [H, W] or [H, W, C] uint8 in, same rank out.
    """
    from PIL import Image

    h, w = image.shape[:2]
    c = min(h, w)
    image = image[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
    if c == size:
        return image
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    method = Image.Resampling.LANCZOS if c > size else Image.Resampling.BICUBIC
    out = np.asarray(pil.resize((size, size), method))
    return out[..., None] if squeeze else out


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([_square_resize(img, size) for img in images])


def _even_bounds(n: int, count: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` of `count` nearly equal contiguous parts."""
    base, extra = divmod(n, count)
    start = base * index + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _epoch_tables(seed: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation [n] and flip decisions bool [n] of one epoch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(n), rng.random(n) < 0.5


def _array_train_iter(images, labels, *, batch_size, seed, start_step, process_index,
                      process_count, random_flip) -> Iterator[Batch]:
    n = len(images)
    global_batch = batch_size * process_count
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    step = start_step
    while True:
        pos = step * global_batch + process_index * batch_size + np.arange(batch_size)
        epochs, offsets = np.divmod(pos, n)
        index = np.empty(batch_size, np.int64)
        flip = np.empty(batch_size, bool)
        for epoch in np.unique(epochs):
            if int(epoch) not in tables:
                if len(tables) >= 4:
                    del tables[min(tables)]
                tables[int(epoch)] = _epoch_tables(seed, int(epoch), n)
            perm, flips = tables[int(epoch)]
            rows = epochs == epoch
            index[rows] = perm[offsets[rows]]
            flip[rows] = flips[offsets[rows]]
        batch = images[index]
        if random_flip:
            batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
        yield {"image": batch, "label": labels[index]}
        step += 1


def _pad_batch(image: np.ndarray, label: np.ndarray, batch_size: int,
               example_shape: tuple[int, ...]) -> Batch:
    n = len(label)
    pad = batch_size - n
    return {
        "image": np.concatenate([image, np.zeros((pad, *example_shape), np.uint8)]),
        "label": np.concatenate([label.astype(np.int32), np.zeros(pad, np.int32)]),
        "mask": np.arange(batch_size) < n,
    }


def _num_eval_batches(n: int, batch_size: int, process_count: int) -> int:
    return math.ceil(math.ceil(n / process_count) / batch_size)


def _array_eval_iter(images, labels, *, batch_size, process_index,
                     process_count) -> Iterator[Batch]:
    start, end = _even_bounds(len(images), process_count, process_index)
    for i in range(_num_eval_batches(len(images), batch_size, process_count)):
        lo, hi = min(start + i * batch_size, end), min(start + (i + 1) * batch_size, end)
        yield _pad_batch(images[lo:hi], labels[lo:hi], batch_size, images.shape[1:])


# ----------------------------------------------------------------------------
# tfds sources.


def _import_tf():
    """Imports TensorFlow and tfds, keeping TensorFlow off accelerators."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialized, or no such kind
            pass
    return tf, tfds


def _check_split(name: str, split: str) -> None:
    allowed = _TFDS_SPECS[name].splits
    if split not in allowed:
        raise ValueError(f"split={split!r} is not available for {name!r}; allowed: {allowed}.")


def _tfds_builder(settings: DataSettings):
    """The tfds builder of a prepared data set; raises at once if not prepared."""
    _, tfds = _import_tf()
    spec = _TFDS_SPECS[settings.name]
    builder = tfds.builder(spec.tfds_name, data_dir=settings.data_dir)
    if not builder.is_prepared():
        data_dir = settings.data_dir
        if not data_dir:  # the default root: strip name[/config]/version
            data_dir = os.fspath(builder.data_path)
            for _ in range(2 + spec.tfds_name.count("/")):
                data_dir = os.path.dirname(data_dir)
        raise FileNotFoundError(
            f"Data set {settings.name!r} (tfds {spec.tfds_name!r}) is not prepared in "
            f"data.data_dir={data_dir!r} (looked for {os.fspath(builder.data_path)}). "
            + spec.instructions.format(tfds_name=spec.tfds_name, data_dir=data_dir)
            + " Then set data.data_dir to that directory (a gs:// bucket works too)."
        )
    return builder


def _split_size(builder, split: str) -> int:
    """Examples in a plain split name, from the metadata or the dataset's cardinality."""
    try:
        return int(builder.info.splits[split].num_examples)
    except KeyError:  # no split metadata: ask the dataset itself
        return _cardinality(builder.as_dataset(split=split), split)


def _cardinality(ds, split) -> int:
    size = int(ds.cardinality())
    if size < 0:
        raise ValueError(f"cannot tell the number of examples in split {split!r}.")
    return size


def _decode_fn(settings: DataSettings) -> Callable:
    """(encoded image, label) -> (uint8 [S, S, C] image, int32 label), in graph."""
    tf, _ = _import_tf()
    size, native = settings.image_size, _TFDS_SPECS[settings.name].native_size

    def resize(img):
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        c = tf.minimum(h, w)
        img = tf.image.crop_to_bounding_box(img, (h - c) // 2, (w - c) // 2, c, c)

        def resample():
            out = tf.image.resize(img, [size, size], method="lanczos3", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

        return tf.cond(tf.equal(c, size), lambda: img, resample)

    def decode(encoded, label):
        img = tf.io.decode_image(encoded, channels=settings.channels, expand_animations=False)
        if native != size:
            img = resize(img)
        img = tf.ensure_shape(img, [size, size, settings.channels])
        return img, tf.cast(label, tf.int32)

    return decode


def _encoded_dataset(builder, split: str):
    """Records of a split as (encoded image bytes, label) pairs, in file order."""
    tf, tfds = _import_tf()
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    has_label = "label" in builder.info.features
    return ds.map(lambda ex: (ex["image"], ex["label"] if has_label else tf.constant(0, tf.int64)))


def _with_options(ds):
    tf, _ = _import_tf()
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _tfds_train_iter(builder, settings, *, split, batch_size, seed, start_step,
                     process_index, process_count) -> Iterator[Batch]:
    tf, tfds = _import_tf()
    shard = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count)
    records = _encoded_dataset(builder, shard)
    shard_size = _cardinality(records, shard)
    if shard_size < 1:
        raise ValueError(f"process {process_index} of {process_count} gets no examples of "
                         f"{settings.name!r} split {split!r}.")
    process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    buffer = min(settings.shuffle_buffer, shard_size)
    decode = _decode_fn(settings)
    flip = settings.random_flip

    @tf.autograph.experimental.do_not_convert
    def one_pass(epoch):
        pass_seed = tf.constant(process_seed, tf.int64) * _EPOCH_SEED_STRIDE + epoch
        shuffled = records.shuffle(buffer, seed=pass_seed, reshuffle_each_iteration=False)
        return shuffled.enumerate().map(lambda i, ex: (pass_seed, i, ex))

    @tf.autograph.experimental.do_not_convert
    def process(pass_seed, i, ex):
        img, label = decode(*ex)
        if flip:
            u = tf.random.stateless_uniform([], seed=tf.stack([pass_seed, i]))
            img = tf.cond(u < 0.5, lambda: tf.reverse(img, axis=[1]), lambda: img)
        return {"image": img, "label": label}

    first_pass, skip = divmod(start_step * batch_size, shard_size)
    ds = tf.data.Dataset.range(first_pass, 2**62).flat_map(one_pass).skip(skip)
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(_with_options(ds)))


def _tfds_eval_iter(builder, settings, *, split, batch_size, seed, start_step,
                    process_index, process_count) -> Iterator[Batch]:
    del seed, start_step  # one ordered pass
    tf, tfds = _import_tf()
    shard = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count)
    num_batches = _num_eval_batches(_split_size(builder, split), batch_size, process_count)
    decode = tf.autograph.experimental.do_not_convert(_decode_fn(settings))
    ds = _encoded_dataset(builder, shard).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    example_shape = (settings.image_size, settings.image_size, settings.channels)

    def batches():
        done = 0
        for image, label in tfds.as_numpy(_with_options(ds)):
            yield _pad_batch(image, label, batch_size, example_shape)
            done += 1
        empty = np.zeros((0, *example_shape), np.uint8)
        for _ in range(done, num_batches):
            yield _pad_batch(empty, np.zeros(0, np.int32), batch_size, example_shape)

    return batches()
