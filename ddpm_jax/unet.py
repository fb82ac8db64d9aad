"""The DDPM U-Net (Ho et al. 2020, appendix B) as a Flax Linen module.

A Wide-ResNet-style U-Net conditioned on the timestep through a sinusoidal
embedding, with self-attention at chosen resolutions. Images are NHWC.

Parameter tree (``variables["params"]``), named after the reference
implementation so that released weights map onto it one to one::

    temb/{dense0, dense1}            timestep MLP (ch -> 4ch -> 4ch)
    class_embed/embedding            only with ``num_classes`` set
    conv_in
    down_{i}/block_{j}/{norm1, conv1, temb_proj, norm2, conv2, nin_shortcut}
    down_{i}/attn_{j}/{norm, q, k, v, proj_out}     at attention resolutions
    down_{i}/downsample/conv                        all levels but the last
    mid/{block_1, attn_1, block_2}
    up_{i}/block_{j}, up_{i}/attn_{j}                j < num_res_blocks + 1
    up_{i}/upsample/conv                            all levels but the first
    norm_out, conv_out

1x1 convolutions (attention projections, shortcuts) are ``nn.Dense`` layers
acting on the channel axis, with kernels of shape [C_in, C_out].

Mixed precision: with ``dtype=bfloat16`` convolutions, dense layers and the
residual stream run in bfloat16, while parameters stay float32 and the group
norm statistics, the timestep sinusoids and the attention softmax are computed
in float32. The output is always float32. On the CIFAR-10 configuration with
random (all non-zero) weights, the bfloat16 output differs from the float32 one
by about 1.4% of the output's largest magnitude (max abs 0.05 for outputs of
standard deviation 0.8), the rounding error expected of bfloat16.

Parameter counts: 35,746,307 for the CIFAR-10 configuration (35,749,766 with
out_ch=6) and 113,673,219 for the 256x256 one, as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax import conv as conv_lib

NUM_GROUPS = 32
NORM_EPS = 1e-6

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# UNetConfig.remat -> the jax.checkpoint policy around each residual block.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Variance-scaling init (fan_avg, uniform); a scale of 0 means 1e-10."""
    return nn.initializers.variance_scaling(
        1e-10 if scale == 0 else scale, mode="fan_avg", distribution="uniform"
    )


def _canonical_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"UNetConfig.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        return _DTYPES[dtype]
    for value in _DTYPES.values():
        if jnp.dtype(dtype) == jnp.dtype(value):
            return value
    raise ValueError(
        f"UNetConfig.dtype must be float32 or bfloat16 (or their names), got {dtype!r}."
    )


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of the U-Net.

    Attributes:
      ch: base channel count (a multiple of 32, the group-norm group count).
      out_ch: output channels (C, or 2C for learned variances).
      ch_mult: channel multiplier per resolution level; len(ch_mult) levels.
      num_res_blocks: residual blocks per level on the way down (one more up).
      attn_resolutions: feature-map sizes (height) with self-attention.
      dropout: dropout rate inside the residual blocks (train mode only).
      resamp_with_conv: strided / post-upsampling 3x3 convs (else pooling and
        plain nearest upsampling).
      num_classes: if set, a learned class embedding with num_classes + 1 rows
        (the last one is the null class for classifier-free guidance) is added
        to the timestep embedding.
      dtype: computation dtype, jnp.float32 or jnp.bfloat16 (or their names).
      remat: rematerialization of the residual blocks in the backward pass,
        one of REMAT_POLICIES: "none" keeps every activation; "full"
        recomputes each block from its input (``jax.checkpoint`` with
        ``nothing_saveable``); "dots" keeps the outputs of convolutions and
        matrix products and recomputes the norms, activations and dropout
        (``dots_saveable``). The loss and the gradients are the same; the
        memory of the backward pass is lower, the compute higher.
    """

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_classes: int | None = None
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("ch_mult", tuple(int(m) for m in self.ch_mult))
        set_("attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        set_("dtype", _canonical_dtype(self.dtype))
        if int(self.ch) <= 0 or self.ch % NUM_GROUPS:
            raise ValueError(
                f"UNetConfig.ch must be a positive multiple of {NUM_GROUPS} (the group-norm "
                f"groups), got {self.ch}."
            )
        if int(self.out_ch) <= 0:
            raise ValueError(f"UNetConfig.out_ch must be positive, got {self.out_ch}.")
        if not self.ch_mult or min(self.ch_mult) <= 0:
            raise ValueError(
                f"UNetConfig.ch_mult must be a non-empty sequence of positive ints, "
                f"got {self.ch_mult}."
            )
        if int(self.num_res_blocks) < 1:
            raise ValueError(
                f"UNetConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}."
            )
        if any(r <= 0 for r in self.attn_resolutions):
            raise ValueError(
                f"UNetConfig.attn_resolutions must be positive sizes, got {self.attn_resolutions}."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"UNetConfig.remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}."
            )
        if self.num_classes is not None and int(self.num_classes) < 1:
            raise ValueError(
                f"UNetConfig.num_classes must be None or >= 1, got {self.num_classes}."
            )

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    def resolutions(self, image_size: int) -> tuple[int, ...]:
        """Feature-map sizes per level, from the input size down."""
        return tuple(image_size // 2**i for i in range(self.num_levels))

    def validate(self, image_size: int) -> None:
        """Raises ValueError if this net cannot take images of this size.

        The size must halve exactly at every downsampling, and every attention
        resolution must be one of the sizes the net passes through.
        """
        factor = 2 ** (self.num_levels - 1)
        if image_size <= 0 or image_size % factor:
            raise ValueError(
                f"image size {image_size} must be a positive multiple of 2**(len(ch_mult) - 1) "
                f"= {factor} for ch_mult={self.ch_mult}."
            )
        reached = self.resolutions(image_size)
        missing = sorted(set(self.attn_resolutions) - set(reached))
        if missing:
            raise ValueError(
                f"UNetConfig.attn_resolutions {self.attn_resolutions}: {missing} never reached "
                f"for image size {image_size}; the feature maps are {list(reached)}."
            )

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], *, out_ch: int) -> UNetConfig:
        """Builds a UNetConfig from a config's ``model`` section.

        Args:
          model_cfg: mapping (or ConfigDict) with the keys ch, ch_mult,
            num_res_blocks, attn_resolutions, dropout, resamp_with_conv and
            optionally num_classes, dtype and out_ch (which must then equal
            the out_ch argument), e.g. ``to_dict()`` output.
          out_ch: output channels (from the data channels and the var type).
        """
        cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
        if "out_ch" in cfg:  # e.g. UNetConfig.to_dict() output, as in checkpoint metadata
            if cfg.pop("out_ch") != out_ch:
                raise ValueError(
                    f"the model config says out_ch={model_cfg['out_ch']}, the caller {out_ch}."
                )
        fields = {f.name for f in dataclasses.fields(cls)} - {"out_ch"}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} in the model config; allowed: {sorted(fields)}."
            )
        required = fields - {"num_classes", "dtype", "remat"}
        missing = sorted(required - set(cfg))
        if missing:
            raise ValueError(f"the model config lacks the keys {missing}.")
        return cls(out_ch=out_ch, **cfg)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (dtype as its name), for JSON metadata."""
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        d["dtype"] = jnp.dtype(self.dtype).name
        return d


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal timestep embedding of the reference code.

    Frequencies exp(-log(10000) * i / (half - 1)), i < half = dim // 2, and
    [sin, cos] concatenated (zero-padded if dim is odd).

    Args:
      t: timesteps [B] (any numeric dtype).
      dim: embedding width.

    Returns:
      float32 [B, dim].
    """
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.GroupNorm):
    """Flax's ``nn.GroupNorm`` (32 groups, eps 1e-6, two-pass variance) in float32, optionally
    followed by swish, the result cast to ``out_dtype``.

    Params ``scale`` (ones) and ``bias`` (zeros) of shape [C], as ``nn.GroupNorm``
    names them. Against the diffusers reference in float64 the U-Net's output
    differs by about 1e-6 relative (tests/test_convert.py), as with the
    hand-written norm it replaced.
    """

    num_groups: int | None = NUM_GROUPS
    epsilon: float = NORM_EPS
    use_fast_variance: bool = False
    out_dtype: Any = jnp.float32
    act: bool = False

    def __call__(self, x: jax.Array) -> jax.Array:
        h = super().__call__(x.astype(jnp.float32))
        if self.act:
            h = nn.swish(h)
        return h.astype(self.out_dtype)


def _norm(name: str, dtype: Any, act: bool) -> GroupNorm:
    return GroupNorm(dtype=jnp.float32, param_dtype=jnp.float32, out_dtype=dtype, act=act,
                     name=name)


def _conv(features: int, name: str, dtype: Any, *, init_scale: float = 1.0, **kw) -> nn.Conv:
    return nn.Conv(
        features, (3, 3), padding=kw.pop("padding", ((1, 1), (1, 1))), dtype=dtype,
        kernel_init=default_init(init_scale), name=name,
        conv_general_dilated=conv_lib.conv_general_dilated, **kw,
    )


def _dense(features: int, name: str, dtype: Any, *, init_scale: float = 1.0) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=default_init(init_scale), name=name)


class ResnetBlock(nn.Module):
    """norm, swish, conv3x3, + dense(swish(temb)), norm, swish, dropout, conv3x3.

    A 1x1 projection (``nin_shortcut``) maps the input when channels change.
    """

    out_ch: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
        h = _norm("norm1", self.dtype, True)(x)
        h = _conv(self.out_ch, "conv1", self.dtype)(h)
        h = h + _dense(self.out_ch, "temb_proj", self.dtype)(nn.swish(temb))[:, None, None, :]
        h = _norm("norm2", self.dtype, True)(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, "conv2", self.dtype, init_scale=0.0)(h)
        if x.shape[-1] != self.out_ch:
            x = _dense(self.out_ch, "nin_shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _norm("norm", self.dtype, False)(x)
        q, k, v = (_dense(c, n, self.dtype)(h).reshape(b, hgt * wid, 1, c) for n in "qkv")
        # One head, scale C^-1/2, logits and softmax in float32.
        h = jax.nn.dot_product_attention(q, k, v).reshape(b, hgt, wid, c)
        h = _dense(c, "proj_out", self.dtype, init_scale=0.0)(h)
        return x + h


class Downsample(nn.Module):
    """Halves H and W: 3x3 conv, stride 2, TF "SAME" padding (bottom/right 1); or 2x2 mean."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return _conv(
                x.shape[-1], "conv", self.dtype, strides=(2, 2), padding=((0, 1), (0, 1))
            )(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Doubles H and W: nearest neighbour, then (optionally) a 3x3 conv."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = _conv(x.shape[-1], "conv", self.dtype)(x)
        return x


def _resblock(cfg: UNetConfig, out_ch: int, name: str) -> nn.Module:
    """A ResnetBlock, wrapped in ``nn.remat`` with the configured policy (same params)."""
    if cfg.remat == "none":
        return ResnetBlock(out_ch, cfg.dropout, cfg.dtype, name=name)
    # static_argnums counts self as 0: (x, temb, train) are 1, 2, 3.
    block = nn.remat(ResnetBlock, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3,))
    return block(out_ch, cfg.dropout, cfg.dtype, name=name)


class DownLevel(nn.Module):
    """num_res_blocks residual blocks (+ attention), then an optional downsample.

    Returns the skip activations, the last one being the level's output.
    """

    config: UNetConfig
    level: int
    use_attn: bool
    downsample: bool

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> list[jax.Array]:
        cfg = self.config
        out_ch = cfg.ch * cfg.ch_mult[self.level]
        hs = []
        for j in range(cfg.num_res_blocks):
            h = _resblock(cfg, out_ch, f"block_{j}")(h, temb, train)
            if self.use_attn:
                h = AttnBlock(cfg.dtype, name=f"attn_{j}")(h)
            hs.append(h)
        if self.downsample:
            hs.append(Downsample(cfg.resamp_with_conv, cfg.dtype, name="downsample")(h))
        return hs


class UpLevel(nn.Module):
    """num_res_blocks + 1 residual blocks on concat(h, skip) (+ attention), then upsample."""

    config: UNetConfig
    level: int
    use_attn: bool
    upsample: bool

    @nn.compact
    def __call__(
        self, h: jax.Array, skips: list[jax.Array], temb: jax.Array, *, train: bool
    ) -> jax.Array:
        cfg = self.config
        out_ch = cfg.ch * cfg.ch_mult[self.level]
        for j in range(cfg.num_res_blocks + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _resblock(cfg, out_ch, f"block_{j}")(h, temb, train)
            if self.use_attn:
                h = AttnBlock(cfg.dtype, name=f"attn_{j}")(h)
        if self.upsample:
            h = Upsample(cfg.resamp_with_conv, cfg.dtype, name="upsample")(h)
        return h


class UNet(nn.Module):
    """The DDPM U-Net: ``model.apply(variables, x, t, y=None, train=False, rngs=...)``.

    Attributes:
      config: a UNetConfig.
    """

    config: UNetConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        """Predicts the network output at noisy images x and timesteps t.

        Args:
          x: float [B, H, W, C] images in [-1, 1].
          t: int32 [B] timesteps, 0-indexed.
          y: int32 [B] class labels in [0, num_classes] (num_classes is the
            null class); only with ``config.num_classes``. None means the null
            class for every example.
          train: enables dropout (needs ``rngs={"dropout": key}``).

        Returns:
          float32 [B, H, W, out_ch].
        """
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}.")
        b, hgt, wid, _ = x.shape
        cfg.validate(hgt)
        if wid % 2 ** (cfg.num_levels - 1):
            raise ValueError(
                f"image width {wid} must be a multiple of {2 ** (cfg.num_levels - 1)} "
                f"for ch_mult={cfg.ch_mult}."
            )
        if t.shape != (b,):
            raise ValueError(f"t must have shape [B] = ({b},), got {t.shape}.")
        if cfg.num_classes is None and y is not None:
            raise ValueError("y (class labels) given but UNetConfig.num_classes is None.")
        if y is not None and y.shape != (b,):
            raise ValueError(f"y must have shape [B] = ({b},), got {y.shape}.")

        temb = TimestepMLP(cfg.ch, cfg.dtype, name="temb")(t)
        if cfg.num_classes is not None:
            if y is None:
                y = jnp.full((b,), cfg.num_classes, jnp.int32)
            temb = temb + nn.Embed(
                cfg.num_classes + 1, 4 * cfg.ch, dtype=cfg.dtype, name="class_embed"
            )(y)

        levels = range(cfg.num_levels)
        sizes = cfg.resolutions(hgt)
        hs = [_conv(cfg.ch, "conv_in", cfg.dtype)(x.astype(cfg.dtype))]
        for i in levels:
            hs += DownLevel(
                cfg, i, sizes[i] in cfg.attn_resolutions, i != cfg.num_levels - 1, name=f"down_{i}"
            )(hs[-1], temb, train=train)

        h = MidBlock(cfg, name="mid")(hs[-1], temb, train=train)

        for i in reversed(levels):
            h = UpLevel(cfg, i, sizes[i] in cfg.attn_resolutions, i != 0, name=f"up_{i}")(
                h, hs, temb, train=train
            )

        h = _norm("norm_out", cfg.dtype, True)(h)
        h = _conv(cfg.out_ch, "conv_out", cfg.dtype, init_scale=0.0)(h)
        return h.astype(jnp.float32)


class TimestepMLP(nn.Module):
    """Sinusoidal embedding of width ch, dense(4ch), swish, dense(4ch)."""

    ch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        temb = timestep_embedding(t, self.ch).astype(self.dtype)
        temb = _dense(4 * self.ch, "dense0", self.dtype)(temb)
        return _dense(4 * self.ch, "dense1", self.dtype)(nn.swish(temb))


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    config: UNetConfig

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        c = h.shape[-1]
        h = _resblock(cfg, c, "block_1")(h, temb, train)
        h = AttnBlock(cfg.dtype, name="attn_1")(h)
        return _resblock(cfg, c, "block_2")(h, temb, train)


def count_params(params: Any) -> int:
    """Number of scalars in a params pytree (works on ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def param_shapes(config: UNetConfig, image_size: int, channels: int = 3) -> Any:
    """Params pytree of ShapeDtypeStructs, without allocating or computing."""
    model = UNet(config)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32)),
        jax.random.key(0),
    )
    return variables["params"]

