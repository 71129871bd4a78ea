"""One run, one writer: an exclusive lock per run folder (``filelock``, an OS lock).

The lock of ``<runs>/<stage>/<run>/`` is the file ``<runs>/.locks/<stage>/<run>.lock`` (outside the
run folder, so ``--force`` can delete the folder while holding it), with a sidecar
``<run>.lock.json`` naming the holder (host, pid, start time, what it runs). The lock is a
``flock``/``fcntl`` lock held by an open file: the operating system drops it when the holding
process dies, however it dies (SIGKILL included), so a stale lock never blocks anyone; a stale
sidecar is simply overwritten by the next holder.

Who takes it: the batch runner (every executor) around each job, and
:func:`dfkd.tracking.start_run` for notebooks run by hand. A job's kernel (or torchrun ranks)
inherits ``$DFKD_RUN_LOCK`` naming the lock its runner holds, and then takes nothing itself.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

LOCK_ENV = "DFKD_RUN_LOCK"


class RunLocked(RuntimeError):
    """The run folder is locked by another process (``holder`` is its sidecar, maybe ``{}``)."""

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"run folder {run_dir} is being written by another process "
                         f"({describe_holder(holder)})")


def lock_path(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir).resolve()
    return run_dir.parent.parent / ".locks" / run_dir.parent.name / f"{run_dir.name}.lock"


def sidecar_path(run_dir: str | os.PathLike) -> Path:
    p = lock_path(run_dir)
    return p.with_name(p.name + ".json")


def read_holder(run_dir: str | os.PathLike) -> dict:
    try:
        return json.loads(sidecar_path(run_dir).read_text())
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown: its sidecar is not written yet"
    started = holder.get("started_at") or time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    what = f", {holder['what']}" if holder.get("what") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {started}{what}"


def held_by_parent(run_dir: str | os.PathLike) -> bool:
    """True when the process that started us (the batch runner) holds this run's lock."""
    return os.environ.get(LOCK_ENV, "") == str(lock_path(run_dir))


class RunLock:
    """The exclusive lock of one run folder. ``acquire(wait=...)``, ``release()``, or ``with``."""

    def __init__(self, run_dir: str | os.PathLike, what: str = ""):
        from filelock import FileLock
        self.run_dir, self.what = Path(run_dir).absolute(), what
        self.path = lock_path(self.run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), thread_local=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment for child processes that work inside this lock."""
        return {LOCK_ENV: str(self.path)}

    def acquire(self, wait: bool = True, log: Callable[[str], Any] | None = None,
                poll_s: float = 0.2) -> "RunLock":
        """Take the lock. Locked by another process: raise :class:`RunLocked` (``wait=False``) or
        say who holds it and block until it is released (its holder finishes or dies)."""
        from filelock import Timeout
        self.waited = False
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = read_holder(self.run_dir)
            if not wait:
                raise RunLocked(self.run_dir, holder) from None
            if log:
                log(f"  {self.run_dir} is locked ({describe_holder(holder)}); waiting for it")
            self._lock.acquire(timeout=-1, poll_interval=poll_s)
            self.waited = True
        now = time.time()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                "what": self.what or " ".join(sys.argv)[:200], "run_dir": str(self.run_dir)}
        tmp = sidecar_path(self.run_dir).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, sidecar_path(self.run_dir))
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            if read_holder(self.run_dir).get("pid") == os.getpid():
                sidecar_path(self.run_dir).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def probe(run_dir: str | os.PathLike) -> dict | None:
    """``None`` when nobody holds the run's lock, else the holder's sidecar (maybe ``{}``)."""
    if not lock_path(run_dir).exists():
        return None
    from filelock import Timeout
    lock = RunLock(run_dir)._lock
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return read_holder(run_dir)
    lock.release()  # the sidecar is left alone: a dead holder's stays as a record
    return None


# ---- for notebooks run by hand: dfkd.tracking.start_run holds the lock until run.finish() ----
_held: dict[str, RunLock] = {}


def hold(run_dir: str | os.PathLike) -> None:
    """Take the run's lock for this process (no-op when held already, or by the batch runner)."""
    if held_by_parent(run_dir) or str(lock_path(run_dir)) in _held:
        return
    lock = RunLock(run_dir, what=f"{Path(sys.argv[0]).name} (start_run)")
    try:
        lock.acquire(wait=False)
    except RunLocked as e:
        raise RuntimeError(f"{e}. Wait for it to finish (its lock goes when that process ends), "
                           "or choose another run_name.") from None
    _held[str(lock.path)] = lock


def unhold(run_dir: str | os.PathLike) -> None:
    lock = _held.pop(str(lock_path(run_dir)), None)
    if lock is not None:
        lock.release()
