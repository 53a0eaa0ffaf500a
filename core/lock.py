"""Run-directory lock: one training process writes to a run directory at a time.

``RUN/fewstep.lock`` holds ``{"host", "pid", "started"}`` of the process that writes the run. It is
taken before anything else is written and removed when the run ends (normally, by an error, or by
Ctrl-C). A second run into the same directory is refused with the holder's host, PID and start time.
A lock left by a process that died without removing it (``kill -9``, power loss) is taken over when
its host is this host and its PID is no longer alive; a lock from another host is never taken over.

On a local disk the lock file is created atomically (written under a unique name, then hard-linked
to ``fewstep.lock``, which fails if it exists). fsspec object stores have no atomic create, so there
the lock is checked and written best-effort: see docs/cli.md for the rule that applies.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket

from core.errors import RunLockedError
from core.files import exists, join, makedirs, url_to_fs, write_bytes_atomic

LOCK_NAME = "fewstep.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(out, log):`` holds ``out``'s lock for the block (or ``acquire()``/``release()``)."""

    def __init__(self, out: str, log=None):
        self.out = out.rstrip("/") or out
        self.url = join(self.out, LOCK_NAME)
        self.fs, self.path = url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.log = log or (lambda msg: None)
        self.held = False
        self._created_dir = False
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    # -- taking and giving back ------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        self._created_dir = not exists(self.out)
        makedirs(self.out)
        for _ in range(3):  # a stale lock removed by us (or a racing process) is retried
            if self._try_create():
                self.held = True
                return self
            holder = self._read_holder()
            if holder is None:
                continue  # vanished between our create and read: its holder just released it
            if self._is_stale(holder):
                self._take_over(holder)
                continue
            raise self._locked(holder)
        raise RunLockedError(f"could not take the lock {self.url} (it keeps changing hands); "
                             "make sure one run writes to this directory, or choose another out=")

    def check(self) -> None:
        """Raise RunLockedError when a live process holds the lock (without taking it)."""
        holder = self._read_holder() if exists(self.url) else None
        if holder is not None and not self._is_stale(holder):
            raise self._locked(holder)

    def _locked(self, holder: dict) -> RunLockedError:
        return RunLockedError(
            f"out={self.out} is in use by another run (host {holder.get('host')}, PID {holder.get('pid')}, "
            f"started {holder.get('started')}; lock file {self.url}); wait for it to finish, or choose "
            "another out= (if that process is gone, delete the lock file)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(FileNotFoundError):
            if self._read_holder() == self.record:
                self.fs.rm(self.path)
        if self._created_dir:  # a run refused before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                _, out_path = url_to_fs(self.out)
                if not self.fs.ls(out_path):
                    self.fs.rmdir(out_path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- helpers --------------------------------------------------------------------------------------
    def _try_create(self) -> bool:
        data = json.dumps(self.record).encode()
        if not self.local:  # no atomic create on object stores: check, then write (docs/cli.md)
            if self.fs.exists(self.path):
                return False
            write_bytes_atomic(self.url, data)
            return True
        tmp = f"{self.path}.{os.getpid()}.{id(self)}"
        write_bytes_atomic(tmp, data)
        try:
            os.link(tmp, self.path)  # atomic: fails when the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read_holder(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                holder = json.loads(f.read().decode() or "{}")
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _is_stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def _take_over(self, holder: dict) -> None:
        """Remove a dead process's lock: renamed first, so of two processes taking it over only one wins."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            self.fs.mv(self.path, aside)
        except OSError:
            return
        try:
            with self.fs.open(aside, "rb") as f:
                moved = json.loads(f.read().decode() or "{}")
        except (OSError, ValueError):
            moved = {}
        if moved != holder and self.local:  # a racing process's fresh lock: put it back unless replaced again
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(Exception):
            self.fs.rm(aside)
        if moved != holder:
            return
        self.log(f"fewstep: took over the lock of a run that ended without releasing it (host {holder.get('host')}, "
                 f"PID {holder.get('pid')}, started {holder.get('started')})")
