"""A network-namespace "lab" for multi-host tests on one machine: N hosts, each its own network namespace with its
own loopback and one veth link ("eth0") to a bridge, so processes in different hosts talk tcp as if on separate
machines on one LAN.

    from netns import NetnsLab, netns_unavailable

    with NetnsLab(3) as lab:
        server = lab.popen(0, [sys.executable, "-m", "hypervisor", ...])      # in host 0's namespace
        lab.run(2, [sys.executable, "-c", "..."], check=True, timeout=10)     # in host 2's
        lab.hosts[0].addr                                                     # "10.x.y.1"

In a test, ``netns_lab(n)`` (a plain function, not a fixture) skips the test with the reason when this machine
cannot make namespaces (not root, no ``ip``...) and otherwise returns an un-entered lab:

    from netns import netns_lab

    def test_something() -> None:
        with netns_lab(3) as lab:
            ...

Layout (nothing is added to the machine's root network namespace, so its routes and links are untouched, and two
labs never share a link or an address space): the bridge ``br0`` lives in its own namespace ``PREFIX-PID-TAG-br``;
host i is namespace ``PREFIX-PID-TAG-i`` whose ``eth0`` (address ``10.X.Y.(i+1)/24``) is a veth whose peer ``p<i>``
is a port of ``br0``. PID is the creating process's and TAG a random hex tag, so namespaces left behind by a process
that died without cleaning up are recognised and removed (``cleanup_stale``) by the next lab.

Processes run through ``nsenter --net=/run/netns/NS`` (or ``ip netns exec NS`` without nsenter): only the network
namespace changes; the filesystem, working directory, environment and user are the caller's, so
``sys.executable -m ...`` of the project works the same inside.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts named namespaces (iproute2's default)

_CAP_SYS_ADMIN = 21


class NetnsError(RuntimeError):
    """An ``ip`` command of the lab failed."""


@dataclass(frozen=True)
class Host:
    index: int
    name: str  # the network namespace's name (under /run/netns)
    addr: str  # IPv4 address of its eth0, on the lab's /24
    ifname: str = "eth0"


# --------------------------------------------------------------------------------------------------------------------
# ip / probing


@functools.cache
def _ip_path() -> str | None:
    found = shutil.which("ip")
    if found:
        return found
    for cand in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):  # root's PATH may lack sbin
        if os.access(cand, os.X_OK):
            return cand
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = _ip_path()
    if ip is None:
        raise NetnsError("`ip` (iproute2) is not installed")
    proc = subprocess.run([ip, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc


def _has_cap_sys_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


@functools.cache
def _nsenter_path() -> str | None:
    return shutil.which("nsenter")


def exec_prefix(ns: str) -> list[str]:
    """The argv prefix that runs a command in network namespace ``ns`` (only the network namespace changes)."""
    nsenter = _nsenter_path()
    if nsenter:
        return [nsenter, f"--net={NETNS_DIR / ns}", "--"]
    ip = _ip_path()
    if ip is None:
        raise NetnsError("neither nsenter nor `ip` is installed")
    return [ip, "netns", "exec", ns]


@functools.cache
def netns_unavailable() -> str | None:
    """None if this process can create network namespaces with a bridge and veth links in them and run a process
    inside one; else the reason to skip with. Probed once per process (a namespace made and deleted at once)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if not _has_cap_sys_admin():
        return "creating network namespaces needs root (CAP_SYS_ADMIN)"
    if _ip_path() is None:
        return "`ip` (iproute2) is not installed"
    name = f"pvc-{os.getpid()}-{secrets.token_hex(2)}-probe"
    try:
        _ip("netns", "add", name)
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        return f"cannot create a network namespace: {e}"
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
        _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _ip("-n", name, "link", "set", "p0", "master", "br0")
        inside = subprocess.run([*exec_prefix(name), sys.executable, "-I", "-c", "pass"], capture_output=True,
                                text=True, timeout=30, stdin=subprocess.DEVNULL)
        if inside.returncode != 0:
            return f"cannot run a process in a network namespace: {inside.stderr.strip()}"
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        return f"cannot set up links in a network namespace: {e}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


# --------------------------------------------------------------------------------------------------------------------
# namespaces and the processes in them


def _ns_pids(ns: str) -> list[int]:
    """Pids of the live (non-zombie) processes whose network namespace is ``ns`` (like `ip netns pids`)."""
    try:
        st = os.stat(NETNS_DIR / ns)
    except OSError:
        return []
    key = (st.st_dev, st.st_ino)
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            pst = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, or a zombie (which holds no namespace)
            continue
        if (pst.st_dev, pst.st_ino) == key:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    """True if ``pid`` is a process that has not exited (a zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_processes(ns: str, timeout: float = 2.0) -> list[int]:
    """SIGKILL every process in namespace ``ns`` (strays a lab did not start itself: daemonised grandchildren, or the
    processes of a dead lab) and wait, up to ``timeout``, for them to exit; return the pids still alive."""
    pids = _ns_pids(ns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if pids:
            time.sleep(0.01)
    return pids


def _delete_ns(ns: str) -> str | None:
    """Kill what runs in ``ns`` and delete it (its links go with it); None on success, else what went wrong."""
    if not (NETNS_DIR / ns).exists():
        return None
    left = _kill_ns_processes(ns)
    proc = _ip("netns", "del", ns, check=False)
    if proc.returncode != 0 and (NETNS_DIR / ns).exists():
        return f"{ns}: ip netns del: {proc.stderr.strip()}"
    if left:
        return f"{ns}: processes {left} survived SIGKILL"
    return None


_NAME_RE = r"^{prefix}-(?P<pid>\d+)-(?P<tag>[0-9a-f]+)-(?P<part>\w+)$"
_LIVE: dict[str, NetnsLab] = {}  # tag -> this process's labs that are set up (or being set up)
_LIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False
_SEQ = itertools.count()


def cleanup_stale(prefix: str = "pvc") -> list[str]:
    """Delete the namespaces left over by labs (``PREFIX-PID-TAG-...``) whose process died without cleaning up: the
    PID no longer exists, or it is this process but no lab of this process has that TAG (a reused pid). Processes
    still running in them are killed. Returns the names deleted. Called by ``NetnsLab.__enter__``. (Pids are read in
    this process's pid namespace: labs of processes in other pid namespaces sharing /run/netns would look dead.)"""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []
    pattern = re.compile(_NAME_RE.format(prefix=re.escape(prefix)))
    me = os.getpid()
    with _LIVE_LOCK:
        live_tags = set(_LIVE)
    removed = []
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        pid, tag = int(m["pid"]), m["tag"]
        if pid == me:
            if tag in live_tags or m["part"] == "probe":
                continue
        elif _pid_exists(pid):
            continue
        if _delete_ns(name) is None:
            removed.append(name)
    return removed


def _cleanup_live_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE.values())
    for lab in labs:
        lab.close()


# --------------------------------------------------------------------------------------------------------------------
# the lab


class NetnsLab:
    """``hosts`` network namespaces joined by a bridge (see the module's docstring). A context manager: ``__enter__``
    builds it (and deletes stale labs' namespaces first), ``__exit__`` kills every process started through
    ``popen``/``run`` and anything else still running in its namespaces, and deletes the namespaces, even when the
    body, or ``__enter__`` half way, raised. An atexit handler closes labs a crashed test left open."""

    BRIDGE = "br0"

    def __init__(self, hosts: int, *, prefix: str = "pvc", term_grace: float = 1.0,
                 reach_timeout: float = 5.0) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be 1..250, not {hosts}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
            raise ValueError(f"prefix must be letters, digits or _, not {prefix!r}")
        self.n_hosts = hosts
        self.prefix = prefix
        self.term_grace = term_grace
        self.reach_timeout = reach_timeout
        pid = os.getpid()
        self.tag = secrets.token_hex(2)
        base = f"{prefix}-{pid}-{self.tag}"
        # A /24 in 10.200.0.0-10.255.255.0 picked from the pid and a per-process counter: each lab's bridge is in its
        # own namespace, so labs cannot clash anyway; distinct subnets keep addresses telling in logs.
        n = (pid * 8 + next(_SEQ)) % (56 * 256)
        self.subnet = f"10.{200 + n // 256}.{n % 256}"
        self.bridge_ns = f"{base}-br"
        self.hosts: list[Host] = [Host(i, f"{base}-{i}", f"{self.subnet}.{i + 1}") for i in range(hosts)]
        self._made: list[str] = []  # namespaces created so far, in order
        self._procs: list[tuple[subprocess.Popen[Any], bool]] = []  # (process, has its own process group)
        self._lock = threading.Lock()
        self._open = False

    def __repr__(self) -> str:
        return f"NetnsLab({self.n_hosts} hosts, {self.subnet}.0/24, {self.bridge_ns}, open={self._open})"

    # -- set-up / tear-down ----------------------------------------------------------------------------------------

    def __enter__(self) -> NetnsLab:
        global _ATEXIT_REGISTERED
        if self._open:
            raise RuntimeError("lab already entered")
        with _LIVE_LOCK:
            _LIVE[self.tag] = self
            if not _ATEXIT_REGISTERED:
                atexit.register(_cleanup_live_labs)
                _ATEXIT_REGISTERED = True
        self._open = True
        try:
            cleanup_stale(self.prefix)
            self._add_bridge()
            for host in self.hosts:
                self._add_host(host)
            self._check_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        problems = self.close()
        if problems and exc is None:
            raise NetnsError("lab cleanup left things behind: " + "; ".join(problems))

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _add_bridge(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _ip("-n", br, "link", "add", self.BRIDGE, "type", "bridge")  # STP off: ports forward as soon as they are up
        _ip("-n", br, "link", "set", self.BRIDGE, "up")

    def _add_host(self, host: Host) -> None:
        self._add_ns(host.name)
        port = f"p{host.index}"
        _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", host.ifname,
            "netns", host.name)
        _ip("-n", self.bridge_ns, "link", "set", port, "master", self.BRIDGE, "up")
        _ip("-n", host.name, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
        _ip("-n", host.name, "link", "set", host.ifname, "up")

    def _check_reachable(self) -> None:
        """Host 0 reaches every other host: a TCP connect to a closed port answered by a reset (or accepted) proves
        the round trip; a timeout or unreachable does not. Retried until ``reach_timeout`` (links come up async)."""
        targets = [h.addr for h in self.hosts[1:]]
        if not targets:
            return
        script = (
            "import socket, sys, time\n"
            "deadline = time.monotonic() + float(sys.argv[1])\n"
            "for addr in sys.argv[2:]:\n"
            "    while True:\n"
            "        s = socket.socket()\n"
            "        s.settimeout(0.5)\n"
            "        try:\n"
            "            s.connect((addr, 9))\n"
            "            break\n"
            "        except ConnectionRefusedError:\n"
            "            break\n"
            "        except OSError as e:\n"
            "            if time.monotonic() > deadline:\n"
            "                sys.exit(f'{addr} unreachable: {e}')\n"
            "            time.sleep(0.02)\n"
            "        finally:\n"
            "            s.close()\n"
        )
        proc = self.run(0, [sys.executable, "-I", "-c", script, str(self.reach_timeout), *targets],
                        capture_output=True, text=True, timeout=self.reach_timeout + 30)
        if proc.returncode != 0:
            raise NetnsError(f"lab check: from {self.hosts[0].name} ({self.hosts[0].addr}): "
                             f"{proc.stderr.strip() or proc.returncode}")

    def close(self) -> list[str]:
        """Kill the lab's processes and delete its namespaces (idempotent; what ``__exit__`` does). Returns what
        could not be cleaned up (empty when all went)."""
        with self._lock:
            procs, self._procs = self._procs, []
            made, self._made = self._made, []
            self._open = False
        problems = self._stop(procs)
        for ns in reversed(made):  # hosts first, the bridge last
            try:
                err = _delete_ns(ns)
            except (OSError, subprocess.SubprocessError, NetnsError) as e:
                err = f"{ns}: {e}"
            if err:
                problems.append(err)
        with _LIVE_LOCK:
            if _LIVE.get(self.tag) is self:
                del _LIVE[self.tag]
        if problems:
            warnings.warn(f"{self!r}: " + "; ".join(problems), RuntimeWarning, stacklevel=2)
        return problems

    def _stop(self, procs: list[tuple[subprocess.Popen[Any], bool]]) -> list[str]:
        """SIGTERM (whole process group where it has its own), up to ``term_grace`` seconds, then SIGKILL; reap."""
        def signal_all(sig: int) -> None:
            for proc, own_group in procs:
                # Only a leader not yet reaped: its pid (and so its group id) cannot have been reused. Whatever it
                # leaves behind in the lab's namespaces is killed when they are deleted.
                if proc.poll() is not None:
                    continue
                try:
                    if own_group:
                        os.killpg(proc.pid, sig)  # its children too; the leader may be gone, its group not
                    else:
                        proc.send_signal(sig)
                except OSError:
                    pass

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.term_grace
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        signal_all(signal.SIGKILL)
        problems = []
        for proc, _ in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {proc.pid} did not exit after SIGKILL")
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        return problems

    # -- running things in a host ----------------------------------------------------------------------------------

    def host(self, host: Host | int) -> Host:
        return self.hosts[host] if isinstance(host, int) else host

    def argv(self, host: Host | int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run in ``host``'s network namespace."""
        return [*exec_prefix(self.host(host).name), *argv]

    def popen(self, host: Host | int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(argv, **popen_kwargs)`` inside ``host``'s namespace (cwd, env and the other keyword
        arguments work as usual). The process gets its own session (``start_new_session=True`` unless given) so the
        lab's exit kills its children too; the lab remembers it and ``__exit__`` kills it if still running."""
        if not self._open:
            raise RuntimeError("the lab is not set up (use it inside `with`)")
        popen_kwargs.setdefault("start_new_session", True)
        own_group = bool(popen_kwargs["start_new_session"]) or popen_kwargs.get("process_group") == 0
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(host, argv), **popen_kwargs)
        with self._lock:
            self._procs.append((proc, own_group))
        return proc

    def run(self, host: Host | int, argv: Sequence[str], *, input: Any = None, timeout: float | None = None,
            check: bool = False, capture_output: bool = False, **popen_kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``host``'s namespace, through ``popen`` (so a run interrupted by an exception is
        still killed by the lab). On timeout the process group is killed and TimeoutExpired raised."""
        if input is not None:
            popen_kwargs.setdefault("stdin", subprocess.PIPE)
        if capture_output:
            popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
        full = self.argv(host, argv)
        proc = self.popen(host, argv, **popen_kwargs)
        with proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_one(proc)
                proc.communicate()
                raise
            except BaseException:
                self._kill_one(proc)
                raise
        with self._lock:
            self._procs = [(p, g) for p, g in self._procs if p is not proc]
        result = subprocess.CompletedProcess(full, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def _kill_one(self, proc: subprocess.Popen[Any]) -> None:
        own_group = next((g for p, g in self._procs if p is proc), False)
        try:
            if own_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------------------------
# pytest


def netns_lab(hosts: int, **kwargs: Any) -> NetnsLab:
    """An un-entered ``NetnsLab(hosts, **kwargs)``, or skip the calling test with the reason this machine cannot
    make network namespaces. Use as ``with netns_lab(3) as lab: ...``; the probe runs on the first call, not at
    import."""
    import pytest

    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    return NetnsLab(hosts, **kwargs)
