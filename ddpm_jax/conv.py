"""The U-Net's convolution: ``lax.conv_general_dilated``, with CPU-friendly gradients on CPU.

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

Every other backend (GPU, TPU) gets ``lax.conv_general_dilated`` unchanged:
the choice is made by ``lax.platform_dependent`` when the computation is
lowered, so an ahead-of-time compilation for TPU on a CPU host takes the
standard path. The values are the same convolution's; the gradients agree
with the standard ones to float32 rounding (tests/test_conv.py checks both
against float64 numpy).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
    return lax.platform_dependent(lhs, rhs, cpu=_make_cpu_conv(strides, pads), default=standard)
