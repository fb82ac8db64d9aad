"""LSUN Church (outdoor) 256x256 (Ho et al. 2020).

Command (one TPU v3-8 host; see the README for pods and GPUs):
  python run_train.py --config configs/lsun_church256.py --workdir runs/lsun_church256 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Data: tfds ``lsun/church_outdoor`` (center crops resized to 256, as in the
reference data preparation).

Hardware and time: the paper trained 1.2M steps at batch 64 on a TPU
v3-8 at about 2.2 steps/s, i.e. about 152 hours (6.3 days).
--config.model.dtype=bfloat16 makes it faster.

Expected result: FID about 7.89 (paper) (EMA weights, 50,000 samples, 1000
DDPM steps with the fixedsmall variance).
"""

import ml_collections

from ddpm_jax.config_lib import base_config


def get_config() -> ml_collections.ConfigDict:
    """LSUN Church 256: the CelebA-HQ 256 config on another data set."""
    config = base_config(__file__, "celebahq256")
    config.data.name = "lsun_church"
    config.data.random_flip = True
    config.training.num_train_steps = 1_200_000
    return config
