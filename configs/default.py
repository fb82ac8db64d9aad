"""CIFAR-10, the paper's main run (Ho et al. 2020, L_simple, FID 3.17).

Command (one TPU v3-8 host, or 8 GPUs on one machine):
  python run_train.py --config configs/default.py --workdir runs/cifar10
    [--config.data.data_dir=gs://BUCKET/tensorflow_datasets]

Hardware and time: the paper trained 800k steps at batch 128 on a TPU v3-8 at
about 21 steps/s (2,688 images/s), i.e. about 10.6 hours (plus sample grids
and checkpoints). With --config.model.dtype=bfloat16 it runs faster on TPUs
and recent GPUs.

Expected result (EMA weights, 50,000 samples, 1000 DDPM steps, fixedlarge):
FID about 3.2 against the training set (paper 3.17; 5.24 against the test
set), Inception Score about 9.5, and <= 3.75 bits/dim on the test set.

Gradient clipping: by default the replica-averaged gradient is clipped to
global norm 1.0, which does not depend on the device count. The reference
TPU run clipped each replica's local gradient (local batch 16 on 8 cores)
before averaging; --config.optim.clip_per_replica=True on 8 devices
reproduces that exactly.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 paper configuration."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # "shard_map" (jax.jit over a 1-D device mesh) or "pmap".
    config.parallelism = "shard_map"

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"
    data.path = ""  # image folder / .npz file for name "image_folder" / "npz"
    data.data_dir = ""  # tfds data_dir ("" = the tfds default, e.g. a gs:// bucket on TPU)
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.shuffle_buffer = 50_000

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.num_classes = ml_collections.config_dict.placeholder(int)
    model.dtype = "float32"  # or "bfloat16" (mixed precision; params stay float32)
    model.remat = "none"  # or "full" / "dots": recompute residual blocks to save memory

    config.diffusion = diff = ml_collections.ConfigDict()
    diff.beta_schedule = "linear"
    diff.beta_start = 1e-4
    diff.beta_end = 0.02
    diff.num_timesteps = 1000
    diff.mean_type = "eps"
    diff.var_type = "fixedlarge"
    diff.loss_type = "mse"

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup_steps = 5000
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.grad_clip = 1.0  # global norm; 0 disables clipping
    optim.clip_per_replica = False

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global, over all devices and processes
    training.num_train_steps = 800_000
    training.steps_per_call = 10  # train steps per compiled call (lax.scan)
    training.ema_decay = 0.9999
    training.log_every = 100
    training.checkpoint_every = 10_000
    training.keep_checkpoints = 3
    training.sample_every = 50_000
    training.num_samples = 64
    # "uniform" (the paper) or "loss_aware" (importance-sampled timesteps, for loss_type "kl").
    training.timestep_sampler = "uniform"

    # How the periodic sample grids are drawn (with the EMA params).
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.sampler = "ddpm"  # "ddpm" | "ddim" | "dpm++2m"
    sampling.num_steps = ml_collections.config_dict.placeholder(int)  # None: all T steps
    sampling.clip_denoised = True
    # None: the sampler's default ("logsnr" for dpm++2m, else "linspace"); see sampling.SPACINGS
    sampling.spacing = ml_collections.config_dict.placeholder(str)

    # FID and Inception Score of EMA samples during training (ddpm_jax.metrics.in_training);
    # off while every = 0. Turning it on needs the two files, checked when training starts.
    config.eval = ev = ml_collections.ConfigDict()
    ev.every = 0  # train steps between evaluations; 0: off
    ev.num_samples = 10_000
    ev.batch_size = 512  # images per sampling call and Inception batch (x local devices)
    ev.sampler = "ddim"
    ev.num_steps = 100  # network evaluations per sample (None: all T, for "ddpm" only)
    ev.seed = 1  # the same samples' noise at every evaluation
    ev.inception = ""  # pt_inception-2015-12-05-6726825d.pth (or its .npz)
    ev.ref_stats = ""  # python -m ddpm_jax.metrics stats ... --out cifar10_train.npz
    ev.fid_method = "eigh"  # "sqrtm" for the TTUR computation (slower)
    ev.is_splits = 10
    return config
