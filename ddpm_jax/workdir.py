"""The workdir of a training run: one trainer at a time, and no hang on the way out.

`WorkdirLock` holds ``WORKDIR/train.lock`` (pid, host, start time) while a
run trains: a second run on the same workdir fails at once naming the first,
and a lock left by a dead process on the same host is taken over with a
warning. `exit_watchdog` ends a program that is still waiting on background
threads (orbax's save threads) a while after it meant to exit.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
    """Another live process trains in this workdir."""


class WorkdirLock:
    """``WORKDIR/train.lock``: one trainer per workdir (see the module docstring).

    The lock file holds the owner's pid, host name and start time; it is
    created atomically (a fully written temporary file hard-linked to its
    name) and removed on release if it is still this lock's. An existing lock
    is stale when its host is this host and its pid is not alive, or is this
    process's own pid (a restarted container reusing the pid); a stale lock is
    taken over with a warning. A lock from another host is never judged: on a
    file system shared by several hosts, a dead run's lock from another host
    must be removed by hand.

    In a multi-process run only process 0 takes the lock; every process
    enters and leaves together, and all of them raise if process 0 could not
    lock.

    Raises (on enter):
      WorkdirBusyError: a live process, or a process on another host, holds the lock.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._token: str | None = None

    def __enter__(self) -> WorkdirLock:
        error: Exception | None = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except WorkdirBusyError as e:
                error = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                error = WorkdirBusyError(f"process 0 could not take the lock {self.path}; "
                                         "its log says which process holds it.")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> None:
        self._token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(), "token": self._token,
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        tmp = f"{self.path}.{self._token}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            for _ in range(20):
                try:
                    _create_exclusive(tmp, self.path, json.dumps(record))
                    return
                except FileExistsError:
                    self._take_over_if_stale()
            raise WorkdirBusyError(f"could not take the lock {self.path}: it keeps changing.")
        finally:
            os.remove(tmp)

    def _take_over_if_stale(self) -> None:
        """Removes the lock file if it is stale; WorkdirBusyError if it is held."""
        holder, text = _read_lock(self.path)
        if holder is None:
            if text is None:
                return  # released meanwhile: try again
            if time.time() - _mtime(self.path) < 10:
                time.sleep(0.2)  # being written by a process without hard links: wait
                return
        elif not _is_stale(holder):
            raise WorkdirBusyError(
                f"the workdir {os.path.dirname(self.path)} is in use by process "
                f"{holder.get('pid')} on host {holder.get('host')!r} (started "
                f"{holder.get('started')}); {self.path} says so. Wait for it to finish, stop "
                "it, or use another workdir. If that process is dead (a run on another host "
                "cannot be checked from here), delete the lock file and start again.")
        # Stale: move it aside under a unique name, and delete it if it is still the stale one.
        aside = f"{self.path}.{os.getpid()}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_lock(aside)[1] == text:
            os.remove(aside)
            logging.warning("took over the stale lock %s of process %s on host %r (started %s), "
                            "which is no longer running.", self.path, (holder or {}).get("pid"),
                            (holder or {}).get("host"), (holder or {}).get("started"))
        else:  # a new holder's lock was moved by mistake: put it back
            try:
                os.link(aside, self.path)
            finally:
                os.remove(aside)

    def release(self) -> None:
        """Removes the lock file if it is this lock's (process 0; no-op otherwise)."""
        if self._token is None:
            return
        holder, _ = _read_lock(self.path)
        if holder is not None and holder.get("token") == self._token:
            os.remove(self.path)
        self._token = None


def _create_exclusive(tmp: str, path: str, text: str) -> None:
    """Creates path with tmp's content; FileExistsError if it exists.

    A hard link publishes the file fully written; where the file system has no
    hard links, an exclusive create and a write.
    """
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _read_lock(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the lock record or None if unparsable, the raw text or None if there is no file)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(text)
    except ValueError:
        return None, text
    return (record if isinstance(record, dict) else None), text


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _is_stale(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def exit_watchdog(code: int, grace_s: float = 60.0) -> threading.Thread:
    """Ends the process with code if it is still alive grace_s seconds from now.

    Call it on the way out of a program: Python waits at exit for non-daemon
    threads (orbax's save threads among them), and one that hangs would keep a
    finished or failed run alive forever. A normal exit ends this daemon
    thread with the process.
    """

    def watch():
        time.sleep(grace_s)
        names = [t.name for t in threading.enumerate()
                 if t.is_alive() and not t.daemon and t is not threading.main_thread()]
        logging.error("the process was still waiting at exit %.0f s later, on the threads %s; "
                      "exiting with code %d.", grace_s, names, code)
        logging.flush()
        os._exit(code)

    thread = threading.Thread(target=watch, name="ddpm_jax_exit_watchdog", daemon=True)
    thread.start()
    return thread
