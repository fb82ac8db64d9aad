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

import importlib.util
import pathlib

import ml_collections


def _default_config() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("default.py")
    spec = importlib.util.spec_from_file_location("ddpm_configs_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    """LSUN Bedroom 256: the CIFAR-10 config with the paper's 256x256 changes."""
    config = _default_config()
    config.data.name = "lsun_bedroom"
    config.data.image_size = 256
    config.data.random_flip = False
    config.data.shuffle_buffer = 10_000

    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0

    config.diffusion.var_type = "fixedsmall"

    config.optim.lr = 2e-5

    config.training.batch_size = 64
    config.training.num_train_steps = 2_400_000
    config.training.steps_per_call = 1
    config.training.checkpoint_every = 5_000
    config.training.sample_every = 50_000
    config.training.num_samples = 16
    return config
