"""8x8 handwritten digits on CPU: the embedded default of ``python run_train.py``.

Command (from the repository root; writes ./runs/digits):
  python run_train.py
  # the same as: python run_train.py --config configs/digits.py --workdir runs/digits

Data: scikit-learn's 8x8 digits (1,500 training images, shipped with
scikit-learn, no download), one channel scaled to 0..255, no flips.

Hardware and time: 2 CPU cores. The train step runs at about 5.6 steps/s
(batch 128) on an otherwise idle 2-core machine, so the 2,500 steps take
about 7.5 minutes, plus about a minute for start-up, compilation and the final
64 samples (1000 DDPM steps): about 8.5 minutes. Measured: 10 min 18 s wall
on a shared 2-core machine (load average 1.7-5 from other jobs; 16.5 minutes
at a load average of 8-12). For a shorter run, e.g.
--config.training.num_train_steps=1800.

Expected result: samples/step_*.png shows recognizable digits. Measured with
``python -m ddpm_jax.digits_quality runs/digits`` (1,000 DDPM samples, 1000
steps, classified by an MLP trained on the real digits): 94.3% of the samples
get a class with probability >= 0.8 (real held-out digits: 98.2%), and the
classes get 8.2%-11.4% of the samples each.
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
