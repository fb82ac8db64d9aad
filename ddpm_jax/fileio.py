"""Writing outputs so that nothing good is lost, and reading inputs with clear errors.

* Writes go to a temporary name in the destination's directory and are renamed over the
  destination with ``os.replace`` (atomic on POSIX file systems), so a reader, a crash or a
  full disk never leaves half a file under the final name: either the old file or the new
  one is there. ``atomic_path`` is the general form; ``write_npz`` and ``write_text`` use it.
* ``open_npz`` and ``load_npz`` read an ``.npz`` and turn numpy's and zipfile's messages for
  a file that is not one (the "pickled (object) data" message, ``BadZipFile``, ``EOFError``)
  into one ValueError naming the file and what was expected.
* ``StopOnSigterm``, ``read_manifest`` and ``manifest_differences`` serve the commands that
  save their progress in shards and resume (``ddpm_jax.generate``, ``metrics bpd``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import zipfile
from collections.abc import Iterator

import numpy as np

# What a file that is not an .npz of plain arrays raises in numpy (or zipfile) while read.
_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, IndexError,
               MemoryError)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renames it over ``path`` when the block ends.

    The temporary name keeps ``path``'s extension (numpy appends ``.npz`` to names without
    it). If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez(path, **arrays)`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _is_npz_name(path: str) -> bool:
    return path.lower().endswith(".npz")


def _npz_error(path: str, what: str, err: BaseException) -> ValueError:
    reason = str(err).split("\n")[0] or type(err).__name__
    return ValueError(f"{path} is not a readable .npz of {what} ({type(err).__name__}: "
                      f"{reason[:200]}); give an .npz written by numpy.savez holding {what}.")


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, what: str) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load(path)`` of an ``.npz``, with a missing or garbage file as one ValueError.

    Args:
      path: the file.
      what: what it should hold, for the message (e.g. "uint8 images [N, H, W, C]").

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not an ``.npz`` archive of plain (non-object) arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected an .npz of {what}).")
    if not zipfile.is_zipfile(path) and _is_npz_name(path):
        raise ValueError(f"{path} is not a readable .npz of {what} (not a zip archive: empty, "
                         f"truncated or another format); give an .npz written by numpy.savez.")
    try:
        data = np.load(path)
    except _NPZ_ERRORS as e:
        raise _npz_error(path, what, e) from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz archive of {what}; give "
                         "an .npz written by numpy.savez.")
    with data:
        yield data


def load_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """Reads every array of an ``.npz`` (see ``open_npz`` for the errors)."""
    with open_npz(path, what) as f:
        try:
            return {k: f[k] for k in f.files}
        except _NPZ_ERRORS as e:
            raise _npz_error(os.fspath(path), what, e) from e


class StopOnSigterm:
    """A context in which SIGTERM only sets ``requested``, so a loop can save its work and
    exit 143 at a safe point. Installed from the main thread only (elsewhere a no-op)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def read_manifest(path: str) -> dict | None:
    """The JSON object at path, None if there is no file; a garbage file is one ValueError."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON manifest ({e}); remove it or pass "
                         "--overwrite.") from e


def manifest_differences(old: dict, new: dict) -> list[str]:
    """``"field: old there, new now"`` for each field of new that old holds differently."""
    return [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in new.items() if old.get(k) != v]
