"""8x8 handwritten digits on CPU: the embedded default of ``python run_train.py``.

Command (from the repository root; writes ./runs/digits):
  python run_train.py
  # the same as: python run_train.py --config configs/digits.py --workdir runs/digits

Data: scikit-learn's 8x8 digits (1,500 training images, shipped with
scikit-learn, no download), one channel scaled to 0..255, no flips.

Hardware and time: 2 CPU cores; the measured run time is in the README
("The embedded default"), the one place it is stated, with its results file.
For a shorter run, e.g. --config.training.num_train_steps=1800.

Expected result: samples/step_*.png shows recognizable digits; the measured
quality (``python -m ddpm_jax.digits_quality``) is in the same README section.
"""

import ml_collections

from ddpm_jax.config_lib import base_config


def get_config() -> ml_collections.ConfigDict:
    """A small U-Net on the 8x8 digits."""
    config = base_config(__file__, "default")
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False

    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 200

    config.training.batch_size = 128
    config.training.num_train_steps = 2500
    config.training.steps_per_call = 5
    config.training.ema_decay = 0.995
    config.training.log_every = 250
    config.training.checkpoint_every = 1000
    config.training.keep_checkpoints = 2
    config.training.sample_every = 100_000
    config.training.num_samples = 64
    return config
