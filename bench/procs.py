"""Memory of a process tree, from /proc (Linux): what `pvcluster up` and every process under it hold.

No psutil: the figures are two lines of /proc each. A process that exits between the walk and the read counts 0.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import attrs

PROC = Path("/proc")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's: a child belongs to the thread that forked it)."""
    out: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def _field_kib(path: Path, name: str) -> int:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS): shared library pages count in every process that maps them."""
    return _field_kib(PROC / str(pid) / "status", "VmRSS:")


def pss_kib(pid: int) -> int:
    """Proportional set size: each shared page divided among its sharers, so a sum over processes is honest."""
    return _field_kib(PROC / str(pid) / "smaps_rollup", "Pss:")


def role(pid: int) -> str:
    """"hypervisor", "domain" or "toolstack", from the command line the cluster launched it with."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    module = argv[argv.index(b"-m") + 1] if b"-m" in argv[:-1] else b""
    return {b"hypervisor": "hypervisor", b"domains": "domain"}.get(module, "toolstack")


@attrs.define
class MemoryPeak:
    """Peaks over the samples of a process tree: of the sums (what the whole cluster held at one time) and of each
    process on its own."""

    rss_kib: int = 0  # peak of the sum of VmRSS over every process of the tree
    pss_kib: int = 0  # peak of the sum of Pss
    cluster_rss_kib: int = 0  # the same without the toolstack: hypervisor and domain processes only
    samples: int = 0
    per_process_kib: dict[int, tuple[str, int]] = attrs.Factory(dict)  # pid -> (role, peak VmRSS)

    def add_sample(self, pid: int) -> None:
        total = pss = cluster = 0
        for p in tree(pid):
            rss = rss_kib(p)
            if rss == 0:
                continue
            kind = self.per_process_kib[p][0] if p in self.per_process_kib else role(p)
            total += rss
            pss += pss_kib(p)
            cluster += rss if kind != "toolstack" else 0
            self.per_process_kib[p] = (kind, max(rss, self.per_process_kib.get(p, (kind, 0))[1]))
        self.rss_kib = max(self.rss_kib, total)
        self.pss_kib = max(self.pss_kib, pss)
        self.cluster_rss_kib = max(self.cluster_rss_kib, cluster)
        self.samples += 1

    def peak_by_role(self) -> dict[str, int]:
        """The largest single process of each role (KiB)."""
        out: dict[str, int] = {}
        for kind, rss in self.per_process_kib.values():
            out[kind] = max(out.get(kind, 0), rss)
        return out


class Sampler:
    """Samples a process tree every ``interval_s`` on a thread of its own until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        if PROC.is_dir() and os.path.exists(PROC / str(self.pid)):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak.add_sample(self.pid)
            self._stop.wait(self.interval_s)
