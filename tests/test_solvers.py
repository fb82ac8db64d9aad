"""Respaced ancestral sampling, DPM-Solver++(2M) and the timestep spacings.

References are float64 numpy computations written here from the formulas, not
from ddpm_jax. The oracle is the exact denoiser of Gaussian data N(m, c^2)
(scalar "images" [N, 1, 1, 1]): E[x0 | x_t] is affine in x_t, so every step of
every sampler here is affine in x_t plus Gaussian noise, and the mean and std
of the output follow in closed form by propagating the two moments.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling, schedules

T = 1000
N = 16384  # samples per moment check
TOL_SE = 4.0

B64 = np.linspace(1e-4, 0.02, T, dtype=np.float64)
AB64 = np.cumprod(1.0 - B64)
LOG_SNR64 = np.log(AB64) - np.log1p(-AB64)


@functools.cache
def schedule():
    return diffusion.make_schedule(schedules.get_beta_schedule("linear", num_timesteps=T))


def x0_coefs(ab, m, c):
    """E[x0 | x_t] = p x_t + q for data N(m, c^2)."""
    den = ab * c * c + 1.0 - ab
    return np.sqrt(ab) * c * c / den, m * (1.0 - ab) / den


def oracle(mean_type, m, c, var_channel=None):
    """The exact model for N(m, c^2) data; "xprev" predicts the one-step posterior mean."""
    ab_tab = jnp.asarray(AB64, jnp.float32)
    b_tab = jnp.asarray(B64, jnp.float32)

    def fn(x, t):
        ab = ab_tab[t][:, None, None, None]
        abp = jnp.where(t > 0, ab_tab[jnp.maximum(t - 1, 0)], 1.0)[:, None, None, None]
        b = b_tab[t][:, None, None, None]
        den = ab * c * c + 1.0 - ab
        x0 = m + jnp.sqrt(ab) * c * c * (x - jnp.sqrt(ab) * m) / den
        eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
        out = {
            "eps": eps,
            "v": jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0,
            "xprev": (b * jnp.sqrt(abp) * x0 + (1.0 - abp) * jnp.sqrt(1.0 - b) * x) / (1.0 - ab),
        }[mean_type]
        if var_channel is not None:
            out = jnp.concatenate([out, jnp.full_like(x, var_channel)], axis=-1)
        return out

    return fn


def run(model, key, shape, **kw):
    s = schedule()
    return jax.jit(lambda k: sampling.sample(s, model, k, shape, **kw))(key)


def check_moments(x, mu, sd, label):
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    z_mean = (x.mean() - mu) / (sd / np.sqrt(n))
    z_std = (x.std(ddof=1) - sd) / (sd / np.sqrt(2 * (n - 1)))
    print(f"{label}: mean {x.mean():.5f} (exact {mu:.5f}, {z_mean:+.2f} SE), "
          f"std {x.std(ddof=1):.5f} (exact {sd:.5f}, {z_std:+.2f} SE)")
    assert abs(z_mean) < TOL_SE and abs(z_std) < TOL_SE, (label, z_mean, z_std)


# ----------------------------------------------------------------------------- spacings
def np_dedup(ts_up, top):
    """Sorted ints -> strictly increasing, colliding ones moved to the next free step."""
    out = list(ts_up)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    out[-1] = min(out[-1], top)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1] - 1)
    return np.array(out)


def np_spacing(kind, n, t_start=T - 1):
    if kind == "linspace":
        return np.round(np.linspace(t_start, 0, n)).astype(int)
    if kind == "quadratic":
        up = np.round(t_start * (np.arange(n) / (n - 1)) ** 2).astype(int)
    else:  # logsnr: targets evenly spaced, each the timestep nearest to its interpolated t
        lam = LOG_SNR64[: t_start + 1]
        targets = np.linspace(lam[0], lam[t_start], n)
        up = []
        for y in targets:
            j = np.searchsorted(-lam, -y)  # first t with lam[t] <= y
            j = min(max(j, 1), t_start)
            up.append(round(j - 1 + (lam[j - 1] - y) / (lam[j - 1] - lam[j])))
    return np_dedup(np.asarray(up), t_start)[::-1]


@pytest.mark.parametrize("spacing", sampling.SPACINGS)
@pytest.mark.parametrize("n", [2, 3, 10, 20, 41, 100, 500, 999, 1000])
def test_spacing_distinct_sorted_count(spacing, n):
    ts = sampling.spaced_timesteps(schedule(), n, spacing)
    assert ts.dtype == np.int32 and ts.shape == (n,)
    assert np.all(np.diff(ts) < 0), "strictly decreasing, hence distinct"
    assert ts[-1] == 0 and ts[0] <= T - 1
    if spacing != "uniform":
        assert ts[0] == T - 1
        np.testing.assert_array_equal(ts, np_spacing(spacing, n))


@pytest.mark.parametrize("spacing", ["linspace", "quadratic", "logsnr"])
def test_spacing_with_t_start(spacing):
    ts = sampling.spaced_timesteps(schedule(), 12, spacing, t_start=300)
    assert ts[0] == 300 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(ts, np_spacing(spacing, 12, 300))
    np.testing.assert_array_equal(sampling.spaced_timesteps(schedule(), 301, spacing,
                                                            t_start=300), np.arange(300, -1, -1))


def test_spacing_values():
    np.testing.assert_array_equal(sampling.spaced_timesteps(schedule(), 10, "quadratic"),
                                  [999, 789, 604, 444, 308, 197, 111, 49, 12, 0])
    ts = sampling.spaced_timesteps(schedule(), 10, "logsnr")
    np.testing.assert_allclose(np.diff(LOG_SNR64[ts]), np.diff(LOG_SNR64[ts]).mean(), rtol=0.1)
    # Rounding collides above ~40 steps on this schedule: the count is still kept.
    raw = np.round(np.interp(np.linspace(LOG_SNR64[-1], LOG_SNR64[0], 100), LOG_SNR64[::-1],
                             np.arange(T - 1, -1, -1.0)))
    assert len(np.unique(raw)) < 100
    assert len(np.unique(sampling.spaced_timesteps(schedule(), 100, "logsnr"))) == 100


def test_spacing_bad_input():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sampling.ddim_timesteps(T, 10, "logsnr")
    with pytest.raises(ValueError, match="spacing"):
        sampling.ddim_timesteps(T, 10, "cosine")
    with pytest.raises(ValueError, match="num_steps"):
        sampling.spaced_timesteps(schedule(), T + 1, "logsnr")


# ----------------------------------------------------------------------------- respaced DDPM
def np_respaced(ts):
    """Tables of the process restricted to ts (any order), float64, index i = i-th smallest."""
    k = np.sort(ts)
    ab = AB64[k]
    abp = np.append(1.0, ab[:-1])
    b = 1.0 - ab / abp
    post = b * (1.0 - abp) / (1.0 - ab)
    return {"k": k, "ab": ab, "b": b, "post": post,
            "post_log": np.log(np.append(post[1], post[1:])),
            "c1": b * np.sqrt(abp) / (1.0 - ab), "c2": (1.0 - abp) * np.sqrt(1.0 - b) / (1.0 - ab)}


def np_step_var(r, i, var):
    if var == "fixedsmall":
        return r["post"][i]
    if var == "fixedlarge":
        return r["b"][i]
    return np.exp(0.5 * np.log(r["b"][i]) + 0.5 * r["post_log"][i])  # learned_range, v = 0


def respaced_moments(ts, var, m, c):
    r, mu, v = np_respaced(ts), 0.0, 1.0
    for i in range(len(ts) - 1, -1, -1):
        p, q = x0_coefs(r["ab"][i], m, c)
        slope = r["c1"][i] * p + r["c2"][i]
        mu = slope * mu + r["c1"][i] * q
        v = slope * slope * v + (np_step_var(r, i, var) if i > 0 else 0.0)
    return mu, np.sqrt(v)


@pytest.mark.parametrize(
    "num_steps,spacing,mean_type,var_type,var_channel,expect",
    [
        (10, "linspace", "eps", "fixedsmall", None, "fixedsmall"),
        (10, "linspace", "eps", "fixedlarge", None, "fixedlarge"),
        (25, "quadratic", "v", "fixedlarge", None, "fixedlarge"),
        (10, "linspace", "xprev", "fixedsmall", None, "fixedsmall"),
        (10, "logsnr", "eps", "learned_range", 0.0, "learned_range"),  # middle of the range
    ],
)
def test_respaced_ddpm_oracle_moments(num_steps, spacing, mean_type, var_type, var_channel,
                                      expect):
    m, c = 0.5, 0.1
    x = run(oracle(mean_type, m, c, var_channel), jax.random.key(1), (N, 1, 1, 1),
            mean_type=mean_type, var_type=var_type, clip_denoised=False, num_steps=num_steps,
            spacing=spacing)
    mu, sd = respaced_moments(np_spacing(spacing, num_steps), expect, m, c)
    check_moments(x, mu, sd, f"respaced ddpm {num_steps} {spacing} {mean_type}/{var_type}")
    # Not the full chain's moments: respacing changes the output distribution here.
    if var_type == "fixedlarge":
        _, sd_full = respaced_moments(np.arange(T), "fixedlarge", m, c)
        assert abs(sd / sd_full - 1) > 0.05


def documented_noise(key, n, times):
    """x_T from fold_in(init_key, g); the noise at original timestep t from
    fold_in(fold_in(loop_key, t), g) (the module docstring's promise)."""
    init_key, loop_key = jax.random.split(key)
    draw = lambda k, g: jax.random.normal(jax.random.fold_in(k, g), (1, 1, 1))
    idx = jnp.arange(n)
    x_T = np.asarray(jax.vmap(lambda g: draw(init_key, g))(idx), np.float64)
    per_t = lambda t: jax.vmap(lambda g: draw(jax.random.fold_in(loop_key, t), g))(idx)
    noise = {int(t): np.asarray(per_t(t), np.float64) for t in times}
    return x_T, noise


def test_respaced_ddpm_clip_matches_float64_chain():
    m, c, n, steps = 0.9, 0.3, 64, 10  # data near +1: pred_x0 is clipped often
    key = jax.random.key(2)
    x = run(oracle("eps", m, c), key, (n, 1, 1, 1), mean_type="eps", var_type="fixedsmall",
            clip_denoised=True, num_steps=steps)
    ts = np_spacing("linspace", steps)
    x_T, noise = documented_noise(key, n, ts)
    r, ref = np_respaced(ts), x_T
    for i in range(steps - 1, -1, -1):
        p, q = x0_coefs(r["ab"][i], m, c)
        x0 = np.clip(p * ref + q, -1, 1)
        ref = r["c1"][i] * x0 + r["c2"][i] * ref
        if i > 0:
            ref = ref + np.sqrt(r["post"][i]) * noise[int(r["k"][i])]
    np.testing.assert_allclose(np.asarray(x), ref, rtol=0, atol=1e-4)
    assert np.asarray(x).max() <= 1.0


def test_ddpm_all_steps_is_the_full_process():
    s = diffusion.make_schedule(schedules.get_beta_schedule("linear", num_timesteps=20))
    model = lambda x, t: jnp.tanh(x * (1.0 + t[:, None, None, None] / 20.0))
    kw = {"mean_type": "eps", "var_type": "fixedlarge"}
    f = jax.jit(lambda k, n: sampling.sample(s, model, k, (8, 2, 2, 1), num_steps=n, **kw),
                static_argnums=1)
    key = jax.random.key(3)
    full = np.asarray(f(key, None))
    np.testing.assert_array_equal(np.asarray(f(key, 20)), full)
    assert not np.allclose(np.asarray(f(key, 19)), full, atol=1e-3)
    # The respaced tables of all the steps are the schedule's own.
    r = sampling.respaced_schedule(s, np.arange(20))
    for a, b in zip(r, s, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6)


def test_respaced_needs_concrete_schedule():
    s = schedule()
    f = jax.jit(lambda s, k: sampling.sample(s, oracle("eps", 0.0, 1.0), k, (2, 1, 1, 1),
                                             mean_type="eps", var_type="fixedlarge",
                                             num_steps=10))
    with pytest.raises(ValueError, match="concrete schedule"):
        f(s, jax.random.key(0))


# ----------------------------------------------------------------------------- DPM-Solver++(2M)
def np_dpm_chain(x, ts, m, c, clip):
    """float64 DPM-Solver++(2M) on the oracle from x at ts[0]; returns x_0."""
    x0_prev = h_prev = None
    lam = 0.5 * LOG_SNR64
    for i, t in enumerate(ts):
        p, q = x0_coefs(AB64[t], m, c)
        x0 = p * x + q
        if clip:
            x0 = np.clip(x0, -1, 1)
        if i == len(ts) - 1:
            return x0
        tn = ts[i + 1]
        h = lam[tn] - lam[t]
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2.0 * h_prev)
        x = np.sqrt((1 - AB64[tn]) / (1 - AB64[t])) * x - np.sqrt(AB64[tn]) * np.expm1(-h) * d
        x0_prev, h_prev = x0, h
    raise AssertionError("unreachable")


def np_ddim_chain(x, ts, m, c):
    for i, t in enumerate(ts):
        p, q = x0_coefs(AB64[t], m, c)
        x0 = p * x + q
        ab_n = AB64[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x = np.sqrt(ab_n) * x0 + np.sqrt(1 - ab_n) * (x - np.sqrt(AB64[t]) * x0) / np.sqrt(
            1 - AB64[t])
    return x


TABLE_M, TABLE_C = 0.2, 0.3
# The table: sample std error at 10 / 20 steps (float64, exact denoiser).
TABLE = {
    ("linspace", "ddim"): (-0.40, -0.21), ("linspace", "dpm++2m"): (0.23, 0.30),
    ("quadratic", "ddim"): (-0.19, -0.09), ("quadratic", "dpm++2m"): (0.13, 0.04),
    ("logsnr", "ddim"): (-0.24, -0.12), ("logsnr", "dpm++2m"): (0.026, 0.015),
}
X_GRID = np.linspace(-3.0, 3.0, 16)


@functools.cache
def sampler_std_error(sampler, spacing, steps):
    """Std error of the JAX sampler's output: it is affine in x_T, x_0 = A x_T + B, so the
    output std is |A| exactly (no sampling error); A from the x_T grid by least squares."""
    x_init = jnp.asarray(X_GRID, jnp.float32).reshape(-1, 1, 1, 1)
    out = run(oracle("eps", TABLE_M, TABLE_C), jax.random.key(0), x_init.shape, mean_type="eps",
              var_type="fixedlarge", clip_denoised=False, sampler=sampler, num_steps=steps,
              spacing=spacing, x_init=x_init)
    slope, _ = np.polyfit(X_GRID, np.asarray(out, np.float64).ravel(), 1)
    return abs(slope) / TABLE_C - 1.0


@pytest.mark.parametrize("spacing", ["linspace", "quadratic", "logsnr"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_gaussian_table(sampler, spacing):
    """Reproduces the table: the JAX samplers' std errors match a float64 chain to 0.1
    point and the table's rounded figures to 1 point."""
    for j, steps in enumerate((10, 20)):
        got = sampler_std_error(sampler, spacing, steps)
        ts = np_spacing(spacing, steps)
        chain = np_dpm_chain if sampler == "dpm++2m" else np_ddim_chain
        ref_out = [chain(x, ts, TABLE_M, TABLE_C, False) if sampler == "dpm++2m"
                   else chain(x, ts, TABLE_M, TABLE_C) for x in (0.0, 1.0)]
        ref = abs(ref_out[1] - ref_out[0]) / TABLE_C - 1.0
        print(f"{sampler} {spacing} {steps} steps: std error {got:+.2%} "
              f"(float64 {ref:+.2%}, table {TABLE[spacing, sampler][j]:+.1%})")
        assert abs(got - ref) < 1e-3
        assert abs(got - TABLE[spacing, sampler][j]) < 0.01


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_beats_ddim_on_logsnr(steps):
    dpm = sampler_std_error("dpm++2m", "logsnr", steps)
    ddim = sampler_std_error("ddim", "logsnr", steps)
    assert abs(dpm) <= abs(ddim) / 4, (dpm, ddim)


def test_dpm_solver_default_spacing_is_logsnr():
    x_init = jnp.asarray(X_GRID, jnp.float32).reshape(-1, 1, 1, 1)
    kw = {"mean_type": "eps", "var_type": "fixedlarge", "clip_denoised": False,
          "sampler": "dpm++2m", "num_steps": 10, "x_init": x_init}
    model = oracle("eps", TABLE_M, TABLE_C)
    default = run(model, jax.random.key(0), x_init.shape, **kw)
    logsnr = run(model, jax.random.key(0), x_init.shape, spacing="logsnr", **kw)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(logsnr))


@pytest.mark.parametrize("mean_type", ["eps", "v", "xprev"])
def test_dpm_solver_clip_matches_float64_chain(mean_type):
    m, c, n, steps = 0.9, 0.3, 256, 12
    key = jax.random.key(4)
    x, traj = run(oracle(mean_type, m, c), key, (n, 1, 1, 1), mean_type=mean_type,
                  var_type="fixedsmall", clip_denoised=True, sampler="dpm++2m", num_steps=steps,
                  trajectory_every=steps)
    x_T = np.asarray(traj["x_t"][0], np.float64)
    ref = np_dpm_chain(x_T, np_spacing("logsnr", steps), m, c, clip=True)
    np.testing.assert_allclose(np.asarray(x), ref, rtol=0, atol=2e-4)
    assert np.asarray(x).max() <= 1.0
    assert (np_dpm_chain(x_T, np_spacing("logsnr", steps), m, c, clip=False) > 1.0).any()


def test_dpm_solver_step_orders():
    """The first step is DDIM's (first order), the last returns pred_x0, and a second step
    uses the previous x0 prediction as the multistep formula says."""
    s = schedule()
    rng = np.random.default_rng(0)
    x, out, out2 = (jnp.asarray(rng.standard_normal((3, 2, 2, 1)), jnp.float32) for _ in range(3))
    kw = {"mean_type": "eps", "var_type": "fixedlarge", "clip_denoised": False}
    state = sampling.dpm_solver_state(x)
    t, tn, tnn = jnp.int32(800), jnp.int32(500), jnp.int32(200)
    x1, x0, state = sampling.dpm_solver_2m_step(s, x, t, tn, out, state, **kw)
    ddim, _ = sampling.ddim_step(s, x, t, tn, out, None, **kw)
    np.testing.assert_allclose(np.asarray(x1), np.asarray(ddim), atol=1e-5)
    x2, x0b, _ = sampling.dpm_solver_2m_step(s, x1, tn, tnn, out2, state, **kw)
    lam = 0.5 * LOG_SNR64
    h, h_prev = lam[200] - lam[500], lam[500] - lam[800]
    d = np.asarray(x0b, np.float64) + (np.asarray(x0b) - np.asarray(x0)) * h / (2 * h_prev)
    ref = (np.sqrt((1 - AB64[200]) / (1 - AB64[500])) * np.asarray(x1, np.float64)
           - np.sqrt(AB64[200]) * np.expm1(-h) * d)
    np.testing.assert_allclose(np.asarray(x2), ref, rtol=1e-4, atol=1e-4)
    x_last, x0_last, _ = sampling.dpm_solver_2m_step(s, x2, tnn, jnp.int32(-1), out, state, **kw)
    np.testing.assert_array_equal(np.asarray(x_last), np.asarray(x0_last))


# ----------------------------------------------------------------------------- the digits judge
def _tiny_digits_params(directory):
    """A random-weight 8x8x1 U-Net with T = 10, saved as a save_params directory."""
    from ddpm_jax import builders, checkpoint
    from ddpm_jax.unet import UNetConfig

    cfg = UNetConfig(ch=32, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                     dropout=0.0)
    meta = {"model": cfg.to_dict(),
            "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.2,
                          "num_timesteps": 10, "mean_type": "eps", "var_type": "fixedlarge"},
            "data": {"image_size": 8, "channels": 1}, "step": 3}
    model = builders.unet_from_meta(meta)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros((1,), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape, np.float32), shapes)
    checkpoint.save_params(str(directory), params, meta=meta)
    return str(directory)


def test_digits_quality_sampler_options_and_table(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from ddpm_jax import digits_quality

    path = _tiny_digits_params(tmp_path / "params")

    class UniformJudge:  # the real judge is tested in test_configs.py; fitting it takes seconds
        def predict_proba(self, images):
            return np.full((len(images), 10), 0.1)

    monkeypatch.setattr(digits_quality, "_judge", lambda: (UniformJudge(), 0.99, 0.98))
    out = tmp_path / "table.jsonl"
    monkeypatch.setattr(sys, "argv", ["digits_quality", path, "--table", "--table_steps", "3",
                                      "--num_samples", "3", "--out", str(out)])
    digits_quality.main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["sampler"], r["num_steps"]) for r in rows] == [
        (s, 3) for s in ("ddpm", "ddim", "dpm++2m")]
    assert [r["spacing"] for r in rows] == ["linspace", "linspace", "logsnr"]
    for r in rows:
        assert r["num_samples"] == 3 and r["batch_size"] == 3 and r["seconds_per_batch"] > 0
        assert r["confident"] == 0.0 and r["class_shares"] == [1.0] + [0.0] * 9
        assert r["command"].endswith(f"--out {out}") and r["checkpoint_step"] == 3
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("digits_quality: the sampler table")
    monkeypatch.setattr(sys, "argv", ["digits_quality", path, "--sampler", "ddpm",
                                      "--num_steps", "4", "--num_samples", "2"])
    digits_quality.main()
    body, last = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    single = json.loads(body)
    assert last.startswith("digits_quality: 0.0% of 2 samples (ddpm, 4 steps)")
    assert (single["sampler"], single["num_steps"], single["num_samples"]) == ("ddpm", 4, 2)


def test_dpm_solver_step_needs_scalar_timesteps():
    x = jnp.zeros((2, 1, 1, 1))
    with pytest.raises(ValueError, match="scalars"):
        sampling.dpm_solver_2m_step(schedule(), x, jnp.array([5, 6]), jnp.array([2, 3]), x,
                                    sampling.dpm_solver_state(x), mean_type="eps",
                                    var_type="fixedlarge")
