"""Tests for the workdir of a run: the lock, config changes on resume, the ways out of training."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm_jax import checkpoint, parallel, train
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**training):
    """configs/test.py with a one-level U-Net (the fastest to compile)."""
    c = load_config(os.path.join(REPO, "configs", "test.py"))
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    c.training.steps_per_call = 2
    c.training.num_samples = 0
    for k, v in training.items():
        c.training[k] = v
    return c


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **record):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "started": "earlier", **record}, f)
    return path


# ----------------------------------------------------------------------------- the lock


def test_lock_is_released_and_refuses_a_live_holder(tmp_path):
    workdir = str(tmp_path)
    path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    with workdir_lib.WorkdirLock(workdir):
        record = json.load(open(path))
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert not os.path.exists(path)
    # A live process on this host (this test's parent), and any process on another host.
    for holder in ({"pid": os.getppid()}, {"pid": 1234, "host": "other-host"}):
        _write_lock(workdir, **holder)
        with pytest.raises(workdir_lib.WorkdirBusyError) as e:
            workdir_lib.WorkdirLock(workdir).__enter__()
        assert f"process {holder['pid']}" in str(e.value)
        assert "delete the lock file" in str(e.value)
        assert json.load(open(path))["pid"] == holder["pid"]  # left alone
    assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]  # no temporary files left


def test_stale_lock_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path)
    path = _write_lock(workdir, pid=_dead_pid())
    with workdir_lib.WorkdirLock(workdir):
        assert json.load(open(path))["pid"] == os.getpid()
    assert "took over the stale lock" in caplog.text
    assert os.listdir(workdir) == []
    # Unparsable and old (a crash while writing it): stale too.
    with open(path, "w") as f:
        f.write('{"pid": 12')
    os.utime(path, (time.time() - 60, time.time() - 60))
    with workdir_lib.WorkdirLock(workdir):
        assert json.load(open(path))["pid"] == os.getpid()


def test_lock_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_link)
    workdir = str(tmp_path)
    with workdir_lib.WorkdirLock(workdir):
        assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))["pid"] == os.getpid()
        _write_lock(str(tmp_path / "other"), pid=os.getppid())
        with pytest.raises(workdir_lib.WorkdirBusyError):
            workdir_lib.WorkdirLock(str(tmp_path / "other")).__enter__()
    assert os.listdir(workdir) == ["other"]


def test_busy_workdir_fails_before_compiling(tmp_path, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled in a busy workdir")

    monkeypatch.setattr(train, "create_train_state", no_compile)
    workdir = str(tmp_path / "run")
    _write_lock(workdir, pid=os.getppid())
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"process {os.getppid()}"):
        train.train_and_evaluate(_tiny(), workdir)
    assert not os.path.exists(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR))


def test_exit_watchdog_ends_a_process_stuck_on_a_thread():
    script = ("import threading, time\n"
              "from ddpm_jax import workdir\n"
              "threading.Thread(target=time.sleep, args=(600,)).start()\n"
              "workdir.exit_watchdog(3, grace_s=1.0)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "still waiting at exit" in proc.stderr
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------- config changes


def _checkpointed_workdir(tmp_path, config):
    """A workdir with one checkpoint written by config (no training: only its metadata counts)."""
    workdir = str(tmp_path / "run")
    dp = parallel.DataParallel()
    meta = {"step": 2, "inference": {"step": 2}, "config": config.to_dict()}
    with checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        ckpt.save(2, dp.replicate({"step": np.int32(2)}), meta)
    return workdir


class _Reached(Exception):
    pass


def _stop_at_init(*args, **kwargs):
    raise _Reached


def test_config_changes_lists_fields():
    old = _tiny()
    new = _tiny(num_train_steps=50, log_every=7)
    new.diffusion.num_timesteps = 10
    new.model.ch_mult = (1, 2)
    new.seed = 5
    meaningful, harmless = checkpoint.config_changes(old.to_dict(), new)
    assert meaningful == ["diffusion.num_timesteps: 20 -> 10", "model.ch_mult: [1] -> [1, 2]",
                          "seed: 0 -> 5"]
    assert harmless == ["training.log_every: 4 -> 7", "training.num_train_steps: 8 -> 50"]
    assert checkpoint.config_changes(old.to_dict(), old) == ([], [])
    # A checkpoint written before a field existed: its default is no change, another value is.
    older = old.to_dict()
    del older["sampling"]["spacing"], older["eval"]
    assert checkpoint.config_changes(older, old)[0] == []  # eval.* lines are harmless
    new = _tiny()
    new.sampling.spacing, new.eval.every = "quadratic", 100
    assert checkpoint.config_changes(older, new)[0] == []


def test_resume_with_a_changed_config_is_refused(tmp_path, monkeypatch, caplog):
    workdir = _checkpointed_workdir(tmp_path, _tiny())
    monkeypatch.setattr(train, "create_train_state", _stop_at_init)
    changed = _tiny()
    changed.diffusion.num_timesteps = 10
    changed.training.batch_size = 8
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(changed, workdir)
    msg = str(e.value)
    assert "diffusion.num_timesteps: 20 -> 10" in msg and "training.batch_size: 16 -> 8" in msg
    assert "new workdir" in msg and "--allow_config_change" in msg
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))  # released
    # With the override it goes on (to the state's creation here), with a warning.
    with pytest.raises(_Reached):
        train.train_and_evaluate(changed, workdir, allow_config_change=True)
    assert "changed config (allowed)" in caplog.text
    # Harmless fields need no override.
    caplog.set_level(logging.INFO)
    with pytest.raises(_Reached):
        train.train_and_evaluate(_tiny(num_train_steps=100, checkpoint_every=50), workdir)
    assert "training.num_train_steps: 8 -> 100" in caplog.text


# ----------------------------------------------------------------------------- ways out


def _fake_state(config, key):
    """Stands in for `train.create_train_state`: a two-number model (no compile)."""
    del config, key
    params = {"w": np.zeros(2, np.float32)}
    return train.TrainState(step=np.int32(0), params=params, ema_params=params, opt_state=())


def _fake_step(loss):
    """Stands in for `train.make_train_fn`: state unchanged, the given loss (no compile)."""

    def make_train_fn(config, dp):
        def train_fn(state, batches, key_data):
            k = jax.tree.leaves(batches)[0].shape[0]
            metrics = {"loss": np.full([k], loss, np.float32), "grad_norm": np.ones([k]),
                       "lr": np.ones([k])}
            return state, dp.replicate(metrics)

        return train_fn

    return make_train_fn


def test_nonfinite_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "create_train_state", _fake_state)
    monkeypatch.setattr(train, "make_train_fn", _fake_step(np.nan))
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteLossError, match="No checkpoint was written yet") as e:
        train.train_and_evaluate(_tiny(num_train_steps=4, checkpoint_every=2), workdir)
    assert "at step 1" in str(e.value) and "step None" not in str(e.value)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == []
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


def test_sigterm_during_final_sampling_finishes_normally(tmp_path, monkeypatch, caplog):
    """Training is complete then: the samples are written and the run ends with exit code 0."""

    def make_sample_fn(config):
        def sample(params, key, n):  # SIGTERM arrives while the samples are drawn
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs in the main thread, i.e. here
            return np.full((n, 8, 8, 1), 7, np.uint8)

        return sample

    monkeypatch.setattr(train, "create_train_state", _fake_state)
    monkeypatch.setattr(train, "make_train_fn", _fake_step(1.0))
    monkeypatch.setattr(train, "make_sample_fn", make_sample_fn)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_tiny(num_train_steps=2, num_samples=2, sample_every=100), workdir)
    images = np.load(os.path.join(workdir, "samples", "step_00000002.npz"))["images"]
    assert images.shape == (2, 8, 8, 1) and np.all(images == 7)
    assert "training is complete" in caplog.text
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


def test_sigterm_before_final_sampling_exits_143_with_a_message(tmp_path, monkeypatch, caplog):
    sampled = []

    def make_train_fn(config, dp):
        fake = _fake_step(1.0)(config, dp)

        def train_fn(*args):  # SIGTERM arrives during the last step
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            return fake(*args)

        return train_fn

    monkeypatch.setattr(train, "create_train_state", _fake_state)
    monkeypatch.setattr(train, "make_train_fn", make_train_fn)
    monkeypatch.setattr(train, "make_sample_fn", lambda config: sampled.append)
    workdir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.train_and_evaluate(_tiny(num_train_steps=2, num_samples=2, sample_every=100),
                                 workdir)
    assert e.value.code == 143 and "preemption (SIGTERM) at step 2" in caplog.text
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"] and not sampled
