"""Tests for ddpm_jax/commands.py: --config FILE and --config.FIELD overrides, and logging."""

import logging
import pathlib

import pytest

from ddpm_jax import commands, config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_CONFIG = str(REPO / "configs" / "test.py")


def _parse(*argv, default=TEST_CONFIG):
    p = commands.parser("prog", "A command with a config.")
    commands.add_config_flag(p, default)
    p.add_argument("--workdir", default=None)
    return commands.parse_with_config(p, list(argv))


def test_override_types_are_the_fields_types():
    args, c = _parse(
        "--config.optim.clip_per_replica=TRUE", "--config.sampling.clip_denoised=0",  # bool
        "--config.training.batch_size=64",  # int
        "--config.optim.lr=2",  # float field, int literal
        "--config.diffusion.beta_end=0.03",  # float
        "--config.model.ch_mult=(1,2,2,2)", "--config.model.attn_resolutions=2,4",  # tuples
        "--config.model.dtype=bfloat16",  # str
        "--config.sampling.num_steps=50", "--config.sampling.spacing=quadratic")  # None fields
    assert c.optim.clip_per_replica is True and c.sampling.clip_denoised is False
    assert c.training.batch_size == 64 and type(c.training.batch_size) is int
    assert c.optim.lr == 2.0 and type(c.optim.lr) is float
    assert c.diffusion.beta_end == 0.03
    assert c.model.ch_mult == (1, 2, 2, 2) and c.model.attn_resolutions == (2, 4)
    assert c.model.dtype == "bfloat16"
    assert c.sampling.num_steps == 50 and c.sampling.spacing == "quadratic"
    assert args.config == TEST_CONFIG and args.workdir is None
    assert c.is_locked  # no new fields after parsing, as before
    untouched = config_lib.load_config(TEST_CONFIG)
    assert c.training.num_train_steps == untouched.training.num_train_steps == 8


@pytest.mark.parametrize("text, want", [
    ("true", True), ("False", False), ("1", True), ("0", False), ("T", True), ("f", False)])
def test_bool_spellings(text, want):
    assert _parse(f"--config.optim.clip_per_replica={text}")[1].optim.clip_per_replica is want


@pytest.mark.parametrize("text, want", [("4", (4,)), ("(4,)", (4,)), ("[4, 8]", (4, 8)),
                                        ("()", ()), ("", ())])
def test_tuple_spellings(text, want):
    assert _parse(f"--config.model.attn_resolutions={text}")[1].model.attn_resolutions == want


def test_space_form_bare_bool_and_order():
    args, c = _parse("--config.training.batch_size", "32", "--workdir", "/tmp/w",
                     "--config.optim.clip_per_replica", "--config.model.dtype", "bfloat16",
                     "--config.optim.lr", "-1e-4")
    assert (c.training.batch_size, c.optim.clip_per_replica, c.model.dtype, c.optim.lr) == (
        32, True, "bfloat16", -1e-4)
    assert args.workdir == "/tmp/w"
    # An override may come before --config (absl wanted --config first).
    args, c = _parse("--config.training.batch_size=3", "--config", "digits", default=None)
    assert (args.config, c.data.name, c.training.batch_size, c.training.num_train_steps) == (
        "digits", "digits", 3, 2500)


def test_config_file_flag_and_default():
    _, c = _parse()
    assert c.training.batch_size == 16  # configs/test.py, the default here
    for argv in (["--config", "configs/default.py"], ["--config=configs/default.py"]):
        args, c = _parse(*argv)
        assert (args.config, c.data.name, c.training.batch_size) == (
            "configs/default.py", "cifar10", 128)


def test_config_file_with_argument(tmp_path):
    f = tmp_path / "sized.py"
    f.write_text("import ml_collections\n"
                 "def get_config(size):\n"
                 "    return ml_collections.ConfigDict({'training': {'batch_size': int(size)}})\n")
    _, c = _parse(f"--config={f}:48", "--config.training.batch_size", "12")
    assert c.training.batch_size == 12
    assert config_lib.load_config(f"{f}:48").training.batch_size == 48
    with pytest.raises(ValueError, match="needs an argument"):
        config_lib.load_config(f)
    with pytest.raises(ValueError, match=r"takes no argument; drop ':x'"):
        config_lib.load_config(f"{TEST_CONFIG}:x")


def _error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2  # as argparse's own errors
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_unknown_field_names_the_nearest(capsys):
    assert _error(capsys, "--config.training.batch_sise=3") == (
        "prog: error: --config.training.batch_sise is not a config field of "
        f"{commands.relpath(TEST_CONFIG)}; did you mean --config.training.batch_size?")
    assert "did you mean --config.training.batch_size or --config.eval.batch_size" in _error(
        capsys, "--config.trainig.batch_size=3")
    assert "the fields of config.training: batch_size, checkpoint_every," in _error(
        capsys, "--config.training.bogus=1")
    assert "is a section, not a field" in _error(capsys, "--config.training=3")


@pytest.mark.parametrize("argv, message", [
    (["--config.training.batch_size=abc"], "--config.training.batch_size='abc': expected an int."),
    (["--config.training.batch_size=1.5"], "--config.training.batch_size='1.5': expected an int."),
    (["--config.optim.lr=fast"], "--config.optim.lr='fast': expected a float."),
    (["--config.optim.clip_per_replica=yes"],
     "--config.optim.clip_per_replica='yes': expected a bool (true or false)."),
    (["--config.model.ch_mult=(1,x"], "--config.model.ch_mult='(1,x': expected a tuple such as "
                                      "1,2."),
    (["--config.training.batch_size"], "--config.training.batch_size needs a value"),
])
def test_bad_value_names_the_flag_and_type(capsys, argv, message):
    assert message in _error(capsys, *argv)


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield root
    for h in root.handlers[:]:
        if h not in saved[0]:
            root.removeHandler(h)
            h.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("verbose", [False, True])
def test_logging_terminal_and_file(tmp_path, capsys, root_logger, verbose):
    logging.basicConfig()  # a stderr handler added before the command's own (e.g. by a library)
    path = commands.setup_logging(tmp_path / "run" / "train.log", verbose=verbose)
    logging.getLogger("some.lib").info("an info line")
    logging.getLogger("some.lib").warning("a warning line")
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "line" in line]
    assert [line.split("] ")[-1] for line in lines] == (
        ["an info line", "a warning line"] if verbose else ["a warning line"])
    assert lines[-1].startswith("W")  # absl's format, shown once
    assert not any("flag parsing" in line for line in err)
    text = pathlib.Path(path).read_text()
    assert "INFO some.lib: an info line" in text and "WARNING some.lib: a warning line" in text


def test_run_train_bad_config_is_one_line_without_traceback(tmp_path):
    """A config train_and_evaluate refuses ends run_train.py with its message, exit 1."""
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "run_train.py", "--config", "configs/test.py", "--workdir",
         str(tmp_path / "w"), "--config.optim.lr=-1"],
        cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "run_train.py: config.optim.lr must be > 0, got -1.0.")
    assert not (tmp_path / "w" / "checkpoints").exists()  # refused before any work
