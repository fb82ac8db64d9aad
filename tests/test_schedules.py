"""Beta schedules against their definitions, computed independently in float64."""

import math

import numpy as np
import pytest

from ddpm_jax import schedules


def test_linear_is_the_paper_schedule():
    betas = schedules.get_beta_schedule("linear")
    assert betas.dtype == np.float64
    assert betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_quad_is_linear_in_sqrt_beta():
    betas = schedules.get_beta_schedule("quad", beta_start=1e-4, beta_end=0.02, num_timesteps=50)
    root = np.sqrt(betas)
    assert root[0] == pytest.approx(0.01)
    assert root[-1] == pytest.approx(math.sqrt(0.02))
    np.testing.assert_allclose(np.diff(root), (math.sqrt(0.02) - 0.01) / 49, rtol=1e-9)


def test_const_and_jsd():
    np.testing.assert_array_equal(
        schedules.get_beta_schedule("const", beta_end=0.3, num_timesteps=7), np.full(7, 0.3)
    )
    jsd = schedules.get_beta_schedule("jsd", num_timesteps=5)
    np.testing.assert_allclose(jsd, [1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-12)


@pytest.mark.parametrize("name,frac", [("warmup10", 0.1), ("warmup50", 0.5)])
def test_warmup(name, frac):
    T = 200
    betas = schedules.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_timesteps=T)
    n = int(T * frac)
    np.testing.assert_allclose(betas[:n], 1e-4 + np.arange(n) * (0.02 - 1e-4) / (n - 1), rtol=1e-9)
    np.testing.assert_array_equal(betas[n:], 0.02)


def test_cosine_follows_its_alpha_bar_and_is_capped():
    T = 1000
    betas = schedules.get_beta_schedule("cosine", num_timesteps=T)
    s = 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    uncapped = betas < 0.999
    # Wherever no beta before t was capped, alpha-bar_t equals f(t+1)/f(0).
    first_capped = np.argmin(uncapped) if not uncapped.all() else T
    np.testing.assert_allclose(
        alphas_cumprod[:first_capped], f[1 : first_capped + 1] / f[0], rtol=1e-9
    )
    assert betas.max() == pytest.approx(0.999)
    assert betas[-1] == pytest.approx(0.999)
    assert np.all(betas > 0)


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="linear.*cosine"):
        schedules.get_beta_schedule("sigmoid")


def test_bad_num_timesteps():
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.get_beta_schedule("linear", num_timesteps=0)
