"""The DDPM math against closed forms and independent float64 numpy computations."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ddpm_jax import diffusion as d
from ddpm_jax import schedules

T = 1000
BETAS = schedules.get_beta_schedule("linear", num_timesteps=T)
S = d.make_schedule(BETAS)

# Independent float64 tables, straight from the definitions.
A = 1.0 - BETAS
AB = np.cumprod(A)
AB_PREV = np.concatenate([[1.0], AB[:-1]])
POST_VAR = BETAS * (1 - AB_PREV) / (1 - AB)


def _erf_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _normal_logpdf(x, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


# ----------------------------------------------------------------------------- tables


def test_schedule_tables_match_definitions():
    np.testing.assert_allclose(S.alphas_cumprod, AB, rtol=1e-6)
    np.testing.assert_allclose(S.alphas_cumprod_prev, AB_PREV, rtol=1e-6)
    np.testing.assert_allclose(S.sqrt_alphas_cumprod, np.sqrt(AB), rtol=1e-6)
    np.testing.assert_allclose(S.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - AB), rtol=1e-6)
    np.testing.assert_allclose(S.log_one_minus_alphas_cumprod, np.log(1 - AB), rtol=1e-6)
    np.testing.assert_allclose(S.sqrt_recip_alphas_cumprod, 1 / np.sqrt(AB), rtol=1e-6)
    np.testing.assert_allclose(S.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / AB - 1), rtol=1e-6)
    np.testing.assert_allclose(S.posterior_variance, POST_VAR, rtol=1e-6)
    np.testing.assert_allclose(
        S.posterior_log_variance_clipped, np.log(np.concatenate([[POST_VAR[1]], POST_VAR[1:]])),
        rtol=1e-6,
    )
    for table in S:
        assert table.dtype == jnp.float32 and table.shape == (T,)
    assert S.num_timesteps == T


def test_q_marginal_equals_iterating_the_markov_chain():
    # Propagate the moments of x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps in float64.
    x0 = 0.7
    mean, var = x0, 0.0
    means, variances = [], []
    for b in BETAS:
        mean, var = math.sqrt(1 - b) * mean, (1 - b) * var + b
        means.append(mean)
        variances.append(var)
    t = jnp.arange(T, dtype=jnp.int32)
    m, v, logv = d.q_mean_variance(S, jnp.full((T, 1), x0), t)
    np.testing.assert_allclose(m[:, 0], means, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(v[:, 0], variances, rtol=2e-5)
    np.testing.assert_allclose(np.exp(logv[:, 0]), variances, rtol=2e-5)


def test_q_sample_moments():
    n = 200_000
    x0 = jnp.full((n, 1, 1, 1), -0.4)
    for t_val in (0, 10, 300, 999):
        t = jnp.full((n,), t_val, jnp.int32)
        noise = jax.random.normal(jax.random.key(t_val), x0.shape)
        x = np.asarray(jax.jit(d.q_sample)(S, x0, t, noise), dtype=np.float64).ravel()
        mean, var = math.sqrt(AB[t_val]) * -0.4, 1 - AB[t_val]
        se_mean = math.sqrt(var / n)
        se_var = var * math.sqrt(2 / (n - 1))
        assert abs(x.mean() - mean) < 5 * se_mean
        assert abs(x.var() - var) < 5 * se_var


# ----------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("t_val", [1, 5, 100, 500, 999])
def test_posterior_matches_bayes_rule_numerically(t_val):
    x0 = 0.3
    xt = math.sqrt(AB[t_val]) * x0 + math.sqrt(1 - AB[t_val]) * 0.8  # a typical x_t
    # q(x_{t-1} | x_0) q(x_t | x_{t-1}) on a fine grid, normalised: a numerical posterior.
    prior_mean, prior_var = math.sqrt(AB[t_val - 1]) * x0, 1 - AB[t_val - 1]
    lo, hi = min(prior_mean, xt) - 0.5, max(prior_mean, xt) + 0.5
    grid = np.linspace(lo - 4 * math.sqrt(prior_var), hi + 4 * math.sqrt(prior_var), 2_000_001)
    logp = _normal_logpdf(grid, prior_mean, prior_var) + _normal_logpdf(
        xt, math.sqrt(1 - BETAS[t_val]) * grid, BETAS[t_val]
    )
    w = np.exp(logp - logp.max())
    w /= w.sum()
    num_mean = np.sum(w * grid)
    num_var = np.sum(w * (grid - num_mean) ** 2)

    t = jnp.array([t_val], jnp.int32)
    mean, var, logvar = d.q_posterior_mean_variance(
        S, jnp.full((1, 1), x0), jnp.full((1, 1), xt), t
    )
    assert float(mean[0, 0]) == pytest.approx(num_mean, rel=1e-4, abs=1e-5)
    assert float(var[0, 0]) == pytest.approx(num_var, rel=1e-3)
    assert float(np.exp(logvar[0, 0])) == pytest.approx(num_var, rel=1e-3)


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    x0, xt = jnp.array([[0.3]]), jnp.array([[-0.5]])
    mean, var, logvar = d.q_posterior_mean_variance(S, x0, xt, jnp.array([0]))
    assert float(mean[0, 0]) == pytest.approx(0.3, abs=1e-6)
    assert float(var[0, 0]) == 0.0
    assert float(logvar[0, 0]) == pytest.approx(math.log(POST_VAR[1]), rel=1e-6)


# ----------------------------------------------------------------------------- parametrizations


def test_round_trips_x0_eps_v():
    key = jax.random.key(0)
    x0 = jax.random.uniform(key, (6, 5, 3, 2), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([0, 1, 10, 400, 900, 999], jnp.int32)
    xt = d.q_sample(S, x0, t, eps)
    np.testing.assert_allclose(d.predict_xstart_from_eps(S, xt, t, eps), x0, atol=2e-3)
    np.testing.assert_allclose(d.predict_eps_from_xstart(S, xt, t, x0), eps, atol=2e-3)
    v = d.predict_v(S, x0, t, eps)
    np.testing.assert_allclose(d.predict_xstart_from_v(S, xt, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(d.predict_eps_from_v(S, xt, t, v), eps, atol=1e-5)
    # v against its definition in float64.
    ab = AB[np.asarray(t)][:, None, None, None]
    v_ref = np.sqrt(ab) * np.asarray(eps, np.float64) - np.sqrt(1 - ab) * np.asarray(x0, np.float64)
    np.testing.assert_allclose(v, v_ref, atol=1e-6)
    # x_{t-1} mean <-> x_0 (t > 0, where the posterior mean depends on x_0).
    tp = t.at[0].set(3)
    xt = d.q_sample(S, x0, tp, eps)
    mean, _, _ = d.q_posterior_mean_variance(S, x0, xt, tp)
    np.testing.assert_allclose(d.predict_xstart_from_xprev(S, xt, tp, mean), x0, atol=2e-3)


# ----------------------------------------------------------------------------- reverse process


def test_p_mean_variance_fixed_and_learned_variances():
    x0 = jnp.full((4, 2, 2, 1), 0.25)
    eps = jnp.linspace(-1, 1, 16).reshape(x0.shape)
    t = jnp.array([0, 1, 50, 999], jnp.int32)
    tn = np.asarray(t)
    xt = d.q_sample(S, x0, t, eps)

    out = d.p_mean_variance(S, eps, xt, t, mean_type="eps", var_type="fixedlarge")
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0], BETAS[tn], rtol=1e-6)
    log_large = np.log(np.concatenate([[POST_VAR[1]], BETAS[1:]]))[tn]
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], log_large, rtol=1e-6)
    # With the true eps the mean is the true posterior mean, from float64 formulas.
    coef1 = BETAS * np.sqrt(AB_PREV) / (1 - AB)
    coef2 = (1 - AB_PREV) * np.sqrt(A) / (1 - AB)
    ref_mean = coef1[tn][:, None, None, None] * 0.25 + coef2[tn][:, None, None, None] * np.asarray(
        xt, np.float64
    )
    np.testing.assert_allclose(out["mean"], ref_mean, atol=2e-3)
    np.testing.assert_allclose(out["pred_xstart"], x0, atol=2e-3)

    out = d.p_mean_variance(S, eps, xt, t, mean_type="eps", var_type="fixedsmall")
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0], POST_VAR[tn], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(
        out["log_variance"][:, 0, 0, 0],
        np.log(np.concatenate([[POST_VAR[1]], POST_VAR[1:]]))[tn],
        rtol=1e-6,
    )

    for v_val, ref in ((1.0, np.log(BETAS)), (-1.0, np.log(np.r_[POST_VAR[1], POST_VAR[1:]]))):
        out2 = jnp.concatenate([eps, jnp.full_like(eps, v_val)], axis=-1)
        out = d.p_mean_variance(S, out2, xt, t, mean_type="eps", var_type="learned_range")
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], ref[tn], rtol=1e-5)
    logv = jnp.full_like(eps, -3.0)
    out = d.p_mean_variance(
        S, jnp.concatenate([eps, logv], -1), xt, t, mean_type="eps", var_type="learned"
    )
    np.testing.assert_allclose(out["log_variance"], -3.0)
    np.testing.assert_allclose(out["variance"], math.exp(-3.0), rtol=1e-6)


def test_p_mean_variance_clipping_and_mean_types():
    xt = jnp.full((2, 1, 1, 1), 3.0)
    t = jnp.array([10, 10], jnp.int32)
    big = jnp.full_like(xt, 5.0)
    clipped = d.p_mean_variance(S, big, xt, t, mean_type="xstart", var_type="fixedsmall")
    assert np.allclose(clipped["pred_xstart"], 1.0)
    raw = d.p_mean_variance(
        S, big, xt, t, mean_type="xstart", var_type="fixedsmall", clip_denoised=False
    )
    assert np.allclose(raw["pred_xstart"], 5.0)
    # xprev: the mean is the output itself.
    out = d.p_mean_variance(S, big, xt, t, mean_type="xprev", var_type="fixedsmall")
    np.testing.assert_allclose(out["mean"], 5.0)
    # v: pred_x0 = sqrt(ab) x_t - sqrt(1 - ab) v, in float64.
    out = d.p_mean_variance(
        S, jnp.full_like(xt, 0.5), xt, t, mean_type="v", var_type="fixedsmall", clip_denoised=False
    )
    np.testing.assert_allclose(
        out["pred_xstart"], math.sqrt(AB[10]) * 3.0 - math.sqrt(1 - AB[10]) * 0.5, rtol=1e-5
    )


# ----------------------------------------------------------------------------- likelihoods


def test_normal_kl_zero_for_identical_and_matches_integration():
    m, lv = jnp.array([0.3, -2.0]), jnp.array([-1.0, 0.5])
    np.testing.assert_allclose(d.normal_kl(m, lv, m, lv), 0.0, atol=1e-7)
    m1, v1, m2, v2 = 0.2, 0.5, -0.3, 1.7
    grid = np.linspace(-15, 15, 600_001)
    p = np.exp(_normal_logpdf(grid, m1, v1))
    kl_num = np.sum(p * (_normal_logpdf(grid, m1, v1) - _normal_logpdf(grid, m2, v2))) * (
        grid[1] - grid[0]
    )
    kl = d.normal_kl(jnp.array(m1), jnp.log(v1), jnp.array(m2), jnp.log(v2))
    assert float(kl) == pytest.approx(kl_num, rel=1e-5)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -5.5), (-0.99, -1.0), (2.0, 0.5)])
def test_discretized_likelihood_sums_to_one_and_tracks_exact_cdf(mean, log_scale):
    x = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    ll = d.discretized_gaussian_log_likelihood(
        x, means=jnp.full_like(x, mean), log_scales=jnp.full_like(x, log_scale)
    )
    probs = np.exp(np.asarray(ll, np.float64))
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)
    # Against the exact Gaussian bin masses in float64 (the tanh CDF differs by < 2e-4).
    xs = np.arange(256) / 127.5 - 1.0
    sd = math.exp(log_scale)
    upper = np.where(xs > 0.999, 1.0, _erf_cdf((xs + 1 / 255 - mean) / sd))
    lower = np.where(xs < -0.999, 0.0, _erf_cdf((xs - 1 / 255 - mean) / sd))
    exact = upper - lower
    np.testing.assert_allclose(probs, exact, atol=1e-3)


def test_discretized_likelihood_floor():
    x = jnp.array([0.0])
    ll = d.discretized_gaussian_log_likelihood(x, means=jnp.array([0.9]), log_scales=jnp.array(-8.0))
    assert float(ll[0]) == pytest.approx(math.log(1e-12), rel=1e-5)


def _true_posterior_eps_model(x0):
    """An oracle that knows x_0: its eps output makes pred_x0 = x_0 exactly."""

    def model_fn(xt, t):
        return d.predict_eps_from_xstart(S, xt, t, x0)

    return model_fn


def test_vb_terms_vanish_for_the_true_posterior_mean():
    x0 = jax.random.uniform(jax.random.key(2), (5, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(3), x0.shape)
    t = jnp.array([1, 2, 100, 500, 999], jnp.int32)
    xt = d.q_sample(S, x0, t, noise)
    mean, _, _ = d.q_posterior_mean_variance(S, x0, xt, t)
    bpd, _ = d.vb_terms_bpd(S, mean, x0, xt, t, mean_type="xprev", var_type="fixedsmall")
    np.testing.assert_allclose(bpd, 0.0, atol=1e-6)
    # fixedlarge: the KL is that between two zero-mean Gaussians of variances beta~ and beta.
    bpd, _ = d.vb_terms_bpd(S, mean, x0, xt, t, mean_type="xprev", var_type="fixedlarge")
    tn = np.asarray(t)
    ratio = POST_VAR[tn] / BETAS[tn]
    expected = 0.5 * (-1 - np.log(ratio) + ratio) / math.log(2)
    np.testing.assert_allclose(bpd, expected, rtol=2e-3, atol=1e-7)


def test_decoder_term_at_t0_against_float64():
    x0_u8 = np.array([[0, 1, 127, 128, 200, 255]], np.float64)
    x0 = x0_u8 / 127.5 - 1.0
    t = jnp.array([0], jnp.int32)
    xt = jnp.asarray(x0 + 0.01, jnp.float32)
    model_mean = np.clip(x0 + 0.003, -1, 1)
    bpd, _ = d.vb_terms_bpd(
        S, jnp.asarray(model_mean, jnp.float32), jnp.asarray(x0, jnp.float32), xt, t,
        mean_type="xprev", var_type="fixedsmall",
    )
    sd = math.sqrt(POST_VAR[1])
    upper = np.where(x0 > 0.999, 1.0, _erf_cdf((x0 + 1 / 255 - model_mean) / sd))
    lower = np.where(x0 < -0.999, 0.0, _erf_cdf((x0 - 1 / 255 - model_mean) / sd))
    expected = -np.mean(np.log(np.maximum(upper - lower, 1e-12))) / math.log(2)
    assert float(bpd[0]) == pytest.approx(expected, rel=5e-3)


def test_prior_bpd_is_about_1e_minus_5():
    x0 = jax.random.uniform(jax.random.key(4), (4, 8, 8, 3), minval=-1, maxval=1)
    got = d.prior_bpd(S, x0)
    ab = AB[-1]
    x = np.asarray(x0, np.float64)
    kl = 0.5 * (-1 - np.log(1 - ab) + (1 - ab) + ab * x**2)
    expected = kl.reshape(4, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(got, expected, rtol=2e-2)
    assert 3e-6 < float(got.mean()) < 3e-5


def test_calc_bpd_loop_with_an_oracle_model():
    x0_u8 = jax.random.randint(jax.random.key(5), (2, 3, 3, 1), 0, 256)
    x0 = x0_u8.astype(jnp.float32) / 127.5 - 1.0
    short = schedules.get_beta_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=20)
    s = d.make_schedule(short)

    def model_fn(xt, t):
        return d.predict_eps_from_xstart(s, xt, t, x0)

    out = jax.jit(
        functools.partial(d.calc_bpd_loop, mean_type="eps", var_type="fixedsmall"),
        static_argnums=1,
    )(s, model_fn, x0, jax.random.key(6))
    assert out["terms_bpd"].shape == (2, 20) and out["mse"].shape == (2, 20)
    # The oracle recovers x_0, so every KL term (t > 0) vanishes and pred_x0 is exact.
    np.testing.assert_allclose(out["terms_bpd"][:, 1:], 0.0, atol=1e-5)
    np.testing.assert_allclose(out["mse"], 0.0, atol=1e-8)
    # t = 0: the decoder at mean x_0 and variance beta~_1, in float64.
    ab = np.cumprod(1 - short)
    pv1 = short[1] * (1 - ab[0]) / (1 - ab[1])
    x = np.asarray(x0, np.float64)
    sd = math.sqrt(pv1)
    upper = np.where(x > 0.999, 1.0, _erf_cdf((1 / 255) / sd))
    lower = np.where(x < -0.999, 0.0, _erf_cdf((-1 / 255) / sd))
    dec = -np.log(upper - lower).reshape(2, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(out["terms_bpd"][:, 0], dec, rtol=5e-3)
    prior = (0.5 * (-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x**2)).reshape(2, -1).mean(1)
    np.testing.assert_allclose(out["prior_bpd"], prior / math.log(2), rtol=1e-3)
    np.testing.assert_allclose(
        out["total_bpd"], out["terms_bpd"].sum(1) + out["prior_bpd"], rtol=1e-6
    )


# ----------------------------------------------------------------------------- losses


def test_oracle_denoiser_expected_mse_has_its_closed_form():
    m, c, n = 0.3, 0.5, 100_000
    x0 = m + c * jax.random.normal(jax.random.key(7), (n, 1, 1, 1))
    noise = jax.random.normal(jax.random.key(8), x0.shape)

    def oracle(xt, t):
        ab = d.extract(S.alphas_cumprod, t, xt)
        return jnp.sqrt(1 - ab) * (xt - jnp.sqrt(ab) * m) / (ab * c**2 + 1 - ab)

    loss_fn = jax.jit(
        functools.partial(
            d.training_losses, mean_type="eps", var_type="fixedlarge", loss_type="mse"
        ),
        static_argnums=1,
    )
    for t_val in (0, 100, 400, 999):
        t = jnp.full((n,), t_val, jnp.int32)
        losses = np.asarray(loss_fn(S, oracle, x0, t, noise), np.float64)
        ab = AB[t_val]
        expected = ab * c**2 / (ab * c**2 + 1 - ab)
        se = losses.std() / math.sqrt(n)
        assert abs(losses.mean() - expected) < 5 * se + 1e-6, (t_val, losses.mean(), expected)


def test_mse_targets_per_mean_type():
    x0 = jax.random.uniform(jax.random.key(9), (3, 2, 2, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(10), x0.shape)
    t = jnp.array([5, 50, 500], jnp.int32)
    tn = np.asarray(t)[:, None, None, None]
    x0n, nn = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
    xt = np.sqrt(AB[tn]) * x0n + np.sqrt(1 - AB[tn]) * nn
    coef1 = BETAS * np.sqrt(AB_PREV) / (1 - AB)
    coef2 = (1 - AB_PREV) * np.sqrt(A) / (1 - AB)
    targets = {
        "eps": nn,
        "xstart": x0n,
        "xprev": coef1[tn] * x0n + coef2[tn] * xt,
        "v": np.sqrt(AB[tn]) * nn - np.sqrt(1 - AB[tn]) * x0n,
    }
    for mean_type, target in targets.items():
        # A model that outputs 0 has loss mean(target^2).
        losses = d.training_losses(
            S, lambda x, t: jnp.zeros_like(x), x0, t, noise,
            mean_type=mean_type, var_type="fixedsmall", loss_type="mse",
        )
        np.testing.assert_allclose(losses, (target**2).reshape(3, -1).mean(1), rtol=1e-4)


def test_kl_loss_is_zero_for_the_true_posterior_and_hybrid_freezes_the_mean():
    x0 = jax.random.uniform(jax.random.key(11), (3, 2, 2, 2), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(12), x0.shape)
    t = jnp.array([1, 30, 700], jnp.int32)

    def posterior_model(xt, t):
        mean, _, _ = d.q_posterior_mean_variance(S, x0, xt, t)
        return mean

    kl = d.training_losses(
        S, posterior_model, x0, t, noise, mean_type="xprev", var_type="fixedsmall",
        loss_type="kl",
    )
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)

    # Hybrid: the gradient with respect to the mean part is that of the mse alone.
    def loss(out_mean, out_var, loss_type):
        fn = lambda xt, tt: jnp.concatenate([out_mean, out_var], -1)
        return d.training_losses(
            S, fn, x0, t, noise, mean_type="eps", var_type="learned_range", loss_type=loss_type
        ).sum()

    om, ov = 0.1 * noise, jnp.zeros_like(noise)
    g_hybrid = jax.grad(loss, argnums=(0, 1))(om, ov, "hybrid")
    g_mse = jax.grad(lambda m: ((noise - m) ** 2).reshape(3, -1).mean(1).sum())(om)
    np.testing.assert_allclose(g_hybrid[0], g_mse, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g_hybrid[1]).sum()) > 0


@jax.enable_x64(True)
def test_training_losses_gradients():
    # Finite differences need float64 to be meaningful.
    x0 = jax.random.uniform(jax.random.key(13), (2, 3, 3, 2), jnp.float64, minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(14), x0.shape, jnp.float64)
    t = jnp.array([3, 600], jnp.int32)

    for mean_type, var_type, loss_type, out_ch in [
        ("eps", "fixedlarge", "mse", 2),
        ("xstart", "fixedsmall", "kl", 2),
        ("v", "learned_range", "kl", 4),
        ("xprev", "learned", "kl", 4),
    ]:
        # (hybrid is left out on purpose: its stop-gradient makes the gradient differ from
        # finite differences of the value; it is tested on its own above.)

        def loss(w, b, mean_type=mean_type, var_type=var_type, loss_type=loss_type):
            fn = lambda xt, tt: jnp.tanh(xt @ w + b)
            return d.training_losses(
                S, fn, x0, t, noise, mean_type=mean_type, var_type=var_type, loss_type=loss_type
            ).mean()

        w = 0.3 * jax.random.normal(jax.random.key(15), (2, out_ch), jnp.float64)
        b = jnp.zeros((out_ch,), jnp.float64)
        check_grads(loss, (w, b), order=1, modes=("rev",), atol=1e-4, rtol=1e-4, eps=1e-5)


# ----------------------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 2), (2, 8, 8, 3)])
def test_jit_for_any_shape(shape):
    x0 = jnp.zeros(shape)
    t = jnp.zeros((shape[0],), jnp.int32)
    fn = jax.jit(
        functools.partial(
            d.training_losses, mean_type="eps", var_type="fixedlarge", loss_type="mse"
        ),
        static_argnums=1,
    )
    assert fn(S, lambda x, t: x, x0, t, x0).shape == (shape[0],)


def test_bad_names_raise_value_error():
    x = jnp.zeros((2, 2, 2, 1))
    t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="mean_type.*eps"):
        d.p_mean_variance(S, x, x, t, mean_type="epsilon", var_type="fixedlarge")
    with pytest.raises(ValueError, match="var_type.*fixedsmall"):
        d.p_mean_variance(S, x, x, t, mean_type="eps", var_type="fixed")
    with pytest.raises(ValueError, match="loss_type.*hybrid"):
        d.training_losses(S, lambda a, b: a, x, t, x, mean_type="eps", var_type="fixedlarge",
                          loss_type="l1")
    with pytest.raises(ValueError, match="hybrid"):
        d.training_losses(S, lambda a, b: a, x, t, x, mean_type="eps", var_type="learned",
                          loss_type="mse")
    with pytest.raises(ValueError, match="learned"):
        d.training_losses(S, lambda a, b: a, x, t, x, mean_type="eps", var_type="fixedlarge",
                          loss_type="hybrid")


def test_mismatched_shapes_raise_value_error():
    x = jnp.zeros((2, 4, 4, 3))
    t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="same shape"):
        d.q_sample(S, x, t, jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="t must have shape"):
        d.q_sample(S, x, jnp.zeros((3,), jnp.int32), x)
    with pytest.raises(ValueError, match="model output"):
        d.p_mean_variance(S, x, x, t, mean_type="eps", var_type="learned")
    with pytest.raises(ValueError, match="model output"):
        d.p_mean_variance(S, jnp.zeros((2, 4, 4, 6)), x, t, mean_type="eps",
                          var_type="fixedlarge")
    with pytest.raises(ValueError, match="betas"):
        d.make_schedule(np.array([0.1, 1.5]))
