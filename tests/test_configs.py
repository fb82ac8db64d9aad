"""Tests for configs/*.py: the paper's numbers, the overrides, validation, the entry point."""

import importlib.util
import pathlib

import numpy as np
import pytest

from ddpm_jax import builders, train, unet

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
ALL = ("default", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256", "digits",
       "test")


def load(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ALL)
def test_every_config_validates_and_documents_itself(name):
    module = load(name)
    train.validate_config(module.get_config())
    doc = module.__doc__
    assert "run_train.py" in doc  # the command
    assert "Expected result" in doc and "ime" in doc  # the result and the time


def test_default_is_the_cifar10_paper_run():
    c = load("default").get_config()
    assert (c.data.name, c.data.image_size, c.data.channels, c.data.random_flip) == (
        "cifar10", 32, 3, True)
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert tuple(c.model.attn_resolutions) == (16,) and c.model.dropout == 0.1
    assert c.model.resamp_with_conv and c.model.dtype == "float32"
    d = c.diffusion
    assert (d.beta_schedule, d.beta_start, d.beta_end, d.num_timesteps) == (
        "linear", 1e-4, 0.02, 1000)
    assert (d.mean_type, d.var_type, d.loss_type) == ("eps", "fixedlarge", "mse")
    o = c.optim
    assert (o.lr, o.warmup_steps, o.beta1, o.beta2, o.eps, o.grad_clip) == (
        2e-4, 5000, 0.9, 0.999, 1e-8, 1.0)
    t = c.training
    assert (t.batch_size, t.num_train_steps, t.ema_decay) == (128, 800_000, 0.9999)
    assert c.parallelism == "shard_map"


@pytest.mark.parametrize("name,data,flip,steps", [
    ("celebahq256", "celeb_a_hq", True, 500_000),
    ("lsun_church256", "lsun_church", True, 1_200_000),
    ("lsun_bedroom256", "lsun_bedroom", False, 2_400_000),
    ("lsun_cat256", "lsun_cat", True, 1_800_000),
])
def test_256_configs_override_default(name, data, flip, steps):
    base = load("default").get_config()
    c = load(name).get_config()
    assert (c.data.name, c.data.image_size, c.data.random_flip) == (data, 256, flip)
    assert tuple(c.model.ch_mult) == (1, 1, 2, 2, 4, 4) and c.model.dropout == 0.0
    assert (c.optim.lr, c.training.batch_size, c.training.num_train_steps) == (2e-5, 64, steps)
    assert c.diffusion.var_type == "fixedsmall"
    # Unchanged from the CIFAR-10 run.
    assert c.model.ch == base.model.ch == 128 and c.optim.warmup_steps == 5000
    assert c.optim.grad_clip == 1.0 and c.training.ema_decay == 0.9999


def _num_params(config):
    shapes = unet.param_shapes(builders.unet_config(config), config.data.image_size,
                               config.data.channels)
    return sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(shapes))


def test_paper_parameter_counts():
    assert _num_params(load("default").get_config()) == 35_746_307
    assert _num_params(load("lsun_church256").get_config()) == 113_673_219


def test_digits_config_is_small_and_native():
    c = load("digits").get_config()
    assert (c.data.name, c.data.image_size, c.data.channels, c.data.random_flip) == (
        "digits", 8, 1, False)
    assert _num_params(c) < 5_000_000


@pytest.mark.parametrize("section,field,value,match", [
    ("data", "name", "mnist", "data.name"),
    ("diffusion", "loss_type", "l1", "loss_type"),
    ("diffusion", "var_type", "learned_big", "var_type"),
    ("sampling", "sampler", "euler", "sampler"),
    ("data", "image_size", 12, "image size 12"),
    ("model", "attn_resolutions", (3,), "attn_resolutions"),
    ("training", "steps_per_call", 0, "steps_per_call"),
])
def test_bad_values_raise_valueerror(section, field, value, match):
    c = load("test").get_config()
    c[section][field] = value
    with pytest.raises(ValueError, match=match):
        train.validate_config(c)


def test_unknown_fields_raise_valueerror():
    c = load("test").get_config()
    c.training.unlocked_typo = 1
    with pytest.raises(ValueError, match="training.unlocked_typo"):
        train.validate_config(c)
    c = load("test").get_config()
    c.optimizer = {"lr": 1.0}
    with pytest.raises(ValueError, match="optimizer"):
        train.validate_config(c)
    c = load("test").get_config()
    c.parallelism = "dp"
    with pytest.raises(ValueError, match="pmap"):
        train.validate_config(c)


def test_run_train_flags_default_and_override(monkeypatch, capsys):
    """run_train.py's flags, parsed in-process as `run_train.main` parses them."""
    monkeypatch.chdir(CONFIG_DIR.parent)
    import run_train

    args, c = run_train.parse_args([])
    assert (args.config, args.workdir) == (str(CONFIG_DIR / "digits.py"), "runs/digits")
    assert (c.data.name, c.training.batch_size, c.is_locked) == ("digits", 128, True)
    assert (args.verbose, args.multihost, args.allow_config_change) == (False, False, False)
    args, c = run_train.parse_args(["--config.training.batch_size=64", "--verbose"])
    assert (c.training.batch_size, args.verbose) == (64, True)
    args, c = run_train.parse_args(["--config", "configs/default.py",
                                    "--config.model.dtype", "bfloat16", "--workdir", "/tmp/r"])
    assert (args.config, args.workdir, c.data.name, c.model.dtype) == (
        "configs/default.py", "/tmp/r", "cifar10", "bfloat16")
    args, _ = run_train.parse_args(["--config=configs/test.py", "--multihost",
                                    "--coordinator_address=h:1234", "--num_processes", "2",
                                    "--process_id=1", "--allow_config_change", "--noverbose"])
    assert (args.workdir, args.multihost, args.coordinator_address, args.num_processes,
            args.process_id, args.allow_config_change, args.verbose) == (
        "runs/test", True, "h:1234", 2, 1, True, False)
    with pytest.raises(SystemExit) as e:
        run_train.parse_args(["--config.training.no_such_field=1"])
    assert e.value.code == 2
    assert "--config.training.no_such_field is not a config field of configs/digits.py" in (
        capsys.readouterr().err)


def test_digits_quality_judge_accepts_real_digits_and_rejects_one_class():
    from sklearn.datasets import load_digits

    from ddpm_jax import digits_quality

    d = load_digits()
    real = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    ok = digits_quality.score(real[-400:])
    assert ok["confident"] >= 0.9 and ok["max_class_share"] <= 0.15
    assert ok["real_heldout_accuracy"] > 0.95
    blank = np.zeros((400, 8, 8, 1), np.uint8)
    assert digits_quality.score(blank)["max_class_share"] == 1.0  # one class: rejected


def test_typed_sections_are_the_one_list_of_fields():
    """Each section of configs/default.py has exactly its dataclass's fields, read back typed."""
    import dataclasses

    from ddpm_jax import config_lib

    c = load("default").get_config()
    typed = config_lib.ExperimentConfig.from_config(c)
    for name, cls in (("diffusion", config_lib.DiffusionConfig), ("optim", config_lib.OptimConfig),
                      ("training", config_lib.TrainingConfig),
                      ("sampling", config_lib.SamplingConfig), ("eval", config_lib.EvalConfig)):
        assert sorted(f.name for f in dataclasses.fields(cls)) == sorted(c[name].keys()), name
        section = getattr(typed, name)
        assert {k: getattr(section, k) for k in c[name].keys()} == c[name].to_dict()
    np.testing.assert_array_equal(typed.diffusion.betas(), np.linspace(1e-4, 0.02, 1000))
    assert typed.model.out_ch == 3 and typed.data.image_size == 32


@pytest.mark.parametrize("section,field,value,match", [
    ("optim", "beta1", 1.0, "beta1"),
    ("optim", "warmup_steps", -1, "warmup_steps"),
    ("training", "ema_decay", float("nan"), "ema_decay"),
    ("training", "num_samples", -1, "num_samples"),
    ("diffusion", "beta_end", float("inf"), "beta_end"),
    ("sampling", "num_steps", 0, "num_steps"),
    (None, "seed", True, "seed"),
])
def test_typed_sections_reject_bad_values(section, field, value, match):
    c = load("test").get_config()
    (c if section is None else c[section])[field] = value
    with pytest.raises(ValueError, match=match):
        train.validate_config(c)


def test_missing_field_names_the_section():
    c = load("test").get_config().to_dict()
    del c["optim"]["eps"]
    with pytest.raises(ValueError, match=r"config.optim lacks \['eps'\]"):
        train.validate_config(c)
