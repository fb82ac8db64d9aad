"""The FID Inception-v3 network (the 2015-12-05 TensorFlow graph) in Flax.

This is the network that the TTUR FID code, the original Inception Score code and pytorch-fid
use, with its FID-specific blocks: average pools that do not count padding (Mixed_5*, Mixed_6b-e,
Mixed_7b) and a max pool in the last block's pooling branch (Mixed_7c). The outputs are the
2048-d pool3 features and the 1008-way logits (with and without the final bias).

Input handling, two choices (``resize=``):

* ``"tf1"`` (default): what the paper's numbers went through. The TTUR FID code and the
  original Inception Score code feed [0, 255] floats to the graph's ``ExpandDims`` input; the
  graph then resizes with TensorFlow 1's ``ResizeBilinear`` (``align_corners=False``, no
  half-pixel centres: source coordinate ``i * n_in / n_out``) to 299x299 and scales by
  ``(x - 128) / 128``. TF-GAN's ``preprocess_image`` (used by the DDPM authors' code) does the
  same resize and scaling. The scaled range is [-1, 0.9921875], not [-1, 1].
* ``"pytorch"``: pytorch-fid's ``F.interpolate(x, (299, 299), mode="bilinear",
  align_corners=False)`` (half-pixel centres: source ``(i + 0.5) * n_in / n_out - 0.5``) of
  ``x / 255``, then ``2 x - 1``. Use it to compare with statistics made by pytorch-fid.

FID between statistics made with different choices is not meaningful; ``fid.save_statistics``
records the choice and ``fid.load_statistics`` checks it.

Inception Score logits: the original code (openai/improved-gan ``inception_score/model.py``)
multiplies pool3 by the weights of ``softmax/logits/MatMul`` alone, so its logits lack the
final bias; ``"logits_unbiased"`` is that, ``"logits"`` adds the bias.

Weights: download pytorch-fid's port of the graph (about 92 MB)

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

and pass its path to ``load_inception_params``. The first call converts it to a torch-free
``.npz`` cached beside it (``pt_inception-2015-12-05-6726825d.npz``), holding the SHA-256 of
the ``.pth`` it came from; later calls read the ``.npz`` when that hash matches the ``.pth``
and rebuild it when not. The ``.pth`` is read by ``ddpm_jax.metrics.torch_pickle`` without
torch.

Every convolution and matmul runs at ``Precision.HIGHEST``: on TPU the default float32 matmul
precision would otherwise move the features (and FID) noticeably.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import builders

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


RESIZE_METHODS = ("tf1", "pytorch")
DEFAULT_RESIZE = "tf1"
# Which logits the Inception Score uses: the original code's pool3 @ W (no bias), or the layer
# with its bias.
IS_LOGITS = {"unbiased": "logits_unbiased", "biased": "logits"}
DEFAULT_IS_LOGITS = "unbiased"


def check_resize(resize: str) -> str:
    """Returns ``resize`` if it is one of ``RESIZE_METHODS``, else raises ValueError."""
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}.")
    return resize


def resize_matrix(n_in: int, n_out: int, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bilinear interpolation (no antialiasing), in float64.

    Args:
      n_in: input length.
      n_out: output length.
      resize: "tf1": TensorFlow 1's ``resize_bilinear(align_corners=False)`` without half-pixel
        centres, source coordinate ``i * n_in / n_out``, computed in float32 as TensorFlow's
        kernel does (so the weights are TensorFlow's to the bit). "pytorch": half-pixel
        centres as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
        source ``(i + 0.5) * n_in / n_out - 0.5`` clamped below at 0. In both, the upper
        neighbour is clamped at the border.
    """
    i = np.arange(n_out, dtype=np.float64)
    if check_resize(resize) == "tf1":
        scale = np.float32(n_in) / np.float32(n_out)
        src = (i.astype(np.float32) * scale).astype(np.float64)
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


def preprocess(images: jax.Array, resize: str = DEFAULT_RESIZE) -> jax.Array:
    """uint8 (or [0, 255] float) images [B, H, W, C], C in {1, 3} -> [B, 299, 299, 3].

    "tf1": resize the [0, 255] values, then ``(x - 128) / 128`` (the 2015-12-05 graph's own
    preprocessing). "pytorch": resize ``x / 255``, then ``2 x - 1`` (pytorch-fid's).
    """
    x = images.astype(jnp.float32)
    if check_resize(resize) == "pytorch":
        x = x / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    rh = jnp.asarray(resize_matrix(x.shape[1], INPUT_SIZE, resize), jnp.float32)
    rw = jnp.asarray(resize_matrix(x.shape[2], INPUT_SIZE, resize), jnp.float32)
    x = jnp.einsum("oh,bhwc,pw->bopc", rh, x, rw, precision=_HIGHEST)
    if resize == "tf1":
        return (x - 128.0) / 128.0
    return 2.0 * x - 1.0


class BatchNormInference(nn.Module):
    """Batch norm with frozen statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """Convolution without bias, frozen batch norm, ReLU (torchvision's BasicConv2d)."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                    name="conv")(x)
        return nn.relu(BatchNormInference(name="bn")(x))


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool that ignores the zero padding (TF's SAME average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e: factorised 7x7 branches."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, row[0], padding=row[1], name="branch7x7_2")(b7)
        b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        for i, (feat, (k, p)) in enumerate(
                [(c7, col), (c7, row), (c7, col), (192, row)], start=2):
            bd = BasicConv(feat, k, padding=p, name=f"branch7x7dbl_{i}")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (max pool branch, as in the FID graph)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, 1, 1)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
    """The 2048 -> 1008 softmax layer; returns logits with and without its bias."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
        bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
        unbiased = jnp.dot(x, kernel, precision=_HIGHEST)
        return unbiased + bias, unbiased


class InceptionV3(nn.Module):
    """FID Inception-v3. Submodule names follow the torch state dict of pytorch-fid's weights.

    ``__call__(images)`` takes uint8 (or [0, 255] float) images [B, H, W, C], C in {1, 3}, of
    any size, and returns a dict with "pool3" [B, 2048], "logits" [B, 1008] (with bias) and
    "logits_unbiased" [B, 1008] (pool3 @ W, what the original Inception Score code uses).
    ``resize`` chooses the input resize and scaling ("tf1" or "pytorch", see ``preprocess``).
    """

    resize: str = DEFAULT_RESIZE

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = preprocess(images, self.resize)
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2, 0)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 2, 0)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        logits, unbiased = Logits(name="fc")(pool3)
        return {"pool3": pool3, "logits": logits, "logits_unbiased": unbiased}


# ---------------------------------------------------------------------------------------------
# Weights: pytorch-fid state dict (torch names, NCHW/OI layouts) -> Flax params.

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat {"a/b/c": shape} of InceptionV3's params, from an abstract init (no compute)."""
    return dict(_param_shapes())


@functools.lru_cache(maxsize=1)
def _param_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    abstract = jax.eval_shape(
        lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.uint8)))
    flat = traverse_util.flatten_dict(abstract["params"], sep="/")
    return tuple((k, tuple(v.shape)) for k, v in flat.items())


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Converts pytorch-fid's Inception state dict (numpy arrays) to InceptionV3 params.

    Conv weights [O, I, kh, kw] become kernels [kh, kw, I, O]; batch norm weight, bias,
    running_mean, running_var become scale, bias, mean, var; fc.weight [1008, 2048] becomes
    fc/kernel [2048, 1008]. ``num_batches_tracked`` entries are ignored.

    Raises:
      ValueError: if keys are missing or unexpected, or a shape does not match the network.
    """
    want = param_shapes()
    flat = {}
    unexpected = []
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if len(parts) < 2:
            unexpected.append(key)
            continue
        try:
            value = np.asarray(value, np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: not a numeric array ({e}).") from e
        if parts[-2:] == ["conv", "weight"]:
            name, value = "/".join([*parts[:-1], "kernel"]), value.transpose(2, 3, 1, 0)
        elif parts[-2] == "bn" and parts[-1] in _BN_NAMES:
            name = "/".join([*parts[:-1], _BN_NAMES[parts[-1]]])
        elif parts == ["fc", "weight"]:
            name, value = "fc/kernel", value.T
        elif parts == ["fc", "bias"]:
            name = "fc/bias"
        else:
            unexpected.append(key)
            continue
        if name not in want:
            unexpected.append(key)
            continue
        if value.shape != want[name]:
            raise ValueError(f"{key}: shape {value.shape} after conversion, the network "
                             f"expects {want[name]}.")
        flat[name] = value
    missing = sorted(set(want) - set(flat))
    if missing or unexpected:
        raise ValueError(
            "Not a pytorch-fid FID Inception state dict: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}).")
    return traverse_util.unflatten_dict(flat, sep="/")


SOURCE_HASH_KEY = "_source_sha256"
_WEIGHTS_HINT = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth (see "
                 "ddpm_jax.metrics.inception) or the .npz cached from it")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (about 0.2 s for the 92 MB .pth)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_weights_npz(path: str) -> tuple[dict[str, np.ndarray], str | None]:
    """(state dict, source hash or None) of a weights ``.npz``; ValueError naming it if garbage."""
    from ddpm_jax.metrics import fid

    arrays = fid.read_npz(path, f"Inception weights: {_WEIGHTS_HINT}")
    source = arrays.pop(SOURCE_HASH_KEY, None)
    return arrays, None if source is None else str(source)


def _params_from_npz(path: str) -> dict:
    state_dict, _ = _read_weights_npz(path)
    try:
        return convert_state_dict(state_dict)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load_inception_params(path: str | os.PathLike) -> dict:
    """Loads FID Inception params from pytorch-fid's ``.pth`` or our cached ``.npz``.

    Args:
      path: ``pt_inception-2015-12-05-6726825d.pth`` (downloaded by the user, see the module
        docstring) or the ``.npz`` cache made from it. Given a ``.pth``, the ``.npz`` beside it
        is read if it records this ``.pth``'s SHA-256; otherwise (missing, made from another
        file, or unreadable) the ``.pth`` is converted and the ``.npz`` written again (if the
        folder is writable), through a temporary file and a rename.

    Returns:
      The params pytree for ``InceptionV3().apply({"params": params}, images)``.

    Raises:
      ValueError: naming the file, if it is missing or not what is expected.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(
            f"Inception weights not found at {path!r}. Download pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (see ddpm_jax.metrics.inception) and pass its "
            "path.")
    root, ext = os.path.splitext(path)
    if ext == ".npz":
        return _params_from_npz(path)
    if ext not in (".pth", ".pt"):
        raise ValueError(f"Inception weights must be a .pth or .npz file, got {path!r}.")
    cache = root + ".npz"
    source_hash = file_sha256(path)
    if os.path.exists(cache):
        try:
            state_dict, cached_hash = _read_weights_npz(cache)
            if cached_hash == source_hash:
                return convert_state_dict(state_dict)
        except ValueError:
            pass  # an unreadable or foreign cache: rebuilt below
        print(f"Inception weights cache {cache} does not match {path}; rebuilding it.",
              file=sys.stderr)
    from ddpm_jax.metrics import torch_pickle

    state_dict = torch_pickle.load_state_dict(path)
    try:
        params = convert_state_dict(state_dict)  # validate before caching
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    tmp = cache + ".tmp.npz"
    try:
        np.savez(tmp, **{k: np.asarray(v) for k, v in state_dict.items()},
                 **{SOURCE_HASH_KEY: np.asarray(source_hash)})
        os.replace(tmp, cache)
    except OSError:  # a read-only folder (or a full disk): convert again next time
        if os.path.exists(tmp):
            os.remove(tmp)
    return params


@functools.lru_cache(maxsize=8)
def _sharded_apply(devices: tuple[jax.Device, ...], resize: str):
    """One jitted InceptionV3 per device set and resize, so that extractors share compilations."""
    data, replicated = builders.data_shardings(devices)
    model = InceptionV3(resize=resize)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x),
                    in_shardings=(replicated, data), out_shardings=replicated)
    return apply, data, replicated


class InceptionExtractor:
    """Jitted FID Inception features, batched and sharded over all devices.

    Each call's images are cut into batches of ``batch_size`` (rounded up to a multiple of
    the device count; the last batch is zero-padded so the network compiles once), sharded on
    the batch axis over a 1-D mesh of all devices; results come back replicated. With several
    processes every process must pass the same images. ``resize`` is the input resize and
    scaling ("tf1", the default, or "pytorch"; see ``preprocess``).
    """

    def __init__(self, params: Mapping, *, batch_size: int = 200,
                 devices: Sequence[jax.Device] | None = None, resize: str = DEFAULT_RESIZE):
        devices = tuple(jax.devices() if devices is None else devices)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.resize = check_resize(resize)
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
        self._apply, self._data, replicated = _sharded_apply(devices, self.resize)
        self._params = jax.device_put(params, replicated)

    def __call__(self, images: np.ndarray, *, progress: bool = False,
                 desc: str = "Inception") -> dict[str, np.ndarray]:
        """Features of uint8 images [N, H, W, C] (C in {1, 3}).

        Returns:
          dict of float32 numpy arrays: "pool3" [N, 2048], "logits" [N, 1008],
          "logits_unbiased" [N, 1008].
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [N, H, W, C] with C in (1, 3), got {images.shape}.")
        outs: dict[str, list[np.ndarray]] = {}
        n, bs = images.shape[0], self.batch_size
        starts = range(0, n, bs)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc=desc, unit="batch")
        for start in starts:
            batch = images[start:start + bs]
            m = batch.shape[0]
            if m < bs:
                batch = np.concatenate([batch, np.zeros((bs - m, *batch.shape[1:]), batch.dtype)])
            x = jax.make_array_from_callback(batch.shape, self._data, lambda idx, b=batch: b[idx])
            result = self._apply(self._params, x)
            for k, v in result.items():
                outs.setdefault(k, []).append(np.asarray(v)[:m])
        if not outs:
            return {"pool3": np.zeros((0, NUM_FEATURES), np.float32),
                    "logits": np.zeros((0, NUM_LOGITS), np.float32),
                    "logits_unbiased": np.zeros((0, NUM_LOGITS), np.float32)}
        return {k: np.concatenate(v) for k, v in outs.items()}
