"""Config files: loading them by path, and their typed, checked sections.

Every reader of a config file uses `load_config`: the commands' ``--config`` flag
(`ddpm_jax.commands.parse_with_config`, which also applies ``--config.FIELD=VALUE``
overrides), notebooks, tests, benchmarks, and the config files themselves (which extend one
another).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import pathlib
from typing import Any, ClassVar

import ml_collections
import numpy as np

from ddpm_jax import diffusion, input_pipeline, parallel, sampling, schedules, timestep_sampling
from ddpm_jax.unet import UNetConfig

REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Returns ``get_config()`` of a config file, or ``get_config(ARG)`` for ``FILE:ARG``.

    Args:
      path: a config file, or the bare name of one in this repository's configs/ folder
        ("digits" -> configs/digits.py). ``FILE:ARG`` (as ml_collections' config flags
        read it) passes the string ARG to ``get_config``, for config files whose
        ``get_config`` takes one argument.

    Raises:
      FileNotFoundError: no such file, with the names available in configs/.
      ValueError: an ARG for a ``get_config`` that takes none, or none for one that needs it.
    """
    arg = None
    if isinstance(path, str) and ":" in path and not pathlib.Path(path).is_file():
        path, arg = path.split(":", 1)
    path = pathlib.Path(path)
    if path.suffix != ".py" and len(path.parts) == 1:
        path = REPO_CONFIGS / f"{path}.py"
    if not path.is_file():
        names = sorted(p.stem for p in REPO_CONFIGS.glob("*.py")) if REPO_CONFIGS.is_dir() else []
        raise FileNotFoundError(f"no config file {str(path)!r}; the configs here: {names}.")
    spec = importlib.util.spec_from_file_location(f"ddpm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = inspect.signature(module.get_config).parameters.values()
    if arg is not None and not params:
        raise ValueError(f"{path}: get_config() takes no argument; drop ':{arg}' from the "
                         "config file name.")
    if arg is None and any(p.default is p.empty for p in params):
        raise ValueError(f"{path}: get_config() needs an argument; pass the file as "
                         f"{path}:ARG.")
    return module.get_config() if arg is None else module.get_config(arg)


def base_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """The config `name` (e.g. "default") from the folder of `config_file` (pass __file__)."""
    return load_config(pathlib.Path(config_file).resolve().with_name(f"{name}.py"))


# --------------------------------------------------------------------------- typed sections
#
# Each section of a training config is read into a frozen dataclass by its ``from_config``,
# which rejects unknown and missing fields and checks every value. The dataclass fields are
# the one list of what a section may hold; `ExperimentConfig.from_config` reads them all.


def _as_dict(section: Any) -> dict[str, Any]:
    if isinstance(section, ml_collections.ConfigDict):
        return section.to_dict()
    return dict(section)


def _read_section(cls, section: Any, name: str) -> dict[str, Any]:
    """The section's fields as a dict, after checking them against cls's dataclass fields."""
    values = _as_dict(section)
    fields = dataclasses.fields(cls)
    allowed = [f.name for f in fields]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config field(s) {[f'{name}.{u}' for u in unknown]}; "
                         f"allowed in {name}: {allowed}.")
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"config.{name} lacks {missing}; start from configs/default.py.")
    return values


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name} must be a positive int, got {value!r}.")


def _finite(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config.{name} must be a number, got {value!r}.") from None
    if not math.isfinite(v):
        raise ValueError(f"config.{name} must be a finite number, got {value!r}.")
    return v


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"config.{name}={value!r} is unknown; allowed: {list(allowed)}.")


class _Section:
    """A typed config section: ``from_config`` reads ``config.<SECTION>`` into the dataclass."""

    SECTION: ClassVar[str]

    @classmethod
    def from_config(cls, section: Any):
        """Reads and checks the section (a ConfigDict or a dict): unknown or missing fields
        and bad values raise ValueError naming the field."""
        return cls(**_read_section(cls, section, cls.SECTION))


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(_Section):
    """``config.diffusion``: the forward process and what the network predicts.

    Attributes:
      beta_schedule, beta_start, beta_end, num_timesteps: the betas
        (`schedules.get_beta_schedule`); num_timesteps T >= 2.
      mean_type, var_type, loss_type: one of `diffusion.MEAN_TYPES`,
        `diffusion.VAR_TYPES`, `diffusion.LOSS_TYPES`.
    """

    SECTION: ClassVar[str] = "diffusion"

    beta_schedule: str
    beta_start: float
    beta_end: float
    num_timesteps: int
    mean_type: str
    var_type: str
    loss_type: str

    def __post_init__(self):
        _choice("diffusion.mean_type", self.mean_type, diffusion.MEAN_TYPES)
        _choice("diffusion.var_type", self.var_type, diffusion.VAR_TYPES)
        _choice("diffusion.loss_type", self.loss_type, diffusion.LOSS_TYPES)
        _positive_int("diffusion.num_timesteps", self.num_timesteps)
        if self.num_timesteps < 2:
            raise ValueError(f"config.diffusion.num_timesteps must be >= 2, got "
                             f"{self.num_timesteps} (the posterior at t = 0 borrows the t = 1 "
                             "variance).")
        _finite("diffusion.beta_start", self.beta_start)
        _finite("diffusion.beta_end", self.beta_end)
        self.betas()  # the schedule's own checks (name, range)


    def betas(self) -> np.ndarray:
        """float64 [T]: `schedules.get_beta_schedule` of these fields."""
        return schedules.get_beta_schedule(
            self.beta_schedule, beta_start=float(self.beta_start),
            beta_end=float(self.beta_end), num_timesteps=int(self.num_timesteps))

    @property
    def learned_variance(self) -> bool:
        """Whether the network also outputs the variance (2C output channels)."""
        return self.var_type in diffusion.LEARNED_VAR_TYPES


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    """``config.optim``: Adam with a linear warm-up and global-norm clipping.

    Attributes:
      lr: the learning rate after warm-up, finite and > 0.
      warmup_steps: linear warm-up length (0: none).
      beta1, beta2, eps: Adam's.
      grad_clip: global-norm clipping threshold; 0 disables clipping.
      clip_per_replica: clip each device's gradient before averaging (the
        reference TPU code's order) instead of the averaged one.
    """

    SECTION: ClassVar[str] = "optim"

    lr: float
    warmup_steps: int
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    clip_per_replica: bool = False

    def __post_init__(self):
        for name in ("lr", "beta1", "beta2", "eps", "grad_clip"):
            _finite(f"optim.{name}", getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"config.optim.lr must be > 0, got {self.lr}.")
        if self.grad_clip < 0:
            raise ValueError(f"config.optim.grad_clip must be >= 0 (0 disables clipping), got "
                             f"{self.grad_clip}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            raise ValueError(f"config.optim.warmup_steps must be an int >= 0, got "
                             f"{self.warmup_steps!r}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps >= 0):
            raise ValueError(f"config.optim: beta1 and beta2 must lie in [0, 1) and eps >= 0; "
                             f"got beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}.")


@dataclasses.dataclass(frozen=True)
class TrainingConfig(_Section):
    """``config.training``: the loop.

    Attributes:
      batch_size: global batch, over all devices and processes.
      num_train_steps: the run's length.
      steps_per_call: train steps per compiled call (a ``lax.scan`` when > 1).
      ema_decay: in [0, 1).
      log_every, checkpoint_every, sample_every: in steps.
      keep_checkpoints: how many checkpoints to keep.
      num_samples: images in each sample grid (0: none).
      timestep_sampler: one of `timestep_sampling.TIMESTEP_SAMPLERS`: "uniform"
        (the paper's) or "loss_aware" (importance sampling by the loss history,
        Nichol & Dhariwal 2021); absent in older configs, then "uniform".
    """

    SECTION: ClassVar[str] = "training"

    batch_size: int
    num_train_steps: int
    steps_per_call: int
    ema_decay: float
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    sample_every: int
    num_samples: int
    timestep_sampler: str = "uniform"

    def __post_init__(self):
        for name in ("batch_size", "num_train_steps", "steps_per_call", "log_every",
                     "checkpoint_every", "sample_every", "keep_checkpoints"):
            _positive_int(f"training.{name}", getattr(self, name))
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples < 0:
            raise ValueError(f"config.training.num_samples must be an int >= 0, got "
                             f"{self.num_samples!r}.")
        if not 0.0 <= _finite("training.ema_decay", self.ema_decay) < 1.0:
            raise ValueError(f"config.training.ema_decay must be in [0, 1), got {self.ema_decay}.")
        _choice("training.timestep_sampler", self.timestep_sampler,
                timestep_sampling.TIMESTEP_SAMPLERS)


@dataclasses.dataclass(frozen=True)
class SamplingConfig(_Section):
    """``config.sampling``: how the periodic sample grids are drawn (with the EMA params).

    Attributes:
      sampler: one of `sampling.SAMPLERS`.
      num_steps: network evaluations per sample (None: T for "ddpm"; required
        otherwise).
      clip_denoised: clip the x0 prediction to [-1, 1] at each step.
      spacing: which timesteps num_steps visits, one of `sampling.SPACINGS`
        (None: the sampler's default, "logsnr" for "dpm++2m", else "linspace").
    """

    SECTION: ClassVar[str] = "sampling"

    sampler: str
    num_steps: int | None = None
    clip_denoised: bool = True
    spacing: str | None = None

    def __post_init__(self):
        _choice("sampling.sampler", self.sampler, sampling.SAMPLERS)
        if self.spacing is not None:
            _choice("sampling.spacing", self.spacing, sampling.SPACINGS)
        if self.num_steps is not None:
            _positive_int("sampling.num_steps", self.num_steps)


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
    """``config.eval`` (optional): FID and IS of EMA samples during training.

    The files and the sampler options are checked by
    ``ddpm_jax.metrics.in_training.validate_eval_config`` when ``every`` > 0.

    Attributes:
      every: train steps between evaluations; 0: off.
      num_samples: images per evaluation (>= 2).
      batch_size: images per sampling call and Inception batch.
      sampler, num_steps: as in `SamplingConfig`.
      seed: the samples' noise (the same at every evaluation).
      inception: the FID Inception weights (.pth or its .npz).
      ref_stats: reference statistics .npz (``python -m ddpm_jax.metrics stats``).
      fid_method: "sqrtm" or "eigh".
      is_splits: Inception Score splits.
    """

    SECTION: ClassVar[str] = "eval"

    every: int = 0
    num_samples: int = 10_000
    batch_size: int = 512
    sampler: str = "ddim"
    num_steps: int | None = 100
    seed: int = 1
    inception: str = ""
    ref_stats: str = ""
    fid_method: str = "eigh"
    is_splits: int = 10

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"config.eval.every must be an int >= 0, got {self.every!r}.")
        if not self.every:
            return
        _choice("eval.sampler", self.sampler, sampling.SAMPLERS)
        for name in ("num_samples", "batch_size", "is_splits"):
            _positive_int(f"eval.{name}", getattr(self, name))
        if self.num_steps is not None:
            _positive_int("eval.num_steps", self.num_steps)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole training config, every section typed and checked.

    ``ExperimentConfig.from_config(config)`` is the validation of a training
    config (`train.validate_config` calls it): unknown or missing sections and
    fields, and bad values, raise ValueError naming the field, before anything
    compiles.
    """

    seed: int
    parallelism: str
    data: input_pipeline.DataSettings
    model: UNetConfig
    diffusion: DiffusionConfig
    optim: OptimConfig
    training: TrainingConfig
    sampling: SamplingConfig
    eval: EvalConfig | None = None  # optional section: None when a config has none

    @classmethod
    def from_config(cls, config: Any) -> ExperimentConfig:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config.keys()) - set(allowed))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; allowed: {allowed}.")
        missing = sorted(set(allowed) - set(config.keys()) - {"eval"})
        if missing:
            raise ValueError(f"the config lacks the section(s) {missing}; start from "
                             "configs/default.py.")
        if isinstance(config["seed"], bool) or not isinstance(config["seed"], int):
            raise ValueError(f"config.seed must be an int, got {config['seed']!r}.")
        _choice("parallelism", config["parallelism"], parallel.PARALLELISMS)
        data = input_pipeline.DataSettings.from_config(config["data"])
        diff = DiffusionConfig.from_config(config["diffusion"])
        out_ch = data.channels * (2 if diff.learned_variance else 1)
        model = UNetConfig.from_config(config["model"], out_ch=out_ch)
        model.validate(data.image_size)
        return cls(seed=config["seed"], parallelism=config["parallelism"], data=data,
                   model=model, diffusion=diff, optim=OptimConfig.from_config(config["optim"]),
                   training=TrainingConfig.from_config(config["training"]),
                   sampling=SamplingConfig.from_config(config["sampling"]),
                   eval=EvalConfig.from_config(config["eval"]) if "eval" in config else None)
