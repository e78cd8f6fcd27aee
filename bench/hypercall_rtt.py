"""Hypercall round trip (guest `int 0x82` to result in EAX) beside a raw pyzmq ping-pong, measured in one run.

The ping-pong is two processes and a DEALER/ROUTER pair over ipc://, the same transport the bus uses: the floor a
hypercall that crosses the bus cannot beat. The hypercall figure comes from a one-vCPU guest making 2000
back-to-back XENVER_version calls; each one is one conductor window (hypervisor -> domain -> hypervisor).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import zmq

from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

ROUNDS = 2000


def _echo(endpoint: str, rounds: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    s.send(b"ready")
    for _ in range(rounds):
        s.send(s.recv())
    s.close()
    ctx.term()


def zmq_pingpong_us(rounds: int = ROUNDS) -> float:
    with tempfile.TemporaryDirectory(prefix="pvb-") as d:
        ctx = zmq.Context()
        r = ctx.socket(zmq.ROUTER)
        endpoint = f"ipc://{d}/pp.sock"
        r.bind(endpoint)
        proc = mp.get_context("spawn").Process(target=_echo, args=(endpoint, rounds))
        proc.start()
        ident, _ = r.recv_multipart()
        payload = b"x" * 64
        t0 = time.perf_counter()
        for _ in range(rounds):
            r.send_multipart([ident, payload])
            r.recv_multipart()
        dt = time.perf_counter() - t0
        proc.join()
        r.close()
        ctx.term()
    return dt / rounds * 1e6


SPEC = """
[cluster]
name = "bench"
[[domain]]
name = "bench"
vcpus = 1
cmdline = "workload=hcbench shutdown=poweroff"
"""


def hypercall_rtt_us() -> tuple[float, float, int]:
    """(median wall us per hypercall, mean, count) from the hypervisor trace of one benchmark run."""
    with tempfile.TemporaryDirectory(prefix="pvb-") as d:
        run_dir = Path(d)
        with Cluster.start(parse_spec(SPEC), run_dir=run_dir) as cluster:
            final = cluster.wait(timeout_s=300)
        assert final["domains"][0]["shutdown_reason"] == "poweroff", final
        walls = [
            e["wall_ns"]
            for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
            if e["event"] == "hypercall" and e["name"] == "xen_version"
        ]
    gaps = [(b - a) / 1000 for a, b in zip(walls, walls[1:], strict=False)]
    return statistics.median(gaps), statistics.fmean(gaps), len(walls)


def main() -> None:
    pp = zmq_pingpong_us()
    med, mean, n = hypercall_rtt_us()
    pp2 = zmq_pingpong_us()
    floor = min(pp, pp2)
    print("hypercall round trip vs raw pyzmq ping-pong (wall clock, one run)")
    print(f"  pyzmq DEALER/ROUTER ping-pong, ipc, 2 processes: {pp:8.1f} us / {pp2:8.1f} us (before / after)")
    print(f"  hypercall int 0x82 -> result, {n} calls:         {med:8.1f} us median, {mean:8.1f} us mean")
    print(f"  ratio hypercall / ping-pong:                     {med / floor:8.2f}x")


if __name__ == "__main__":
    main()
