"""One run per run directory: the lock that keeps a second ``tsmtrain run`` out of a directory a
run is writing.

Rank 0 takes an exclusive ``flock`` on ``RUN_DIR/.lock`` (:data:`LOCK_FILE`) before it writes
anything there and holds it while the run lasts; the kernel releases it when the process ends,
however it ends (``kill -9`` included), so a requeued job that starts after the old one has ended
proceeds, while a resubmitted job that starts while the first one still runs is refused with one
line naming the holder (host, pid, start time), which rank 0 writes into the file once it holds
the lock. Forked children (data-loading workers) close their copy of the descriptor, so the
lock ends with its holder, not with its last worker. :func:`claim_run_dir` shares rank 0's outcome with every rank, so that all of them
stop together instead of some waiting in a collective for a rank 0 that has left.

``flock`` works on local filesystems and on NFS (where Linux maps it onto NFS byte-range locks);
where the filesystem supports no locks at all the run proceeds unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from ..errors import TrainingError

__all__ = ["LOCK_FILE", "RunLock", "RunDirInUse", "claim_run_dir", "lock_holder"]

LOCK_FILE = ".lock"
"""The lock file in the run directory; it holds the holder's ``host``, ``pid`` and ``started``
(ISO 8601 text) as JSON."""

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # filesystems without flock

_HELD: set[int] = set()  # the file descriptors of the locks this process holds


def _close_in_child() -> None:
    """In a forked child (a data-loading worker): close the inherited lock descriptors. The lock
    belongs to the open file, which the fork shares, so a child keeping it open would keep the
    directory locked after a ``kill -9`` of its parent until the child noticed and exited;
    closing (not unlocking) it leaves the parent's lock as it is."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirInUse(TrainingError):
    """Another process holds the run directory's lock (the message names its host and pid)."""


def lock_holder(run_dir: str | Path) -> dict | None:
    """What the lock file of ``run_dir`` says about its holder (``host``, ``pid``, ``started``), or
    ``None`` when there is no lock file or it holds nothing readable (a holder that has not
    written it yet). The holder may have ended since: only the lock itself tells."""
    try:
        doc = json.loads((Path(run_dir) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class RunLock:
    """The exclusive lock on one run directory, held by this process until :meth:`release` (or
    the end of a ``with`` block, or the end of the process).

    Attributes:
        run_dir: the run directory.
        path: its lock file (:data:`LOCK_FILE`).
        note: ``""``, or why the directory could not be locked and the run proceeds unlocked
            (a filesystem without locks), for the log.
    """

    def __init__(self, run_dir: Path, fd: int | None, note: str = ""):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.note = note
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunLock":
        """Lock ``run_dir`` (created if missing) for this process without waiting, and write this
        process's host, pid and start time into the lock file.

        Returns:
            The held :class:`RunLock`.

        Raises:
            RunDirInUse: another process holds it (the message names it and says what to do).
            TrainingError: the directory or its lock file cannot be created or opened.
        """
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise TrainingError(f"cannot lock the run directory: {path}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirInUse(_in_use(run_dir)) from None
        except OSError as err:
            os.close(fd)
            if err.errno in _UNSUPPORTED:
                return cls(run_dir, None, note=f"{run_dir}: the filesystem supports no file locks ({err.strerror}); "
                                              f"nothing keeps a second run out of this run directory")
            raise TrainingError(f"cannot lock the run directory: {path}: {err.strerror or err}") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass  # (a full disk): the lock holds all the same; a refused run cannot name the holder
        _HELD.add(fd)
        return cls(run_dir, fd)

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays: removing it would let a run that
        has it open lock a file no longer in the directory while a third run locks a new one."""
        fd, self._fd = self._fd, None
        if fd is None or fd not in _HELD:  # (in a forked child the descriptor is closed already)
            return
        _HELD.discard(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _in_use(run_dir: Path) -> str:
    holder = lock_holder(run_dir)
    if holder:
        who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    else:
        who = "holder unknown: it has not written the lock file yet"
    return f"{run_dir} is in use by another run ({who}): wait for it to end, or choose another run.name"


def claim_run_dir(engine, run_dir: str | Path) -> RunLock | None:
    """Take the run directory for this run: rank 0 locks it (:meth:`RunLock.acquire`) and every
    rank learns the outcome (one ``allgather_object``), so all ranks go on, or all raise. Every
    rank must call it, before any other collective of the run.

    Returns:
        Rank 0: the held :class:`RunLock` (release it when the run ends); other ranks: ``None``.

    Raises:
        RunDirInUse: on every rank, when another process holds the directory.
        TrainingError: on every rank, when rank 0 cannot lock it for another reason.
    """
    lock, refusal = None, None
    if engine.rank == 0:
        try:
            lock = RunLock.acquire(run_dir)
        except TrainingError as err:
            refusal = (type(err) is RunDirInUse, str(err))
    refusal = engine.allgather_object(refusal, name="run_dir_lock")[0]
    if refusal is not None:
        in_use, message = refusal
        raise (RunDirInUse if in_use else TrainingError)(message)
    return lock
