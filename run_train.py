"""Trains a DDPM: ``python run_train.py [--config FILE] [--workdir DIR] [--config.FIELD=VALUE]``.

With no flags it trains the embedded default, configs/digits.py, into
./runs/digits. Every config field can be overridden on the command line, e.g.
``--config.training.batch_size=64``.

Several processes (multi-host TPU pods, several GPU machines): pass
``--multihost`` where JAX detects the cluster (Cloud TPU pods, SLURM, Open
MPI), or ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
(or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
environment variables) to each process.
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
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ddpm_jax import parallel, train

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, auto=FLAGS.multihost)
    workdir = FLAGS.workdir
    if workdir is None:
        config_file = FLAGS["config"].config_filename
        name = os.path.splitext(os.path.basename(config_file.split(":")[0]))[0]
        workdir = os.path.join("runs", name)
    train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
