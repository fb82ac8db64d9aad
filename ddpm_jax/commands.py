"""What every command line shares: the --verbose flag, where logging goes, the closing line.

The commands (``run_train.py``, ``python -m ddpm_jax.generate``, ``.convert``,
``.metrics``, ``.digits_quality``) behave alike:

- Flags are ``--name=value`` or ``--name value``. ``run_train.py`` reads them with
  absl (its config file and ``--config.FIELD=VALUE`` overrides come from
  ml_collections' ``config_flags``); the others with argparse, built by `parser`.
- INFO logging of this library and of third-party libraries (orbax, absl, jax)
  goes to the command's log file when it has one (e.g. ``WORKDIR/train.log``),
  and the terminal shows warnings and errors only, plus the command's own
  progress bar and lines. ``--verbose`` sends INFO to the terminal too.
- The last line a command prints says what it did and where the output is
  (`finish`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OWN_HANDLER = "_ddpm_jax_command_handler"


def parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """An ``argparse`` parser with the flags every command has (``--verbose``)."""
    p = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    add_verbose_flag(p)
    return p


def add_verbose_flag(p: argparse.ArgumentParser) -> None:
    """Adds ``--verbose``: INFO logging (this library's and third parties') on the terminal."""
    p.add_argument("--verbose", action="store_true",
                   help="Show INFO logging (orbax, absl, jax, this library) on the terminal "
                        "too; by default it goes to the log file only.")


def setup_logging(log_file: str | os.PathLike | None, *, verbose: bool = False) -> str | None:
    """Routes logging: INFO and above to log_file, the terminal WARNING and above (or INFO).

    Safe to call again (a second call replaces the first one's file handler).

    Args:
      log_file: a file to append INFO logging to (its folder is created), or None.
      verbose: also show INFO on the terminal.

    Returns:
      The log file's absolute path, or None.
    """
    from absl import logging as absl_logging

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    terminal_level = logging.INFO if verbose else logging.WARNING
    # absl's handler writes to stderr (it is the one absl and app.run install on the root).
    absl_logging.get_absl_handler().setLevel(terminal_level)
    for h in list(root.handlers):
        if getattr(h, _OWN_HANDLER, False):
            root.removeHandler(h)
            h.close()
        elif h is not absl_logging.get_absl_handler() and isinstance(h, logging.StreamHandler) \
                and not isinstance(h, logging.FileHandler):
            h.setLevel(terminal_level)
    if absl_logging.get_absl_handler() not in root.handlers:
        root.addHandler(absl_logging.get_absl_handler())
    if log_file is None:
        return None
    path = os.path.abspath(os.fspath(log_file))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    setattr(handler, _OWN_HANDLER, True)
    root.addHandler(handler)
    return path


def finish(command: str, message: str, *, start: float | None = None,
           log_file: str | None = None) -> str:
    """Prints (to stdout) and returns the command's closing line.

    ``"<command>: <message> in <elapsed>; log <log_file>"``, with the parts that are given.
    """
    line = f"{command}: {message}"
    if start is not None:
        line += f" in {format_seconds(time.perf_counter() - start)}"
    if log_file:
        line += f"; log {log_file}"
    print(line, flush=True)
    return line


def format_seconds(seconds: float) -> str:
    """``"42.0 s"``, ``"7 min 17 s"`` or ``"2 h 05 min"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def relpath(path: str | os.PathLike) -> str:
    """path relative to the current directory when it lies below it, else absolute."""
    path = os.path.abspath(os.fspath(path))
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def stderr(message: str) -> None:
    """One line to stderr (notes that are neither logging nor the closing line)."""
    print(message, file=sys.stderr, flush=True)
