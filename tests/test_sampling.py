"""Tests for ddpm_jax.sampling against closed forms and float64 numpy chains.

The oracle: for data x0 ~ N(m, c^2) (scalar "images" [N, 1, 1, 1]) the exact
denoiser is known in closed form, E[x0 | x_t] = m + sqrt(ab) c^2 (x_t -
sqrt(ab) m) / (ab c^2 + 1 - ab), and every sampler step is affine in x_t, so
the exact mean and std of the samples follow from propagating Gaussian moments
through the chain in float64. The fixed variances are not the exact reverse
variance, so e.g. fixedsmall gives a std below c: the tests compare with the
propagated value, in standard errors (SE) of the N-sample mean and std.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax import diffusion, sampling, schedules

T = 1000
M, C = 0.5, 0.1  # data mean and std of the oracle tests
N = 16384  # scalar samples per oracle run
TOL_SE = 4.0


# ----------------------------------------------------------------------------- float64 reference
def np_tables(num_timesteps=T):
    b = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    a = 1.0 - b
    ab = np.cumprod(a)
    abp = np.append(1.0, ab[:-1])
    return {
        "b": b,
        "ab": ab,
        "post_var": b * (1.0 - abp) / (1.0 - ab),
        "c1": b * np.sqrt(abp) / (1.0 - ab),
        "c2": (1.0 - abp) * np.sqrt(a) / (1.0 - ab),
    }


TAB = np_tables()


def oracle_x0_coefs(ab, m=M, c=C):
    """E[x0 | x_t] = A x_t + B."""
    den = ab * c * c + 1.0 - ab
    return np.sqrt(ab) * c * c / den, m * (1.0 - ab) / den


def np_ddim_steps(num_steps):
    ts = np.round(np.linspace(T - 1, 0, num_steps)).astype(int)
    return ts, np.append(ts[1:], -1)


def ddpm_moments(var):
    """Exact mean and std of ancestral samples with the oracle, fixed variance `var`."""
    mu, v = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        a0, b0 = oracle_x0_coefs(TAB["ab"][t])
        alpha = TAB["c1"][t] * a0 + TAB["c2"][t]
        s2 = 0.0 if t == 0 else (TAB["post_var"][t] if var == "fixedsmall" else TAB["b"][t])
        mu, v = alpha * mu + TAB["c1"][t] * b0, alpha * alpha * v + s2
    return mu, np.sqrt(v)


def ddim_coefs(t, t_next, eta):
    ab = TAB["ab"][t]
    ab_s = TAB["ab"][t_next] if t_next >= 0 else 1.0
    sigma = eta * np.sqrt((1 - ab_s) / (1 - ab) * (1 - ab / ab_s))
    return ab, ab_s, sigma, np.sqrt(1 - ab_s - sigma**2)


def ddim_moments(num_steps, eta):
    mu, v = 0.0, 1.0
    for t, tn in zip(*np_ddim_steps(num_steps), strict=True):
        ab, ab_s, sigma, d = ddim_coefs(t, tn, eta)
        a0, b0 = oracle_x0_coefs(ab)
        alpha = np.sqrt(ab_s) * a0 + d * (1 - np.sqrt(ab) * a0) / np.sqrt(1 - ab)
        beta = np.sqrt(ab_s) * b0 - d * np.sqrt(ab) * b0 / np.sqrt(1 - ab)
        mu, v = alpha * mu + beta, alpha * alpha * v + sigma**2
    return mu, np.sqrt(v)


def np_oracle_x0(x, t, m=M, c=C):
    a0, b0 = oracle_x0_coefs(TAB["ab"][t], m, c)
    return a0 * x + b0


def np_ddpm_chain(x_T, noise, clip, m, c):
    """float64 ancestral chain, fixedsmall; noise[t] is the noise added at step t."""
    x = x_T.astype(np.float64)
    for t in range(T - 1, -1, -1):
        x0 = np_oracle_x0(x, t, m, c)
        if clip:
            x0 = np.clip(x0, -1, 1)
        x = TAB["c1"][t] * x0 + TAB["c2"][t] * x
        if t > 0:
            x = x + np.sqrt(TAB["post_var"][t]) * noise[t]
    return x


def np_ddim_chain(x_T, noise, num_steps, eta, clip, m, c):
    x = x_T.astype(np.float64)
    for t, tn in zip(*np_ddim_steps(num_steps), strict=True):
        ab, ab_s, sigma, d = ddim_coefs(t, tn, eta)
        x0 = np_oracle_x0(x, t, m, c)
        if clip:
            x0 = np.clip(x0, -1, 1)
        eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        x = np.sqrt(ab_s) * x0 + d * eps + (0.0 if noise is None else sigma * noise[t])
    return x


# ----------------------------------------------------------------------------- JAX side
@functools.cache
def schedule():
    return diffusion.make_schedule(schedules.get_beta_schedule("linear", num_timesteps=T))


def _tab(name):
    return jnp.asarray(TAB[name], jnp.float32)


def _at(name, t):
    return _tab(name)[t][:, None, None, None]


def oracle_model(mean_type, var_channel=None, m=M, c=C):
    """The exact model for N(m, c^2) data in the given parametrization."""

    def fn(x, t):
        ab = _at("ab", t)
        den = ab * c * c + 1.0 - ab
        eps = jnp.sqrt(1.0 - ab) * (x - jnp.sqrt(ab) * m) / den
        x0 = m + jnp.sqrt(ab) * c * c * (x - jnp.sqrt(ab) * m) / den
        out = {
            "eps": eps,
            "xstart": x0,
            "v": jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0,
            "xprev": _at("c1", t) * x0 + _at("c2", t) * x,
        }[mean_type]
        if var_channel is not None:
            out = jnp.concatenate([out, var_channel(t, x)], axis=-1)
        return out

    return fn


def run_sample(model_fn, key, shape, **kw):
    s = schedule()
    f = jax.jit(lambda k: sampling.sample(s, model_fn, k, shape, **kw))
    return f(key)


def check_moments(x, mu, sd, label):
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    se_mean, se_std = sd / np.sqrt(n), sd / np.sqrt(2 * (n - 1))
    z_mean = (x.mean() - mu) / se_mean
    z_std = (x.std(ddof=1) - sd) / se_std
    print(f"{label}: mean {x.mean():.5f} (exact {mu:.5f}, {z_mean:+.2f} SE), "
          f"std {x.std(ddof=1):.5f} (exact {sd:.5f}, {z_std:+.2f} SE; "
          f"data std {C}: {(sd - C) / se_std:+.2f} SE)")
    assert abs(z_mean) < TOL_SE, (label, z_mean)
    assert abs(z_std) < TOL_SE, (label, z_std)


_LOG_BETA = lambda t, x: jnp.broadcast_to(jnp.log(_at("b", t)), x.shape)
_MINUS_ONE = lambda t, x: -jnp.ones_like(x)


@pytest.mark.parametrize(
    "mean_type,var_type,var_channel,expect",
    [
        ("eps", "fixedsmall", None, "fixedsmall"),
        ("eps", "fixedlarge", None, "fixedlarge"),
        ("xstart", "fixedsmall", None, "fixedsmall"),
        ("v", "fixedlarge", None, "fixedlarge"),
        ("xprev", "fixedsmall", None, "fixedsmall"),
        ("eps", "learned", _LOG_BETA, "fixedlarge"),  # log-variance output = log beta_t
        ("eps", "learned_range", _MINUS_ONE, "fixedsmall"),  # -1 = lower end of the range
    ],
)
def test_ddpm_oracle_moments(mean_type, var_type, var_channel, expect):
    model = oracle_model(mean_type, var_channel)
    x = run_sample(model, jax.random.key(1), (N, 1, 1, 1), mean_type=mean_type,
                   var_type=var_type, clip_denoised=False)
    check_moments(x, *ddpm_moments(expect), f"ddpm {mean_type}/{var_type}")


@pytest.mark.parametrize("num_steps,eta", [(T, 0.0), (T, 1.0), (10, 1.0), (10, 0.0)])
def test_ddim_oracle_moments(num_steps, eta):
    x = run_sample(oracle_model("eps"), jax.random.key(2), (N, 1, 1, 1), mean_type="eps",
                   var_type="fixedlarge", clip_denoised=False, sampler="ddim",
                   num_steps=num_steps, eta=eta)
    check_moments(x, *ddim_moments(num_steps, eta), f"ddim steps={num_steps} eta={eta}")


def test_ddim_few_steps_matches_float64_chain():
    """Deterministic DDIM with 10 steps: elementwise equal to a float64 numpy run from the
    same x_T, and its known discretization error (std != c) is reproduced."""
    num_steps, n = 10, 4096
    x, traj = run_sample(oracle_model("eps"), jax.random.key(3), (n, 1, 1, 1),
                         mean_type="eps", var_type="fixedsmall", clip_denoised=False,
                         sampler="ddim", num_steps=num_steps, eta=0.0,
                         trajectory_every=num_steps)
    x_T = np.asarray(traj["x_t"][0])
    ref = np_ddim_chain(x_T, None, num_steps, 0.0, False, M, C)
    np.testing.assert_allclose(np.asarray(x), ref, rtol=0, atol=2e-5)
    _, sd = ddim_moments(num_steps, 0.0)
    print(f"DDIM-10 eta=0 exact output std {sd:.5f} vs data std {C} "
          f"(discretization error {sd / C - 1:+.3%})")
    # The affine map x_T -> x_0 has slope sd: the discretization error is in the samples.
    np.testing.assert_allclose(np.std(np.asarray(x)) / np.std(x_T), sd, rtol=1e-3)
    assert abs(sd / C - 1) > 0.01  # 10 steps are visibly inexact for this data


def documented_noise(key, n, times, shape=(1, 1, 1)):
    """The noise the module docstring promises: x_T from fold_in(init_key, g), step t's
    noise from fold_in(fold_in(loop_key, t), g)."""
    init_key, loop_key = jax.random.split(key)
    draw = lambda k, g: jax.random.normal(jax.random.fold_in(k, g), shape)
    idx = jnp.arange(n)
    x_T = jax.vmap(lambda g: draw(init_key, g))(idx)
    times = np.asarray(list(times))
    per_t = jax.jit(jax.vmap(lambda t: jax.vmap(lambda g: draw(jax.random.fold_in(loop_key, t), g))(idx)))
    all_noise = np.asarray(per_t(jnp.asarray(times)), np.float64)
    noise = {int(t): all_noise[j] for j, t in enumerate(times)}
    return np.asarray(x_T, np.float64), noise


@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_clip_matches_float64_chain_with_documented_noise(clip):
    # Data near +1 so that pred_x0 is clipped often.
    m, c, n = 0.9, 0.3, 64
    key = jax.random.key(4)
    x = run_sample(oracle_model("eps", m=m, c=c), key, (n, 1, 1, 1), mean_type="eps",
                   var_type="fixedsmall", clip_denoised=clip)
    x_T, noise = documented_noise(key, n, range(T))
    ref = np_ddpm_chain(x_T, noise, clip, m, c)
    np.testing.assert_allclose(np.asarray(x), ref, rtol=0, atol=2e-3)
    if clip:
        assert np.asarray(x).max() <= 1.0
        assert ref.max() <= 1.0 + 1e-9 and (np_ddpm_chain(x_T, noise, False, m, c) > 1.0).any()


def test_ddim_eta_clip_matches_float64_chain():
    m, c, n, steps, eta = 0.9, 0.3, 64, 10, 0.5
    key = jax.random.key(5)
    x = run_sample(oracle_model("v", m=m, c=c), key, (n, 1, 1, 1), mean_type="v",
                   var_type="fixedlarge", clip_denoised=True, sampler="ddim",
                   num_steps=steps, eta=eta)
    ts, _ = np_ddim_steps(steps)
    x_T, noise = documented_noise(key, n, ts)
    ref = np_ddim_chain(x_T, noise, steps, eta, True, m, c)
    np.testing.assert_allclose(np.asarray(x), ref, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- keys, shapes
def toy_model(x, t):
    """A nonlinear model that mixes pixels within an example."""
    tt = (t.astype(jnp.float32) / T)[:, None, None, None]
    return jnp.tanh(x + jnp.mean(x, axis=(1, 2, 3), keepdims=True) * tt)


SMALL_T = 20
SHAPE = (16, 4, 4, 3)


SMALL_S = diffusion.make_schedule(schedules.get_beta_schedule("linear", num_timesteps=SMALL_T))


def small_sample(key, shape=SHAPE, **kw):
    kw = {"mean_type": "eps", "var_type": "fixedlarge", **kw}
    return sampling.sample(SMALL_S, toy_model, key, shape, **kw)


@pytest.mark.parametrize("sampler_kw", [{}, {"sampler": "ddim", "num_steps": 7, "eta": 0.3},
                                        {"num_steps": 6}, {"sampler": "dpm++2m", "num_steps": 8}])
def test_determinism_prefix_and_offset(sampler_kw):
    f = jax.jit(lambda k, off, shape: small_sample(k, shape, index_offset=off, **sampler_kw),
                static_argnums=2)
    key = jax.random.key(6)
    full = np.asarray(f(key, 0, SHAPE))
    np.testing.assert_array_equal(full, np.asarray(f(key, 0, SHAPE)))
    assert not np.allclose(full, np.asarray(f(jax.random.key(7), 0, SHAPE)))
    np.testing.assert_allclose(np.asarray(f(key, 0, (5, *SHAPE[1:]))), full[:5], atol=1e-6)
    np.testing.assert_allclose(np.asarray(f(key, 5, (11, *SHAPE[1:]))), full[5:], atol=1e-6)
    assert np.abs(full).max() <= 1.0  # clip_denoised: the last step returns clipped x0


@pytest.mark.parametrize("sampler_kw", [{}, {"sampler": "dpm++2m", "num_steps": 8}])
def test_device_count_invariance(sampler_kw):
    devices = jax.devices()
    assert len(devices) == 8, "conftest sets 8 fake CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    key = jax.random.key(8)
    one = jax.jit(lambda k: small_sample(k, **sampler_kw))(key)
    many = jax.jit(lambda k: small_sample(k, sharding=sharding, **sampler_kw),
                   out_shardings=sharding)(key)
    assert len(many.sharding.device_set) == 8
    assert many.addressable_shards[0].data.shape == (2, *SHAPE[1:])
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-6)


def test_compiles_once_per_shape():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(key, offset):
        return small_sample(key, index_offset=offset)

    for i in range(3):  # new keys and offsets do not retrace (a second trace would raise)
        f(jax.random.key(i), jnp.int32(16 * i)).block_until_ready()


def test_trajectory():
    key, k = jax.random.key(9), 6
    x_init = jax.random.normal(jax.random.key(10), SHAPE)
    plain = jax.jit(lambda kk, xi: small_sample(kk, x_init=xi))(key, x_init)
    x, traj = jax.jit(lambda kk, xi: small_sample(kk, x_init=xi, trajectory_every=k))(key, x_init)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(plain))
    num_saved = -(-SMALL_T // k)
    assert traj["x_t"].shape == traj["pred_xstart"].shape == (num_saved, *SHAPE)
    np.testing.assert_array_equal(np.asarray(traj["t"]), np.arange(SMALL_T - 1, -1, -k))
    np.testing.assert_array_equal(np.asarray(traj["x_t"][0]), np.asarray(x_init))
    # pred_x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab), clipped, at each saved step.
    b = np.linspace(1e-4, 0.02, SMALL_T)
    ab = np.cumprod(1 - b)
    for j, t in enumerate(np.asarray(traj["t"])):
        xt = np.asarray(traj["x_t"][j], np.float64)
        eps = np.asarray(toy_model(traj["x_t"][j], jnp.full((SHAPE[0],), t)), np.float64)
        ref = np.clip((xt - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t]), -1, 1)
        np.testing.assert_allclose(np.asarray(traj["pred_xstart"][j]), ref, atol=1e-4)


def test_ddim_timesteps():
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 1000), np.arange(999, -1, -1))
    ts = sampling.ddim_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 50, "uniform"),
                                  np.arange(980, -1, -20))
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 1), [999])


# ----------------------------------------------------------------------------- guidance
def test_classifier_free_guidance_one_batched_call():
    num_classes, w = 3, 2.5
    shape = (6, 4, 4, 1)
    means = jnp.array([-0.5, 0.0, 0.5, 0.1])  # the last one is the null class
    seen = []

    def cond_model(x, t, y):
        seen.append(x.shape[0])
        return oracle_model("eps", m=0.0)(x - means[y][:, None, None, None], t)

    def combined(x, t):  # (1 + w) eps(x, y) - w eps(x, null), written out
        e_c = oracle_model("eps", m=0.0)(x - means[labels][:, None, None, None], t)
        e_u = oracle_model("eps", m=0.0)(x - means[num_classes], t)
        return (1 + w) * e_c - w * e_u

    labels = jnp.array([0, 1, 2, 0, 1, 2])
    s = schedule()
    kw = {"mean_type": "eps", "var_type": "fixedsmall", "sampler": "ddim", "num_steps": 5}
    key = jax.random.key(11)
    guided = jax.jit(lambda k: sampling.sample(s, cond_model, k, shape, labels=labels,
                                               guidance_scale=w, null_label=num_classes,
                                               **kw))(key)
    assert seen == [12]  # one call on the doubled batch, traced once
    ref = jax.jit(lambda k: sampling.sample(s, combined, k, shape, **kw))(key)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(ref), atol=1e-5)
    plain = jax.jit(lambda k: sampling.sample(s, cond_model, k, shape, labels=labels, **kw))(key)
    assert not np.allclose(np.asarray(plain), np.asarray(guided))


# ----------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("sampler_kw", [{}, {"sampler": "ddim", "num_steps": 4}])
def test_interpolation(sampler_kw):
    s = schedule()
    t, shape = 300, (4, 2, 2, 1)
    a = jax.random.uniform(jax.random.key(12), shape, minval=-1, maxval=1)
    b = jax.random.uniform(jax.random.key(13), shape, minval=-1, maxval=1)
    kw = {"mean_type": "eps", "var_type": "fixedsmall", "clip_denoised": False, **sampler_kw}
    key = jax.random.key(14)
    out = jax.jit(lambda k: sampling.interpolate(s, oracle_model("eps", m=0.0, c=0.5), k, a, b, t,
                                                 jnp.array([0.0, 0.25, 1.0]), **kw))(key)
    assert out.shape == (3, *shape)
    # The oracle is affine and the decoding noise is shared across lambdas, so decoding is
    # affine in the latent: the lam = 0.25 image is the 3:1 mix of the end points.
    np.testing.assert_allclose(np.asarray(out[1]), 0.75 * np.asarray(out[0]) + 0.25 * np.asarray(out[2]),
                               atol=1e-5)
    # lam = 0 decodes q_sample(a, t, noise) with the documented encoding noise.
    enc_key, dec_key = jax.random.split(key)
    noise = jax.vmap(lambda g: jax.random.normal(jax.random.fold_in(enc_key, g), shape[1:]))(
        jnp.arange(shape[0]))
    ab = TAB["ab"][t]
    x_t = np.sqrt(ab) * np.asarray(a) + np.sqrt(1 - ab) * np.asarray(noise)
    ref = jax.jit(lambda k, x: sampling.sample(s, oracle_model("eps", m=0.0, c=0.5), k, shape,
                                               x_init=x, t_start=t, **kw))(
        dec_key, jnp.asarray(x_t, jnp.float32))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref), atol=1e-5)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"sampler": "euler"}, "sampler"),
        ({"mean_type": "x0"}, "mean_type"),
        ({"var_type": "small"}, "var_type"),
        ({"sampler": "ddim", "eta": 1.5}, "eta"),
        ({"sampler": "ddim", "num_steps": 0}, "num_steps"),
        ({"sampler": "ddim", "num_steps": 7, "ddim_spacing": "quad"}, "ddim_spacing"),
        ({"num_steps": 1}, "num_steps"),  # respaced ddpm needs at least 2 steps
        ({"num_steps": SMALL_T + 1}, "num_steps"),
        ({"sampler": "dpm++2m", "spacing": "cosine"}, "spacing"),
        ({"trajectory_every": 0}, "trajectory_every"),
        ({"guidance_scale": 1.0}, "labels"),
        ({"guidance_scale": 1.0, "labels": jnp.zeros(16, jnp.int32)}, "null_label"),
        ({"labels": jnp.zeros(3, jnp.int32)}, "labels"),
        ({"t_start": SMALL_T}, "t_start"),
        ({"x_init": jnp.zeros((2, 4, 4, 3))}, "x_init"),
    ],
)
def test_bad_input_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        small_sample(jax.random.key(0), **kw)


# ----------------------------------------------------------------------------- one step
STEP_SHAPE = (4, 2, 2, 1)
STEP_T = np.array([0, 1, 500, T - 1], np.int32)  # one timestep per example


def np_step_inputs(seed):
    rng = np.random.default_rng(seed)
    x, out, z = (rng.standard_normal(STEP_SHAPE) for _ in range(3))
    return x, out, z


def np_pred_x0(x, out, t, mean_type, clip):
    """float64 pred_x0 from an eps / x_0 / v model output at per-example t [B]."""
    ab = TAB["ab"][t][:, None, None, None]
    x0 = {"eps": (x - np.sqrt(1 - ab) * out) / np.sqrt(ab),
          "xstart": out,
          "v": np.sqrt(ab) * x - np.sqrt(1 - ab) * out}[mean_type]
    return np.clip(x0, -1, 1) if clip else x0


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "v"])
@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_matches_float64_posterior(mean_type, var_type, clip):
    """x_{t-1} = c1 x0 + c2 x_t + sigma z, sigma^2 = posterior variance (fixedsmall) or
    beta_t (fixedlarge), no noise at t = 0: numpy float64 from the betas."""
    x, out, z = np_step_inputs(0)
    x0 = np_pred_x0(x, out, STEP_T, mean_type, clip)
    col = lambda name: TAB[name][STEP_T][:, None, None, None]
    var = col("post_var") if var_type == "fixedsmall" else col("b")
    std = np.where(STEP_T[:, None, None, None] > 0, np.sqrt(var), 0.0)
    ref = col("c1") * x0 + col("c2") * x + std * z
    step = jax.jit(functools.partial(sampling.ddpm_step, schedule(), mean_type=mean_type,
                                     var_type=var_type, clip_denoised=clip))
    x_prev, pred_x0 = step(*_f32(x), jnp.asarray(STEP_T), *_f32(out, z))
    assert x_prev.dtype == jnp.float32 and x_prev.shape == STEP_SHAPE
    np.testing.assert_allclose(np.asarray(pred_x0), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_prev), ref, rtol=1e-5, atol=1e-5)
    # A scalar t is that timestep for the whole batch.
    x_prev_500, _ = step(*_f32(x), jnp.int32(500), *_f32(out, z))
    np.testing.assert_allclose(np.asarray(x_prev_500)[2], ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mean_type,clip", [("eps", False), ("eps", True), ("v", True)])
def test_ddim_step_matches_float64_update(eta, mean_type, clip):
    """x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z with eps recomputed from
    the (clipped) x0 and ab_s = 1 for t_next = -1: numpy float64 from the betas."""
    x, out, z = np_step_inputs(1)
    t_next = np.array([-1, 0, 300, 950], np.int32)
    x0 = np_pred_x0(x, out, STEP_T, mean_type, clip)
    ab = TAB["ab"][STEP_T][:, None, None, None]
    ab_s = np.where(t_next >= 0, TAB["ab"][np.maximum(t_next, 0)], 1.0)[:, None, None, None]
    eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
    sigma = eta * np.sqrt((1 - ab_s) / (1 - ab) * (1 - ab / ab_s))
    ref = np.sqrt(ab_s) * x0 + np.sqrt(1 - ab_s - sigma**2) * eps + sigma * z
    step = jax.jit(functools.partial(sampling.ddim_step, schedule(), mean_type=mean_type,
                                     var_type="fixedlarge", clip_denoised=clip, eta=eta))
    args = (*_f32(x), jnp.asarray(STEP_T), jnp.asarray(t_next), *_f32(out))
    x_next, pred_x0 = step(*args, *_f32(z))
    np.testing.assert_allclose(np.asarray(pred_x0), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_next), ref, rtol=1e-5, atol=2e-5)
    if eta == 0.0:  # the deterministic step draws no noise
        np.testing.assert_allclose(np.asarray(step(*args, None)[0]), ref, rtol=1e-5, atol=2e-5)


def test_ddim_eta_one_single_step_is_ddpm_fixedsmall():
    x, out, z = _f32(*np_step_inputs(2))
    t = jnp.asarray(STEP_T[1:])  # t = 0 has no t - 1
    kw = {"mean_type": "eps", "var_type": "fixedsmall", "clip_denoised": False}
    ddim, _ = sampling.ddim_step(schedule(), x[1:], t, t - 1, out[1:], z[1:], eta=1.0, **kw)
    ddpm, _ = sampling.ddpm_step(schedule(), x[1:], t, out[1:], z[1:], **kw)
    # float32: at t = 1 DDIM's sigma and direction terms are differences of numbers near 1
    # (1 - ab_1 / ab_0 = beta_1 = 1e-4), so they carry ~1e-5 relative error.
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), rtol=1e-4, atol=1e-4)


def test_step_bad_noise_raises():
    x = jnp.zeros(STEP_SHAPE)
    t = jnp.asarray(STEP_T)
    kw = {"mean_type": "eps", "var_type": "fixedlarge"}
    with pytest.raises(ValueError, match="noise"):
        sampling.ddim_step(schedule(), x, t, t - 1, x, None, eta=0.5, **kw)
    with pytest.raises(ValueError, match="noise"):
        sampling.ddpm_step(schedule(), x, t, x, jnp.zeros((1, 2, 2, 1)), **kw)


def test_scan_chain_threads_solver_state_and_records():
    """A two-step toy 'solver' whose update uses the previous model output (kept in the
    solver state) runs in the driver as written; checked against a Python loop."""
    ts = np.array([9, 6, 3, 0], np.int32)
    t_next = np.append(ts[1:], -1).astype(np.int32)
    net = lambda x, t: 0.5 * x + t[:, None, None, None].astype(jnp.float32)

    def step(x, t, t_nx, out, noise, state):
        prev_out, count = state
        x_next = x - 0.1 * out + 0.05 * prev_out + 0.01 * noise + 0.001 * t_nx
        return x_next, out, (out, count + 1)

    x_start = jnp.arange(8.0).reshape(2, 2, 2, 1)
    noise_fn = lambda t: jnp.full((2, 2, 2, 1), t, jnp.float32)
    state0 = (jnp.zeros_like(x_start), jnp.int32(0))
    x, traj = jax.jit(lambda x0: sampling._scan_chain(
        net, x0, ts, t_next, step, noise_fn=noise_fn, state=state0, trajectory_every=3))(x_start)
    xr, prev, xs_seen, x0_seen = np.asarray(x_start, np.float64), 0.0, [], []
    for t, tn in zip(ts, t_next, strict=True):
        out = 0.5 * xr + t
        xs_seen.append(xr)
        x0_seen.append(out)
        xr, prev = xr - 0.1 * out + 0.05 * prev + 0.01 * t + 0.001 * tn, out
    np.testing.assert_allclose(np.asarray(x), xr, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(traj["t"]), [9, 0])
    np.testing.assert_allclose(np.asarray(traj["x_t"]), np.stack(xs_seen[::3]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(traj["pred_xstart"]), np.stack(x0_seen[::3]), rtol=1e-6)


# ----------------------------------------------------------------------------- options
def test_sample_with_options_equals_keywords():
    kw = {"mean_type": "eps", "var_type": "fixedlarge", "sampler": "ddim", "num_steps": 5,
          "eta": 0.5, "trajectory_every": 2}
    key = jax.random.key(15)
    x_kw, traj_kw = jax.jit(lambda k: small_sample(k, **kw))(key)
    options = sampling.SampleOptions(**kw)
    x_opt, traj_opt = jax.jit(lambda k: sampling.sample_with(SMALL_S, toy_model, k, SHAPE,
                                                             options))(key)
    np.testing.assert_array_equal(np.asarray(x_opt), np.asarray(x_kw))
    for name in ("x_t", "pred_xstart", "t"):
        np.testing.assert_array_equal(np.asarray(traj_opt[name]), np.asarray(traj_kw[name]))
    assert hash(options) == hash(sampling.SampleOptions(**kw))  # plain values: hashable


@pytest.mark.parametrize(
    "field,value",
    [
        ("sampler", "euler"),
        ("mean_type", "x0"),
        ("var_type", "small"),
        ("eta", -0.1),
        ("eta", 1.5),
        ("trajectory_every", 0),
        ("ddim_spacing", "quad"),
        ("guidance_scale", 1.0),  # without labels
    ],
)
def test_options_reject_bad_values(field, value):
    kw = {"mean_type": "eps", "var_type": "fixedlarge", field: value}
    with pytest.raises(ValueError, match=field):
        sampling.SampleOptions(**kw)


def test_options_frozen_and_replace_checks():
    options = sampling.SampleOptions(mean_type="eps", var_type="fixedlarge")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.eta = 0.5
    with pytest.raises(ValueError, match="null_label"):
        dataclasses.replace(options, labels=jnp.zeros(4, jnp.int32), guidance_scale=2.0)
    assert dataclasses.replace(options, sampler="ddim").sampler == "ddim"
