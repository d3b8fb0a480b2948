"""The liveness watchdog (tsmtrain/dist/watchdog.py), the network interface chooser
(tsmtrain/dist/netif.py), their recipe keys and the job script's export of the interface.

A rank's process is emulated on this host: SIGKILL for a killed node, SIGSTOP for a node whose
link went down (it sends nothing more, and its connection stays open). The end-to-end tests stop
rank 1 of a two-rank ``tsmtrain run`` and check that the job ends with the line naming it, leaves
no process behind, and resumes from its last checkpoint.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe, venv_env
from tsmtrain.dist import netif
from tsmtrain.dist.watchdog import CLOSED, Watchdog, WatchdogError, loss_line, start_watchdog, world_line
from tsmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(REPO / "tests" / "watchdog_worker.py")]


def wait_for(condition, seconds=60.0):
    """Poll ``condition`` until it is true or ``seconds`` pass (a bound against hanging, not a timing)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


# ---- lines

def test_world_line_groups_consecutive_ranks_per_host():
    assert world_line(["n1", "n2", "n3", "n4"]) == \
        "tsmtrain: world size 4 on 4 hosts: rank 0 n1, rank 1 n2, rank 2 n3, rank 3 n4"
    assert world_line(["a", "a", "b", "b", "a"]) == "tsmtrain: world size 5 on 2 hosts: ranks 0-1 a, ranks 2-3 b, rank 4 a"
    assert world_line(["x", "x"]) == "tsmtrain: world size 2 on 1 host: ranks 0-1 x"


def test_world_line_of_a_large_world_is_capped():
    line = world_line([f"node{i // 8}" for i in range(256 * 8)])
    assert line.startswith("tsmtrain: world size 2048 on 256 hosts: ranks 0-7 node0, ranks 8-15 node1")
    assert "... 246 more groups ..." in line and line.endswith("ranks 2040-2047 node255")
    assert len(line) < 400


def test_loss_line_names_rank_host_step_and_resume():
    line = loss_line(3, "node4", "no heartbeat for 30 s", 41)
    assert line == ("tsmtrain: rank 3 on host node4 lost: no heartbeat for 30 s (last seen at step 41); ending the "
                    "job (resume: run again, it continues from the last checkpoint)")
    assert "before its first step" in loss_line(1, "h", CLOSED, None)


# ---- watchdogs in threads of this process

class ThreadEngine:
    """An engine of ``size`` ranks in threads of this process: ``allgather_object`` meets at a barrier."""

    def __init__(self, rank, shared):
        self.rank, self.size, self.shared = rank, shared["size"], shared

    def allgather_object(self, obj, name="object"):
        self.shared["slots"][self.rank] = obj
        self.shared["barrier"].wait(timeout=30)
        out = list(self.shared["slots"])
        self.shared["barrier"].wait(timeout=30)
        return out


def start_ranks(size, timeout_s=2.0):
    shared = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size)}
    lost, dogs, lines = [], [None] * size, [None] * size

    def rank(r):
        dogs[r], lines[r] = start_watchdog(ThreadEngine(r, shared), timeout_s, "lo", interval_s=0.2,
                                           on_lost=lost.append)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return dogs, lines, lost


def test_ranks_that_say_goodbye_are_not_reported():
    dogs, lines, lost = start_ranks(3)
    host = socket.gethostname()
    assert lines[0] == f"tsmtrain: world size 3 on 1 host: ranks 0-2 {host}"
    assert wait_for(lambda: len(dogs[0].peers) == 2)
    assert sorted(p.rank for p in dogs[0].peers) == [1, 2]
    for r in (1, 2):  # the ranks end first, each with a goodbye; silence afterwards is not a loss
        dogs[r].stop()
    assert wait_for(lambda: not dogs[0].peers, 10)
    time.sleep(3)  # longer than the 2 s timeout
    dogs[0].stop()
    assert lost == []


def test_a_loss_on_rank_0_stops_the_other_ranks_with_the_reason():
    dogs, _, lost = start_ranks(3, timeout_s=30.0)
    assert wait_for(lambda: len(dogs[0].peers) == 2)
    dogs[2]._done = True  # rank 2 dies: its thread stops, its connection closes without a goodbye
    dogs[2]._thread.join()
    dogs[2].peers[0].sock.close()
    assert wait_for(lambda: len(lost) == 2, 20)
    host = socket.gethostname()
    # rank 0's line and rank 1's come from two threads: either may be appended first
    rank0 = [line for line in lost if line.startswith(f"tsmtrain: rank 2 on host {host} lost: {CLOSED}")]
    rank1 = [line for line in lost if line == (f"tsmtrain: rank 1 on host {host} stopping: rank 0 on host {host} "
                                               f"is ending the job (rank 2 on host {host} lost)")]
    assert len(rank0) == len(rank1) == 1, lost
    for dog in dogs:
        dog.stop()


def test_rank_0_that_says_goodbye_is_not_reported():
    dogs, _, lost = start_ranks(2)
    dogs[0].stop()
    assert wait_for(lambda: not dogs[1].peers, 10)
    time.sleep(3)
    dogs[1].stop()
    assert lost == []


def test_a_busy_main_thread_still_sends_heartbeats():
    """The heartbeats come from the watchdog's thread: a rank whose training thread is busy
    (a long checkpoint write or evaluation) for longer than the timeout is not lost."""
    dogs, _, lost = start_ranks(2, timeout_s=1.0)
    deadline = time.monotonic() + 3  # busy in Python, holding the interpreter most of the time
    while time.monotonic() < deadline:
        sum(range(10000))
    assert lost == []
    dogs[1].stop()
    dogs[0].stop()


def test_a_stranger_connecting_is_dropped_not_reported():
    lost = []
    dog = Watchdog.listen("here", 2.0, ["127.0.0.1"], interval_s=0.2, on_lost=lost.append)
    with socket.create_connection(("127.0.0.1", dog.port)) as s:
        s.sendall(b'{"t": "hello", "rank": 1, "host": "x", "token": "wrong"}\n')
        assert s.recv(100) == b""  # closed without a welcome
    with socket.create_connection(("127.0.0.1", dog.port)):
        time.sleep(2.5)  # connected, silent, never said hello: dropped at the timeout
    time.sleep(0.5)
    assert lost == [] and dog.peers == []
    dog.stop()


def test_connecting_to_nothing_names_the_addresses():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(WatchdogError, match=rf"host node1 at port {port}: 127.0.0.1: "):
            Watchdog.connect(1, "node2", {"addrs": ["127.0.0.1"], "port": port, "token": "t", "host": "node1"}, 5.0)


# ---- a rank in its own process: killed, stopped, or ending cleanly

@pytest.fixture
def rank0():
    lost = []
    dog = Watchdog.listen("node1", 3.0, ["127.0.0.1"], on_lost=lost.append)  # heartbeats 1 s apart, as the clients'

    yield dog, lost
    dog.stop()


def start_client(dog, rank=1, timeout_s=30.0):
    proc = subprocess.Popen([*WORKER, "connect", str(rank), str(timeout_s), json.dumps(dog.contact())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=venv_env(), cwd=REPO)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    assert wait_for(lambda: any(p.rank == rank for p in dog.peers), 10)
    return proc


def test_a_killed_rank_is_reported_at_once_with_its_rank_and_host(rank0):
    dog, lost = rank0
    dog.timeout_s = 60.0  # so that the report can only come from the closed connection
    proc = start_client(dog, rank=2)
    assert wait_for(lambda: (dog.peers[0].step or 0) > 0, 10)  # its steps arrive with its heartbeats
    proc.kill()
    proc.wait()
    assert wait_for(lambda: lost, 30)
    assert lost[0].startswith(f"tsmtrain: rank 2 on host host-2 lost: {CLOSED} (last seen at step ")
    assert lost[0].endswith("ending the job (resume: run again, it continues from the last checkpoint)")
    assert len(lost) == 1


def test_a_stopped_rank_is_reported_after_the_timeout(rank0):
    dog, lost = rank0
    proc = start_client(dog)
    assert wait_for(lambda: (dog.peers[0].step or 0) > 0, 10)
    os.kill(proc.pid, signal.SIGSTOP)  # as a node whose link went down: the connection stays open, silent
    try:
        assert wait_for(lambda: lost, 30)
        assert lost[0].startswith("tsmtrain: rank 1 on host host-1 lost: no heartbeat for 3 s (last seen at step ")
    finally:
        proc.kill()
        proc.wait()


def test_every_rank_silent_at_once_blames_rank_0s_own_network(rank0):
    dog, lost = rank0
    procs = [start_client(dog, rank) for rank in (1, 2)]
    try:
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)  # as rank 0's own link going down: everyone silent
        assert wait_for(lambda: lost, 30)
        assert lost[0].startswith("tsmtrain: rank 0 on host node1 lost contact with all 2 other ranks: no heartbeat "
                                  "for 3 s (this host's own network may be down); ending the job")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_rank_ending_cleanly_is_not_reported(rank0):
    dog, lost = rank0
    proc = start_client(dog)
    out, err = proc.communicate(input="", timeout=30)  # stdin's end: goodbye, exit 0
    assert proc.returncode == 0 and out.strip().endswith("bye"), err
    assert wait_for(lambda: not dog.peers, 10)
    time.sleep(3.5)  # past the timeout
    assert lost == []


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_rank_that_loses_rank_0_exits_with_its_line(fault):
    zero = subprocess.Popen([*WORKER, "listen", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=venv_env(), cwd=REPO)
    contact = zero.stdout.readline()
    client = subprocess.Popen([*WORKER, "connect", "1", "3", contact], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=venv_env(), cwd=REPO)
    try:
        assert client.stdout.readline().strip() == "ready"
        os.kill(zero.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        client.wait(timeout=60)  # (stdin stays open: its end would be a clean stop)
        err = client.stderr.read()
    finally:
        zero.kill()
        zero.wait()
        client.kill()
    why = CLOSED if fault == "kill" else "no heartbeat for 3 s"
    host = socket.gethostname()
    assert client.returncode == 1
    assert err.strip() == f"tsmtrain: rank 1 on host host-1 lost contact with rank 0 on host {host}: {why}; stopping"


# ---- the network interface

IFACES = {"lo": ["127.0.0.1"], "eth0": ["10.0.0.5"], "ib0": ["192.168.7.5"], "docker0": []}


def test_named_interface_reads_the_variables():
    assert netif.named_interface({"GLOO_SOCKET_IFNAME": "ib0"}, IFACES) == "ib0"
    assert netif.named_interface({"NCCL_SOCKET_IFNAME": "^docker,lo"}, IFACES) is None
    assert netif.named_interface({"NCCL_SOCKET_IFNAME": "=eth0"}, IFACES) == "eth0"
    assert netif.named_interface({"HOROVOD_GLOO_IFACE": "nope,eth0"}, IFACES) == "eth0"
    assert netif.named_interface({}, IFACES) is None


def test_candidate_addresses():
    assert netif.candidate_addresses("ib0", IFACES) == ["192.168.7.5"]
    assert netif.candidate_addresses(None, IFACES) == ["10.0.0.5", "192.168.7.5"]
    assert netif.candidate_addresses("missing", IFACES) == ["10.0.0.5", "192.168.7.5"]
    assert netif.candidate_addresses(None, {"lo": ["127.0.0.1"]}) == ["127.0.0.1"]


def resolver(table):
    def resolve(name):
        if name not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return table[name]
    return resolve


def test_hostname_is_usable():
    resolve = resolver({"good": ["10.0.0.5"], "debian": ["127.0.1.1"], "mixed": ["127.0.0.1", "10.0.0.5"]})
    assert netif.hostname_is_usable("good", resolve) is None
    assert netif.hostname_is_usable("mixed", resolve) is None
    assert netif.hostname_is_usable("debian", resolve) == "this host's name debian resolves to loopback (127.0.1.1)"
    assert "this host's name ghost does not resolve" in netif.hostname_is_usable("ghost", resolve)


def test_gloo_interface_is_chosen_only_when_the_host_name_is_loopback(monkeypatch):
    routes = {"10.0.0.1": "eth0", "192.0.2.1": "ib0"}
    monkeypatch.setattr(netif, "route_interface", lambda addr, found=None: routes.get(addr))
    resolve = resolver({"node2": ["127.0.1.1"], "node1": ["10.0.0.1"], "good": ["10.0.0.5"], "me": ["127.0.1.1"]})

    def choose(master, env=None, host="node2"):
        return netif.choose_gloo_interface(master, env or {}, host, resolve, IFACES)

    assert choose("node1") == ("eth0", "this host's name node2 resolves to loopback (127.0.1.1)")
    assert choose("node1", host="good") is None  # Gloo binds to the host name's address itself
    assert choose("node1", {"GLOO_SOCKET_IFNAME": "ib0"}) is None  # named: left alone
    assert choose("me")[0] == "ib0"  # rank 0's own host: the default route's interface
    assert choose("ghost", host="ghost")[0] == "ib0"  # nothing resolves: the default route's
    monkeypatch.setattr(netif, "route_interface", lambda addr, found=None: None)
    assert choose("node1")[0] == "eth0"  # no route at all: the first interface outside loopback


def test_route_interface_finds_loopback_for_a_local_address():
    assert netif.route_interface("127.0.0.1") == "lo"


# ---- recipe keys and the job script

@pytest.mark.parametrize("sets,key", [
    (["dist.timeout_seconds=2"], "dist.timeout_seconds"),
    (["dist.timeout_seconds=true"], "dist.timeout_seconds"),
    (["cluster.network_interface=eth0;reboot"], "cluster.network_interface"),
    (["cluster.network_interface=eth0@if5"], "cluster.network_interface"),
    (["cluster.network_interface=a_name_too_long_x"], "cluster.network_interface"),
])
def test_recipe_keys_are_validated(tmp_path, sets, key):
    from tsmtrain.recipe import load_recipe

    path = tiny_recipe(tmp_path / "r.yaml", tmp_path, "r")
    with pytest.raises(UserError) as err:
        load_recipe(path, sets, check_files=False)
    assert [p.key for p in err.value.problems] == [key], err.value.problems


def test_recipe_keys_defaults_and_values(tmp_path):
    from tsmtrain.recipe import load_recipe

    path = tiny_recipe(tmp_path / "r.yaml", tmp_path, "r")
    r = load_recipe(path, [], check_files=False)
    assert r.dist.timeout_seconds == 30 and r.cluster.network_interface is None
    r = load_recipe(path, ["dist.timeout_seconds=60", "cluster.network_interface=ib0"], check_files=False)
    assert r.dist.timeout_seconds == 60 and r.cluster.network_interface == "ib0"


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_job_script_exports_the_network_interface(tmp_path, launcher):
    from tsmtrain.dist.slurm import prepare_job, render_sbatch
    from tsmtrain.recipe import load_recipe

    path = tiny_recipe(tmp_path / "r.yaml", tmp_path, "r", dist={"engine": "ddp"})
    plain = render_sbatch(prepare_job(load_recipe(path, [f"cluster.launcher={launcher}"], check_files=False)))
    assert "IFNAME" not in plain and "if_include" not in plain
    text = render_sbatch(prepare_job(load_recipe(path, [f"cluster.launcher={launcher}", "cluster.nodes=2",
                                                        "cluster.network_interface=ib0"], check_files=False)))
    assert "export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0\n" in text
    assert "export HOROVOD_GLOO_IFACE=ib0\n" in text
    assert "export OMPI_MCA_btl_tcp_if_include=ib0 OMPI_MCA_oob_tcp_if_include=ib0\n" in text
    assert text.index("GLOO_SOCKET_IFNAME=ib0") < text.index(" -m tsmtrain run ")
    over = render_sbatch(prepare_job(load_recipe(path, ["cluster.network_interface=ib0",
                                                        "cluster.env={GLOO_SOCKET_IFNAME: eth1}"], check_files=False)))
    assert over.index("GLOO_SOCKET_IFNAME=ib0") < over.index("export GLOO_SOCKET_IFNAME=eth1")  # cluster.env wins
    if launcher == "mpirun":  # mpirun passes on only what -x names (OMPI_MCA_* it reads itself)
        assert "-x GLOO_SOCKET_IFNAME -x NCCL_SOCKET_IFNAME -x HOROVOD_GLOO_IFACE" in text
    env = {"PATH": os.environ["PATH"]}
    check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr


# ---- end to end: a rank of `tsmtrain run --np 2` stopped mid-run

def _below(pid):
    """The ``python -m tsmtrain`` processes under ``pid`` (ranks and their loader workers)."""
    import psutil

    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.cmdline()[1:3] == ["-m", "tsmtrain"]:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _rank_process(procs, variable, rank):
    """The rank ``rank`` itself among ``procs`` (its loader workers share its environment)."""
    import psutil

    for proc in procs:
        try:
            if proc.environ().get(variable) == str(rank) and proc.parent().cmdline()[1:3] != ["-m", "tsmtrain"]:
                return proc
        except psutil.Error:
            pass
    return None


def _alive(proc):
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.parametrize("engine,variable", [("ddp", "RANK"), ("horovod", "HOROVOD_RANK")])
def test_a_stopped_rank_ends_the_job_and_the_next_start_resumes(tmp_path, tiny_demo, engine, variable):
    """Rank 1 frozen (SIGSTOP, as a node whose link went down) after the first checkpoint: rank 0
    names it after dist.timeout_seconds and ends the job, the launcher ends the rest, nothing is
    left running, and the same command resumes from the last checkpoint to the end. (10 s, not
    the minimum 5: on a machine whose two cores several test runs share, a rank's process was
    once not scheduled for 5 s during its start.)"""
    from tests.conftest import steps_logged
    from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint

    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "lost", schedule={"epochs": 2},
                         dist={"engine": engine, "np": 2, "timeout_seconds": 10})
    run_dir = tmp_path / "runs" / "lost"
    cmd = [sys.executable, "-m", "tsmtrain", "run", str(recipe)]
    proc = subprocess.Popen(cmd, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)
    seen, frozen = [], None
    try:
        assert wait_for(lambda: latest_checkpoint(run_dir) is not None and steps_logged(run_dir) > 6
                        or proc.poll() is not None, 300)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        seen = _below(proc.pid)
        frozen = _rank_process(seen, variable, 1)
        assert frozen is not None, [p.cmdline() for p in seen]
        frozen.suspend()  # SIGSTOP
        # once rank 0 has named it, let the frozen rank run again, so that the launcher's SIGTERM
        # ends it at once instead of after the grace period before SIGKILL (torchrun's is 30 s)
        train_log = run_dir / "train.log"
        wait_for(lambda: " lost: " in train_log.read_text() or proc.poll() is not None, 120)
        frozen.resume()
        out, _ = proc.communicate(timeout=300)  # ends: it does not hang in the allreduce
    finally:
        for p in seen:
            if _alive(p):
                p.kill()
        if proc.poll() is None:
            proc.kill()
    host = socket.gethostname()
    assert proc.returncode not in (0, None), out[-3000:]
    assert f"tsmtrain: world size 2 on 1 host: ranks 0-1 {host}" in out
    lost = [line[line.index("tsmtrain: "):] for line in out.splitlines() if " lost: " in line]  # ([0]<stderr>: horovodrun's)
    assert len(lost) == 1, out[-3000:]
    assert lost[0].startswith(f"tsmtrain: rank 1 on host {host} lost: no heartbeat for 10 s (last seen at step ")
    assert lost[0] in (run_dir / "train.log").read_text()
    assert [p.pid for p in seen if _alive(p)] == []  # no rank, and no loader worker, left running

    state = load_checkpoint(latest_checkpoint(run_dir))
    again = subprocess.run(cmd, env=venv_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {state['step']}" in again.stderr
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 2 * 6


def test_ddp_sets_the_chosen_interface_and_says_so(monkeypatch, capsys):
    from tsmtrain.dist import ddp

    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(netif, "choose_gloo_interface",
                        lambda addr: ("eth0", "this host's name node2 resolves to loopback (127.0.1.1)"))
    ddp._choose_interface("node1", cuda=True)
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "eth0"
    err = capsys.readouterr().err
    assert err.startswith("tsmtrain: this host's name node2 resolves to loopback (127.0.1.1), so Gloo would bind")
    assert "GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME=eth0 (the interface that reaches rank 0 at node1;" in err
    monkeypatch.setattr(netif, "choose_gloo_interface", lambda addr: None)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    ddp._choose_interface("node1", cuda=False)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0" and capsys.readouterr().err == ""


def test_rank_0_watches_more_ranks_than_select_could():
    """1,100 ranks (sockets above descriptor 1023, which select() cannot watch) connect at once,
    say hello and are watched; one of them closing without a goodbye is reported by its rank."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2400:
        pytest.skip(f"this process may open {hard} files; the test needs 2,400")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2400), hard))
    lost = []
    dog = Watchdog.listen("node1", 60.0, ["127.0.0.1"], on_lost=lost.append)
    socks = []
    try:
        for rank in range(1, 1101):
            s = socket.create_connection(("127.0.0.1", dog.port))
            s.sendall(json.dumps({"t": "hello", "rank": rank, "host": f"n{rank}", "token": dog.token}).encode() + b"\n")
            socks.append(s)
        assert wait_for(lambda: sum(p.rank is not None for p in dog.peers) == 1100, 60)
        socks.pop().close()  # rank 1100, on the highest descriptor
        assert wait_for(lambda: lost, 30)
        assert lost[0].startswith(f"tsmtrain: rank 1100 on host n1100 lost: {CLOSED}")
    finally:
        for s in socks:
            s.close()
        dog.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_stalled_watchdog_thread_does_not_blame_its_peers(monkeypatch):
    """Rank 0's own thread not scheduled for longer than the timeout (a loaded machine): the
    heartbeats that arrived meanwhile are read before anyone is judged silent, and nothing is
    reported."""
    import tsmtrain.dist.watchdog as wd

    lost = []
    zero = Watchdog.listen("node1", 2.0, ["127.0.0.1"], interval_s=0.2, on_lost=lost.append)
    one = Watchdog.connect(1, "node2", zero.contact(), 30.0, interval_s=0.2, on_lost=lost.append)
    assert wait_for(lambda: any(p.rank == 1 for p in zero.peers), 10)
    readable, stalled = wd._readable, []

    def stall_once(watched, timeout_s):  # not scheduled after its poll returned: the heartbeats wait unread
        ready = readable(watched, timeout_s)
        if threading.current_thread().name == "tsmtrain-watchdog-0" and not stalled and not ready:
            stalled.append(True)
            time.sleep(3.0)
        return ready

    monkeypatch.setattr(wd, "_readable", stall_once)
    assert wait_for(lambda: stalled, 10)
    time.sleep(4.0)
    one.stop()
    zero.stop()
    assert lost == []
