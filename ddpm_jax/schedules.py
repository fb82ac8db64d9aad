"""Noise schedules beta_1..beta_T for the forward process q(x_t | x_{t-1}).

Every schedule is computed once, in float64 numpy, outside of any trace. The names and
semantics follow the reference DDPM code (linear, quad, const, jsd, warmup10, warmup50),
plus the cosine schedule of Nichol & Dhariwal (2021).
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _warmup(beta_start: float, beta_end: float, num_timesteps: int, frac: float) -> np.ndarray:
    """beta_end everywhere, except a linear ramp from beta_start over the first frac * T steps."""
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    warmup_steps = int(num_timesteps * frac)
    betas[:warmup_steps] = np.linspace(beta_start, beta_end, warmup_steps, dtype=np.float64)
    return betas


def _cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Betas whose alpha-bar follows cos^2(((t/T + s) / (1 + s)) * pi/2), capped at max_beta."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def get_beta_schedule(
    name: str,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_timesteps: int = 1000,
) -> np.ndarray:
    """Returns the betas of a named schedule.

    Args:
      name: one of "linear" (the paper's: beta_start..beta_end evenly spaced), "quad" (evenly
        spaced in sqrt(beta), then squared), "const" (beta_end throughout), "jsd"
        (1/T, 1/(T-1), ..., 1), "warmup10" / "warmup50" (a linear ramp over the first 10% / 50%
        of the steps, then beta_end), "cosine" (Nichol & Dhariwal 2021; ignores beta_start and
        beta_end).
      beta_start: beta_1.
      beta_end: beta_T.
      num_timesteps: T.

    Returns:
      float64 array [T].

    Raises:
      ValueError: for an unknown name or a non-positive number of steps.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    elif name == "jsd":
        betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
    elif name == "warmup10":
        betas = _warmup(beta_start, beta_end, num_timesteps, 0.1)
    elif name == "warmup50":
        betas = _warmup(beta_start, beta_end, num_timesteps, 0.5)
    elif name == "cosine":
        betas = _cosine(num_timesteps)
    else:
        raise ValueError(f"Unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULES)}.")
    return betas
