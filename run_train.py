"""Trains a DDPM: ``python run_train.py [--config FILE] [--workdir DIR] [--config.FIELD=VALUE]``.

With no flags it trains the embedded default, configs/digits.py, into
./runs/digits. Every config field can be overridden on the command line, e.g.
``--config.training.batch_size=64``.

Several processes (multi-host TPU pods, several GPU machines): pass
``--multihost`` where JAX detects the cluster (Cloud TPU pods, SLURM, Open
MPI), or ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
(or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
environment variables) to each process.

A rerun of the same command resumes from the newest good checkpoint of the
workdir. One run at a time per workdir (a second one stops with a message
naming the first). Resuming with a config that changes what training means
(T, schedule, model, seed, batch size, optimizer, data) is refused unless
``--allow_config_change`` is given.
"""

import os

from absl import app, flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "digits.py"),
    "Training configuration file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Checkpoints, logs and samples go here; default runs/<config file name>.")
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() with the cluster JAX detects.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool("verbose", False,
                  "Show INFO logging (orbax, absl, jax, this library) on the terminal too; by "
                  "default it goes to WORKDIR/train.log only.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir even when the config differs from the one its checkpoints "
                  "were written with in fields that change what training means.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import time

    from ddpm_jax import commands, parallel, train
    from ddpm_jax import workdir as workdir_lib

    start = time.perf_counter()
    commands.setup_logging(None, verbose=FLAGS.verbose)  # before JAX logs its backend probe

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, auto=FLAGS.multihost)
    workdir = FLAGS.workdir
    if workdir is None:
        config_file = FLAGS["config"].config_filename
        name = os.path.splitext(os.path.basename(config_file.split(":")[0]))[0]
        workdir = os.path.join("runs", name)
    import jax

    i = jax.process_index()
    log_name = "train.log" if i == 0 else f"train.process{i}.log"
    log_file = commands.setup_logging(os.path.join(workdir, log_name), verbose=FLAGS.verbose)
    code = 1
    try:
        state = train.train_and_evaluate(FLAGS.config, workdir,
                                         allow_config_change=FLAGS.allow_config_change)
        code = 0
        commands.finish("run_train.py", _what_was_done(workdir, state), start=start,
                        log_file=commands.relpath(log_file))
    except workdir_lib.WorkdirBusyError as e:
        raise SystemExit(f"run_train.py: {e}") from None
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        # Python waits at exit for background threads; none may keep the process alive.
        workdir_lib.exit_watchdog(code, grace_s=60.0)


def _what_was_done(workdir: str, state) -> str:
    import numpy as np

    from ddpm_jax import commands

    step = int(np.asarray(state.step).reshape(-1)[0])
    line = f"trained to step {step}; checkpoints in {commands.relpath(workdir)}/checkpoints"
    png = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    if os.path.exists(png):
        line += f", samples {commands.relpath(png)}"
    return line


if __name__ == "__main__":
    app.run(main)
