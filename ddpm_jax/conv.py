"""The U-Net's convolution: ``lax.conv_general_dilated``, with CPU-friendly kernels on CPU.

Why this exists. XLA:CPU runs a convolution on its fast library kernels
(Eigen) only when the operands are in the canonical order, input NHWC and
kernel HWIO. Reverse-mode differentiation of an NHWC/HWIO convolution emits
two convolutions in other orders: the input gradient with an HWOI kernel
(``b01f_01oi->b01f``) and the kernel gradient with the batch as the feature
axis (``f01b_i01o->01bf``). XLA:CPU's ``convolution-canonicalization`` pass
rewrites such convolutions into transposes plus a canonical convolution, but
it visits only the entry computation (its header says "all top-level
convolutions"). A train step inside a ``lax.scan`` or ``lax.fori_loop`` has
its convolutions in the loop body, where the pass never looks, so there they
run as generic loops: about 10x slower for the whole step on the CIFAR-10
U-Net (compare ``dim_labels`` in ``jax.jit(f).lower(...).compile().as_text()``,
or the pass dumps under ``XLA_FLAGS=--xla_dump_to=DIR
--xla_dump_hlo_pass_re=.*``).

What it does. `conv_general_dilated` has the signature Flax's ``nn.Conv``
expects. On CPU, for 2-D NHWC/HWIO convolutions without dilation or groups, it
is a ``jax.custom_vjp`` whose backward pass is written in canonical form:

- input gradient: a canonical convolution of the output gradient with the
  spatially reversed kernel, transposed to HWIO by an explicit transpose, the
  stride becoming an input dilation (what the canonicalization pass builds);
- kernel gradient: a canonical convolution of the input, transposed to
  [C_in, H, W, B] (C_in in the batch position, B in the feature position),
  with the output gradient transposed to an HWIO kernel [oh, ow, B, C_out],
  the stride becoming a kernel dilation; its [C_in, kh, kw, C_out] result
  is transposed to HWIO.

These are the forms the canonicalization pass itself produces at the top
level, so a step inside a loop runs as fast as one outside it.

Which kernels run them. XLA:CPU (jax 0.10) hands convolutions, dots and
reductions to the YNNPACK library by default. `compiler_options` gives the
jit options that keep dots and reductions on YNNPACK and put convolutions on
XLA's Eigen kernels: on the CPU measured (AMD EPYC, AVX-512, 2 cores) the
CIFAR-10 train step at batch 8 takes 1.94 instead of 2.05 s and the digits
step at batch 128 0.159 instead of 0.194 s, with the same loss to the last bit
(``python -m benchmarks.bench_train --compare_compiler_options``, records in
benchmarks/results/cpu.jsonl). The train call and the samplers compile with
them on CPU.

Winograd on CPU. XLA:CPU's convolution kernels run the CIFAR-10 U-Net's 3x3 convolutions
at about 80% of the speed of PyTorch's oneDNN kernels on the same CPU
(benchmarks/conv_kernels.py). The CPU path therefore computes the U-Net's wide 3x3, stride
1, float32 convolutions by Winograd F(4x4, 3x3) (F(2x2, 3x3) below 8x8): elementwise
input and kernel transforms, (m + 2)^2 dots that do 2.25 to 4 times fewer multiplications
than the direct convolution, and an output transform (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016). Its input and kernel gradients go through the same
transforms. The results agree with float64 to a few 1e-6 of their scale
(F(4x4, 3x3)'s constants cost a few bits; tests/test_conv.py checks values and gradients
against float64). `cpu_algorithm` chooses per traced function ("auto": Winograd when both
channel counts are at least WINOGRAD_MIN_CHANNELS; "winograd"; "direct"). On the CIFAR-10
train step at batch 8 "auto" takes about 1.4 s against 2.0 s for "direct"
(``python -m benchmarks.bench_train --compare_cpu_algorithms``, records in
benchmarks/results/cpu.jsonl).

Every other backend (GPU, TPU) gets ``lax.conv_general_dilated`` unchanged:
the choice is made by ``lax.platform_dependent`` when the computation is
lowered, so an ahead-of-time compilation for TPU on a CPU host takes the
standard path. The values are the same convolution's; the gradients agree
with the standard ones to float32 rounding (tests/test_conv.py checks both
against float64 numpy).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_CANONICAL = ("NHWC", "HWIO", "NHWC")

# XLA:CPU: YNNPACK for dots and reductions, Eigen for convolutions (module docstring).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _cpu_options_accepted() -> bool:
    """Whether this jaxlib knows CPU_COMPILER_OPTIONS (an experimental XLA option)."""
    try:
        x = jax.device_put(jnp.zeros((), jnp.float32), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(x).compile()
    except Exception:  # renamed or dropped in another jaxlib: compile without it
        return False
    return True


def compiler_options(devices: Iterable[Any] | None = None) -> dict[str, str] | None:
    """``jax.jit(..., compiler_options=...)`` for a computation on devices (default: the
    default backend's): CPU_COMPILER_OPTIONS when they are all CPU devices and this jaxlib
    accepts them, else None (no options)."""
    if devices is None:
        cpu = jax.default_backend() == "cpu"
    else:
        cpu = all(getattr(d, "platform", None) == "cpu" for d in devices)
    return dict(CPU_COMPILER_OPTIONS) if cpu and _cpu_options_accepted() else None


def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
          padding: tuple[tuple[int, int], ...], lhs_dilation=None) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                    dimension_numbers=_CANONICAL)


def _input_grad(g: jax.Array, w: jax.Array, in_hw: tuple[int, int], strides, padding):
    """d loss / d x for y = conv(x, w): a canonical conv of g with the flipped HWIO kernel."""
    kh, kw = w.shape[:2]
    w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))  # [kh, kw, C_out, C_in]
    pads = []
    for size, k, s, (lo, _), out in zip(in_hw, (kh, kw), strides, padding, g.shape[1:3],
                                        strict=True):
        new_lo = k - 1 - lo
        pads.append((new_lo, size + lo - 1 - (out - 1) * s))
    return _conv(g, w_t, (1, 1), tuple(pads), lhs_dilation=tuple(strides))


def _kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int], strides, padding):
    """d loss / d w for y = conv(x, w): a canonical conv of x^T with g as its kernel."""
    kh, kw = kernel_hw
    xt = jnp.transpose(x, (3, 1, 2, 0))  # [C_in, H, W, B]: C_in is the batch, B the feature
    gt = jnp.transpose(g, (1, 2, 0, 3))  # [oh, ow, B, C_out]: an HWIO kernel
    pads = []
    for size, k, s, (lo, _), out in zip(x.shape[1:3], (kh, kw), strides, padding, g.shape[1:3],
                                        strict=True):
        # Output size k: size + lo + hi - ((out - 1) * s + 1) + 1 = k.
        pads.append((lo, k + (out - 1) * s - size - lo))
    dw = lax.conv_general_dilated(xt, gt, (1, 1), tuple(pads), rhs_dilation=tuple(strides),
                                  dimension_numbers=_CANONICAL)  # [C_in, kh, kw, C_out]
    return jnp.transpose(dw, (1, 2, 0, 3))


def _make_cpu_conv(strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
    @jax.custom_vjp
    def conv(x, w):
        return _conv(x, w, strides, padding)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        dx = _input_grad(g, w, x.shape[1:3], strides, padding).astype(x.dtype)
        dw = _kernel_grad(x, g, w.shape[:2], strides, padding).astype(w.dtype)
        return dx, dw

    conv.defvjp(fwd, bwd)
    return conv


# Winograd F(m x m, 3 x 3) (Lavin & Gray 2016): an output tile of m x m from an input tile
# of (m + 2) x (m + 2) with (m + 2)^2 elementwise products instead of 9 m^2. B^T transforms
# input tiles, G the 3x3 kernel, A^T the products back to output tiles. F(2, 3) interpolates
# at 0, 1, -1 and infinity; F(4, 3) adds 2 and -2.
_WINOGRAD = {
    2: ((
        (1, 0, -1, 0),
        (0, 1, 1, 0),
        (0, -1, 1, 0),
        (0, 1, 0, -1)), (
        (1, 0, 0),
        (1 / 2, 1 / 2, 1 / 2),
        (1 / 2, -1 / 2, 1 / 2),
        (0, 0, 1)), (
        (1, 1, 1, 0),
        (0, 1, -1, -1))),
    4: ((
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1)), (
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1)), (
        (1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, -2, 0),
        (0, 1, 1, 4, 4, 0),
        (0, 1, -1, 8, -8, 1))),
}
# Smallest channel count (in and out) for which the CPU path picks Winograd by itself
# ("auto"). The paper's U-Nets (128 to 512 channels) take it; below, the products are small
# for the dot kernels and the compile grows more than the step shrinks: the digits U-Net (32
# and 64 channels) forced to Winograd trained 4-6% faster per step at batch 128 but compiled
# in 30 s instead of 6 (bench_train --compare_cpu_algorithms winograd,direct, cpu.jsonl).
WINOGRAD_MIN_CHANNELS = 128

CPU_ALGORITHMS = ("auto", "winograd", "direct")
_cpu_algorithm = "auto"


@contextlib.contextmanager
def cpu_algorithm(name: str):
    """Within the block, functions traced on CPU convolve with algorithm ``name``:

    - "auto" (the default): Winograd F(4x4, 3x3) or F(2x2, 3x3) for 3x3, stride 1,
      padding 1, float32 convolutions with at least WINOGRAD_MIN_CHANNELS channels in and
      out; the direct convolution otherwise;
    - "winograd": Winograd for every such convolution, whatever its channel count;
    - "direct": never Winograd.

    The choice is made when a function is traced: a jitted function already traced keeps
    the algorithm it was traced with. Other backends always use ``lax.conv_general_dilated``.
    """
    global _cpu_algorithm
    if name not in CPU_ALGORITHMS:
        raise ValueError(f"unknown CPU convolution algorithm {name!r}; choose one of "
                         f"{', '.join(CPU_ALGORITHMS)}")
    previous, _cpu_algorithm = _cpu_algorithm, name
    try:
        yield
    finally:
        _cpu_algorithm = previous


def _combine(coefs, arrays):
    """sum_i coefs[i] * arrays[i], skipping zero coefficients (elementwise, so XLA fuses it)."""
    out = None
    for c, a in zip(coefs, arrays, strict=True):
        if c == 0:
            continue
        term = a if c == 1 else -a if c == -1 else a * jnp.asarray(c, a.dtype)
        out = term if out is None else out + term
    return out


def _winograd_tile(hw: tuple[int, int]) -> int:
    """Output tile size m: 4 when both sides are at least 8, else 2 (less padding waste)."""
    return 4 if min(hw) >= 8 else 2


def _num_tiles(hw: tuple[int, int], m: int) -> tuple[int, int]:
    """Tiles of m x m outputs along H and W (the last ones cropped when m does not divide)."""
    return -(-hw[0] // m), -(-hw[1] // m)


def _winograd_inputs(x: jax.Array, m: int) -> list[jax.Array]:
    """B^T d B for every input tile d of x padded by 1 (and up to a multiple of m): (m + 2)^2
    arrays of shape [B * tiles, C]. Kept as separate arrays: stacking them into one buffer
    made XLA:CPU's fusion up to 10x slower at some sizes."""
    bt = _WINOGRAD[m][0]
    a = m + 2
    n, h, w, c = x.shape
    th, tw = _num_tiles((h, w), m)
    xp = jnp.pad(x, ((0, 0), (1, 1 + th * m - h), (1, 1 + tw * m - w), (0, 0)))
    d = [[xp[:, i:i + m * (th - 1) + 1:m, j:j + m * (tw - 1) + 1:m] for j in range(a)]
         for i in range(a)]
    rows = [[_combine(bt[k], [d[i][j] for i in range(a)]) for j in range(a)] for k in range(a)]
    return [_combine(bt[q], rows[k]).reshape(n * th * tw, c) for k in range(a) for q in range(a)]


def _winograd_kernel(w: jax.Array, m: int, flip: bool = False) -> list[jax.Array]:
    """G g G^T for a 3x3 HWIO kernel g (flip: g rotated by 180 degrees): (m + 2)^2 arrays
    [C_in, C_out]."""
    g = _WINOGRAD[m][1]
    if flip:
        g = tuple(row[::-1] for row in g)
    a = m + 2
    rows = [[_combine(g[k], [w[i, j] for i in range(3)]) for j in range(3)] for k in range(a)]
    return [_combine(g[q], rows[k]) for k in range(a) for q in range(a)]


def _winograd_outputs(prods: list[jax.Array], m: int, shape: tuple[int, ...]) -> jax.Array:
    """A^T M A for every tile of products M, interleaved into [B, H, W, C_out].

    Written as one dot of the (m^2, (m + 2)^2) matrix A^T (x) A^T with the stacked products,
    then a transpose that interleaves the tiles. Written instead as sums of products and
    stacks, XLA:CPU fused the interleave into the consumers (GroupNorm, swish and their
    gradients) and evaluated it twice per element there: up to 40 ms for one
    [8, 32, 32, 384] output, against about 2 ms this way."""
    at = np.asarray(_WINOGRAD[m][2], np.float64)
    a = m + 2
    n, h, w, co = shape
    th, tw = _num_tiles((h, w), m)
    a2 = np.einsum("rk,sl->rskl", at, at).reshape(m * m, a * a)
    stacked = jnp.stack(prods).reshape(a * a, -1)
    y = (jnp.asarray(a2, stacked.dtype) @ stacked).reshape(m, m, n, th, tw, co)
    y = jnp.transpose(y, (2, 3, 0, 4, 1, 5)).reshape(n, th * m, tw * m, co)
    return y[:, :h, :w]


def _winograd_conv(x: jax.Array, w: jax.Array, m: int, transpose: bool = False) -> jax.Array:
    """3x3, stride 1, padding 1 convolution by Winograd F(m x m, 3 x 3). transpose: convolve
    with w rotated by 180 degrees and its in and out channels swapped (the input gradient);
    the swap happens inside the dots rather than as a transposed copy of the kernel."""
    u = _winograd_kernel(w, m, flip=transpose)
    v = _winograd_inputs(x, m)
    if transpose:
        prods = [vp @ up.T for vp, up in zip(v, u, strict=True)]
    else:
        prods = [vp @ up for vp, up in zip(v, u, strict=True)]
    return _winograd_outputs(prods, m, (*x.shape[:3], w.shape[2 if transpose else 3]))


def _winograd_kernel_grad(x: jax.Array, g: jax.Array, m: int) -> jax.Array:
    """d loss / d w for y = conv(x, w) (3x3, stride 1, padding 1), through the same
    transforms: with V = B^T d B and G_y the output gradient of a tile, dU = V^T (A G_y A^T)
    summed over tiles, and dw = G^T dU G."""
    _, gm, at = _WINOGRAD[m]
    a = m + 2
    n, h, w, co = g.shape
    th, tw = _num_tiles((h, w), m)
    gp = jnp.pad(g, ((0, 0), (0, th * m - h), (0, tw * m - w), (0, 0)))
    gt = [[gp[:, r::m, s::m] for s in range(m)] for r in range(m)]  # [B, th, tw, C_out]
    # The transpose of the output transform: dM[k, q] = sum_rs AT[r, k] AT[s, q] G_y[r, s].
    cols = [[_combine([at[r][k] for r in range(m)], [gt[r][s] for r in range(m)])
             for s in range(m)] for k in range(a)]
    dm = [_combine([at[s][q] for s in range(m)], cols[k]).reshape(n * th * tw, co)
          for k in range(a) for q in range(a)]
    # V is recomputed rather than saved by the forward pass: the residuals stay (x, w), as
    # for the direct convolution, at the cost of one input transform (about 1-2 ms here).
    v = _winograd_inputs(x, m)
    du = [vp.T @ dmp for vp, dmp in zip(v, dm, strict=True)]  # [C_in, C_out] each
    # The transpose of the kernel transform: dw[i, j] = sum_kq G[k, i] G[q, j] dU[k, q].
    rows = [[_combine([gm[k][i] for k in range(a)], [du[k * a + q] for k in range(a)])
             for q in range(a)] for i in range(3)]
    return jnp.stack([jnp.stack([_combine([gm[q][j] for q in range(a)], rows[i])
                                 for j in range(3)]) for i in range(3)])


def _make_winograd_conv(m: int):
    @jax.custom_vjp
    def conv(x, w):
        return _winograd_conv(x, w, m)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        # Padding 1 on every side: the input gradient is the same convolution of g with the
        # spatially flipped kernel, its in and out channels swapped.
        return _winograd_conv(g, w, m, transpose=True), _winograd_kernel_grad(x, g, m)

    conv.defvjp(fwd, bwd)
    return conv


def _winograd_applies(x: jax.Array, w: jax.Array, strides, padding) -> bool:
    """Whether the CPU path computes this convolution by Winograd (see cpu_algorithm).
    Float32 only: the transforms' constants (up to 8 and 1/24) cost low precisions too
    many bits."""
    if _cpu_algorithm == "direct":
        return False
    eligible = (w.shape[:2] == (3, 3) and tuple(strides) == (1, 1)
                and tuple(padding) == ((1, 1), (1, 1))
                and x.dtype == jnp.float32 and w.dtype == jnp.float32)
    return eligible and (_cpu_algorithm == "winograd"
                         or min(w.shape[2], w.shape[3]) >= WINOGRAD_MIN_CHANNELS)


def _is_simple(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
               batch_group_count, padding) -> bool:
    ones = lambda d: d is None or all(int(v) == 1 for v in d)
    if lhs.ndim != 4 or dimension_numbers is None:
        return False
    canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CANONICAL)
    return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == canonical
            and ones(lhs_dilation)
            and ones(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1
            and not isinstance(padding, str)
            and all(lo >= 0 and hi >= 0 for lo, hi in padding))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` with canonical-form gradients on CPU (module docstring).

    Same arguments and result as ``lax.conv_general_dilated``. The CPU path
    applies to 2-D convolutions with NHWC/HWIO/NHWC dimension numbers, explicit
    non-negative padding, no dilation, one feature group and default
    precision; anything else goes to ``lax.conv_general_dilated`` directly.
    """
    standard = lambda x, w: lax.conv_general_dilated(
        x, w, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    if (precision is not None or preferred_element_type is not None
            or not _is_simple(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                              feature_group_count, batch_group_count, padding)):
        return standard(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if _winograd_applies(lhs, rhs, strides, pads):
        cpu = _make_winograd_conv(_winograd_tile(lhs.shape[1:3]))
    else:
        cpu = _make_cpu_conv(strides, pads)
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=standard)
