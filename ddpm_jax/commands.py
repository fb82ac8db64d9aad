"""What every command line shares: its flags, where logging goes, the closing line.

The commands (``run_train.py``, ``python -m ddpm_jax.generate``, ``.convert``,
``.metrics``, ``.digits_quality``) behave alike:

- Flags are ``--name=value`` or ``--name value``, read by argparse through `parser`.
  A command that trains or measures a config (``run_train.py``, the benchmarks) takes
  ``--config FILE`` (`add_config_flag`) and ``--config.FIELD=VALUE`` or
  ``--config.FIELD VALUE`` overrides of the file's fields (`parse_with_config`).
- INFO logging of this library and of third-party libraries (orbax, absl, jax)
  goes to the command's log file when it has one (e.g. ``WORKDIR/train.log``),
  and the terminal shows warnings and errors only, plus the command's own
  progress bar and lines. ``--verbose`` sends INFO to the terminal too.
- The last line a command prints says what it did and where the output is
  (`finish`).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import logging
import os
import sys
import time
from typing import Any

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


def add_config_flag(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """Adds ``--config FILE`` (or ``FILE:ARG``, or a name in configs/) and its override flags.

    Read the arguments with `parse_with_config`, which also takes ``--config.FIELD=VALUE``.
    """
    p.add_argument("--config", default=default, required=default is None, metavar="FILE",
                   help="Config file (a Python file with get_config()), FILE:ARG for "
                        "get_config(ARG), or a name in configs/ such as 'digits'"
                        + (f" (default: {relpath(default)})." if default else "."))
    note = ("Config fields: --config.FIELD=VALUE or --config.FIELD VALUE, e.g. "
            "--config.training.batch_size=64; the value is read as the type of the field's "
            "current value.")
    p.epilog = f"{p.epilog}\n\n{note}" if p.epilog else note


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None = None, *,
                      lock: bool = True) -> tuple[argparse.Namespace, Any]:
    """Parses argv with p (made with `add_config_flag`) and loads the config with its overrides.

    The config comes from ``config_lib.load_config(args.config)``; each ``--config.FIELD``
    override is then set (`apply_config_overrides`), and the config is locked (no new
    fields) when lock is True. Bad flags, an unknown field or a value of the wrong type
    exit with status 2 and one line naming the flag (``p.error``).

    Returns:
      (the parsed arguments, the ml_collections ConfigDict).
    """
    from ddpm_jax import config_lib

    rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    try:
        config = config_lib.load_config(args.config)
        source = relpath(args.config) if os.path.isfile(args.config) else args.config
        apply_config_overrides(config, overrides, source=source)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if lock:
        config.lock()
    return args, config


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Separates ``--config.FIELD=VALUE`` and ``--config.FIELD VALUE`` from the other arguments.

    A ``--config.FIELD`` followed by nothing or by another ``--flag`` has the value None
    (a bool field is then set to True).

    Returns:
      (the other arguments in order, [(FIELD, VALUE or None)] in order).
    """
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        item = argv[i]
        i += 1
        if item == "--":
            rest.extend(argv[i - 1:])
            break
        if not item.startswith("--config."):
            rest.append(item)
            continue
        name, eq, value = item[len("--config."):].partition("=")
        if not eq:
            value = None
            if i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
        overrides.append((name, value))
    return rest, overrides


def apply_config_overrides(config: Any, overrides: list[tuple[str, str | None]], *,
                           source: str | None = None) -> None:
    """Sets dotted fields of an ml_collections ConfigDict from command-line strings.

    Each value is read as the type of the field's current value: bool (true/false, t/f,
    1/0, any case; no value means true), int, float (an int literal is fine), str, tuple or
    list (``(1,2,2,2)``, ``1,2,2,2`` or ``4`` for ``(4,)``). A field whose value is None
    takes a Python literal when the value is one (``50``, ``0.5``, ``(1, 2)``, ``None``),
    else the string.

    Raises:
      ValueError: an unknown field (naming the nearest ones), a section given a value, or a
        value that does not read as the field's type; one sentence naming the flag.
    """
    for name, value in overrides:
        flag = f"--config.{name}"
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "keys") else None
        if not hasattr(node, "keys") or leaf not in node:
            raise ValueError(_unknown_field_message(config, name, source))
        old = node[leaf]
        if hasattr(old, "keys"):
            raise ValueError(f"{flag} is a section, not a field; set one of its fields, e.g. "
                             f"--config.{name}.{next(iter(old.keys()), 'FIELD')}=VALUE.")
        parsed = _parse_override(flag, old, value)
        with config.unlocked():
            node[leaf] = parsed


_TRUE, _FALSE = ("true", "t", "1"), ("false", "f", "0")


def _parse_override(flag: str, old: Any, value: str | None) -> Any:
    """value read as the type of old (see `apply_config_overrides`)."""
    if value is None:
        if isinstance(old, bool):
            return True
        raise ValueError(f"{flag} needs a value: {flag}=VALUE or {flag} VALUE.")
    kind = {bool: "a bool (true or false)", int: "an int", float: "a float"}.get(type(old))
    try:
        if isinstance(old, bool):
            if value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise ValueError(value)
        if isinstance(old, (int, float)):
            return type(old)(value)
        if isinstance(old, (tuple, list)):
            example = ",".join(map(str, old)) if old else "1,2"
            kind = f"a {type(old).__name__} such as {example}"
            return type(old)(_typed_like(old, _literal_sequence(value)))
    except ValueError:
        raise ValueError(f"{flag}={value!r}: expected {kind}.") from None
    if old is None:
        return _literal_or_str(value)
    if isinstance(old, str):
        return value
    raise ValueError(f"{flag}: a field of type {type(old).__name__} cannot be set on the "
                     "command line; change it in the config file.")


def _typed_like(old: tuple | list, items: tuple) -> tuple:
    """items, each of the one element type of old when old has one (ints for (1, 2))."""
    types = {type(x) for x in old}
    if len(types) != 1 or (want := types.pop()) not in (bool, int, float, str):
        return items
    ok = {bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str),
          int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)}[want]
    if not all(ok(x) for x in items):
        raise ValueError(items)
    return tuple(want(x) for x in items)


def _literal_sequence(value: str) -> tuple:
    """``"(1,2)"``, ``"1,2"``, ``"[1, 2]"`` -> (1, 2); ``"4"`` -> (4,); ``""`` or ``"()"`` -> ()."""
    text = value.strip()
    if text in ("", "()", "[]"):
        return ()
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # bare words: (a,b) -> ("a", "b")
        parts = [p.strip() for p in text.strip("()[]").split(",") if p.strip()]
        return tuple(_literal_or_str(p) for p in parts)
    return tuple(parsed) if isinstance(parsed, (tuple, list)) else (parsed,)


def _literal_or_str(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _unknown_field_message(config: Any, name: str, source: str | None) -> str:
    fields = []

    def walk(node, prefix):
        for key, val in node.items():
            if hasattr(val, "items"):
                walk(val, f"{prefix}{key}.")
            else:
                fields.append(prefix + key)

    walk(config, "")
    section, _, leaf = name.rpartition(".")
    near = [f"{section}.{x}" if section else x for x in difflib.get_close_matches(
        leaf, [f[len(section) + 1:] for f in fields if f.startswith(section + ".")]
        if section else fields, n=3, cutoff=0.6)]  # a typo in the field name
    near += difflib.get_close_matches(name, fields, n=3, cutoff=0.85)  # in the section name
    near += [f for f in fields if f.rpartition(".")[2] == leaf]  # the field of another section
    near = list(dict.fromkeys(near))[:3]
    where = f" of {source}" if source else ""
    if near:
        hint = f"did you mean {' or '.join(f'--config.{f}' for f in near)}?"
    else:
        mine = [f[len(section) + 1:] for f in fields if f.startswith(section + ".")]
        hint = (f"the fields of config.{section}: {', '.join(mine)}." if section and mine
                else f"the top level: {', '.join(config.keys())}.")
    return f"--config.{name} is not a config field{where}; {hint}"


def setup_logging(log_file: str | os.PathLike | None, *, verbose: bool = False) -> str | None:
    """Routes logging: INFO and above to log_file, the terminal WARNING and above (or INFO).

    The terminal lines are in absl's format (``W1130 20:48:19.063 ... file.py:12] message``),
    written to the current sys.stderr. Other handlers of the root logger that write to
    stderr (absl's, which would also need absl's flags parsed, or one that
    ``logging.basicConfig`` added) are taken off, so that nothing is shown twice.
    Safe to call again (a second call replaces the first one's handlers).

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
    root.removeHandler(absl_logging.get_absl_handler())
    for h in list(root.handlers):
        if getattr(h, _OWN_HANDLER, False):
            root.removeHandler(h)
            h.close()
        elif isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            if h.stream in (sys.stderr, sys.__stderr__):  # e.g. logging.basicConfig's
                root.removeHandler(h)
            else:
                h.setLevel(terminal_level)
    terminal = _StderrHandler()
    terminal.setLevel(terminal_level)
    terminal.setFormatter(absl_logging.PythonFormatter())
    setattr(terminal, _OWN_HANDLER, True)
    root.addHandler(terminal)
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


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to sys.stderr as it is at each record (not at creation)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


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
