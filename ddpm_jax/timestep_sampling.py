"""Timestep samplers for training: uniform, or importance sampling by the loss history.

The training loss is an estimate of the sum over t of per-timestep terms L_t. Drawing
t ~ U{0..T-1} estimates their mean. The loss-aware sampler of Nichol & Dhariwal (2021,
"Improved Denoising Diffusion Probabilistic Models", Sec. 3.3) draws t with probability

  p_t proportional to sqrt(E[L_t^2]),

with E[L_t^2] the mean of the squares of the last `HISTORY` (10) values of L_t seen in
training, and weights term t by 1 / (T p_t), so that the weighted estimate keeps the
uniform estimate's mean (it is unbiased) while its variance drops: L_vlb's terms span
orders of magnitude, and the large early ones are drawn more often. Until every t has 10
values the draw is uniform (and the weights are 1). As in the authors' released code, a
small uniform probability is mixed in once it is warm: p = (1 - u) p' + u / T with
u = `UNIFORM_PROB` (0.001), so every t keeps a positive probability.

The history lives in the train state (`LossHistory`, a ring buffer per t), is replicated on
every device, and is updated with the losses of the whole global batch in a fixed order, so
every replica holds the same history; it is checkpointed with the rest of the state.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

TIMESTEP_SAMPLERS = ("uniform", "loss_aware")
HISTORY = 10  # losses kept per timestep
UNIFORM_PROB = 0.001  # mixed into the warm distribution


@flax.struct.dataclass
class LossHistory:
    """The last `HISTORY` training losses of each timestep, as a ring buffer.

    Attributes:
      losses: float32 [T, HISTORY]; row t holds the latest losses at t (slot order is
        the ring's, not time order; only the set matters).
      counts: int32 [T]; the number of losses seen at t while below HISTORY, afterwards
        HISTORY + (seen - HISTORY) mod HISTORY (bounded, and ``counts % HISTORY`` is the next
        slot to write).
    """

    losses: jax.Array
    counts: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.losses.shape[0])


def init_history(num_timesteps: int) -> LossHistory:
    """An empty history for T timesteps (the sampler is uniform until it fills)."""
    return LossHistory(losses=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
                       counts=jnp.zeros((num_timesteps,), jnp.int32))


def is_warm(history: LossHistory) -> jax.Array:
    """bool []: every timestep has HISTORY losses."""
    return jnp.all(history.counts >= HISTORY)


def probabilities(history: LossHistory) -> jax.Array:
    """p_t, float32 [T]: uniform before the history is warm; then (1 - u) w / sum(w) + u / T
    with w_t = sqrt(mean of the squared stored losses at t) and u = UNIFORM_PROB."""
    num_timesteps = history.num_timesteps
    w = jnp.sqrt(jnp.mean(jnp.square(history.losses), axis=1))
    total = jnp.sum(w)
    warm_p = (1.0 - UNIFORM_PROB) * w / jnp.where(total > 0, total, 1.0) + (
        UNIFORM_PROB / num_timesteps)
    use_warm = is_warm(history) & (total > 0)  # all-zero losses: stay uniform
    return jnp.where(use_warm, warm_p, jnp.full_like(w, 1.0 / num_timesteps))


def sample_timesteps(history: LossHistory, key: jax.Array, batch: int
                     ) -> tuple[jax.Array, jax.Array]:
    """Draws t ~ p (see `probabilities`) and the importance weights 1 / (T p_t).

    Returns:
      (t int32 [batch], weights float32 [batch]); the weights are exactly 1 while the
      draw is uniform (before the history is warm).
    """
    p = probabilities(history)
    num_timesteps = history.num_timesteps
    t = jax.random.choice(key, num_timesteps, (batch,), p=p).astype(jnp.int32)
    uniform = jnp.all(p == p[0])
    weights = jnp.where(uniform, 1.0, 1.0 / (num_timesteps * p[t]))
    return t, weights.astype(jnp.float32)


def update_history(history: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
    """Appends losses[i] to the history of t[i], in the order i = 0, 1, ...

    The result equals appending them one at a time (keeping the last HISTORY per
    timestep), but is computed in one scatter: an example's slot is its timestep's next slot
    plus the number of earlier examples with the same timestep, and only the last HISTORY
    examples of each timestep are written, so no slot is written twice.

    Args:
      history: the current history.
      t: int32 [N] timesteps of the global batch.
      losses: [N] their (unweighted) losses.
    """
    num_timesteps = history.num_timesteps
    same = t[:, None] == t[None, :]  # [N, N]
    earlier = jnp.sum(jnp.tril(same, k=-1), axis=1)  # same t before example i
    later = jnp.sum(jnp.triu(same, k=1), axis=1)  # same t after it
    slot = (history.counts[t] + earlier) % HISTORY
    row = jnp.where(later < HISTORY, t, num_timesteps)  # out of range: dropped
    buf = history.losses.at[row, slot].set(losses.astype(jnp.float32), mode="drop")
    seen = history.counts.at[t].add(1)
    counts = jnp.where(seen >= HISTORY, HISTORY + (seen - HISTORY) % HISTORY, seen)
    return LossHistory(losses=buf, counts=counts.astype(jnp.int32))
