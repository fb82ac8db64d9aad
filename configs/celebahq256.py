"""CelebA-HQ 256x256 (Ho et al. 2020, Section 4 and Appendix).

Command (one TPU v3-8 host; see the README for pods and GPUs):
  python run_train.py --config configs/celebahq256.py --workdir runs/celebahq256 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Data: tfds ``celeb_a_hq/256`` (manual download; the error message when it is
missing says how to prepare it).

Hardware and time: the paper trained 0.5M steps at batch 64 on a TPU
v3-8 at about 2.2 steps/s, i.e. about 63 hours (2.6 days).
--config.model.dtype=bfloat16 makes it faster.

Expected result: The paper shows samples only (no FID for CelebA-HQ): faces of
sample quality like the paper's Figure 1 (EMA weights, 50,000 samples, 1000
DDPM steps with the fixedsmall variance).
"""

import ml_collections

from ddpm_jax.config_lib import base_config


def get_config() -> ml_collections.ConfigDict:
    """CelebA-HQ 256: the CIFAR-10 config with the paper's 256x256 changes."""
    config = base_config(__file__, "default")
    config.data.name = "celeb_a_hq"
    config.data.image_size = 256
    config.data.random_flip = True
    config.data.shuffle_buffer = 10_000

    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0

    config.diffusion.var_type = "fixedsmall"

    config.optim.lr = 2e-5

    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    config.training.steps_per_call = 1
    config.training.checkpoint_every = 5_000
    config.training.sample_every = 50_000
    config.training.num_samples = 16
    return config
