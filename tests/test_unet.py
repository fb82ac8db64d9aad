"""Tests for ddpm_jax.unet against closed forms and float64 numpy."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import unet
from ddpm_jax.unet import UNet, UNetConfig

# A tiny CIFAR-shaped net: 4 levels (32, 16, 8, 4), attention at 16.
TINY = UNetConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1)
# A smaller one, quick to compile, for behaviour tests on 16x16 inputs: levels 16, 8.
SMALL = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)


def _inputs(key, batch, size, channels=3):
    kx, kt = jax.random.split(key)
    x = jax.random.uniform(kx, (batch, size, size, channels), minval=-1.0, maxval=1.0)
    t = jax.random.randint(kt, (batch,), 0, 1000, dtype=jnp.int32)
    return x, t


def _randomize(params, seed):
    """Random float32 params shaped like `params` (arrays or ShapeDtypeStructs), drawn in numpy.

    Kernels at fan-in scale (so the zero-initialized layers are live), norm scales
    around 1, biases and embeddings small and non-zero.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree.map_with_path(draw, params)


def _random_params(config, size, seed):
    return _randomize(unet.param_shapes(config, size), seed)


@pytest.fixture(scope="module")
def small_params():
    return _random_params(SMALL, 16, 0)


# ----------------------------------------------------------------------------- config


def test_param_counts_match_the_paper():
    cifar = UNetConfig(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    assert unet.count_params(unet.param_shapes(cifar, 32)) == 35_746_307
    learned = UNetConfig(**{**cifar.to_dict(), "out_ch": 6})
    assert unet.count_params(unet.param_shapes(learned, 32)) == 35_749_766
    big = UNetConfig(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                     dropout=0.0)
    assert unet.count_params(unet.param_shapes(big, 256)) == 113_673_219


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ch=48), "ch must be a positive multiple of 32"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(dtype="float16"), "dtype"),
        (dict(attn_resolutions=(0,)), "attn_resolutions"),
    ],
)
def test_bad_config_fields_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_bad_resolutions_raise_before_compiling():
    cfg = UNetConfig(ch=32)  # 4 levels: sizes must be multiples of 8
    with pytest.raises(ValueError, match="multiple of"):
        cfg.validate(36)
    with pytest.raises(ValueError, match="never reached"):
        UNetConfig(ch=32, attn_resolutions=(64,)).validate(32)
    with pytest.raises(ValueError, match="never reached"):
        UNetConfig(ch=32, attn_resolutions=(2,)).validate(32)  # smallest map is 4x4
    cfg.validate(32)
    # The model checks at trace time: eval_shape traces and never compiles.
    for size, attn in ((36, (16,)), (32, (64,))):
        model = UNet(UNetConfig(ch=32, attn_resolutions=attn))
        x, t = jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32)
        with pytest.raises(ValueError):
            jax.eval_shape(model.init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="t must have shape"):
        jax.eval_shape(UNet(TINY).init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                       jnp.zeros((3,), jnp.int32))


def test_from_config_and_dtype_names():
    model_cfg = ml_collections.ConfigDict(dict(
        ch=64, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
        resamp_with_conv=False, num_classes=None, dtype="bfloat16"))
    cfg = UNetConfig.from_config(model_cfg, out_ch=6)
    assert cfg.ch_mult == (1, 2) and cfg.attn_resolutions == (8,) and cfg.out_ch == 6
    assert cfg.dtype is jnp.bfloat16
    assert cfg.to_dict()["dtype"] == "bfloat16"
    assert UNetConfig(**{**cfg.to_dict(), "dtype": "float32"}).dtype is jnp.float32
    assert UNetConfig.from_config(cfg.to_dict(), out_ch=6) == cfg
    with pytest.raises(ValueError, match="out_ch=6"):
        UNetConfig.from_config(cfg.to_dict(), out_ch=3)
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_config({**model_cfg.to_dict(), "chanels": 3}, out_ch=3)
    with pytest.raises(ValueError, match="lacks the keys"):
        UNetConfig.from_config({"ch": 64}, out_ch=3)


# ----------------------------------------------------------------------------- structure


def test_attention_only_at_configured_resolutions():
    def attn_blocks(params):
        return {
            (top, sub) for top, mods in params.items() if isinstance(mods, dict)
            for sub in mods if sub.startswith("attn")
        }

    p = unet.param_shapes(TINY, 32)  # levels 32, 16, 8, 4; attention at 16 = level 1
    assert attn_blocks(p) == {("down_1", "attn_0"), ("up_1", "attn_0"), ("up_1", "attn_1"),
                              ("mid", "attn_1")}
    p = unet.param_shapes(UNetConfig(ch=32, num_res_blocks=1, attn_resolutions=(32, 4)), 32)
    assert attn_blocks(p) == {("down_0", "attn_0"), ("down_3", "attn_0"), ("up_0", "attn_0"),
                              ("up_0", "attn_1"), ("up_3", "attn_0"), ("up_3", "attn_1"),
                              ("mid", "attn_1")}
    # Resampling convs on all levels but the last (down) / first (up).
    assert [("downsample" in p[f"down_{i}"]) for i in range(4)] == [True, True, True, False]
    assert [("upsample" in p[f"up_{i}"]) for i in range(4)] == [False, True, True, True]
    assert "class_embed" not in p


def test_initialization_follows_the_reference():
    # One level, no attention: few tensors, so init compiles quickly.
    cfg = UNetConfig(ch=64, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    x, t = _inputs(jax.random.key(0), 1, 8)
    p = jax.jit(UNet(cfg).init)(jax.random.key(1), x, t)["params"]
    # fan_avg uniform: |w| <= sqrt(3 / fan_avg), std sqrt(1 / fan_avg).
    w = np.asarray(p["mid"]["block_1"]["conv1"]["kernel"])  # [3, 3, 64, 64]
    fan_avg = 9 * 64
    assert np.abs(w).max() <= math.sqrt(3 / fan_avg)
    np.testing.assert_allclose(w.std(), math.sqrt(1 / fan_avg), rtol=0.05)
    # "Zero" init: scale 1e-10.
    for zero in (p["conv_out"], p["down_0"]["block_0"]["conv2"], p["mid"]["attn_1"]["proj_out"]):
        assert 0 < np.abs(zero["kernel"]).max() < 1e-4
    for path, leaf in jax.tree.flatten_with_path(p)[0]:
        name = path[-1].key
        assert leaf.dtype == jnp.float32
        if name == "bias":
            assert not np.any(np.asarray(leaf)), path
        if name == "scale":
            assert np.all(np.asarray(leaf) == 1.0), path


# ----------------------------------------------------------------------------- components


def test_timestep_embedding_closed_form():
    t = np.array([0, 1, 17, 999])
    dim = 10
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    got = unet.timestep_embedding(jnp.asarray(t, jnp.int32), dim)
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 sin of args up to 999
    assert unet.timestep_embedding(jnp.asarray(t, jnp.int32), 7).shape == (4, 7)


def _np_group_norm(x, scale, bias, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_and_attention_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 64)) * 3 + 1
    block = unet.AttnBlock()
    params = _randomize(jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x, jnp.float32))
                        ["params"], 1)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    got = block.apply({"params": params}, jnp.asarray(x, jnp.float32))

    h = _np_group_norm(x, p["norm"]["scale"], p["norm"]["bias"]).reshape(2, 16, 64)
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in "qkv")
    logits = np.einsum("bic,bjc->bij", q, k) / np.sqrt(64)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bij,bjc->bic", w, v) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    expected = x + out.reshape(x.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _np_conv(x, w, b, stride, pad):
    """Cross-correlation, NHWC x [B,H,W,I], w [kh,kw,I,O], pad ((top,bottom),(left,right))."""
    x = np.pad(x, ((0, 0), *pad, (0, 0)))
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
            out += patch @ w[i, j]
    return out + b


def test_resampling_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 4))
    xj = jnp.asarray(x, jnp.float32)

    down = unet.Downsample(with_conv=True)
    params = _randomize(jax.eval_shape(down.init, jax.random.key(0), xj)["params"], 1)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["conv"]
    # TF "SAME" for stride 2 on an even size: one row/column of zeros bottom/right only.
    expected = _np_conv(x, p["kernel"], p["bias"], 2, ((0, 1), (0, 1)))
    np.testing.assert_allclose(down.apply({"params": params}, xj), expected, rtol=1e-5, atol=1e-5)
    pooled = unet.Downsample(with_conv=False).apply({}, xj)
    np.testing.assert_allclose(pooled, x.reshape(2, 4, 2, 4, 2, 4).mean(axis=(2, 4)), atol=1e-6)

    up = unet.Upsample(with_conv=True)
    params = _randomize(jax.eval_shape(up.init, jax.random.key(2), xj)["params"], 3)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["conv"]
    nearest = x.repeat(2, axis=1).repeat(2, axis=2)
    expected = _np_conv(nearest, p["kernel"], p["bias"], 1, ((1, 1), (1, 1)))
    np.testing.assert_allclose(up.apply({"params": params}, xj), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unet.Upsample(with_conv=False).apply({}, xj), nearest, atol=0)


def test_resnet_block_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 4, 32))
    temb = rng.normal(size=(2, 16))
    block = unet.ResnetBlock(out_ch=64, dropout=0.0)
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(temb, jnp.float32))
    shapes = jax.eval_shape(lambda k: block.init(k, *args, train=False), jax.random.key(0))
    params = _randomize(shapes["params"], 1)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def swish(a):
        return a / (1 + np.exp(-a))

    def conv(a, q):
        return _np_conv(a, q["kernel"], q["bias"], 1, ((1, 1), (1, 1)))

    h = conv(swish(_np_group_norm(x, **p["norm1"])), p["conv1"])
    h += (swish(temb) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"])[:, None, None, :]
    h = conv(swish(_np_group_norm(h, **p["norm2"])), p["conv2"])
    expected = x @ p["nin_shortcut"]["kernel"] + p["nin_shortcut"]["bias"] + h
    got = block.apply({"params": params}, *args, train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- whole model


def test_output_shape_32_and_256():
    x, t = _inputs(jax.random.key(0), 2, 32)
    model = UNet(TINY)
    out = jax.jit(model.apply)({"params": _random_params(TINY, 32, 1)}, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # 256x256 (6 levels): shapes only, traced without computing.
    big = UNetConfig(ch=32, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attn_resolutions=(16,),
                     dropout=0.0, out_ch=6)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    model = UNet(big)
    variables = jax.eval_shape(model.init, jax.random.key(3), x, t)
    out = jax.eval_shape(model.apply, variables, x, t)
    assert out.shape == (2, 256, 256, 6) and out.dtype == jnp.float32


def test_dropout_only_in_train_mode(small_params):
    model = UNet(SMALL)
    x, t = _inputs(jax.random.key(0), 2, 16)
    apply = jax.jit(model.apply, static_argnames="train")
    v = {"params": small_params}

    def run(train, key):
        return np.asarray(apply(v, x, t, train=train, rngs={"dropout": jax.random.key(key)}))

    eval_a, eval_b = run(False, 1), run(False, 2)
    np.testing.assert_array_equal(eval_a, eval_b)  # the key is unused in eval mode
    train_a, train_a2, train_b = run(True, 1), run(True, 1), run(True, 2)
    np.testing.assert_array_equal(train_a, train_a2)
    assert np.abs(train_a - eval_a).max() > 1e-3
    assert np.abs(train_a - train_b).max() > 1e-3
    with pytest.raises(Exception, match="dropout"):  # train mode needs a dropout key
        jax.eval_shape(functools.partial(model.apply, train=True), v, x, t)


def test_compiles_once_per_shape(small_params):
    model = UNet(SMALL)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(params, x, t):
        return model.apply({"params": params}, x, t)

    for i in range(3):
        x, t = _inputs(jax.random.key(i), 2, 16)
        forward(small_params, x, t)
    with pytest.raises(AssertionError):  # a new shape would compile again
        forward(small_params, *_inputs(jax.random.key(0), 4, 16))


def test_class_conditioning():
    cfg = UNetConfig(**{**SMALL.to_dict(), "num_classes": 3})
    model = UNet(cfg)
    x, t = _inputs(jax.random.key(0), 2, 16)
    params = _random_params(cfg, 16, 2)
    assert params["class_embed"]["embedding"].shape == (4, 4 * cfg.ch)
    assert unet.count_params(params) == (unet.count_params(unet.param_shapes(SMALL, 16))
                                         + 4 * 4 * cfg.ch)
    apply = jax.jit(model.apply)
    out = {y: apply({"params": params}, x, t, jnp.full((2,), y, jnp.int32)) for y in (0, 1, 3)}
    assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3
    np.testing.assert_array_equal(apply({"params": params}, x, t, None), out[3])  # null class
    with pytest.raises(ValueError, match="num_classes is None"):
        jax.eval_shape(UNet(SMALL).init, jax.random.key(1), x, t, y=jnp.zeros((2,), jnp.int32))


def test_bfloat16_close_to_float32(small_params):
    x, t = _inputs(jax.random.key(0), 2, 16)
    bf16 = UNetConfig(**{**SMALL.to_dict(), "dtype": "bfloat16"})
    # Same float32 params in both; only the computation dtype differs.
    shapes = jax.eval_shape(UNet(bf16).init, jax.random.key(1), x, t)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    ref = np.asarray(jax.jit(UNet(SMALL).apply)({"params": small_params}, x, t), np.float64)
    got = jax.jit(UNet(bf16).apply)({"params": small_params}, x, t)
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
    # Measured 1.1e-2 here (1.4e-2 on the CIFAR-10 config with random params): bf16 keeps
    # 8 mantissa bits, ~4e-3 relative rounding per op. The lower bound shows bf16 is used.
    assert 1e-4 < err < 3e-2, err


def test_remat_gives_the_same_loss_and_gradients():
    config = UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        dropout=0.1)
    x, t = _inputs(jax.random.key(0), 2, 8)
    params = UNet(config).init(jax.random.key(1), x, t)["params"]

    def loss_and_grad(remat):
        model = UNet(dataclasses.replace(config, remat=remat))

        def loss(p):  # train mode: dropout must draw the same mask when recomputed
            out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
            return jnp.mean(jnp.square(out - x))

        return jax.jit(jax.value_and_grad(loss))(params)

    base_loss, base_grads = loss_and_grad("none")
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(base_grads))
    for remat in ("full", "dots"):
        loss, grads = loss_and_grad(remat)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        chex.assert_trees_all_close(grads, base_grads, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="remat"):
        UNetConfig(remat="sometimes")
