"""``python -m ddpm_jax.metrics {stats,fid,bpd} ...``: see ``ddpm_jax.metrics.cli``."""

import sys

from ddpm_jax.metrics.cli import main

main(sys.argv[1:])
