"""The network-namespace lab (tests/netns.py): hosts with separate stacks joined by a bridge, and nothing left behind
after the lab, whether its body or its own set-up failed. Skipped where namespaces cannot be made (not root...)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import Host, NetnsError, NetnsLab, cleanup_stale, exec_prefix, netns_lab, netns_unavailable

ROOT = Path(__file__).resolve().parent.parent

# Listens on the given address and on 127.0.0.1, same port (printed); answers each connection with what it got and
# the peer's address.
SERVER = r"""
import socket, sys, threading
a = socket.create_server((sys.argv[1], 0))
port = a.getsockname()[1]
b = socket.create_server(("127.0.0.1", port))
print(port, flush=True)
def serve(srv):
    while True:
        c, peer = srv.accept()
        with c:
            c.sendall(b"echo " + c.recv(100) + b" from " + peer[0].encode())
threading.Thread(target=serve, args=(b,), daemon=True).start()
serve(a)
"""

CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as c:
        c.sendall(b"hi")
        print(c.recv(100).decode())
except ConnectionRefusedError:
    print("refused")
"""


@pytest.fixture(autouse=True)
def _need_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


def listed() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def lab_names(lab: NetnsLab) -> set[str]:
    return {lab.bridge_ns, *(h.name for h in lab.hosts)}


def connect(lab: NetnsLab, host: Host | int, addr: str, port: int) -> str:
    out = lab.run(host, [sys.executable, "-I", "-c", CLIENT, addr, str(port)], capture_output=True, text=True,
                  timeout=15, check=True)
    return out.stdout.strip()


def test_hosts_talk_tcp_over_the_bridge_and_have_their_own_loopback() -> None:
    with netns_lab(3) as lab:
        h0, h1, h2 = lab.hosts
        assert len({h.name for h in lab.hosts}) == 3 and len({h.addr for h in lab.hosts}) == 3
        assert [h.addr.rsplit(".", 1)[0] for h in lab.hosts] == [lab.subnet] * 3
        server = lab.popen(h0, [sys.executable, "-I", "-c", SERVER, h0.addr], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        port = int(server.stdout.readline())

        assert connect(lab, 2, h0.addr, port) == f"echo hi from {h2.addr}"
        assert connect(lab, h1, h0.addr, port) == f"echo hi from {h1.addr}"
        # Host 0's own loopback has the server; host 1's loopback is another one, where nothing listens.
        assert connect(lab, 0, "127.0.0.1", port) == "echo hi from 127.0.0.1"
        assert connect(lab, 1, "127.0.0.1", port) == "refused"
    assert server.returncode is not None


def test_processes_get_the_callers_cwd_env_and_python(tmp_path: Path) -> None:
    env = {**os.environ, "PVC_NETNS_CHECK": "passed-through"}
    probe = "import os, sys; print(os.getcwd()); print(os.environ['PVC_NETNS_CHECK']); print(sys.prefix)"
    with netns_lab(1) as lab:
        out = lab.run(0, [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                      timeout=30, check=True)
        assert out.stdout.splitlines() == [str(tmp_path), "passed-through", sys.prefix]
        # The project's own modules, as the multi-host tests will start them.
        helped = lab.run(0, [sys.executable, "-m", "hypervisor", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
        assert helped.returncode == 0, helped.stderr
        assert "usage" in helped.stdout
        net = lab.run(0, ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
        assert f"{lab.hosts[0].addr}/24" in net and "eth0" in net


def test_exit_kills_every_process_and_deletes_every_namespace() -> None:
    lab = netns_lab(2, term_grace=0.5)
    with lab:
        names = lab_names(lab)
        assert names <= listed()
        sleeper = lab.popen(0, ["sleep", "60"])
        stubborn = lab.popen(1, [sys.executable, "-I", "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                                 "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        # A grandchild in a session of its own: out of reach of the lab's process-group kill, not of its namespace.
        shell = lab.popen(1, ["sh", "-c", "setsid sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        assert shell.stdout is not None
        stray = int(shell.stdout.readline())
        assert not gone(stray)
    assert sleeper.returncode == -15
    assert stubborn.returncode == -9
    assert shell.returncode is not None
    assert gone(stray)
    assert not names & listed()
    lab.close()  # idempotent


def test_a_body_that_raises_still_cleans_up() -> None:
    lab = netns_lab(2)
    with pytest.raises(RuntimeError, match="test body failed"):
        with lab:
            names = lab_names(lab)
            proc = lab.popen(1, ["sleep", "60"])
            raise RuntimeError("test body failed")
    assert proc.returncode is not None
    assert not names & listed()


def test_a_setup_failing_half_way_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = netns_lab(3)
    made_before_failure: set[str] = set()
    add_host = NetnsLab._add_host

    def fail_at_second_host(self: NetnsLab, host: object) -> None:
        if getattr(host, "index", None) == 1:
            made_before_failure.update(listed() & lab_names(lab))
            raise NetnsError("injected failure")
        add_host(self, host)  # type: ignore[arg-type]

    monkeypatch.setattr(NetnsLab, "_add_host", fail_at_second_host)
    with pytest.raises(NetnsError, match="injected failure"):
        with lab:
            pytest.fail("the body must not run")
    assert made_before_failure == {lab.bridge_ns, lab.hosts[0].name}
    assert not lab_names(lab) & listed()


def test_two_labs_coexist() -> None:
    with netns_lab(2) as a, netns_lab(2) as b:
        assert not lab_names(a) & lab_names(b)
        assert a.subnet != b.subnet
        # Separate bridges: a's host 0 does not reach b's hosts.
        probe = ("import socket, sys\ns = socket.socket(); s.settimeout(0.3)\n"
                 "try:\n    s.connect((sys.argv[1], 9))\nexcept ConnectionRefusedError:\n    print('reached')\n"
                 "except OSError:\n    print('unreachable')\n")
        out = a.run(0, [sys.executable, "-I", "-c", probe, b.hosts[1].addr], capture_output=True, text=True,
                    timeout=15, check=True)
        assert out.stdout.strip() == "unreachable"


def test_cleanup_stale_removes_namespaces_of_dead_processes() -> None:
    prefix = f"pvcstale{os.getpid()}"  # of this run only: a concurrent run's cleanup_stale must not see these
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{prefix}-{dead.pid}-beef-0"
    reused = f"{prefix}-{os.getpid()}-beef-1"  # this process's pid, but no lab of this process has that tag
    live = f"{prefix}-1-beef-0"  # pid 1 exists
    try:
        for name in (stale, reused, live):
            subprocess.run(["ip", "netns", "add", name], check=True)
        left_running = subprocess.Popen([*exec_prefix(stale), "sleep", "60"])
        # only once it is inside the namespace can the cleanup find it there (nsenter may still be starting)
        deadline = time.monotonic() + 30
        while str(left_running.pid) not in subprocess.run(["ip", "netns", "pids", stale], capture_output=True,
                                                           text=True).stdout.split():
            assert time.monotonic() < deadline, "the process never entered the namespace"
            time.sleep(0.02)
        assert cleanup_stale(prefix) == sorted([stale, reused])
        assert left_running.wait(timeout=10) == -9
        names = listed()
        assert stale not in names and reused not in names
        assert live in names
        assert cleanup_stale(prefix) == []
    finally:
        for name in (stale, reused, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
