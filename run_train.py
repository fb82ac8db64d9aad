"""Trains a DDPM: ``python run_train.py [--config FILE] [--workdir DIR] [--config.FIELD=VALUE]``.

With no flags it trains the embedded default, configs/digits.py, into
./runs/digits (the default workdir is runs/<config file name>). Every config
field can be overridden on the command line, ``--config.training.batch_size=64``
or ``--config.training.batch_size 64``, the value read as the type of the
field's current value. The flags are read by argparse through
`ddpm_jax.commands` (`parse_with_config`), as in every command of this
repository; ``python run_train.py --help`` lists them.

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

import argparse
import os

_REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "digits.py")


def make_parser():
    """run_train.py's flags (argparse, through `ddpm_jax.commands`, like every command)."""
    from ddpm_jax import commands

    p = commands.parser("run_train.py", "Trains a DDPM; a rerun resumes from the workdir's "
                        "newest checkpoint.")
    commands.add_config_flag(p, DEFAULT_CONFIG)
    p.add_argument("--workdir", default=None,
                   help="Checkpoints, logs and samples go here; default runs/<config file name>.")
    p.add_argument("--multihost", action="store_true",
                   help="Call jax.distributed.initialize() with the cluster JAX detects.")
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 "
                   "(multi-process).")
    p.add_argument("--num_processes", type=int, default=None,
                   help="Number of processes (multi-process).")
    p.add_argument("--process_id", type=int, default=None,
                   help="This process's index (multi-process).")
    p.add_argument("--allow_config_change", action="store_true",
                   help="Resume a workdir even when the config differs from the one its "
                        "checkpoints were written with in fields that change what training "
                        "means.")
    for name in ("verbose", "multihost", "allow_config_change"):  # absl's --noNAME spellings
        p.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None):
    """(the parsed flags, the locked config with the --config.FIELD overrides applied).

    ``args.workdir`` is filled in: runs/<config file name> when not given.
    """
    from ddpm_jax import commands

    args, config = commands.parse_with_config(make_parser(), argv)
    if args.workdir is None:
        name = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
        args.workdir = os.path.join("runs", name)
    return args, config


def main(argv: list[str] | None = None) -> None:
    """Trains; argv as sys.argv[1:] (the default)."""
    import time

    args, config = parse_args(argv)
    start = time.perf_counter()

    from ddpm_jax import commands, parallel, train
    from ddpm_jax import workdir as workdir_lib

    commands.setup_logging(None, verbose=args.verbose)  # before JAX logs its backend probe

    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id, auto=args.multihost)
    workdir = args.workdir
    import jax

    i = jax.process_index()
    log_name = "train.log" if i == 0 else f"train.process{i}.log"
    log_file = commands.setup_logging(os.path.join(workdir, log_name), verbose=args.verbose)
    code = 1
    try:
        state = train.train_and_evaluate(config, workdir,
                                         allow_config_change=args.allow_config_change)
        code = 0
        commands.finish("run_train.py", _what_was_done(workdir, state), start=start,
                        log_file=commands.relpath(log_file))
    except (workdir_lib.WorkdirBusyError, train.ConfigError, train.NonFiniteLossError) as e:
        # Bad input or a diverged run: the message says what to do; no traceback.
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
    main()
