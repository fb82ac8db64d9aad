"""Tests for ddpm_jax.convert: diffusers and official TensorFlow weights."""

import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import convert, unet
from ddpm_jax.unet import UNet, UNetConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "unet_diffusers.npz")

# The network of tests/fixtures/make_unet_fixture.py.
FIXTURE_CONFIG = UNetConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(8,),
                            dropout=0.0, out_ch=6, num_classes=3)


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        arrays = {k: data[k] for k in data.files}
    state = {}
    for key, q in arrays.items():
        if key.startswith("q/"):
            name = key[2:]
            scale, offset = arrays[f"scale/{name}"]
            state[name] = (q.astype(np.float64) * scale + offset).astype(np.float32)
    return state, arrays


def _max_rel_err(got, ref):
    got = np.asarray(got, np.float64)
    return np.abs(got - ref).max() / np.abs(ref).max()


# ----------------------------------------------------------------------------- diffusers


def test_diffusers_outputs_match_reference(fixture):
    state, arrays = fixture
    params = convert.unet_params_from_diffusers(state, FIXTURE_CONFIG)
    assert unet.count_params(params) == sum(v.size for v in state.values())
    out = jax.jit(UNet(FIXTURE_CONFIG).apply)(
        {"params": params}, jnp.asarray(arrays["x"]), jnp.asarray(arrays["t"]),
        jnp.asarray(arrays["y"]))
    # Reference: diffusers in float64; ours in float32. Measured about 1e-6.
    assert _max_rel_err(out, arrays["out"]) < 1e-4
    assert np.abs(arrays["out"]).max() > 0.5  # a live network, not a zero output


def test_diffusers_old_attention_names(fixture):
    state, _ = fixture
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, arr in state.items():
        for new, old in old_names.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = arr
    assert "mid_block.attentions.0.proj_attn.weight" in renamed
    a = convert.unet_params_from_diffusers(state, FIXTURE_CONFIG)
    b = convert.unet_params_from_diffusers(renamed, FIXTURE_CONFIG, image_size=16)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_diffusers_layouts(fixture):
    state, _ = fixture
    p = convert.unet_params_from_diffusers(state, FIXTURE_CONFIG)
    # up_blocks are numbered from the lowest resolution; our up_i from the highest.
    np.testing.assert_array_equal(
        p["up_0"]["block_1"]["conv1"]["kernel"],
        state["up_blocks.2.resnets.1.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        p["up_1"]["attn_2"]["proj_out"]["kernel"], state["up_blocks.1.attentions.2.to_out.0.weight"].T)
    np.testing.assert_array_equal(
        p["down_2"]["block_0"]["nin_shortcut"]["kernel"],
        state["down_blocks.2.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(p["mid"]["block_2"]["norm2"]["scale"],
                                  state["mid_block.resnets.1.norm2.weight"])
    np.testing.assert_array_equal(p["temb"]["dense1"]["kernel"],
                                  state["time_embedding.linear_2.weight"].T)
    np.testing.assert_array_equal(p["class_embed"]["embedding"], state["class_embedding.weight"])
    np.testing.assert_array_equal(p["norm_out"]["bias"], state["conv_norm_out.bias"])


def test_diffusers_mismatches_raise(fixture):
    state, arrays = fixture
    extra = {**state, "down_blocks.0.attentions.0.to_q.weight": np.zeros((32, 32), np.float32)}
    with pytest.raises(ValueError, match=r"unknown tensors \['down_blocks.0.attentions.0.to_q"):
        convert.unet_params_from_diffusers(extra, FIXTURE_CONFIG, image_size=16)
    missing = {k: v for k, v in state.items() if k != "mid_block.resnets.1.conv2.bias"}
    with pytest.raises(ValueError, match=r"missing tensors \['mid_block.resnets.1.conv2.bias'\]"):
        convert.unet_params_from_diffusers(missing, FIXTURE_CONFIG)
    shaped = {**state, "conv_out.weight": state["conv_out.weight"][:3]}
    with pytest.raises(ValueError, match="mis-shaped.*conv_out.weight"):
        convert.unet_params_from_diffusers(shaped, FIXTURE_CONFIG)
    no_classes = UNetConfig(**{**FIXTURE_CONFIG.to_dict(), "num_classes": None})
    with pytest.raises(ValueError, match="num_classes"):
        convert.unet_params_from_diffusers(state, no_classes)
    wrong_attn = UNetConfig(**{**FIXTURE_CONFIG.to_dict(), "attn_resolutions": (8, 4)})
    with pytest.raises(ValueError, match="attention at levels"):
        convert.unet_params_from_diffusers(state, wrong_attn)
    ddpm = json.loads(str(arrays["config"]))
    convert.check_diffusers_config(ddpm)
    with pytest.raises(ValueError, match="not a DDPM U-Net: freq_shift=0"):
        convert.check_diffusers_config({**ddpm, "freq_shift": 0})
    with pytest.raises(ValueError, match="attention_head_dim=8"):
        convert.check_diffusers_config({**ddpm, "attention_head_dim": 8})
    with pytest.raises(ValueError, match="downsample_padding=1"):  # the diffusers default
        convert.check_diffusers_config({k: v for k, v in ddpm.items() if k != "downsample_padding"})


def _write_safetensors(path, tensors):
    """A .safetensors file written from the format's description."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (arr, code) in tensors.items():
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code or codes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def test_read_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.normal(size=(3, 4)).astype(np.float32)
    f16 = rng.normal(size=(5,)).astype(np.float16)
    i64 = np.arange(6, dtype=np.int64).reshape(2, 3)
    # bfloat16 = the top 16 bits of a float32: exact for these values.
    bf16_values = np.array([1.0, -2.5, 0.15625, -1.5 * 2.0**100], np.float32)
    bf16_bits = (bf16_values.view(np.uint32) >> 16).astype(np.uint16)
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, {"a": (f32, None), "b": (f16, None), "c": (i64, None),
                              "d": (bf16_bits, "BF16")})
    got = convert.read_safetensors(str(path))
    assert sorted(got) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(got["a"], f32)
    np.testing.assert_array_equal(got["b"], f16)
    np.testing.assert_array_equal(got["c"], i64)
    np.testing.assert_array_equal(got["d"], bf16_values)
    assert got["d"].dtype == np.float32


def test_load_state_dict_from_a_model_directory(tmp_path, fixture):
    state, _ = fixture
    (tmp_path / "unet").mkdir()
    _write_safetensors(tmp_path / "unet" / "diffusion_pytorch_model.safetensors",
                       {k: (v, None) for k, v in state.items()})
    got = convert.load_state_dict(str(tmp_path))
    assert sorted(got) == sorted(state)
    np.testing.assert_array_equal(got["conv_in.weight"], state["conv_in.weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model"):
        convert.load_state_dict(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        convert.load_state_dict(str(tmp_path / "nowhere.safetensors"))


# ----------------------------------------------------------------------------- official


# A small official-layout net (no class embedding): levels 16, 8; attention at 8.
OFFICIAL_CONFIG = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                             dropout=0.0)


def _official_variables(params, rng):
    """Our params under the reference code's variable names (+ EMA and Adam slots)."""
    leaf_names = {"kernel": "W", "bias": "b"}
    norm_names = {"scale": "gamma", "bias": "beta"}
    raw, ema = {}, {}
    for path, leaf in jax.tree.flatten_with_path(params)[0]:
        keys = [p.key for p in path]
        names = norm_names if keys[-2].startswith("norm") else leaf_names
        name = "/".join(["model", *keys[:-1], names[keys[-1]]])
        raw[name] = rng.normal(size=leaf.shape).astype(np.float32)
        ema[name] = rng.normal(size=leaf.shape).astype(np.float32)
    return raw, ema


def _save_tf_checkpoint(prefix, tensors):
    import tensorflow as tf

    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    rng = np.random.default_rng(0)
    shapes = unet.param_shapes(OFFICIAL_CONFIG, 16)
    raw, ema = _official_variables(shapes, rng)
    # Names straight from the reference code's variable scopes.
    for name in ("model/temb/dense0/W", "model/conv_in/b", "model/down_0/block_0/norm1/gamma",
                 "model/down_0/downsample/conv/W", "model/down_1/attn_0/q/W",
                 "model/down_1/block_0/nin_shortcut/W", "model/mid/block_1/temb_proj/b",
                 "model/mid/attn_1/proj_out/W", "model/mid/block_2/norm2/beta",
                 "model/up_0/block_1/conv2/W", "model/up_1/upsample/conv/b",
                 "model/up_1/attn_1/norm/gamma", "model/norm_out/beta", "model/conv_out/W"):
        assert name in raw, name
    tensors = dict(raw)
    tensors.update({f"{k}/ExponentialMovingAverage": v for k, v in ema.items()})
    tensors.update({f"{k}/Adam": np.zeros_like(v) for k, v in raw.items()})
    tensors["global_step"] = np.array(790000, np.int64)
    tensors["beta1_power"] = np.array(0.5, np.float32)
    prefix = str(tmp_path_factory.mktemp("official") / "model.ckpt-790000")
    _save_tf_checkpoint(prefix, tensors)
    return prefix, raw, ema


def _by_official_name(params):
    out = {}
    for path, leaf in jax.tree.flatten_with_path(params)[0]:
        keys = [p.key for p in path]
        names = {"scale": "gamma", "bias": "beta"} if keys[-2].startswith("norm") else \
            {"kernel": "W", "bias": "b"}
        out["/".join(["model", *keys[:-1], names[keys[-1]]])] = np.asarray(leaf)
    return out


def test_official_round_trip(official_checkpoint):
    prefix, raw, ema = official_checkpoint
    got_ema = _by_official_name(convert.unet_params_from_official(prefix, OFFICIAL_CONFIG))
    got_raw = _by_official_name(
        convert.unet_params_from_official(prefix, OFFICIAL_CONFIG, ema=False, image_size=16))
    assert sorted(got_ema) == sorted(ema) and sorted(got_raw) == sorted(raw)
    for name in ema:
        np.testing.assert_array_equal(got_ema[name], ema[name])
        np.testing.assert_array_equal(got_raw[name], raw[name])


def test_official_mismatches_raise(official_checkpoint, tmp_path):
    prefix, raw, _ = official_checkpoint
    with pytest.raises(ValueError, match="num_classes must be None"):
        convert.unet_params_from_official(
            prefix, UNetConfig(**{**OFFICIAL_CONFIG.to_dict(), "num_classes": 10}))
    wider = UNetConfig(**{**OFFICIAL_CONFIG.to_dict(), "ch": 64})
    with pytest.raises(ValueError, match="mis-shaped.*model/conv_in/W/ExponentialMovingAverage"):
        convert.unet_params_from_official(prefix, wider)
    tensors = {k: v for k, v in raw.items() if k != "model/mid/attn_1/k/b"}
    tensors["model/mid/attn_1/extra/W"] = np.zeros((2, 2), np.float32)
    bad = str(tmp_path / "bad.ckpt")
    _save_tf_checkpoint(bad, tensors)
    with pytest.raises(ValueError) as err:
        convert.unet_params_from_official(bad, OFFICIAL_CONFIG, ema=False)
    assert "unknown tensors ['model/mid/attn_1/extra/W']" in str(err.value)
    assert "missing tensors ['model/mid/attn_1/k/b']" in str(err.value)
    with pytest.raises(ValueError, match="missing tensors.*ExponentialMovingAverage"):
        convert.unet_params_from_official(bad, OFFICIAL_CONFIG)  # no EMA copies there


# ----------------------------------------------------------------------------- command line


CONFIG_FILE = '''
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=16, channels=3),
        model=dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0,
                   resamp_with_conv=True, num_classes=3, dtype="float32"),
        diffusion=dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                       num_timesteps=1000, mean_type="eps", var_type="learned_range"),
    ))
'''


def test_command_line_writes_an_inference_checkpoint(tmp_path, fixture):
    from ddpm_jax import checkpoint

    state, arrays = fixture
    model_dir = tmp_path / "ddpm-tiny"
    model_dir.mkdir()
    _write_safetensors(model_dir / "diffusion_pytorch_model.safetensors",
                       {k: (v, None) for k, v in state.items()})
    (model_dir / "config.json").write_text(str(arrays["config"]))
    config_path = tmp_path / "tiny_config.py"
    config_path.write_text(CONFIG_FILE)
    out = tmp_path / "converted"
    convert.main(["--from", "diffusers", str(model_dir), "--config", str(config_path),
                  "--out", str(out)])
    params, meta = checkpoint.load_params(str(out))
    assert meta["model"] == FIXTURE_CONFIG.to_dict()
    assert meta["diffusion"]["var_type"] == "learned_range"
    expected = convert.unet_params_from_diffusers(state, FIXTURE_CONFIG)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert math.isclose(float(meta["diffusion"]["beta_end"]), 0.02)


def test_command_line_official(tmp_path, official_checkpoint):
    from ddpm_jax import checkpoint

    prefix, _, ema = official_checkpoint
    config_path = tmp_path / "small_config.py"
    config_path.write_text(
        CONFIG_FILE.replace("ch_mult=(1, 1, 2), num_res_blocks=2", "ch_mult=(1, 2), num_res_blocks=1")
        .replace("num_classes=3", "num_classes=None").replace("learned_range", "fixedlarge"))
    out = tmp_path / "converted"
    convert.main(["--from", "official", prefix, "--config", str(config_path), "--out", str(out)])
    params, meta = checkpoint.load_params(str(out))
    assert meta["step"] == 790000
    assert meta["model"] == OFFICIAL_CONFIG.to_dict()
    got = _by_official_name(params)
    assert sorted(got) == sorted(ema)
    for name in ema:
        np.testing.assert_array_equal(got[name], ema[name])


def test_command_line_bad_config(tmp_path):
    not_python = tmp_path / "config.json"
    not_python.write_text("{}")
    args = ["--from", "official", str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="not a Python config file"):
        convert.main([*args, "--config", str(not_python)])
    with pytest.raises(FileNotFoundError, match="no config file.*the configs here"):
        convert.main([*args, "--config", str(tmp_path / "missing.py")])


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path, fixture):
    state, arrays = fixture
    bad = dict(state)
    bad["mid_block.resnets.1.conv2.bias"] = state["mid_block.resnets.1.conv2.bias"].copy()
    bad["mid_block.resnets.1.conv2.bias"][[0, 3]] = np.nan
    bad["conv_out.weight"] = state["conv_out.weight"].copy()
    bad["conv_out.weight"][0, 0, 0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"non-finite weights in 2 tensors: "
                       r"(?=.*mid_block.resnets.1.conv2.bias \(2 NaN, 0 inf\))"
                       r"(?=.*conv_out.weight \(0 NaN, 1 inf\)).*nothing was written"):
        convert.unet_params_from_diffusers(bad, FIXTURE_CONFIG)
    model_dir = tmp_path / "nan-model"
    model_dir.mkdir()
    _write_safetensors(model_dir / "diffusion_pytorch_model.safetensors",
                       {k: (v, None) for k, v in bad.items()})
    (model_dir / "config.json").write_text(str(arrays["config"]))
    (tmp_path / "tiny_config.py").write_text(CONFIG_FILE)
    with pytest.raises(ValueError, match="non-finite weights"):
        convert.main(["--from", "diffusers", str(model_dir), "--config",
                      str(tmp_path / "tiny_config.py"), "--out", str(tmp_path / "converted")])
    assert not (tmp_path / "converted").exists()
