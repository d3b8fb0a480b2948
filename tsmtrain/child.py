"""The one way tsmtrain runs another program (ffmpeg, ffprobe, sbatch, squeue, nvidia-smi, mpirun
--version, the doctor's allreduce ranks), as submitit routes every command through one
``CommandFunction``. Torch-free and light: the Slurm renderer and the scaling code import it.

* :func:`run` runs a child to its end: it has a timeout (the child is killed and waited for, and
  :class:`ChildTimeout` names the command and the seconds), its stdout and stderr are captured,
  and a failure raises :class:`ChildError`, whose message names the program and gives the last
  line of its stderr (``returncode``, ``stderr`` and ``last_line`` are attributes).
* :func:`start` starts a child for streaming (frames written to ffmpeg's stdin, ranks writing to
  files) and returns its :class:`subprocess.Popen`; the caller waits for it.
* A program that cannot be found is :class:`ProgramNotFound`, naming it. All three are
  :class:`~tsmtrain.errors.UserError`: the CLI prints the line and exits with status 2.

**Every child dies with its parent**, even when the parent is killed by SIGKILL (``kill -9``, a
Slurm time limit, the OOM killer), so that no ffmpeg writes on, and no rank waits, for a process
that is gone. On Linux the child calls ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` between fork and exec
(kept across exec); elsewhere nothing is done.

**The thread caveat.** Linux sends that signal when the *thread* that started the child exits,
not the process. So a child must be waited for by the thread that started it: :func:`run` always
does (on a timeout and on an exception too), which is why the preparation's pool threads run
their ffmpeg through :func:`run` and why ``flow_files._Writer`` is started, fed and closed by one
thread. Never :func:`start` a child from a thread that may end before the child does: the child
would be killed with it.

The parent may die between fork and prctl; the child would then miss the signal (it goes to the
new parent, init or a subreaper), so after prctl the child checks that its parent is still this
process and exits at once if not. CPython warns that ``preexec_fn`` is not safe with threads
(the child of a fork may block on a lock another thread held): this one makes one ctypes call of
prctl, looked up in advance in the parent, and ``os.getppid``, two system calls that take no
lock. ``subprocess`` has no other way to run code between fork and exec (``process_group``,
``start_new_session`` and ``pass_fds`` do not tie a child's life to its parent's); the cost is a
fork instead of vfork/posix_spawn, a few milliseconds per child.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from subprocess import DEVNULL, PIPE, STDOUT, CompletedProcess, Popen
from typing import IO, Any

from .errors import UserError

__all__ = ["run", "start", "ChildError", "ChildTimeout", "ProgramNotFound", "PIPE", "STDOUT", "DEVNULL"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl: Any = None  # libc's prctl, looked up once, in the parent (never between fork and exec); False: none
_prctl_lock = threading.Lock()


def _shown(cmd: Sequence[str], limit: int = 300) -> str:
    text = shlex.join(cmd)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _last_line(*texts: str | bytes | None) -> str:
    """The last non-blank line of the first text that has one (stderr, then stdout), at most 300
    characters; ``"no message"`` when there is none."""
    for text in texts:
        lines = [line.strip() for line in _text(text).splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return "no message"


class ChildError(UserError):
    """A child failed: it exited with a non-zero status, was killed, or could not be started.

    Attributes:
        cmd: the command (a list of strings); ``program``: its program's name (no folder).
        returncode: the exit status (negative: killed by that signal); ``None`` when it did not
            end by itself (not started, or killed at its timeout).
        stderr: its whole stderr (text; empty when not captured); ``last_line``: the last
            non-blank line of its stderr (else of its stdout), the line the message gives.
    """

    def __init__(self, message: str, cmd: Sequence[str], returncode: int | None = None, stderr: str = "",
                 last_line: str = ""):
        super().__init__(message)
        self.cmd, self.program = list(cmd), os.path.basename(cmd[0]) if cmd else "?"
        self.returncode, self.stderr, self.last_line = returncode, stderr, last_line


class ChildTimeout(ChildError):
    """A child ran past its timeout and was killed. ``seconds``: the timeout."""

    def __init__(self, message: str, cmd: Sequence[str], seconds: float, stderr: str = "", last_line: str = ""):
        super().__init__(message, cmd, None, stderr, last_line)
        self.seconds = seconds


class ProgramNotFound(ChildError):
    """The child's program is not installed (not on ``PATH``, or no such file)."""


def _die_with_parent(death_signal: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``death_signal`` when the thread that starts it
    ends (see the module's notes); ``None`` (nothing to do) off Linux or without libc's prctl."""
    global _prctl
    if not sys.platform.startswith("linux"):
        return None
    with _prctl_lock:
        if _prctl is None:
            try:
                import ctypes

                prctl = ctypes.CDLL(None).prctl  # the symbols of this process, libc's among them
                prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
                prctl.restype = ctypes.c_int
            except (ImportError, OSError, AttributeError):
                prctl = False
            _prctl = prctl
    if not _prctl:
        return None
    prctl, parent, sig = _prctl, os.getpid(), int(death_signal)

    def child(option: int = _PR_SET_PDEATHSIG) -> None:  # runs in the child, between fork and exec
        prctl(option, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(137)

    return child


def _not_started(cmd: list[str], err: OSError, cwd: str | os.PathLike | None, what: str) -> ChildError:
    """The error for a child that could not be started (``Popen``'s ``OSError``)."""
    program = cmd[0] if cmd else "?"
    doing = f" ({what})" if what else ""
    if isinstance(err, FileNotFoundError) and cwd is not None and not os.path.isdir(cwd):
        return ChildError(f"cannot run {program}{doing}: folder {os.fspath(cwd)} not found", cmd)
    if isinstance(err, FileNotFoundError):
        where = "" if os.sep in program else " on PATH"
        return ProgramNotFound(f"{program} not found{where}{doing}", cmd)
    return ChildError(f"cannot run {program}{doing}: {err.strerror or err}", cmd)


def run(cmd: Sequence[str | os.PathLike], *, timeout: float, input: str | bytes | None = None,
        cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None, text: bool = True,
        check: bool = True, what: str = "", death_signal: int = signal.SIGKILL) -> CompletedProcess:
    """Run ``cmd`` to its end in this thread, its stdout and stderr captured; it dies with this
    process (see the module's notes).

    Args:
        cmd: the program and its arguments (no shell).
        timeout: seconds after which the child is killed (and waited for).
        input: written to its stdin (``str`` when ``text``, else ``bytes``); ``None``: no stdin
            is given (it inherits this process's).
        cwd, env: its working folder and environment (``None``: this process's).
        text: stdout and stderr as text (UTF-8, undecodable bytes replaced), else bytes.
        check: raise :class:`ChildError` on a non-zero exit status; with ``False`` the status is
            the caller's to read (a probe whose failure is an answer).
        what: a few words saying what the child does (``"writing clip.mp4"``), put in the
            messages after the program's name.
        death_signal: the signal the child gets when this thread ends (SIGKILL; SIGTERM for a
            child that stops cleanly on it).

    Returns:
        The :class:`subprocess.CompletedProcess` (``returncode``, ``stdout``, ``stderr``).

    Raises:
        ChildTimeout: it ran past ``timeout`` (killed; the message names the command and the seconds).
        ChildError: it exited non-zero (with ``check``; the message names the program and gives
            the last line of its stderr), or it could not be started.
        ProgramNotFound: the program is not installed.
    """
    cmd = [os.fspath(c) for c in cmd]
    program = os.path.basename(cmd[0])
    doing = f" {what}" if what else ""
    extra: dict[str, Any] = {"encoding": "utf-8", "errors": "replace"} if text else {}
    try:
        done = subprocess.run(cmd, input=input, cwd=cwd, env=env, capture_output=True, timeout=timeout,
                              preexec_fn=_die_with_parent(death_signal), **extra)
    except subprocess.TimeoutExpired as err:
        stderr = _text(err.stderr)
        raise ChildTimeout(f"{program}{doing} ran past its {timeout:g} s timeout and was killed: {_shown(cmd)}",
                           cmd, timeout, stderr, _last_line(stderr, err.output)) from None
    except OSError as err:
        raise _not_started(cmd, err, cwd, what) from None
    if check and done.returncode != 0:
        line = _last_line(done.stderr, done.stdout)
        code = done.returncode
        status = f"killed by {_signal_name(-code)}" if code < 0 else f"exit {code}"
        raise ChildError(f"{program} failed{doing} ({status}): {line}", cmd, code, _text(done.stderr), line)
    return done


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def start(cmd: Sequence[str | os.PathLike], *, stdin: int | IO | None = None, stdout: int | IO | None = None,
          stderr: int | IO | None = None, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
          start_new_session: bool = False, what: str = "", death_signal: int = signal.SIGKILL) -> Popen:
    """Start ``cmd`` and return its :class:`subprocess.Popen` (bytes streams), for a child that is
    fed or read while it runs; it dies with the thread that starts it (see the module's notes).
    The caller waits for it, in the same thread, and kills it on its own errors.

    Args:
        cmd: the program and its arguments (no shell).
        stdin, stdout, stderr: as for ``Popen`` (:data:`PIPE`, :data:`DEVNULL`, :data:`STDOUT`, a file).
        cwd, env, start_new_session: as for ``Popen``.
        what, death_signal: as for :func:`run`.

    Raises:
        ProgramNotFound: the program is not installed. ChildError: it could not be started.
    """
    cmd = [os.fspath(c) for c in cmd]
    try:
        return Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
                     start_new_session=start_new_session, preexec_fn=_die_with_parent(death_signal))
    except OSError as err:
        raise _not_started(cmd, err, cwd, what) from None
