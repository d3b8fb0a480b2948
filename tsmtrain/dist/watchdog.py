"""A liveness watchdog beside the engine: a rank that dies or drops off the network ends the whole
job within about ``dist.timeout_seconds``, with one line naming the rank and its host.

Horovod over MPI has no collective timeout at all and Gloo's is 30 minutes, so without it the
surviving ranks of a job that lost a node wait in their next allreduce until the time limit. The
watchdog is independent of Horovod, Gloo and NCCL: plain TCP between rank 0 and every other rank,
one connection each, driven by one daemon thread per process.

* Rank 0 listens on an ephemeral port on all addresses; the other ranks learn its addresses
  (:func:`tsmtrain.dist.netif.candidate_addresses`) and port through the engine
  (:func:`start_watchdog`), connect, and say hello (rank, host, pid).
* Every ``interval_s`` (1 s) each side sends a heartbeat; the other ranks' carry their optimizer
  step (:attr:`Watchdog.step`). Heartbeats come from the thread, so a long checkpoint write or
  evaluation does not stop them: the watchdog checks that ranks are alive, not that they progress.
* A rank that ends normally, on a stop request or with its own error says goodbye first
  (:meth:`Watchdog.stop`), so a clean end is never reported as a loss.
* Rank 0: a connection that closes without a goodbye (the process died) or sends nothing for
  ``timeout_s`` (its link is down, its node froze) is a lost rank: one line on stderr and in
  ``train.log`` (:func:`loss_line`; when every other rank fell silent at once, the line blames
  rank 0's own network), and rank 0 exits with status 1, which makes srun
  ``--kill-on-bad-exit``, mpirun or torchrun end the other ranks.
* The other ranks: rank 0's connection closing without a goodbye, or silent for ``timeout_s``,
  ends them the same way, so that no rank keeps running on a node cut off from the rest. Before
  rank 0 exits on a loss it tells them (``abort``): they stop with one line saying that rank 0 is
  ending the job and which rank was lost.

No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError

__all__ = ["Watchdog", "start_watchdog", "world_line", "loss_line", "end_process", "WatchdogError",
           "INTERVAL_S", "CONNECT_TIMEOUT_S"]

INTERVAL_S = 1.0
"""Seconds between heartbeats."""

CONNECT_TIMEOUT_S = 5.0
"""Seconds a rank waits for each of rank 0's addresses to accept and welcome it."""

RESUME = "ending the job (resume: run again, it continues from the last checkpoint)"
CLOSED = "its connection closed without a goodbye (the process died)"

log = logging.getLogger("tsmtrain")


class WatchdogError(UserError):
    """This rank could not reach rank 0's watchdog at any of its addresses (the message names them
    and ``cluster.network_interface``, which chooses them)."""


def loss_line(rank: int, host: str, why: str, step: int | None) -> str:
    """Rank 0's line for a lost rank, e.g. ``tsmtrain: rank 3 on host node4 lost: no heartbeat
    for 30 s (last seen at step 41); ending the job (resume: ...)``."""
    seen = f"last seen at step {step}" if step is not None else "last seen before its first step"
    return f"tsmtrain: rank {rank} on host {host} lost: {why} ({seen}); {RESUME}"


def world_line(hosts: list[str]) -> str:
    """``tsmtrain: world size 4 on 2 hosts: ranks 0-1 node1, ranks 2-3 node2``: the ranks of
    each host, consecutive ranks on one host grouped; at most 12 groups are named (the first 8
    and the last 2 of a longer list)."""
    groups: list[list[Any]] = []
    for rank, host in enumerate(hosts):
        if groups and groups[-1][2] == host:
            groups[-1][1] = rank
        else:
            groups.append([rank, rank, host])
    parts = [f"rank {a} {h}" if a == b else f"ranks {a}-{b} {h}" for a, b, h in groups]
    if len(parts) > 12:
        parts = parts[:8] + [f"... {len(parts) - 10} more groups ..."] + parts[-2:]
    distinct = len(set(hosts))
    return f"tsmtrain: world size {len(hosts)} on {distinct} host{'s' if distinct != 1 else ''}: {', '.join(parts)}"


def end_process(line: str, status: int = 1) -> None:
    """Print ``line`` on stderr and into rank 0's ``train.log`` (the ``tsmtrain`` logger's file
    handlers), kill this process's children (loader workers; they would die anyway through
    ``PR_SET_PDEATHSIG``) and exit at once with ``status``, from whichever thread calls it."""
    try:
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None))
                handler.flush()
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    finally:
        os._exit(status)


# sockets closed in forked children (loader workers): a worker must not keep a connection open
_SOCKETS: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()


def _close_in_child() -> None:
    for sock in list(_SOCKETS):
        try:
            os.close(sock.detach())  # the parent's copy stays open; no shutdown, which would end it
        except OSError:
            pass


os.register_at_fork(after_in_child=_close_in_child)


@dataclass
class _Peer:
    """One connection: to a rank (on rank 0) or to rank 0 (on the others)."""

    sock: socket.socket
    rank: int | None = None  # None: connected, not yet said hello
    host: str = "?"
    pid: int | None = None
    step: int | None = None
    seen: float = field(default_factory=time.monotonic)
    buffer: bytes = b""


def _send(sock: socket.socket, message: dict) -> bool:
    """Send one message without blocking (a heartbeat that does not fit a full buffer is
    dropped); False when the connection is gone."""
    try:
        sock.send(json.dumps(message).encode() + b"\n", socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def _readable(watched: dict[socket.socket, Any], timeout_s: float) -> list[Any]:
    """The values of ``watched`` whose socket has something to read (or closed), waiting up to
    ``timeout_s``; ``poll``, not ``select``, which cannot watch descriptors above 1023 (rank 0 of
    a large job)."""
    poller = select.poll()
    by_fd = {}
    for sock, value in watched.items():
        by_fd[sock.fileno()] = value
        poller.register(sock, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(timeout_s * 1000) if fd in by_fd]


class Watchdog:
    """One rank's end of the watchdog; create it with :meth:`listen` (rank 0) or :meth:`connect`.

    Args:
        rank: this rank.
        host: this host's name (in the lines printed).
        timeout_s: seconds of silence after which a peer is lost (> ``interval_s``).
        interval_s: seconds between heartbeats.
        on_lost: called once, from the watchdog's thread, with the line saying who was lost;
            default :func:`end_process`, which exits the process.

    Attributes:
        step: this rank's optimizer step, sent with each heartbeat (the training loop sets it).
        peers: the connections (rank 0: one per rank that said hello).
    """

    def __init__(self, rank: int, host: str, timeout_s: float, interval_s: float = INTERVAL_S,
                 on_lost: Callable[[str], None] | None = None):
        if timeout_s <= interval_s:
            raise ValueError(f"timeout_s ({timeout_s}) must exceed interval_s ({interval_s})")
        self.rank, self.host = rank, host
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.on_lost = on_lost or end_process
        self.step: int | None = None
        self.peers: list[_Peer] = []
        self.listener: socket.socket | None = None
        self.addrs: list[str] = []
        self.port = 0
        self.token = ""
        self.zero_host = "?"
        self.lost_line: str | None = None
        """The line of the loss this watchdog reported, if any."""
        self._lock = threading.Lock()
        self._done = False  # stopped, or a loss reported
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name=f"tsmtrain-watchdog-{rank}", daemon=True)

    # ---- construction
    @classmethod
    def listen(cls, host: str, timeout_s: float, addrs: list[str], interval_s: float = INTERVAL_S,
               on_lost: Callable[[str], None] | None = None) -> "Watchdog":
        """Rank 0's watchdog, listening on an ephemeral port of all IPv4 addresses (``.port``);
        ``addrs`` are the addresses the other ranks try (``.addrs``). Its thread is running.

        Raises:
            OSError: no socket can be opened.
        """
        self = cls(0, host, timeout_s, interval_s, on_lost)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _SOCKETS.add(self.listener)
        self.listener.bind(("0.0.0.0", 0))
        self.listener.listen(4096)  # every rank connects at once (the kernel caps it at somaxconn)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.addrs, self.token = list(addrs), secrets.token_hex(8)
        self._thread.start()
        return self

    @classmethod
    def connect(cls, rank: int, host: str, zero: dict, timeout_s: float, interval_s: float = INTERVAL_S,
                on_lost: Callable[[str], None] | None = None,
                connect_timeout_s: float = CONNECT_TIMEOUT_S) -> "Watchdog":
        """Rank ``rank``'s watchdog, connected to rank 0's, whose ``zero`` is ``{"addrs", "port",
        "token", "host"}`` (:meth:`contact` of rank 0). Each address is tried in turn, loopback
        first when rank 0 runs on this host; its thread is running.

        Raises:
            WatchdogError: no address accepted and welcomed this rank within
                ``connect_timeout_s`` (the message names the addresses and the port).
        """
        self = cls(rank, host, timeout_s, interval_s, on_lost)
        self.zero_host = zero["host"]
        addrs = list(zero["addrs"])
        if zero["host"] == host:
            addrs = ["127.0.0.1"] + [a for a in addrs if a != "127.0.0.1"]
        errors = []
        for addr in addrs:
            try:
                sock = socket.create_connection((addr, zero["port"]), timeout=connect_timeout_s)
            except OSError as err:
                errors.append(f"{addr}: {err.strerror or err}")
                continue
            try:
                sock.sendall(json.dumps({"t": "hello", "rank": rank, "host": host, "pid": os.getpid(),
                                         "token": zero["token"]}).encode() + b"\n")
                reply = b""
                while b"\n" not in reply:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise OSError("closed before welcoming")
                    reply += chunk
                if json.loads(reply.split(b"\n")[0]).get("t") != "welcome":
                    raise OSError("not rank 0's watchdog")
            except (OSError, ValueError) as err:
                sock.close()
                errors.append(f"{addr}: {getattr(err, 'strerror', None) or err}")
                continue
            sock.setblocking(False)
            _SOCKETS.add(sock)
            self.peers.append(_Peer(sock, rank=0, host=zero["host"], buffer=reply.split(b"\n", 1)[1]))
            self._thread.start()
            return self
        raise WatchdogError(f"cannot reach rank 0's watchdog on host {zero['host']} at port {zero['port']}: "
                            + "; ".join(errors) + " (cluster.network_interface chooses rank 0's address)")

    def contact(self) -> dict:
        """What the other ranks need to connect to rank 0's watchdog: addresses, port, token, host."""
        return {"addrs": self.addrs, "port": self.port, "token": self.token, "host": self.host}

    # ---- the thread
    def _watch(self) -> None:
        next_beat = time.monotonic()
        while not self._done:
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.interval_s
                message = {"t": "hb", "step": self.step}
                for peer in list(self.peers):
                    if peer.rank is not None and not _send(peer.sock, message):
                        self._lost(peer, CLOSED)
            watched: dict[socket.socket, Any] = {p.sock: p for p in self.peers}
            if self.listener is not None:
                watched[self.listener] = None
            try:
                ready = _readable(watched, max(0.0, min(0.2, next_beat - time.monotonic())))
            except (OSError, ValueError):  # a socket closed by stop() meanwhile
                continue
            for peer in ready:
                if self._done:
                    return
                if peer is None:
                    self._accept()
                elif peer in self.peers:
                    self._read(peer)
            self._check_silence()

    def _check_silence(self) -> None:
        """Report the first rank (on rank 0) or rank 0 (elsewhere) silent for ``timeout_s``. What
        has arrived is read first: this thread may itself not have run for a while (a loaded
        machine), and heartbeats waiting in the socket are not silence."""
        now = time.monotonic()
        if not any(now - p.seen > self.timeout_s for p in self.peers):
            return
        try:
            for peer in _readable({p.sock: p for p in self.peers}, 0.0):
                if peer in self.peers:
                    self._read(peer)
        except (OSError, ValueError):
            return
        now = time.monotonic()
        for peer in list(self.peers):
            if self._done or now - peer.seen <= self.timeout_s:
                continue
            if peer.rank is None:  # connected but never said hello: not a rank
                self._drop(peer)
            elif self.rank == 0 and len(self.peers) > 1 and all(  # (heartbeats are an interval apart)
                    now - p.seen > max(self.timeout_s - 2 * self.interval_s, self.interval_s) for p in self.peers):
                self._report(f"tsmtrain: rank 0 on host {self.host} lost contact with all {len(self.peers)} "
                             f"other ranks: no heartbeat for {self.timeout_s:g} s (this host's own network "
                             f"may be down); {RESUME}", "rank 0 lost contact with every rank")
            else:
                self._lost(peer, f"no heartbeat for {self.timeout_s:g} s")

    def _accept(self) -> None:
        while True:  # every connection waiting (the listener does not block)
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setblocking(False)
            _SOCKETS.add(sock)
            self.peers.append(_Peer(sock))

    def _read(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if peer.rank is None:
                self._drop(peer)
            else:
                self._lost(peer, CLOSED)
            return
        peer.seen = time.monotonic()
        peer.buffer += data
        *lines, peer.buffer = peer.buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                message = {}
            kind = message.get("t")
            if kind == "hello" and peer.rank is None:
                if message.get("token") != self.token:
                    self._drop(peer)
                    return
                peer.rank, peer.host, peer.pid = int(message["rank"]), str(message["host"]), message.get("pid")
                _send(peer.sock, {"t": "welcome"})
            elif kind == "hb":
                peer.step = message.get("step")
            elif kind == "abort":  # rank 0 is ending the job because of another rank
                self._report(f"tsmtrain: rank {self.rank} on host {self.host} stopping: rank 0 on host {peer.host} "
                             f"is ending the job ({str(message.get('why'))[:200]})")
                return
            elif kind == "bye":  # a clean end: close our side once it has closed its own
                self._drop(peer)
                return

    def _drop(self, peer: _Peer) -> None:
        if peer in self.peers:
            self.peers.remove(peer)
        peer.sock.close()

    def _lost(self, peer: _Peer, why: str) -> None:
        if self.rank == 0:
            self._report(loss_line(peer.rank, peer.host, why, peer.step), f"rank {peer.rank} on host {peer.host} lost")
        else:
            self._report(f"tsmtrain: rank {self.rank} on host {self.host} lost contact with rank 0 on host "
                         f"{peer.host}: {why}; stopping")

    def _report(self, line: str, abort: str = "") -> None:
        """Report ``line`` once (:attr:`on_lost`); rank 0 first tells the other ranks that it is
        ending the job and why (``abort``), so that they stop with that reason rather than
        report rank 0 itself as lost."""
        with self._lock:
            if self._done:
                return
            self._done = True
            self.lost_line = line
        if abort:
            for peer in self.peers:
                if peer.rank is not None:
                    _send(peer.sock, {"t": "abort", "why": abort})
        self.on_lost(line)

    # ---- the end
    def stop(self, linger_s: float = 1.0) -> None:
        """Say goodbye to every peer and close: a clean end, which no peer reports as a loss.
        Waits up to ``linger_s`` seconds for the peers to close their side (so that the goodbye
        is read, not reset). After a loss was reported it only closes; a second call does nothing."""
        with self._lock:
            if self._stopped:
                return
            clean = not self._done
            self._done = self._stopped = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        open_peers = []
        for peer in self.peers if clean else []:
            if peer.rank is not None and _send(peer.sock, {"t": "bye"}):
                try:
                    peer.sock.shutdown(socket.SHUT_WR)
                    open_peers.append(peer)
                except OSError:
                    pass
        deadline = time.monotonic() + linger_s
        while open_peers and time.monotonic() < deadline:
            for peer in _readable({p.sock: p for p in open_peers}, max(0.0, deadline - time.monotonic())):
                try:
                    if peer.sock.recv(65536):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                open_peers.remove(peer)  # closed (or reset) by the peer
        for peer in self.peers:
            peer.sock.close()
        self.peers = []
        if self.listener is not None:
            self.listener.close()

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_watchdog(engine: Any, timeout_s: float, interface: str | None = None, interval_s: float = INTERVAL_S,
                   on_lost: Callable[[str], None] | None = None) -> tuple[Watchdog | None, str]:
    """Start this rank's watchdog (every rank calls it, right after the engine is created): two
    ``engine.allgather_object`` calls, one for rank 0's address and everyone's host, one for
    who could connect.

    Args:
        engine: a :class:`~tsmtrain.dist.base.Engine` (``rank``, ``size``, ``allgather_object``).
        timeout_s: seconds of silence after which a rank (or rank 0) is lost (``dist.timeout_seconds``).
        interface: the interface rank 0 is reached at (:func:`tsmtrain.dist.netif.named_interface`);
            none: all of rank 0's addresses outside loopback.
        interval_s, on_lost: as :class:`Watchdog`.

    Returns:
        ``(watchdog, line)``: the watchdog (``None`` for one process, or where this rank could not
        reach rank 0: it then runs unwatched, with a warning) and :func:`world_line` (``""`` for
        one process).
    """
    if engine.size <= 1:
        return None, ""
    from .netif import candidate_addresses

    host = socket.gethostname()
    dog = None
    if engine.rank == 0:
        dog = Watchdog.listen(host, timeout_s, candidate_addresses(interface), interval_s, on_lost)
    me = {"host": host, "contact": dog.contact() if dog else None}
    everyone = engine.allgather_object(me, name="watchdog.hello")
    zero = everyone[0]["contact"]
    failure = ""
    if engine.rank != 0:
        try:
            dog = Watchdog.connect(engine.rank, host, zero, timeout_s, interval_s, on_lost)
        except WatchdogError as err:
            failure = str(err)
            log.warning("rank %d: %s; this rank runs without the watchdog (its loss would not end the job "
                        "quickly)", engine.rank, failure)
    failures = engine.allgather_object(failure, name="watchdog.connected")
    if engine.rank == 0:
        for rank, why in enumerate(failures):
            if why:
                log.warning("watchdog: rank %d on host %s could not connect (%s): its loss is not watched",
                            rank, everyone[rank]["host"], why)
    return dog, world_line([e["host"] for e in everyone])
