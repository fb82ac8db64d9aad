"""The DDPM math as pure functions: forward process, posterior, model mean and variance,
losses and the variational bound in bits/dim.

This module never sees a network. A model enters as `model_fn(x_t, t) -> output`, with
x_t [B, H, W, C] and int32 t [B]; the output has C channels, or 2C for learned variances
(mean part first, then the variance part, split on the last axis). Timesteps are 0-indexed:
t = 0 is the first noising step, t = T - 1 the last.

The schedule is a `Schedule` of float32 tables computed once in float64 by `make_schedule`
and passed to every function as its first argument, so all of them are jit-able and work
for any batch and image shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")
# Weight of the variational-bound term in the hybrid loss (Nichol & Dhariwal 2021).
HYBRID_VB_WEIGHT = 0.001

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class Schedule(NamedTuple):
    """Diffusion tables, each float32 [T], computed in float64 (see `make_schedule`)."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(betas: np.ndarray) -> Schedule:
    """Precomputes the tables of the forward process and its posterior.

    Args:
      betas: [T] noise variances beta_t, in (0, 1]. Computed on in float64.

    Returns:
      A `Schedule` of float32 arrays [T].
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}.")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must lie in (0, 1].")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance is 0 at t = 0; its log is clipped by reusing the t = 1 value.
    posterior_variance_for_log = np.append(posterior_variance[1], posterior_variance[1:])
    tables = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(posterior_variance_for_log),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


# ----------------------------------------------------------------------------- helpers


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {field} {value!r}; allowed: {', '.join(allowed)}.")


def _check_t(t: jax.Array, x: jax.Array) -> None:
    if jnp.ndim(t) != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must have shape [B] matching the batch of x {x.shape}, got shape {jnp.shape(t)}."
        )


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape.")


def extract(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """Gathers table[t] and reshapes it to broadcast against x.

    Args:
      table: [T] a schedule table.
      t: int [B] timesteps.
      x: [B, ...] the array the result multiplies.

    Returns:
      [B, 1, ..., 1] with x.ndim dimensions, in the table's dtype.
    """
    _check_t(t, x)
    return jnp.take(table, t).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _split_output(model_output: jax.Array, x_t: jax.Array, var_type: str):
    """Splits a model output into its mean part and (for learned variances) variance part."""
    channels = x_t.shape[-1]
    if var_type in LEARNED_VAR_TYPES:
        expected = (*x_t.shape[:-1], 2 * channels)
        if model_output.shape != expected:
            raise ValueError(
                f"var_type {var_type!r} needs a model output of shape {expected} (mean and "
                f"variance parts), got {model_output.shape}."
            )
        return model_output[..., :channels], model_output[..., channels:]
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"var_type {var_type!r} needs a model output of shape {x_t.shape}, "
            f"got {model_output.shape}."
        )
    return model_output, None


# ----------------------------------------------------------------------------- forward process


def q_mean_variance(s: Schedule, x_start: jax.Array, t: jax.Array):
    """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I).

    Args:
      s: the schedule.
      x_start: [B, ...] x_0.
      t: int [B].

    Returns:
      (mean [B, ...], variance [B, 1, ..], log_variance [B, 1, ..]).
    """
    mean = extract(s.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = jnp.square(extract(s.sqrt_one_minus_alphas_cumprod, t, x_start))
    log_variance = extract(s.log_one_minus_alphas_cumprod, t, x_start)
    return mean, variance, log_variance


def q_sample(s: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0) as sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise.

    Args:
      s: the schedule.
      x_start: [B, ...] x_0.
      t: int [B].
      noise: [B, ...] standard normal, same shape as x_start.

    Returns:
      x_t [B, ...].
    """
    _check_same_shape("noise", noise, "x_start", x_start)
    return (
        extract(s.sqrt_alphas_cumprod, t, x_start) * x_start
        + extract(s.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(s: Schedule, x_start: jax.Array, x_t: jax.Array, t: jax.Array):
    """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0).

    Returns:
      (mean [B, ...], variance [B, 1, ..], log_variance_clipped [B, 1, ..]).
    """
    _check_same_shape("x_start", x_start, "x_t", x_t)
    mean = (
        extract(s.posterior_mean_coef1, t, x_t) * x_start
        + extract(s.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = extract(s.posterior_variance, t, x_t)
    log_variance_clipped = extract(s.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance_clipped


# ----------------------------------------------------------------------------- parametrizations


def predict_xstart_from_eps(s: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array):
    """x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
    _check_same_shape("eps", eps, "x_t", x_t)
    return (
        extract(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(s.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_xstart(s: Schedule, x_t: jax.Array, t: jax.Array, x_start: jax.Array):
    """eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t): the inverse of predict_xstart_from_eps."""
    _check_same_shape("x_start", x_start, "x_t", x_t)
    return (
        extract(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start
    ) / extract(s.sqrt_recipm1_alphas_cumprod, t, x_t)


def predict_xstart_from_xprev(s: Schedule, x_t: jax.Array, t: jax.Array, xprev: jax.Array):
    """Inverts the posterior mean: x_0 = (xprev - coef2_t x_t) / coef1_t."""
    _check_same_shape("xprev", xprev, "x_t", x_t)
    return (
        xprev - extract(s.posterior_mean_coef2, t, x_t) * x_t
    ) / extract(s.posterior_mean_coef1, t, x_t)


def predict_v(s: Schedule, x_start: jax.Array, t: jax.Array, eps: jax.Array):
    """The velocity v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022)."""
    _check_same_shape("eps", eps, "x_start", x_start)
    return (
        extract(s.sqrt_alphas_cumprod, t, x_start) * eps
        - extract(s.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
    )


def predict_xstart_from_v(s: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array):
    """x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v."""
    _check_same_shape("v", v, "x_t", x_t)
    return (
        extract(s.sqrt_alphas_cumprod, t, x_t) * x_t
        - extract(s.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def predict_eps_from_v(s: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array):
    """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v."""
    _check_same_shape("v", v, "x_t", x_t)
    return (
        extract(s.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + extract(s.sqrt_alphas_cumprod, t, x_t) * v
    )


# ----------------------------------------------------------------------------- reverse process


def _model_log_variance(s: Schedule, var_out, x_t, t, var_type: str):
    """Variance and log-variance of p(x_{t-1} | x_t) for each var_type."""
    if var_type == "fixedlarge":
        # sigma^2 = beta_t; for likelihoods the t = 0 value is the posterior variance at t = 1.
        log_table = jnp.concatenate([s.posterior_variance[1:2], s.betas[1:]])
        log_variance = jnp.broadcast_to(jnp.log(extract(log_table, t, x_t)), x_t.shape)
        variance = jnp.broadcast_to(extract(s.betas, t, x_t), x_t.shape)
        return variance, log_variance
    if var_type == "fixedsmall":
        log_variance = jnp.broadcast_to(
            extract(s.posterior_log_variance_clipped, t, x_t), x_t.shape
        )
        variance = jnp.broadcast_to(extract(s.posterior_variance, t, x_t), x_t.shape)
        return variance, log_variance
    if var_type == "learned":
        return jnp.exp(var_out), var_out
    # learned_range: v in [-1, 1] mixes log beta_t (v = 1) and the clipped posterior log-variance.
    min_log = extract(s.posterior_log_variance_clipped, t, x_t)
    max_log = extract(jnp.log(s.betas), t, x_t)
    frac = (var_out + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_variance), log_variance


def p_mean_variance(
    s: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """Mean and variance of the reverse step p(x_{t-1} | x_t) from a model output.

    Args:
      s: the schedule.
      model_output: [B, H, W, C], or [B, H, W, 2C] for learned variances.
      x_t: [B, H, W, C].
      t: int [B].
      mean_type: what the mean part predicts: "eps", "xstart", "xprev" or "v".
      var_type: "fixedlarge" (beta_t), "fixedsmall" (posterior variance), "learned" (the
        variance part is a log-variance) or "learned_range" (the variance part, in [-1, 1],
        interpolates between the two fixed log-variances).
      clip_denoised: clip the predicted x_0 to [-1, 1] before forming the mean.

    Returns:
      dict with "mean", "variance", "log_variance", "pred_xstart", each [B, H, W, C].
    """
    _check_choice("mean_type", mean_type, MEAN_TYPES)
    _check_choice("var_type", var_type, VAR_TYPES)
    mean_out, var_out = _split_output(model_output, x_t, var_type)
    variance, log_variance = _model_log_variance(s, var_out, x_t, t, var_type)

    def process(x):
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

    if mean_type == "xprev":
        pred_xstart = process(predict_xstart_from_xprev(s, x_t, t, mean_out))
        mean = mean_out
    else:
        if mean_type == "xstart":
            pred_xstart = process(mean_out)
        elif mean_type == "eps":
            pred_xstart = process(predict_xstart_from_eps(s, x_t, t, mean_out))
        else:
            pred_xstart = process(predict_xstart_from_v(s, x_t, t, mean_out))
        mean, _, _ = q_posterior_mean_variance(s, pred_xstart, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)


# ----------------------------------------------------------------------------- likelihoods


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise (broadcasting)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by the reference code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """Log-likelihood of 8-bit data under a Gaussian discretized into 256 bins.

    The bins are [x - 1/255, x + 1/255] for data x scaled to [-1, 1]; the two edge bins
    extend to -inf and +inf. Probabilities are floored at 1e-12.

    Args:
      x: [B, ...] data in [-1, 1] (uint8 values scaled by x / 127.5 - 1).
      means: [B, ...] Gaussian means.
      log_scales: log standard deviations, broadcastable to x.

    Returns:
      [B, ...] log-probabilities in nats.
    """
    _check_same_shape("means", means, "x", x)
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_terms_bpd(
    s: Schedule,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
):
    """One term of the variational bound, in bits per dimension.

    For t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0: the decoder's
    -log p(x_0 | x_1) under the discretized Gaussian. Both averaged over dimensions.

    Returns:
      (bpd [B], pred_xstart [B, H, W, C]).
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(s, x_start, x_t, t)
    out = p_mean_variance(
        s, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised,
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
    )
    bpd = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
    return bpd, out["pred_xstart"]


def prior_bpd(s: Schedule, x_start: jax.Array) -> jax.Array:
    """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: [B, ...] -> [B].

    It does not depend on the model; for the linear T = 1000 schedule it is about 1e-5.
    """
    t = jnp.full((x_start.shape[0],), s.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(s, x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


# ----------------------------------------------------------------------------- losses


def training_losses(
    s: Schedule,
    model_fn: ModelFn,
    x_start: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    loss_type: str,
) -> jax.Array:
    """Per-example training loss at timesteps t.

    Loss types:
      "mse": the paper's L_simple for eps (mean over pixels of the squared error between the
        target of mean_type and the mean part of the output); the target is eps, x_0, the
        posterior mean or v. Needs a fixed variance.
      "kl": the variational-bound term L_t in bits/dim (`vb_terms_bpd`, no clipping).
      "hybrid": mse + 0.001 * T * L_t (Nichol & Dhariwal 2021's L_simple + lambda L_vlb, with
        L_vlb estimated as T L_t), the bound term seeing the mean through a stop-gradient, so
        it trains only the variance. Needs a learned variance.

    Args:
      s: the schedule.
      model_fn: (x_t [B, H, W, C], t [B]) -> [B, H, W, C] or [B, H, W, 2C].
      x_start: [B, H, W, C] data in [-1, 1].
      t: int [B] timesteps in 0..T-1.
      noise: [B, H, W, C] standard normal.
      mean_type, var_type, loss_type: see the module constants.

    Returns:
      [B] losses.
    """
    _check_choice("mean_type", mean_type, MEAN_TYPES)
    _check_choice("var_type", var_type, VAR_TYPES)
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    learned = var_type in LEARNED_VAR_TYPES
    if loss_type == "mse" and learned:
        raise ValueError(
            f"loss_type 'mse' cannot train var_type {var_type!r}; use loss_type 'hybrid' or "
            "'kl', or a fixed var_type ('fixedlarge', 'fixedsmall')."
        )
    if loss_type == "hybrid" and not learned:
        raise ValueError(
            f"loss_type 'hybrid' needs a learned var_type ('learned', 'learned_range'), got "
            f"{var_type!r}; use loss_type 'mse' for a fixed variance."
        )
    x_t = q_sample(s, x_start, t, noise)
    model_output = model_fn(x_t, t)
    if loss_type == "kl":
        bpd, _ = vb_terms_bpd(
            s, model_output, x_start, x_t, t,
            mean_type=mean_type, var_type=var_type, clip_denoised=False,
        )
        return bpd

    mean_out, var_out = _split_output(model_output, x_t, var_type)
    if mean_type == "eps":
        target = noise
    elif mean_type == "xstart":
        target = x_start
    elif mean_type == "xprev":
        target, _, _ = q_posterior_mean_variance(s, x_start, x_t, t)
    else:
        target = predict_v(s, x_start, t, noise)
    losses = mean_flat(jnp.square(target - mean_out))
    if loss_type == "hybrid":
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
        vb, _ = vb_terms_bpd(
            s, frozen, x_start, x_t, t,
            mean_type=mean_type, var_type=var_type, clip_denoised=False,
        )
        losses = losses + HYBRID_VB_WEIGHT * s.num_timesteps * vb
    return losses


def calc_bpd_loop(
    s: Schedule,
    model_fn: ModelFn,
    x_start: jax.Array,
    key: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """The full variational bound of x_0 in bits/dim, every term evaluated.

    Each term t draws its own x_t ~ q(x_t | x_0) with noise from fold_in(key, t). The loop over
    t = T-1 .. 0 is one lax.scan.

    Args:
      s: the schedule.
      model_fn: (x_t, t) -> output.
      x_start: [B, H, W, C] data in [-1, 1] (discretized 8-bit values).
      key: a PRNG key.
      mean_type, var_type, clip_denoised: as in `p_mean_variance`.

    Returns:
      dict with "total_bpd" [B] (the sum of all terms and the prior), "terms_bpd" [B, T]
      (indexed by t), "prior_bpd" [B], "mse" [B, T] (squared error of pred_x0 per t).
    """
    batch = x_start.shape[0]

    def body(carry, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x_start.shape, x_start.dtype)
        x_t = q_sample(s, x_start, t, noise)
        bpd, pred_xstart = vb_terms_bpd(
            s, model_fn(x_t, t), x_start, x_t, t,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        )
        return carry, (bpd, mean_flat(jnp.square(pred_xstart - x_start)))

    ts = jnp.arange(s.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (terms, mse) = jax.lax.scan(body, None, ts)
    # The scan ran t = T-1 .. 0; flip so column t holds term t.
    terms_bpd = jnp.flip(terms, axis=0).T
    mse = jnp.flip(mse, axis=0).T
    prior = prior_bpd(s, x_start)
    return dict(
        total_bpd=jnp.sum(terms_bpd, axis=1) + prior,
        terms_bpd=terms_bpd,
        prior_bpd=prior,
        mse=mse,
    )
