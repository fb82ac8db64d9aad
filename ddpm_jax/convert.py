"""Import released DDPM U-Net weights into our parameter tree.

Two sources are supported:

* diffusers ``UNet2DModel`` state dicts (e.g. google/ddpm-cifar10-32,
  google/ddpm-church-256): ``unet_params_from_diffusers``. The state dict can
  be read from a ``.safetensors`` file (``read_safetensors``) or a torch
  ``.bin`` (``ddpm_jax.metrics.torch_pickle``), both without torch.
* the authors' TensorFlow checkpoints (e.g. ``model.ckpt-790000`` of the
  CIFAR-10 run): ``unet_params_from_official``, EMA weights by default.

Both return a nested dict of float32 numpy arrays shaped like
``UNet(config).init(...)["params"]``; unknown, missing or mis-shaped tensors
raise ValueError naming them, and so do weights that are NaN or inf (nothing
is converted then).

Command line (writes an inference checkpoint, see ``ddpm_jax.checkpoint``)::

    python -m ddpm_jax.convert --from diffusers ddpm-cifar10-32/ \\
        --config configs/default.py --out /tmp/ddpm_cifar10
    python -m ddpm_jax.convert --from official diffusion_cifar10_model/model.ckpt-790000 \\
        --config configs/default.py --out /tmp/ddpm_cifar10
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ddpm_jax import config_lib, fileio
from ddpm_jax.unet import UNetConfig, param_shapes

Params = dict[str, Any]

# ---------------------------------------------------------------------------
# Reading state dicts.

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _not_safetensors(path: str, reason: str) -> ValueError:
    return ValueError(f"{path} is not a .safetensors file ({reason}); expected an 8-byte header "
                      "length, a JSON header and the tensor data, as the safetensors library "
                      "writes them.")


def _read_safetensors_header(path: str) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the data section of a .safetensors file, checked for size first."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise _not_safetensors(path, f"the header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise _not_safetensors(path, f"the header is not JSON: {e}") from e
        data = f.read()
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    return header, data


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into numpy arrays (bfloat16 becomes float32).

    The format: an 8-byte little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (plus an
    optional ``__metadata__`` entry), then the raw little-endian data. A file
    that does not follow it raises one ValueError naming the file.
    """
    header, data = _read_safetensors_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(v) for v in info["shape"])
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise _not_safetensors(path, f"tensor {name!r} has a malformed entry {info!r}") from e
        if dtype != "BF16" and dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}.")
        itemsize = 2 if dtype == "BF16" else np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * itemsize:
            raise _not_safetensors(path, f"tensor {name!r} of {dtype} {list(shape)} does not "
                                   f"fit its data_offsets [{begin}, {end}]")
        raw = data[begin:end]
        if dtype == "BF16":
            bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(raw, np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
        out[name] = arr.reshape(shape).copy()
    return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a diffusers UNet state dict from a file or a model directory.

    Args:
      path: a ``.safetensors`` file, a ``.npz`` file, a torch
        ``.bin``/``.pt``/``.pth`` file (read without torch by
        ``ddpm_jax.metrics.torch_pickle``: plain tensors only), or a directory
        holding ``diffusion_pytorch_model.safetensors`` (or ``.bin``),
        directly or under ``unet/``. A file that is not what its name says
        raises one ValueError naming it.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory.")
    if os.path.isdir(path):
        for sub in ("", "unet"):
            for ext in ("safetensors", "bin"):
                candidate = os.path.join(path, sub, f"diffusion_pytorch_model.{ext}")
                if os.path.exists(candidate):
                    return load_state_dict(candidate)
        raise ValueError(
            f"{path}: no diffusion_pytorch_model.safetensors or .bin there or under unet/."
        )
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(".npz"):
        return fileio.load_npz(path, "U-Net tensors named as in diffusers")
    if path.endswith((".bin", ".pt", ".pth")):
        from ddpm_jax.metrics import torch_pickle

        return dict(torch_pickle.load_state_dict(path))
    raise ValueError(
        f"{path}: expected a .safetensors, .npz, .bin, .pt or .pth file, or a directory."
    )


# ---------------------------------------------------------------------------
# Shared helpers.


def _image_size_for(config: UNetConfig, attn_levels: set[int]) -> int:
    """An image size at which the config puts attention exactly at these levels."""
    base = 2 ** (config.num_levels - 1)
    res = set(config.attn_resolutions)
    candidates = sorted({r * 2**i for r in res for i in attn_levels} or {base})
    for size in candidates:
        if size % base:
            continue
        levels = {i for i, s in enumerate(config.resolutions(size)) if s in res}
        if levels == attn_levels and res <= set(config.resolutions(size)):
            return size
    raise ValueError(
        f"the checkpoint has attention at levels {sorted(attn_levels)} (0 = full resolution), "
        f"which no image size gives with attn_resolutions={config.attn_resolutions} and "
        f"ch_mult={config.ch_mult}; check the config."
    )


def _check_and_build(
    config: UNetConfig,
    image_size: int,
    in_channels: int,
    source_name: Callable[[tuple[str, ...]], str],
    fetch: Callable[[tuple[str, ...], str, tuple[int, ...]], np.ndarray | None],
    unknown: list[str],
) -> Params:
    """Fills our tree tensor by tensor; reports all problems in one ValueError."""
    expected = flatten_dict(param_shapes(config, image_size, in_channels))
    flat, missing, misshaped, nonfinite = {}, [], [], []
    for path, leaf in expected.items():
        name = source_name(path)
        arr = fetch(path, name, tuple(leaf.shape))
        if arr is None:
            missing.append(name)
        elif arr.shape != tuple(leaf.shape):
            misshaped.append(f"{name}: got {arr.shape}, expected {tuple(leaf.shape)}")
        else:
            flat[path] = np.asarray(arr, np.float32)
            if not np.isfinite(flat[path]).all():
                nan, inf = int(np.isnan(flat[path]).sum()), int(np.isinf(flat[path]).sum())
                nonfinite.append(f"{name} ({nan} NaN, {inf} inf)")
    problems = []
    if unknown:
        problems.append(f"unknown tensors {sorted(unknown)}")
    if missing:
        problems.append(f"missing tensors {missing}")
    if misshaped:
        problems.append(f"mis-shaped tensors (after layout conversion) {misshaped}")
    if problems:
        raise ValueError("checkpoint does not match the UNetConfig: " + "; ".join(problems))
    if nonfinite:
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        raise ValueError(f"the checkpoint holds non-finite weights in {len(nonfinite)} tensors: "
                         f"{', '.join(nonfinite[:5])}{more}; refusing to convert them, nothing "
                         "was written.")
    return unflatten_dict(flat)


# ---------------------------------------------------------------------------
# diffusers.

_OLD_ATTN = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DIFFUSERS_LAYER = {
    "norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
    "conv2": "conv2", "nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q",
    "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
}


def _diffusers_name(path: tuple[str, ...], num_levels: int) -> str:
    *mods, leaf = path
    leaf = "bias" if leaf == "bias" else "weight"
    top = mods[0]
    if top == "temb":
        return f"time_embedding.linear_{int(mods[1][-1]) + 1}.{leaf}"
    if top == "class_embed":
        return f"class_embedding.{leaf}"
    if top in ("conv_in", "conv_out"):
        return f"{top}.{leaf}"
    if top == "norm_out":
        return f"conv_norm_out.{leaf}"
    if top == "mid":
        kind, j = mods[1].split("_")
        prefix = f"mid_block.resnets.{int(j) - 1}" if kind == "block" else "mid_block.attentions.0"
    else:
        direction, i = top.split("_")
        i = int(i)
        block = f"down_blocks.{i}" if direction == "down" else f"up_blocks.{num_levels - 1 - i}"
        sub = mods[1]
        if sub in ("downsample", "upsample"):
            return f"{block}.{sub}rs.0.conv.{leaf}"
        kind, j = sub.split("_")
        prefix = f"{block}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
    return f"{prefix}.{_DIFFUSERS_LAYER[mods[2]]}.{leaf}"


def _from_torch_layout(arr: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """torch layout -> ours; shapes that fit neither are left for the shape check."""
    if path[-1] != "kernel":
        return arr  # biases, norm scales, embedding tables [rows, dim]
    if arr.ndim == 4 and path[-2] == "nin_shortcut":
        return arr[:, :, 0, 0].T if arr.shape[2:] == (1, 1) else arr  # 1x1 conv -> dense
    if arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)  # conv [O, I, kh, kw] -> [kh, kw, I, O]
    if arr.ndim == 2:
        return arr.T  # linear [O, I] -> [I, O]
    return arr


# Hyperparameters of a diffusers UNet2DModel that the state dict does not show:
# (the value that makes it the DDPM network, diffusers' default when absent).
_DDPM_DIFFUSERS_SETTINGS = {
    "flip_sin_to_cos": (False, True),
    "freq_shift": (1, 0),
    "norm_eps": (1e-6, 1e-5),
    "norm_num_groups": (32, 32),
    "downsample_padding": (0, 1),
    "act_fn": ("silu", "silu"),
    "time_embedding_type": ("positional", "positional"),
    "resnet_time_scale_shift": ("default", "default"),
    "center_input_sample": (False, False),
    "mid_block_scale_factor": (1, 1),
    "class_embed_type": (None, None),
}


def check_diffusers_config(diffusers_config: Mapping[str, Any]) -> None:
    """Raises ValueError if a diffusers UNet2DModel config.json is not a DDPM U-Net.

    Checks the settings that the weights cannot reveal (timestep embedding,
    norm epsilon, downsampling padding, one attention head, ...); absent keys
    take diffusers' defaults.
    """
    bad = []
    for key, (need, default) in _DDPM_DIFFUSERS_SETTINGS.items():
        value = diffusers_config.get(key, default)
        if value != need:
            bad.append(f"{key}={value!r} (need {need!r})")
    head_dim = diffusers_config.get("attention_head_dim", 8)
    widths = list(diffusers_config.get("block_out_channels", ()))
    blocks = diffusers_config.get("down_block_types", ())
    attn_widths = {w for w, b in zip(widths, blocks, strict=False) if "Attn" in b}
    attn_widths |= set(widths[-1:])  # the middle block
    if head_dim is not None and attn_widths != {head_dim}:
        bad.append(f"attention_head_dim={head_dim!r} (need None: one head)")
    if bad:
        raise ValueError("the diffusers model is not a DDPM U-Net: " + ", ".join(bad))


def unet_params_from_diffusers(
    state_dict: Mapping[str, np.ndarray], config: UNetConfig, *, image_size: int | None = None
) -> Params:
    """Maps a diffusers UNet2DModel state dict onto our parameters.

    Handles both attention naming schemes (``to_q``/``to_k``/``to_v``/
    ``to_out.0`` and the older ``query``/``key``/``value``/``proj_attn``).
    The model must have the DDPM layout: positional time embedding with
    flip_sin_to_cos=False and freq_shift=1, one attention head, norm_eps
    1e-6, downsample_padding=0 and a class embedding of num_classes + 1 rows
    if any (these hyperparameters are not in the state dict; check them in
    the model's config.json).

    Args:
      state_dict: tensor name -> numpy array (torch layout).
      config: our UNetConfig for the same network.
      image_size: training resolution; by default inferred from which levels
        hold attention.

    Returns:
      float32 params tree for ``UNet(config)``.
    """
    sd = {}
    for name, arr in state_dict.items():
        sd[_OLD_ATTN.sub(lambda m: f"{m[1]}.{_NEW_ATTN[m[2]]}.{m[3]}", name)] = np.asarray(arr)
    if config.num_classes is None and "class_embedding.weight" in sd:
        raise ValueError(
            "the state dict has a class embedding but UNetConfig.num_classes is None; set "
            "num_classes to its number of rows minus one (the last row is the null class)."
        )
    if image_size is None:
        attn = {int(m[1]) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.attentions\.", k))}
        image_size = _image_size_for(config, attn)
    if "conv_in.weight" not in sd:
        raise ValueError("missing tensors ['conv_in.weight']")
    in_channels = int(sd["conv_in.weight"].shape[1])
    num_levels = config.num_levels
    expected_names = {
        _diffusers_name(p, num_levels)
        for p in flatten_dict(param_shapes(config, image_size, in_channels))
    }
    unknown = sorted(set(sd) - expected_names)

    def fetch(path, name, shape):
        if name not in sd:
            return None
        return _from_torch_layout(sd[name], path)

    return _check_and_build(
        config, image_size, in_channels, lambda p: _diffusers_name(p, num_levels), fetch, unknown
    )


# ---------------------------------------------------------------------------
# Official TensorFlow checkpoints.

_OFFICIAL_LEAF = {"kernel": "W", "bias": "b"}
_EMA_SUFFIX = "/ExponentialMovingAverage"


def _official_name(path: tuple[str, ...], scope: str) -> str:
    *mods, leaf = path
    if mods[-1].startswith("norm"):
        leaf = {"scale": "gamma", "bias": "beta"}[leaf]
    else:
        leaf = _OFFICIAL_LEAF[leaf]
    return "/".join((scope, *mods, leaf))


def _tf_reader(checkpoint_path: str):
    """``tf.train.load_checkpoint``, checking first that the checkpoint exists.

    A missing checkpoint is reported before TensorFlow is imported (which takes seconds), and
    TensorFlow's errors for an unreadable one become one ValueError naming the path.
    """
    is_dir = os.path.isdir(checkpoint_path)
    if is_dir and not os.path.isfile(os.path.join(checkpoint_path, "checkpoint")):
        raise ValueError(f"{checkpoint_path}: a directory without a TensorFlow 'checkpoint' "
                         "file; give the checkpoint prefix, e.g. .../model.ckpt-790000.")
    if not is_dir and not os.path.isfile(checkpoint_path + ".index"):
        raise ValueError(f"{checkpoint_path}: no TensorFlow checkpoint there (expected "
                         f"{os.path.basename(checkpoint_path)}.index and .data-* files); give the "
                         "checkpoint prefix, e.g. .../model.ckpt-790000.")
    import tensorflow as tf  # after the checks: importing it takes seconds

    try:
        return tf.train.load_checkpoint(checkpoint_path)
    except (tf.errors.OpError, ValueError) as e:
        reason = str(e).strip().split("\n")[0][:200]
        raise ValueError(f"{checkpoint_path} is not a readable TensorFlow checkpoint "
                         f"({type(e).__name__}: {reason}).") from e


def unet_params_from_official(
    checkpoint_path: str,
    config: UNetConfig,
    *,
    ema: bool = True,
    scope: str = "model",
    image_size: int | None = None,
) -> Params:
    """Reads the authors' TensorFlow checkpoint (hojonathanho/diffusion).

    Variables are named like ``model/down_1/attn_0/q/W``; group norms hold
    ``gamma``/``beta``; 1x1 convs are dense ``W`` of shape [C_in, C_out] and
    3x3 convs [3, 3, C_in, C_out], the layouts we use. Optimizer slots and
    variables outside ``scope`` are ignored.

    Args:
      checkpoint_path: checkpoint prefix, e.g. ``.../model.ckpt-790000``.
      config: our UNetConfig for the same network (no class conditioning:
        the official models have none).
      ema: read the exponential-moving-average weights
        (``<name>/ExponentialMovingAverage``), which the paper evaluates.
      scope: top variable scope of the model.
      image_size: training resolution; by default inferred from which levels
        hold attention.

    Returns:
      float32 params tree for ``UNet(config)``.
    """

    if config.num_classes is not None:
        raise ValueError(
            "UNetConfig.num_classes must be None for official checkpoints (they have no "
            "class embedding)."
        )
    reader = _tf_reader(checkpoint_path)
    names = set(reader.get_variable_to_shape_map())
    ours = {n for n in names if n.startswith(scope + "/")}
    if f"{scope}/conv_in/W" not in ours:
        raise ValueError(f"{checkpoint_path}: missing tensors ['{scope}/conv_in/W'].")
    if image_size is None:
        attn = {
            int(m[1]) for n in ours if (m := re.match(rf"{re.escape(scope)}/down_(\d+)/attn_", n))
        }
        image_size = _image_size_for(config, attn)
    in_channels = int(reader.get_variable_to_shape_map()[f"{scope}/conv_in/W"][2])
    shapes = param_shapes(config, image_size, in_channels)
    expected = {_official_name(p, scope) for p in flatten_dict(shapes)}
    # Known: a variable itself, or one of its slots (EMA, optimizer moments).
    unknown = [n for n in ours if n not in expected and n.rsplit("/", 1)[0] not in expected]

    def fetch(path, name, shape):
        return reader.get_tensor(name) if name in names else None

    def source_name(path):
        return _official_name(path, scope) + (_EMA_SUFFIX if ema else "")

    return _check_and_build(config, image_size, in_channels, source_name, fetch, unknown)


# ---------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> None:
    from ddpm_jax import commands

    parser = commands.parser("python -m ddpm_jax.convert",
                             "Convert released DDPM U-Net weights.")
    parser.add_argument("--from", dest="source", choices=("diffusers", "official"), required=True)
    parser.add_argument("src", help="diffusers model dir/file, or TF checkpoint prefix")
    parser.add_argument(
        "--config", required=True,
        help="ml_collections config file, or the name of one in configs/ (e.g. default)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--no-ema", action="store_true", help="official: read the raw, not the EMA, weights"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    commands.setup_logging(None, verbose=args.verbose)

    from ddpm_jax import checkpoint

    if os.path.isfile(args.config) and not args.config.endswith(".py"):
        raise ValueError(f"--config {args.config}: not a Python config file.")
    config = config_lib.load_config(args.config)
    unet_config = UNetConfig.from_config(config.model, out_ch=checkpoint.out_channels(config))
    image_size = int(config.data.image_size)
    step = 0
    if args.source == "diffusers":
        folder = args.src if os.path.isdir(args.src) else os.path.dirname(args.src)
        for sub in ("", "unet"):
            config_json = os.path.join(folder, sub, "config.json")
            if os.path.exists(config_json):
                with open(config_json) as f:
                    check_diffusers_config(json.load(f))
                break
        params = unet_params_from_diffusers(
            load_state_dict(args.src), unet_config, image_size=image_size
        )
    else:
        params = unet_params_from_official(
            args.src, unet_config, ema=not args.no_ema, image_size=image_size
        )
        reader = _tf_reader(args.src)
        if reader.has_tensor("global_step"):
            step = int(reader.get_tensor("global_step"))
    meta = checkpoint.meta_from_config(config, step=step)
    checkpoint.save_params(args.out, params, meta=meta)
    commands.finish("convert", f"{args.source} weights ({unet_config.ch} ch, "
                    f"{image_size}x{image_size}, step {step}) to {commands.relpath(args.out)}",
                    start=start)


if __name__ == "__main__":
    main()
