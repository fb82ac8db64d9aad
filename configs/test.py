"""A tiny config for tests and smoke runs: digits, a 32-channel U-Net, T = 20.

Command:
  python run_train.py --config configs/test.py --workdir /tmp/ddpm_test

Hardware and time: any CPU, a few seconds after compilation (about 10-30 s in
all). Expected result: it runs end to end (checkpoints, TensorBoard scalars,
a sample grid); the samples are noise, the loss starts near 1 and drops.
"""

import ml_collections

from ddpm_jax.config_lib import base_config


def get_config() -> ml_collections.ConfigDict:
    """Tiny everything."""
    config = base_config(__file__, "digits")
    config.model.attn_resolutions = (4,)  # exercise attention
    config.model.dropout = 0.1  # and dropout

    config.diffusion.num_timesteps = 20

    config.optim.warmup_steps = 2

    config.training.batch_size = 16
    config.training.num_train_steps = 8
    config.training.steps_per_call = 2
    config.training.ema_decay = 0.9
    config.training.log_every = 4
    config.training.checkpoint_every = 4
    config.training.keep_checkpoints = 3
    config.training.sample_every = 8
    config.training.num_samples = 4
    return config
