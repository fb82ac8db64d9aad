"""LSUN Bedroom 256x256 (Ho et al. 2020): no random flips.

Command (one TPU v3-8 host; see the README for pods and GPUs):
  python run_train.py --config configs/lsun_bedroom256.py --workdir runs/lsun_bedroom256 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Data: tfds ``lsun/bedroom`` (center crops resized to 256, as in the reference
data preparation).

Hardware and time: the paper trained 2.4M steps at batch 64 on a TPU
v3-8 at about 2.2 steps/s, i.e. about 303 hours (12.6 days).
--config.model.dtype=bfloat16 makes it faster.

Expected result: FID about 6.36 (paper; 4.90 for its larger model) (EMA
weights, 50,000 samples, 1000 DDPM steps with the fixedsmall variance).
"""

import ml_collections

from ddpm_jax.config_lib import base_config


def get_config() -> ml_collections.ConfigDict:
    """LSUN Bedroom 256: the CelebA-HQ 256 config on another data set."""
    config = base_config(__file__, "celebahq256")
    config.data.name = "lsun_bedroom"
    config.data.random_flip = False
    config.training.num_train_steps = 2_400_000
    return config
