"""Tests for ddpm_jax.conv: values and gradients against float64 numpy, and the CPU fast path."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import conv

DN = ("NHWC", "HWIO", "NHWC")


def _np_conv_and_grads(x, w, r, stride, padding):
    """y = conv(x, w) and the gradients of sum(y * r), by direct loops in float64."""
    (plh, phh), (plw, phw) = padding
    xp = np.pad(x, ((0, 0), (plh, phh), (plw, phw), (0, 0)))
    kh, kw = w.shape[:2]
    oh = (xp.shape[1] - kh) // stride + 1
    ow = (xp.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            win = xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
            y += win @ w[i, j]
            dw[i, j] = np.einsum("bhwc,bhwo->co", win, r)
            dxp[:, i:i + (oh - 1) * stride + 1:stride,
                j:j + (ow - 1) * stride + 1:stride] += r @ w[i, j].T
    dx = dxp[:, plh:plh + x.shape[1], plw:plw + x.shape[2]]
    return y, dx, dw


@pytest.mark.parametrize("size,stride,padding", [
    (8, 1, ((1, 1), (1, 1))),   # the U-Net's 3x3 convs
    (8, 2, ((0, 1), (0, 1))),   # its downsampling (TF "SAME", stride 2)
    (7, 2, ((0, 1), (0, 1))),   # odd size: the last row/column is never a window start
    (6, 1, ((0, 0), (0, 0))),   # "VALID"
])
def test_values_and_gradients_match_float64(size, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, size, size, 3))
    w = rng.standard_normal((3, 3, 3, 5))
    out = (size + sum(padding[0]) - 3) // stride + 1
    r = rng.standard_normal((2, out, out, 5))
    y_ref, dx_ref, dw_ref = _np_conv_and_grads(x, w, r, stride, padding)

    def loss(x, w):
        y = conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN)
        return jnp.sum(y * jnp.asarray(r, jnp.float32)), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


def _conv_labels(compiled_text):
    return collections.Counter(re.findall(r"dim_labels=([^ ,\n]+)", compiled_text))


def test_gradients_inside_a_loop_stay_canonical_on_cpu():
    """XLA:CPU leaves loop-body convolutions uncanonicalized; ours are canonical already."""
    w = jnp.ones((3, 3, 4, 4), jnp.float32)
    x = jnp.ones((3, 2, 8, 8, 4), jnp.float32)

    def steps(conv_fn):
        def body(w, x):
            g = jax.grad(lambda w: jnp.sum(conv_fn(x, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=DN) ** 2))(w)
            return w - 1e-3 * g, None

        return jax.jit(lambda w, x: jax.lax.scan(body, w, x)[0]).lower(w, x).compile().as_text()

    ours = _conv_labels(steps(conv.conv_general_dilated))
    plain = _conv_labels(steps(jax.lax.conv_general_dilated))
    assert set(ours) == {"b01f_01io->b01f"}, ours
    # The premise: the plain convolution's gradient keeps another order inside the loop.
    assert set(plain) - {"b01f_01io->b01f"}, plain


def test_other_convolutions_take_the_standard_path():
    x = jnp.ones((1, 6, 6, 2))
    w = jnp.ones((3, 3, 2, 2))
    dilated = conv.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                        dimension_numbers=DN)
    expected = jax.lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)),
                                            rhs_dilation=(2, 2), dimension_numbers=DN)
    np.testing.assert_array_equal(dilated, expected)
    same = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
    np.testing.assert_array_equal(same, jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN))


def test_cpu_compiler_options_put_convolutions_on_eigen(monkeypatch):
    """On CPU the options move convolutions out of YNNPACK and keep the numbers; other
    platforms get none, and a jaxlib that rejects them gets none instead of an error."""
    assert conv.compiler_options(jax.devices()) == conv.CPU_COMPILER_OPTIONS

    class Chip:
        platform = "tpu"

    assert conv.compiler_options([Chip()]) is None
    assert conv.compiler_options([jax.devices()[0], Chip()]) is None

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)  # 16 channels: no YNNPACK
    w = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)

    def f(x, w):
        return conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))

    plain = jax.jit(f).lower(x, w).compile()
    tuned = jax.jit(f, compiler_options=conv.compiler_options()).lower(x, w).compile()
    # The function is one convolution: YNNPACK runs it by default, Eigen with the options.
    assert "__ynn_fusion" in plain.as_text()
    assert "__ynn_fusion" not in tuned.as_text() and " convolution(" in tuned.as_text()
    np.testing.assert_allclose(np.asarray(tuned(x, w)), np.asarray(plain(x, w)),
                               rtol=1e-5, atol=1e-4)

    conv._cpu_options_accepted.cache_clear()
    monkeypatch.setattr(conv, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    try:
        assert conv.compiler_options(jax.devices()) is None
    finally:
        conv._cpu_options_accepted.cache_clear()


def _jit_conv_and_grads(x, w, r):
    def loss(x, w):
        y = conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
        return jnp.sum(y * jnp.asarray(r, jnp.float32)), y

    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))


@pytest.mark.parametrize("shape", [
    (2, 8, 8, 16, 24),   # F(4x4, 3x3), whole tiles
    (2, 9, 12, 20, 17),  # F(4x4, 3x3), the last tiles cut off
    (2, 5, 7, 16, 16),   # F(2x2, 3x3) (a side under 8), the last row of tiles cut off
    (1, 2, 2, 16, 16),   # F(2x2, 3x3), one tile
])
def test_winograd_values_and_gradients_match_float64(shape):
    n, h, w_, ci, co = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, h, w_, ci))
    w = rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci)
    r = rng.standard_normal((n, h, w_, co))
    refs = _np_conv_and_grads(x, w, r, 1, ((1, 1), (1, 1)))
    with conv.cpu_algorithm("winograd"):
        fn = _jit_conv_and_grads(x, w, r)
        args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
        text = fn.lower(*args).compile().as_text()
        (_, y), (dx, dw) = fn(*args)
    assert " convolution(" not in text  # all three are dots and elementwise transforms
    for got, ref in zip((y, dx, dw), refs, strict=True):
        # F(4x4, 3x3)'s transforms lose a few more bits than the direct convolution.
        assert np.abs(np.asarray(got, np.float64) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_cpu_algorithm_auto_takes_winograd_for_wide_float32_convolutions():
    def convolutions(ci, co, dtype=jnp.float32, algorithm="auto"):
        x = jnp.ones((1, 4, 4, ci), dtype)
        w = jnp.ones((3, 3, ci, co), dtype)
        with conv.cpu_algorithm(algorithm):
            f = jax.jit(lambda x, w: conv.conv_general_dilated(
                x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN))
            return f.lower(x, w).compile().as_text().count(" convolution(")

    wide = conv.WINOGRAD_MIN_CHANNELS
    assert convolutions(wide, wide) == 0
    assert convolutions(wide // 2, wide) == 1
    assert convolutions(8, 8, algorithm="winograd") == 0
    assert convolutions(wide, wide, algorithm="direct") == 1
    assert convolutions(wide, wide, jnp.bfloat16, algorithm="winograd") == 1
    with pytest.raises(ValueError, match="auto, winograd, direct"):
        with conv.cpu_algorithm("fft"):
            pass
    assert conv._cpu_algorithm == "auto"
