"""Reverse-process samplers: ancestral DDPM (full or respaced), DDIM and
DPM-Solver++(2M), each as one `lax.scan`.

Everything here is a pure function of its arguments and an explicit key, and is
`jax.jit`-able with the shape and the string/int options static.

Structure, from the inside out:

- One step. `ddpm_step` and `ddim_step` map (x_t, t, t_next, model output,
  noise) to (next x, pred_x0); `dpm_solver_2m_step` maps (x_t, t, t_next,
  model output, solver state) to (next x, pred_x0, next state). They hold all
  of each sampler's math and know nothing of the model, the keys or the loop.
  Respaced DDPM is `ddpm_step` on a `respaced_schedule`, fed the x_0 that
  the model's output gives at the original timestep.
- The chain. `_scan_chain` is the one `lax.scan` every sampler runs in: per
  visited timestep it calls the model, draws the step's noise and applies a
  step function (a `StepFn`), and it records the trajectory (x_t and pred_x0
  every k steps) when asked. Its carry is (x, solver state, trajectory
  buffers); the solver state is a pytree the step function threads through
  (empty for DDPM and DDIM, a `DPMSolverState` for DPM-Solver++(2M), which
  needs the previous step's x_0 prediction).
- The entry points. `sample_with(s, model_fn, key, shape, options)` takes the
  options as a frozen `SampleOptions`, whose fields are checked when it is
  built; `sample(s, model_fn, key, shape, **options)` is the same with the
  options as keywords. `interpolate` decodes latent mixes with `sample`.

Keys. From the caller's key two keys are split off: one for the initial noise
x_T and one for the loop. The noise added at timestep t to the example with
global index g (``index_offset + i`` for row i of the batch) is drawn from
``fold_in(fold_in(loop_key, t), g)``, and x_T of that example from
``fold_in(init_key, g)``. So an example's whole chain depends only on the key,
its global index and its model outputs: the same key gives the same images,
the first k rows of a batch of n equal a batch of k, and a batch sharded over
devices (``sharding=``) or cut into calls (``index_offset=``) gives the same
images as one batch on one device.

Timesteps. With num_steps < T every sampler visits a subset of the timesteps,
given by ``spaced_timesteps`` (``ddim_timesteps`` without a schedule). The
spacing "linspace" takes ``round(linspace(T - 1, 0, num_steps))``, so the chain
always starts at t = T - 1 (pure noise, like DDPM) and always ends at t = 0;
num_steps = T gives every step. "uniform" is the striding of Song et al.'s
DDIM code, ``range(0, T, T // num_steps)`` (it starts at T - T // num_steps).
"quadratic" is ``round((T - 1) (i / (num_steps - 1))^2)`` and "logsnr" spaces
log(ab / (1 - ab)) evenly from T - 1 to 0; both keep num_steps distinct
timesteps. Defaults: "linspace" for "ddpm" and "ddim" (``ddim_spacing``),
"logsnr" for "dpm++2m". DDIM and DPM-Solver++ step from the last timestep to
"t = -1" where alpha_bar = 1, so their output is the model's prediction of x_0
at t = 0; ancestral DDPM's last step (t = 0, or index 0 of the respaced
process) adds no noise and returns the same.

Respacing. Ancestral sampling with num_steps < T runs the process restricted
to the visited timesteps k_0 < ... < k_{n-1}: betas 1 - ab[k_i] / ab[k_{i-1}],
with the posterior and the variances of that process ("learned_range"
interpolates between its two fixed log-variances; a "learned" log-variance is
used as the model gives it), the model still called at
the original timesteps, as Nichol & Dhariwal (2021) do. num_steps = T is
exactly the full process.

Classifier-free guidance. With ``labels`` and ``guidance_scale`` w the model
is called once on the doubled batch [x; x] with labels [y; null] and the two
outputs are combined as ``(1 + w) * out(x, y) - w * out(x, null)`` (the
convention of Ho & Salimans 2022: w = 0 is the plain conditional model). The
weights sum to one, so combining eps, x_0, v or x_{t-1} predictions is the
same thing; for learned variances only the mean half is guided and the
variance half is taken from the conditional call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SPACINGS = ("linspace", "uniform", "quadratic", "logsnr")
# Every spacing serves every sampler; the older name stays for callers that use it.
DDIM_SPACINGS = SPACINGS

ModelFn = Callable[..., jax.Array]


def _distinct_increasing(ts: np.ndarray, top: int) -> np.ndarray:
    """Makes sorted int timesteps in [0, top] strictly increasing, keeping their count.

    Where rounding put two entries on one timestep, the later one moves up to the
    next free timestep; entries pushed past `top` move back down the same way. The
    endpoints 0 and `top` stay when they were there.
    """
    ts = np.array(ts, np.int64)
    for i in range(1, len(ts)):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = min(ts[-1], top)
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts


def _log_snr_timesteps(alphas_cumprod: np.ndarray, num_steps: int, t_start: int) -> np.ndarray:
    """Timesteps 0..t_start, increasing, whose log-SNR is evenly spaced (see ddim_timesteps)."""
    ab = np.asarray(alphas_cumprod, np.float64)[: t_start + 1]
    log_snr = np.log(ab) - np.log1p(-ab)  # decreasing in t
    targets = np.linspace(log_snr[0], log_snr[-1], num_steps)
    # np.interp needs increasing abscissae: read the decreasing table backwards.
    t_cont = np.interp(targets, log_snr[::-1], np.arange(t_start, -1, -1, dtype=np.float64))
    return np.round(t_cont).astype(np.int64)


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace",
                   *, t_start: int | None = None,
                   alphas_cumprod: np.ndarray | None = None) -> np.ndarray:
    """The timesteps a strided chain (any sampler) visits, in the order visited.

    Args:
      num_timesteps: T of the schedule.
      num_steps: how many model evaluations (1 <= num_steps <= t_start + 1).
      spacing: one of `SPACINGS`:
        "linspace": ``round(linspace(t_start, 0, num_steps))``;
        "uniform": Song et al.'s DDIM striding, the first num_steps of
        ``range(0, t_start + 1, (t_start + 1) // num_steps)``, visited backwards;
        "quadratic": ``round(t_start (i / (num_steps - 1))^2)`` for i = 0..num_steps-1;
        "logsnr": log(ab / (1 - ab)) evenly spaced from t_start to t = 0, each
        value mapped to a timestep by linear interpolation of the log-SNR table
        and rounded to the nearest one (needs alphas_cumprod).
        Where "quadratic" or "logsnr" rounds two values onto one timestep, the
        neighbouring free timesteps are taken, so there are always num_steps
        distinct ones; all but "uniform" start at t_start and end at 0.
      t_start: the first timestep (default T - 1).
      alphas_cumprod: [T] the schedule's alpha-bars (only "logsnr" needs them;
        `spaced_timesteps` passes them from a `Schedule`).

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
    if spacing not in SPACINGS:
        raise ValueError(f"ddim_spacing (the spacing) must be one of {SPACINGS}, "
                         f"got {spacing!r}.")
    if num_steps == 1:
        return np.array([t_start], np.int32)
    if spacing == "linspace":
        return np.round(np.linspace(t_start, 0, num_steps)).astype(np.int32)
    if spacing == "uniform":
        ts = np.arange(0, t_start + 1, (t_start + 1) // num_steps)[:num_steps][::-1]
        return ts.astype(np.int32)
    if spacing == "quadratic":
        ts = np.round(t_start * (np.arange(num_steps) / (num_steps - 1)) ** 2)
    else:
        if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
            raise ValueError(f'spacing "logsnr" needs alphas_cumprod [{num_timesteps}] of the '
                             "schedule; use spaced_timesteps(schedule, ...).")
        ts = _log_snr_timesteps(alphas_cumprod, num_steps, t_start)
    return _distinct_increasing(ts, t_start)[::-1].astype(np.int32)


def _float64_alphas_cumprod(s: diffusion.Schedule) -> np.ndarray:
    """The schedule's alpha-bars in float64, from its betas (a concrete schedule only)."""
    try:
        betas = np.asarray(s.betas, np.float64)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "This sampler option needs a concrete schedule (it precomputes tables in "
            "numpy): close over the Schedule in the jitted function rather than pass it "
            "as a traced argument.") from None
    return np.cumprod(1.0 - betas)


def spaced_timesteps(s: diffusion.Schedule, num_steps: int, spacing: str = "linspace",
                     *, t_start: int | None = None) -> np.ndarray:
    """`ddim_timesteps` for the schedule s (any spacing, "logsnr" included).

    Returns:
      int32 [num_steps], strictly decreasing.
    """
    ab = _float64_alphas_cumprod(s) if spacing == "logsnr" else None
    return ddim_timesteps(s.num_timesteps, num_steps, spacing, t_start=t_start,
                          alphas_cumprod=ab)


def respaced_schedule(s: diffusion.Schedule, timesteps: Sequence[int]) -> diffusion.Schedule:
    """The diffusion restricted to a subset of its timesteps (respaced sampling).

    The kept timesteps k_0 < k_1 < ... keep their alpha-bars: the new process has
    beta_i = 1 - ab[k_i] / ab[k_{i-1}] (ab[k_{-1}] = 1), computed in float64 from
    s.betas, and all its tables (posterior, variances) follow from those betas,
    as in Nichol & Dhariwal's respacing. Index i of the result stands for the
    original timestep k_i.

    Args:
      s: the diffusion schedule (concrete, not traced).
      timesteps: the kept timesteps, distinct, in any order.

    Returns:
      A `Schedule` with len(timesteps) steps.
    """
    kept = np.sort(np.asarray(timesteps, np.int64))
    if len(np.unique(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= s.num_timesteps:
        raise ValueError(f"timesteps must be distinct and in [0, {s.num_timesteps - 1}].")
    ab = _float64_alphas_cumprod(s)[kept]
    return diffusion.make_schedule(1.0 - ab / np.append(1.0, ab[:-1]))


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleOptions:
    """How `sample_with` runs the reverse process; each field is checked when built.

    The checks that need only the field itself raise ValueError here, naming the
    field; those that need the schedule or the batch shape (t_start, num_steps,
    labels, x_init) are made by `sample_with`. Change a field with
    `dataclasses.replace`, which checks again.

    Fields may be arrays (labels, x_init, a traced eta, guidance_scale or
    index_offset). Such options are not hashable, so build them inside the
    jitted function (as `sample` does) rather than pass them as a static
    argument; options of plain Python values are hashable.

    Attributes:
      mean_type: "eps" | "xstart" | "xprev" | "v".
      var_type: "fixedlarge" | "fixedsmall" | "learned" | "learned_range".
      clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
      sampler: "ddpm" | "ddim" | "dpm++2m" (`SAMPLERS`).
      num_steps: model evaluations (default: all steps). For "ddpm" fewer than
        all runs the respaced process (`respaced_schedule`).
      eta: DDIM noise scale in [0, 1] (0: deterministic; 1 with num_steps = T
        is DDPM with fixedsmall variance). A Python number or a traced scalar;
        only a Python 0 skips drawing the noise.
      trajectory_every: if k, also return x_t and pred_x0 at every k-th step.
      labels: int32 [B] class labels for a class-conditional model.
      guidance_scale: classifier-free guidance weight w (needs labels and
        null_label); see the module docstring.
      null_label: the null class id (a model's num_classes).
      index_offset: global index of row 0 (int, may be traced), so a large
        sample cut into calls gives the same images as one call.
      x_init: [B, H, W, C] the starting x at t_start instead of fresh noise.
      t_start: the timestep the chain starts from (default T - 1).
      ddim_spacing: the spacing of "ddim" and "ddpm" when `spacing` is None
        (the older name of that option; default "linspace").
      spacing: which num_steps timesteps are visited, one of `SPACINGS` (see
        `ddim_timesteps`); None: ddim_spacing for "ddim" and "ddpm", "logsnr"
        for "dpm++2m".
      sharding: optional sharding of the [B, ...] arrays (e.g. a NamedSharding
        over a "data" mesh axis) applied to the chain's state under jit.
    """

    mean_type: str
    var_type: str
    clip_denoised: bool = True
    sampler: str = "ddpm"
    num_steps: int | None = None
    eta: float | jax.Array = 0.0
    trajectory_every: int | None = None
    labels: jax.Array | None = None
    guidance_scale: float | jax.Array | None = None
    null_label: int | None = None
    index_offset: int | jax.Array = 0
    x_init: jax.Array | None = None
    t_start: int | None = None
    ddim_spacing: str = "linspace"
    spacing: str | None = None
    sharding: jax.sharding.Sharding | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.mean_type not in diffusion.MEAN_TYPES:
            raise ValueError(f"mean_type must be one of {diffusion.MEAN_TYPES}, "
                             f"got {self.mean_type!r}.")
        if self.var_type not in diffusion.VAR_TYPES:
            raise ValueError(f"var_type must be one of {diffusion.VAR_TYPES}, "
                             f"got {self.var_type!r}.")
        if isinstance(self.eta, (int, float)) and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}.")
        if self.trajectory_every is not None and int(self.trajectory_every) < 1:
            raise ValueError(f"trajectory_every must be a positive int or None, "
                             f"got {self.trajectory_every}.")
        if self.guidance_scale is not None:
            if self.labels is None:
                raise ValueError("guidance_scale needs labels (class labels [B]).")
            if self.null_label is None:
                raise ValueError("guidance_scale needs null_label (the null class, usually "
                                 "num_classes).")
        if self.ddim_spacing not in SPACINGS:
            raise ValueError(f"ddim_spacing must be one of {SPACINGS}, "
                             f"got {self.ddim_spacing!r}.")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS} or None, got {self.spacing!r}.")

    @property
    def resolved_spacing(self) -> str:
        """The spacing used: `spacing`, or the sampler's default when it is None."""
        if self.spacing is not None:
            return self.spacing
        return default_spacing(self.sampler, self.ddim_spacing)


def default_spacing(sampler: str, ddim_spacing: str = "linspace") -> str:
    """The spacing a sampler uses when none is given: "logsnr" for "dpm++2m", else
    ddim_spacing ("linspace" by default)."""
    return "logsnr" if sampler == "dpm++2m" else ddim_spacing


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
        if var_type in diffusion.LEARNED_VAR_TYPES:
            mean = (1 + w) * cond[..., :channels] - w * uncond[..., :channels]
            return jnp.concatenate([mean, cond[..., channels:]], axis=-1)
        return (1 + w) * cond - w * uncond

    return guided


# ----------------------------------------------------------------------------- one step


def _per_example(a: jax.Array, x: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] broadcasting against x; a scalar stays a scalar."""
    return a if jnp.ndim(a) == 0 else jnp.reshape(a, (x.shape[0],) + (1,) * (x.ndim - 1))


def _batch_t(t: jax.Array, x: jax.Array) -> jax.Array:
    """t as int32 [B] (a scalar t is the same timestep for the whole batch)."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.int32), x.shape[:1])


def _check_noise(noise: jax.Array, x: jax.Array) -> None:
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, "
                         f"got {tuple(noise.shape)}.")


def ddpm_step(
    s: diffusion.Schedule,
    x: jax.Array,
    t: jax.Array,
    model_output: jax.Array,
    noise: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step, a draw from p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    x_{t-1} = mean + sigma z with the mean and variance of
    `diffusion.p_mean_variance` for any mean/var type; sigma = 0 where t = 0, so
    the last step adds no noise.

    Args:
      s: the diffusion schedule.
      x: [B, H, W, C] x_t.
      t: int32 [B] the current timesteps, or a scalar shared by the batch.
      model_output: [B, H, W, C] the model's output at (x, t) ([B, H, W, 2C] for
        learned variances).
      noise: [B, H, W, C] standard normal z (unused where t = 0).
      mean_type: "eps" | "xstart" | "xprev" | "v".
      var_type: "fixedlarge" | "fixedsmall" | "learned" | "learned_range".
      clip_denoised: clip the predicted x_0 to [-1, 1] before forming the mean.

    Returns:
      (x_prev, pred_x0), each [B, H, W, C]; x_prev has x's dtype.
    """
    _check_noise(noise, x)
    out = diffusion.p_mean_variance(s, model_output, x, _batch_t(t, x), mean_type=mean_type,
                                    var_type=var_type, clip_denoised=clip_denoised)
    std = jnp.where(_per_example(t > 0, x), jnp.exp(0.5 * out["log_variance"]), 0.0)
    x_prev = out["mean"] + std * noise
    return x_prev.astype(x.dtype), out["pred_xstart"]


def ddim_step(
    s: diffusion.Schedule,
    x: jax.Array,
    t: jax.Array,
    t_next: jax.Array,
    model_output: jax.Array,
    noise: jax.Array | None,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    eta: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step from t to an earlier t_next (Song et al. 2021, eq. 12).

    With x0 = pred_x0 (clipped if clip_denoised), eps recomputed from x0, ab the
    alphas_cumprod table and ab_next = 1 where t_next < 0 (the step to x_0):
    x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_next) / (1 - ab_t)) sqrt(1 - ab_t / ab_next).
    eta = 1 with t_next = t - 1 is the DDPM step with fixedsmall variance.

    Args:
      s: the diffusion schedule.
      x: [B, H, W, C] x_t.
      t: int32 [B] the current timesteps, or a scalar shared by the batch.
      t_next: int32, shaped like t: the timesteps to step to (< t); a negative
        one steps to x_0.
      model_output: [B, H, W, C] the model's output at (x, t) ([B, H, W, 2C] for
        learned variances; only the mean part is used).
      noise: [B, H, W, C] standard normal z, or None when eta is the Python
        number 0 (the deterministic step, which needs no noise).
      mean_type: "eps" | "xstart" | "xprev" | "v".
      var_type: "fixedlarge" | "fixedsmall" | "learned" | "learned_range" (says
        how to split model_output).
      clip_denoised: clip the predicted x_0 to [-1, 1].
      eta: the noise scale in [0, 1], a Python number or a traced scalar.

    Returns:
      (x_next, pred_x0), each [B, H, W, C]; x_next has x's dtype.
    """
    if noise is None:
        if not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError(f"noise must be an array like x unless eta is the Python number 0, "
                             f"got noise=None with eta={eta}.")
    else:
        _check_noise(noise, x)
    tb = _batch_t(t, x)
    out = diffusion.p_mean_variance(s, model_output, x, tb, mean_type=mean_type,
                                    var_type=var_type, clip_denoised=clip_denoised)
    x0 = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(s, x, tb, x0)
    ab_t = _per_example(jnp.take(s.alphas_cumprod, t), x)
    ab_s = _per_example(jnp.where(t_next >= 0, jnp.take(s.alphas_cumprod, jnp.maximum(t_next, 0)),
                                  1.0), x)
    x_next = jnp.sqrt(ab_s) * x0
    if noise is None:
        x_next = x_next + jnp.sqrt(1.0 - ab_s) * eps
    else:
        sigma = eta * jnp.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        dir_scale = jnp.sqrt(jnp.maximum(1.0 - ab_s - sigma**2, 0.0))
        x_next = x_next + dir_scale * eps + sigma * noise
    return x_next.astype(x.dtype), x0


class DPMSolverState(NamedTuple):
    """What `dpm_solver_2m_step` carries from one step to the next.

    Attributes:
      x0_prev: [B, H, W, C] the previous step's x_0 prediction.
      h_prev: float32 scalar, the previous step's log-SNR/2 increment h.
      has_prev: bool scalar, False before the first step (which is first-order).
    """

    x0_prev: jax.Array
    h_prev: jax.Array
    has_prev: jax.Array


def dpm_solver_state(x: jax.Array) -> DPMSolverState:
    """The state before the first `dpm_solver_2m_step` of a chain starting at x."""
    return DPMSolverState(jnp.zeros_like(x), jnp.zeros((), jnp.float32), jnp.zeros((), bool))


def _half_log_snr(s: diffusion.Schedule, t: jax.Array) -> jax.Array:
    """lambda_t = log(alpha_t / sigma_t) = (log ab_t - log(1 - ab_t)) / 2."""
    return 0.5 * (jnp.log(jnp.take(s.alphas_cumprod, t))
                  - jnp.take(s.log_one_minus_alphas_cumprod, t))


def dpm_solver_2m_step(
    s: diffusion.Schedule,
    x: jax.Array,
    t: jax.Array,
    t_next: jax.Array,
    model_output: jax.Array,
    state: DPMSolverState,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array, DPMSolverState]:
    """One step of DPM-Solver++(2M) from t to an earlier t_next (Lu et al. 2022, Alg. 2).

    With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma),
    h = lambda_next - lambda_t and x0 the data prediction at (x, t) (clipped if
    clip_denoised):
    x_next = (sigma_next / sigma_t) x - alpha_next (exp(-h) - 1) D,
    with D = x0 on the first step (first order; the DDIM step) and otherwise
    D = (1 + 1 / (2r)) x0 - 1 / (2r) x0_prev, r = h_prev / h (second order,
    multistep). A negative t_next is the step to alpha_bar = 1, which is first
    order and returns x0 (as DDIM's last step). Deterministic: draws no noise.

    Args:
      s: the diffusion schedule.
      x: [B, H, W, C] x_t.
      t: int32 scalar, the current timestep (shared by the batch).
      t_next: int32 scalar, the timestep to step to (< t); negative: to x_0.
      model_output: [B, H, W, C] the model's output at (x, t) ([B, H, W, 2C] for
        learned variances; only the mean part is used).
      state: a `DPMSolverState` (`dpm_solver_state(x)` before the first step).
      mean_type: "eps" | "xstart" | "xprev" | "v".
      var_type: says how to split model_output.
      clip_denoised: clip the predicted x_0 to [-1, 1].

    Returns:
      (x_next, pred_x0, new state); x_next has x's dtype.
    """
    if jnp.ndim(t) or jnp.ndim(t_next):
        raise ValueError(f"t and t_next must be scalars (one timestep for the batch), got "
                         f"shapes {jnp.shape(t)} and {jnp.shape(t_next)}.")
    out = diffusion.p_mean_variance(s, model_output, x, _batch_t(t, x), mean_type=mean_type,
                                    var_type=var_type, clip_denoised=clip_denoised)
    x0 = out["pred_xstart"]
    last = t_next < 0
    tn = jnp.maximum(t_next, 0)
    h = _half_log_snr(s, tn) - _half_log_snr(s, t)
    second = jnp.logical_and(state.has_prev, jnp.logical_not(last))
    half_inv_r = jnp.where(second, 0.5 * h / jnp.where(second, state.h_prev, 1.0), 0.0)
    d = (1.0 + half_inv_r) * x0 - half_inv_r * state.x0_prev
    sigma_ratio = jnp.exp(0.5 * (jnp.take(s.log_one_minus_alphas_cumprod, tn)
                                 - jnp.take(s.log_one_minus_alphas_cumprod, t)))
    x_next = sigma_ratio * x - jnp.take(s.sqrt_alphas_cumprod, tn) * jnp.expm1(-h) * d
    x_next = jnp.where(last, x0, x_next)
    new_state = DPMSolverState(x0, jnp.asarray(h, jnp.float32), jnp.ones((), bool))
    return x_next.astype(x.dtype), x0, new_state


# ----------------------------------------------------------------------------- the chain

# A chain step for `_scan_chain`: (x [B,H,W,C], t [], t_next [], model_output,
# noise [B,H,W,C] or None, state) -> (x_next, pred_x0, state), with t and t_next int32
# scalars (t_next = -1 on the last step). `state` is a pytree of fixed structure that the
# step threads from one step to the next (() for one-step samplers).
StepFn = Callable[..., tuple[jax.Array, jax.Array, Any]]


def _respaced_ddpm_step(s: diffusion.Schedule, sr: diffusion.Schedule, index_of: np.ndarray,
                        o: SampleOptions) -> StepFn:
    """The chain step of ancestral sampling in the respaced process sr.

    The model's output at the original timestep t gives pred_x0 through the
    original schedule (for every mean type, "xprev" included, whose output
    belongs to the one-step posterior at t); the step is then a `ddpm_step` of
    sr from its index index_of[t] with that pred_x0 and the model's variance
    part ("learned_range" interpolates in sr's range; "learned" is a
    log-variance taken as is).
    """
    kw = {"var_type": o.var_type, "clip_denoised": o.clip_denoised}
    index_of = jnp.asarray(index_of, jnp.int32)

    def step(x, t, t_next, out, noise, state):
        del t_next
        x0 = diffusion.p_mean_variance(s, out, x, _batch_t(t, x), mean_type=o.mean_type,
                                       **kw)["pred_xstart"]
        if o.var_type in diffusion.LEARNED_VAR_TYPES:
            x0 = jnp.concatenate([x0, out[..., x.shape[-1]:]], axis=-1)
        return (*ddpm_step(sr, x, index_of[t], x0, noise, mean_type="xstart", **kw), state)

    return step


def _sampler_step(s: diffusion.Schedule, o: SampleOptions, ts: np.ndarray,
                  x: jax.Array) -> tuple[StepFn, bool, Any]:
    """The chain step of o.sampler over the timesteps ts, whether it needs noise, and
    its initial solver state for a chain starting at x."""
    kw = {"mean_type": o.mean_type, "var_type": o.var_type, "clip_denoised": o.clip_denoised}
    if o.sampler == "ddpm" and len(ts) == ts[0] + 1:  # every step: the process itself
        def step(x, t, t_next, out, noise, state):
            del t_next
            return (*ddpm_step(s, x, t, out, noise, **kw), state)

        return step, True, ()
    if o.sampler == "ddpm":
        index_of = np.zeros(s.num_timesteps, np.int32)
        index_of[np.sort(ts)] = np.arange(len(ts), dtype=np.int32)
        return _respaced_ddpm_step(s, respaced_schedule(s, ts), index_of, o), True, ()
    if o.sampler == "dpm++2m":
        def dpm(x, t, t_next, out, noise, state):
            del noise
            return dpm_solver_2m_step(s, x, t, t_next, out, state, **kw)

        return dpm, False, dpm_solver_state(x)

    def ddim(x, t, t_next, out, noise, state):
        return (*ddim_step(s, x, t, t_next, out, noise, eta=o.eta, **kw), state)

    return ddim, not (isinstance(o.eta, (int, float)) and o.eta == 0), ()


def _save_every(buf: jax.Array, value: jax.Array, i: jax.Array, k: int) -> jax.Array:
    """buf[i // k] = value when i % k == 0 (buf unchanged otherwise)."""
    slot = i // k
    old = jax.lax.dynamic_index_in_dim(buf, slot, keepdims=False)
    new = jnp.where(i % k == 0, value, old)
    return jax.lax.dynamic_update_index_in_dim(buf, new, slot, 0)


def _scan_chain(
    net: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    ts: np.ndarray,
    t_next: np.ndarray,
    step_fn: StepFn,
    *,
    noise_fn: Callable[[jax.Array], jax.Array] | None = None,
    state: Any = (),
    trajectory_every: int | None = None,
    constrain: Callable[[jax.Array], jax.Array] = lambda a: a,
) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Runs a sampler's steps over the visited timesteps in one `lax.scan`.

    Each iteration calls the model once at (x, t [B]), draws that step's noise
    and applies step_fn (with t and t_next as scalars). The carry is (x, state,
    trajectory buffers): state is the solver's own pytree, so a multistep
    solver (one that needs earlier model outputs or timesteps) keeps them there
    and runs in this driver unchanged.

    Args:
      net: ``net(x [B,H,W,C], t [B]) -> model output``.
      x: [B, H, W, C] the chain's start, x at ts[0].
      ts: int [N] the visited timesteps, in order (static).
      t_next: int [N] the timestep after each, -1 after the last (static).
      step_fn: the sampler's step (see `StepFn`).
      noise_fn: ``noise_fn(t) -> [B, H, W, C]`` the noise of the step at t (a
        traced int32 scalar), or None for a step that draws none (it gets None).
      state: the initial solver state.
      trajectory_every: if k, record x_t and pred_x0 at steps 0, k, 2k, ...
      constrain: applied to each new x (e.g. a sharding constraint).

    Returns:
      (x after the last step [B, H, W, C], None or the trajectory
      ``{"x_t": [K,B,H,W,C], "pred_xstart": [K,B,H,W,C], "t": int32 [K]}``, K = ceil(N / k)).
    """
    k = None if trajectory_every is None else int(trajectory_every)
    batch = x.shape[0]

    def body(carry, inp):
        x, state, bufs = carry
        i, t, t_nx = inp
        noise = None if noise_fn is None else noise_fn(t)
        out = net(x, jnp.full((batch,), t, jnp.int32))
        x_new, x0, state = step_fn(x, t, t_nx, out, noise, state)
        if k is not None:
            bufs = (_save_every(bufs[0], x, i, k), _save_every(bufs[1], x0, i, k))
        return (constrain(x_new), state, bufs), None

    bufs = ()
    if k is not None:
        buf = jnp.zeros((math.ceil(len(ts) / k), *x.shape), jnp.float32)
        bufs = (buf, buf)
    xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts, jnp.int32),
          jnp.asarray(t_next, jnp.int32))
    (x, _, bufs), _ = jax.lax.scan(body, (x, state, bufs), xs)
    if k is None:
        return x, None
    return x, {"x_t": bufs[0], "pred_xstart": bufs[1], "t": jnp.asarray(ts[::k], jnp.int32)}


def _visited_timesteps(s: diffusion.Schedule, o: SampleOptions) -> tuple[np.ndarray, np.ndarray]:
    """The chain's timesteps and the one after each (-1 after the last), int32 [N] each."""
    num_timesteps = s.num_timesteps
    t_start = num_timesteps - 1 if o.t_start is None else int(o.t_start)
    if not 0 <= t_start < num_timesteps:
        raise ValueError(f"t_start must be in [0, {num_timesteps - 1}], got {t_start}.")
    num_steps = t_start + 1 if o.num_steps is None else int(o.num_steps)
    if o.sampler == "ddpm" and num_steps == t_start + 1:
        ts = np.arange(t_start, -1, -1, dtype=np.int32)
    elif o.sampler == "ddpm" and not 2 <= num_steps <= t_start + 1:
        raise ValueError(f"num_steps of sampler 'ddpm' must be in [2, {t_start + 1}] "
                         f"(respaced below {t_start + 1}), got {num_steps}.")
    else:
        ts = spaced_timesteps(s, num_steps, o.resolved_spacing, t_start=t_start)
    return ts, np.append(ts[1:], -1).astype(np.int32)


def sample_with(
    s: diffusion.Schedule,
    model_fn: ModelFn,
    key: jax.Array,
    shape: Sequence[int],
    options: SampleOptions,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Draws samples by running the reverse process in one `lax.scan`.

    "ddpm" runs `ddpm_step` at every timestep, or with num_steps < T the
    respaced process (`respaced_schedule`) over the spaced subset; "ddim" runs
    `ddim_step` and "dpm++2m" `dpm_solver_2m_step` over the spaced subset
    (`spaced_timesteps`); the keys are used as the module docstring says.

    Args:
      s: the diffusion schedule.
      model_fn: ``model_fn(x_t [B,H,W,C], t [B]) -> [B,H,W,C]`` ([B,H,W,2C] for
        learned variances), or ``model_fn(x_t, t, y [B])`` when labels are given.
      key: a typed key.
      shape: the batch shape (B, H, W, C) (static).
      options: a `SampleOptions`.

    Returns:
      samples [B,H,W,C] (not clipped; in [-1, 1] when clip_denoised), or with
      trajectory_every=k, ``(samples, {"x_t": [K,B,H,W,C], "pred_xstart":
      [K,B,H,W,C], "t": int32 [K]})`` with K = ceil(steps / k): the chain's
      input x_t and its predicted x_0 at the visited steps 0, k, 2k, ...
    """
    o = options
    shape = tuple(int(d) for d in shape)
    if o.labels is not None and tuple(jnp.shape(o.labels)) != shape[:1]:
        raise ValueError(f"labels must have shape [B] = ({shape[0]},), got {jnp.shape(o.labels)}.")
    ts, t_next = _visited_timesteps(s, o)
    if o.x_init is not None and tuple(o.x_init.shape) != shape:
        raise ValueError(f"x_init has shape {tuple(o.x_init.shape)}, expected {shape}.")
    constrain = (lambda a: a) if o.sharding is None else (
        lambda a: jax.lax.with_sharding_constraint(a, o.sharding))

    init_key, loop_key = jax.random.split(key)
    index = jnp.arange(shape[0], dtype=jnp.int32) + jnp.asarray(o.index_offset, jnp.int32)
    if o.x_init is None:
        x = example_normal(init_key, index, shape[1:])
    else:
        x = jnp.asarray(o.x_init, jnp.float32)
    net = _guided_model(model_fn, o.labels, o.guidance_scale, o.null_label, o.var_type,
                        shape[-1])
    step_fn, noisy, state = _sampler_step(s, o, ts, x)

    def noise_at(t):
        return constrain(example_normal(jax.random.fold_in(loop_key, t), index, shape[1:]))

    x, traj = _scan_chain(net, constrain(x), ts, t_next, step_fn,
                          noise_fn=noise_at if noisy else None, state=state,
                          trajectory_every=o.trajectory_every, constrain=constrain)
    return x if traj is None else (x, traj)


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
    spacing: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """`sample_with` with the `SampleOptions` given as keywords.

    Args:
      s: the diffusion schedule.
      model_fn: as in `sample_with`.
      key: a typed key.
      shape: the batch shape (B, H, W, C) (static).
      mean_type, var_type, clip_denoised, sampler, num_steps, eta,
        trajectory_every, labels, guidance_scale, null_label, index_offset,
        x_init, t_start, ddim_spacing, spacing, sharding: the fields of
        `SampleOptions`.

    Returns:
      As `sample_with`.
    """
    options = SampleOptions(
        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised, sampler=sampler,
        num_steps=num_steps, eta=eta, trajectory_every=trajectory_every, labels=labels,
        guidance_scale=guidance_scale, null_label=null_label, index_offset=index_offset,
        x_init=x_init, t_start=t_start, ddim_spacing=ddim_spacing, spacing=spacing,
        sharding=sharding)
    return sample_with(s, model_fn, key, shape, options)


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
