"""Reverse-process samplers: ancestral DDPM and DDIM as one `lax.scan`.

Everything here is a pure function of its arguments and an explicit key, and is
`jax.jit`-able with the shape and the string/int options static.

Keys. From the caller's key two keys are split off: one for the initial noise
x_T and one for the loop. The noise added at timestep t to the example with
global index g (``index_offset + i`` for row i of the batch) is drawn from
``fold_in(fold_in(loop_key, t), g)``, and x_T of that example from
``fold_in(init_key, g)``. So an example's whole chain depends only on the key,
its global index and its model outputs: the same key gives the same images,
the first k rows of a batch of n equal a batch of k, and a batch sharded over
devices (``sharding=``) or cut into calls (``index_offset=``) gives the same
images as one batch on one device.

DDIM timesteps. ``ddim_timesteps`` gives the strided subset. The default
spacing "linspace" takes ``round(linspace(T - 1, 0, num_steps))``, so the chain
always starts at t = T - 1 (pure noise, like DDPM) and always ends at t = 0;
num_steps = T gives every step. "uniform" is the striding of Song et al.'s
DDIM code, ``range(0, T, T // num_steps)`` (it starts at T - T // num_steps).
After the last timestep the chain steps to "t = -1" where alpha_bar = 1, so
the output is the model's prediction of x_0 at t = 0.

Classifier-free guidance. With ``labels`` and ``guidance_scale`` w the model
is called once on the doubled batch [x; x] with labels [y; null] and the two
outputs are combined as ``(1 + w) * out(x, y) - w * out(x, null)`` (the
convention of Ho & Salimans 2022: w = 0 is the plain conditional model). The
weights sum to one, so combining eps, x_0, v or x_{t-1} predictions is the
same thing; for learned variances only the mean half is guided and the
variance half is taken from the conditional call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion

SAMPLERS = ("ddpm", "ddim")
DDIM_SPACINGS = ("linspace", "uniform")
_LEARNED_VARS = ("learned", "learned_range")

ModelFn = Callable[..., jax.Array]


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace",
                   *, t_start: int | None = None) -> np.ndarray:
    """The strided timesteps a DDIM chain visits, in the order visited.

    Args:
      num_timesteps: T of the schedule.
      num_steps: how many model evaluations (1 <= num_steps <= t_start + 1).
      spacing: "linspace" (evenly spaced from t_start down to 0, both included)
        or "uniform" (Song et al.: the first num_steps of
        range(0, t_start + 1, (t_start + 1) // num_steps), visited backwards).
      t_start: the first timestep (default T - 1).

    Returns:
      int32 [num_steps], strictly decreasing.
    """
    t_start = num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < num_timesteps:
        raise ValueError(f"t_start must be in [0, {num_timesteps - 1}], got {t_start}.")
    if not 1 <= num_steps <= t_start + 1:
        raise ValueError(
            f"num_steps must be in [1, {t_start + 1}] (the timesteps available), "
            f"got {num_steps}.")
    if spacing == "linspace":
        ts = np.round(np.linspace(t_start, 0, num_steps)).astype(np.int32)
        if num_steps == 1:
            ts = np.array([t_start], np.int32)
    elif spacing == "uniform":
        ts = np.arange(0, t_start + 1, (t_start + 1) // num_steps)[:num_steps][::-1]
        ts = ts.astype(np.int32)
    else:
        raise ValueError(f"ddim_spacing must be one of {DDIM_SPACINGS}, got {spacing!r}.")
    return ts


def example_normal(key: jax.Array, indices: jax.Array, shape: Sequence[int],
                   dtype: Any = jnp.float32) -> jax.Array:
    """Standard normal noise, row i drawn from ``fold_in(key, indices[i])``.

    Args:
      key: a typed key.
      indices: int [B] global example indices.
      shape: the shape of one example, e.g. (H, W, C).

    Returns:
      [B, *shape].
    """
    draw = lambda g: jax.random.normal(jax.random.fold_in(key, g), tuple(shape), dtype)
    return jax.vmap(draw)(indices)


def _check_options(sampler, mean_type, var_type, eta, trajectory_every, labels,
                   guidance_scale, null_label, ddim_spacing):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if mean_type not in ("eps", "xstart", "xprev", "v"):
        raise ValueError(f"mean_type must be one of ('eps', 'xstart', 'xprev', 'v'), "
                         f"got {mean_type!r}.")
    if var_type not in ("fixedlarge", "fixedsmall", "learned", "learned_range"):
        raise ValueError("var_type must be one of ('fixedlarge', 'fixedsmall', 'learned', "
                         f"'learned_range'), got {var_type!r}.")
    if isinstance(eta, (int, float)) and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}.")
    if trajectory_every is not None and int(trajectory_every) < 1:
        raise ValueError(f"trajectory_every must be a positive int or None, "
                         f"got {trajectory_every}.")
    if guidance_scale is not None:
        if labels is None:
            raise ValueError("guidance_scale needs labels (class labels [B]).")
        if null_label is None:
            raise ValueError("guidance_scale needs null_label (the null class, usually "
                             "num_classes).")
    if ddim_spacing not in DDIM_SPACINGS:
        raise ValueError(f"ddim_spacing must be one of {DDIM_SPACINGS}, got {ddim_spacing!r}.")


def _guided_model(model_fn: ModelFn, labels, guidance_scale, null_label, var_type,
                  channels: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """model_fn(x, t) with labels and classifier-free guidance folded in."""
    if labels is None:
        return model_fn
    labels = jnp.asarray(labels, jnp.int32)
    if guidance_scale is None:
        return lambda x, t: model_fn(x, t, labels)

    def guided(x, t):
        null = jnp.full_like(labels, null_label)
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([labels, null]))
        cond, uncond = jnp.split(out, 2, axis=0)
        w = jnp.asarray(guidance_scale, cond.dtype)
        if var_type in _LEARNED_VARS:
            mean = (1 + w) * cond[..., :channels] - w * uncond[..., :channels]
            return jnp.concatenate([mean, cond[..., channels:]], axis=-1)
        return (1 + w) * cond - w * uncond

    return guided


def sample(
    s: diffusion.Schedule,
    model_fn: ModelFn,
    key: jax.Array,
    shape: Sequence[int],
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    eta: float | jax.Array = 0.0,
    trajectory_every: int | None = None,
    labels: jax.Array | None = None,
    guidance_scale: float | jax.Array | None = None,
    null_label: int | None = None,
    index_offset: int | jax.Array = 0,
    x_init: jax.Array | None = None,
    t_start: int | None = None,
    ddim_spacing: str = "linspace",
    sharding: jax.sharding.Sharding | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Draws samples by running the reverse process in one `lax.scan`.

    "ddpm" is ancestral sampling (Ho et al. 2020, Algorithm 2) with the mean
    and variance of `diffusion.p_mean_variance` for any mean/var type; no noise
    is added at t = 0. "ddim" (Song et al. 2021, eq. 12) visits the
    `ddim_timesteps` subset; with x0 = pred_xstart (clipped if clip_denoised),
    eps recomputed from x0, and s the next timestep (alpha_bar = 1 after t = 0):
    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s).

    Args:
      s: the diffusion schedule.
      model_fn: ``model_fn(x_t [B,H,W,C], t [B]) -> [B,H,W,C]`` ([B,H,W,2C] for
        learned variances), or ``model_fn(x_t, t, y [B])`` when labels are given.
      key: a typed key; see the module docstring for how it is used.
      shape: the batch shape (B, H, W, C) (static).
      mean_type: "eps" | "xstart" | "xprev" | "v".
      var_type: "fixedlarge" | "fixedsmall" | "learned" | "learned_range".
      clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
      sampler: "ddpm" | "ddim".
      num_steps: DDIM model evaluations (default: all steps). Not for "ddpm".
      eta: DDIM noise scale in [0, 1] (0: deterministic; 1 with num_steps = T
        is DDPM with fixedsmall variance).
      trajectory_every: if k, also return x_t and pred_x0 at every k-th step.
      labels: int32 [B] class labels for a class-conditional model.
      guidance_scale: classifier-free guidance weight w (needs labels and
        null_label); see the module docstring.
      null_label: the null class id (a model's num_classes).
      index_offset: global index of row 0 (int, may be traced), so a large
        sample cut into calls gives the same images as one call.
      x_init: [B,H,W,C] the starting x at t_start instead of fresh noise.
      t_start: the timestep the chain starts from (default T - 1).
      ddim_spacing: "linspace" | "uniform", see `ddim_timesteps`.
      sharding: optional sharding of the [B, ...] arrays (e.g. a NamedSharding
        over a "data" mesh axis) applied to the chain's state under jit.

    Returns:
      samples [B,H,W,C] (not clipped; in [-1, 1] when clip_denoised), or with
      trajectory_every=k, ``(samples, {"x_t": [K,B,H,W,C], "pred_xstart":
      [K,B,H,W,C], "t": int32 [K]})`` with K = ceil(steps / k): the chain's
      input x_t and its predicted x_0 at the visited steps 0, k, 2k, ...
    """
    _check_options(sampler, mean_type, var_type, eta, trajectory_every, labels,
                   guidance_scale, null_label, ddim_spacing)
    shape = tuple(int(d) for d in shape)
    if labels is not None and tuple(jnp.shape(labels)) != shape[:1]:
        raise ValueError(f"labels must have shape [B] = ({shape[0]},), got {jnp.shape(labels)}.")
    num_timesteps = s.num_timesteps
    t_start = num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < num_timesteps:
        raise ValueError(f"t_start must be in [0, {num_timesteps - 1}], got {t_start}.")
    if sampler == "ddpm":
        if num_steps is not None and num_steps != t_start + 1:
            raise ValueError(f"num_steps is for sampler='ddim'; ddpm always takes every step "
                             f"({t_start + 1}). Got num_steps={num_steps}.")
        ts = np.arange(t_start, -1, -1, dtype=np.int32)
    else:
        ts = ddim_timesteps(num_timesteps, t_start + 1 if num_steps is None else num_steps,
                            ddim_spacing, t_start=t_start)
    t_next = np.append(ts[1:], -1).astype(np.int32)
    n = len(ts)
    channels = shape[-1]
    constrain = (lambda a: a) if sharding is None else (
        lambda a: jax.lax.with_sharding_constraint(a, sharding))

    init_key, loop_key = jax.random.split(key)
    index = jnp.arange(shape[0], dtype=jnp.int32) + jnp.asarray(index_offset, jnp.int32)
    if x_init is None:
        x = example_normal(init_key, index, shape[1:])
    else:
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {shape}.")
        x = jnp.asarray(x_init, jnp.float32)
    x = constrain(x)
    net = _guided_model(model_fn, labels, guidance_scale, null_label, var_type, channels)
    deterministic = sampler == "ddim" and isinstance(eta, (int, float)) and eta == 0

    def noise_at(t):
        return constrain(example_normal(jax.random.fold_in(loop_key, t), index, shape[1:]))

    def bcast(a):
        return jnp.reshape(a, (1,) * len(shape))

    def step(x, t, t_nx):
        tb = jnp.full((shape[0],), t, jnp.int32)
        out = diffusion.p_mean_variance(s, net(x, tb), x, tb, mean_type=mean_type,
                                        var_type=var_type, clip_denoised=clip_denoised)
        x0 = out["pred_xstart"]
        if sampler == "ddpm":
            std = jnp.where(t > 0, jnp.exp(0.5 * out["log_variance"]), 0.0)
            x_new = out["mean"] + std * noise_at(t)
        else:
            eps = diffusion.predict_eps_from_xstart(s, x, tb, x0)
            ab_t = s.alphas_cumprod[t]
            ab_s = jnp.where(t_nx >= 0, s.alphas_cumprod[jnp.maximum(t_nx, 0)], 1.0)
            x_new = jnp.sqrt(ab_s) * x0
            if deterministic:
                x_new = x_new + jnp.sqrt(1.0 - ab_s) * eps
            else:
                sigma = eta * jnp.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
                dir_scale = jnp.sqrt(jnp.maximum(1.0 - ab_s - sigma**2, 0.0))
                x_new = x_new + dir_scale * eps + bcast(sigma) * noise_at(t)
        return constrain(x_new.astype(x.dtype)), x0

    xs = (jnp.arange(n, dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(t_next))
    if trajectory_every is None:
        def body(x, inp):
            _, t, t_nx = inp
            return step(x, t, t_nx)[0], None

        x, _ = jax.lax.scan(body, x, xs)
        return x

    k = int(trajectory_every)
    num_saved = math.ceil(n / k)
    buf = jnp.zeros((num_saved, *shape), jnp.float32)

    def save(b, value, i):
        slot = i // k
        old = jax.lax.dynamic_index_in_dim(b, slot, keepdims=False)
        new = jnp.where(i % k == 0, value, old)
        return jax.lax.dynamic_update_index_in_dim(b, new, slot, 0)

    def body_traj(carry, inp):
        x, xt_buf, x0_buf = carry
        i, t, t_nx = inp
        x_new, x0 = step(x, t, t_nx)
        return (x_new, save(xt_buf, x, i), save(x0_buf, x0, i)), None

    (x, xt_buf, x0_buf), _ = jax.lax.scan(body_traj, (x, buf, buf), xs)
    traj = {"x_t": xt_buf, "pred_xstart": x0_buf, "t": jnp.asarray(ts[::k])}
    return x, traj


def interpolate(
    s: diffusion.Schedule,
    model_fn: ModelFn,
    key: jax.Array,
    x0_a: jax.Array,
    x0_b: jax.Array,
    t: int,
    lambdas: jax.Array | Sequence[float],
    **sample_kwargs: Any,
) -> jax.Array:
    """Interpolates two images in latent space (Ho et al. 2020, Fig. 8).

    Both images are diffused to step t with `diffusion.q_sample` and the same
    noise, the latents are mixed linearly, x_t = (1 - lam) x_t^a + lam x_t^b, and
    each mix is decoded with the reverse chain from t. The reverse-process noise
    is the same for every lam (each lam's chain uses the same key and example
    indices), as in the paper.

    Args:
      s: the diffusion schedule.
      model_fn: as in `sample`.
      key: a typed key.
      x0_a: [B,H,W,C] first images in [-1, 1].
      x0_b: [B,H,W,C] second images in [-1, 1].
      t: the step to diffuse to (0 <= t < T, static).
      lambdas: [L] mixing weights (lam = 0 gives a reconstruction of x0_a).
      **sample_kwargs: mean_type, var_type and the other keyword options of
        `sample` (not x_init, t_start or trajectory_every).

    Returns:
      [L, B, H, W, C] decoded images.
    """
    for name in ("x_init", "t_start", "trajectory_every", "shape"):
        if name in sample_kwargs:
            raise ValueError(f"interpolate sets {name} itself; do not pass it.")
    if x0_a.shape != x0_b.shape:
        raise ValueError(f"x0_a and x0_b must have the same shape, got {x0_a.shape} "
                         f"and {x0_b.shape}.")
    t = int(t)
    if not 0 <= t < s.num_timesteps:
        raise ValueError(f"t must be in [0, {s.num_timesteps - 1}], got {t}.")
    encode_key, decode_key = jax.random.split(key)
    batch = x0_a.shape[0]
    offset = jnp.asarray(sample_kwargs.get("index_offset", 0), jnp.int32)
    noise = example_normal(encode_key, jnp.arange(batch, dtype=jnp.int32) + offset,
                           x0_a.shape[1:])
    tb = jnp.full((batch,), t, jnp.int32)
    lat_a = diffusion.q_sample(s, x0_a, tb, noise)
    lat_b = diffusion.q_sample(s, x0_b, tb, noise)

    def decode(lam):
        x_t = (1.0 - lam) * lat_a + lam * lat_b
        return sample(s, model_fn, decode_key, x0_a.shape, x_init=x_t, t_start=t,
                      **sample_kwargs)

    return jax.vmap(decode)(jnp.asarray(lambdas, jnp.float32))
