"""Launching a cluster and watching it: the Python API behind `pvcluster up`, also used by test scripts.

with Cluster.start(load_spec(path)) as cluster:
    final = cluster.wait()           # until every domain has shut down, crashed, or the cluster idles
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvcluster import launch
from pvcluster.control import ControlClient, ControlError, read_hypervisor_info
from pvcluster.spec import ClusterSpec, DomainSpec

FINAL_STATES = frozenset({"dead", "crashed"})
START_TIMEOUT_S = 30.0


class ClusterError(Exception):
    pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Cluster:
    def __init__(
        self, spec: ClusterSpec, run_dir: Path, proc: subprocess.Popen[bytes] | None, client: ControlClient
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.proc = proc
        self.client = client
        self.started_wall = time.monotonic()

    @classmethod
    def start(
        cls,
        spec: ClusterSpec,
        *,
        run_dir: Path | None = None,
        detach: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> Cluster:
        say = progress or (lambda _msg: None)
        run_dir = (run_dir or spec.resolved_run_dir()).absolute()
        info = read_hypervisor_info(run_dir)
        if info is not None:
            raise ClusterError(
                f"a cluster is already running in {run_dir} (hypervisor pid {info['pid']}); "
                f"stop it with `pvcluster down --run-dir {run_dir}`"
            )
        for stale in ("trace", "logs", "hypervisor.json", "bus.sock", "control.sock"):
            p = run_dir / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
        say(f"starting the hypervisor in {run_dir}")
        argv = launch.python_module_argv(
            "hypervisor", "--spec-json", str(run_dir / "spec.json"), "--run-dir", str(run_dir)
        )
        hv_log = run_dir / "logs" / "hypervisor.log"
        proc = launch.spawn(argv, log=hv_log, detached=detach)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (info := read_hypervisor_info(run_dir)) is None or info["pid"] != proc.pid:
            if proc.poll() is not None:
                raise ClusterError(
                    f"the hypervisor exited with code {proc.returncode} while starting:\n{_tail(hv_log)}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise ClusterError(f"the hypervisor did not come up within {START_TIMEOUT_S:.0f} s:\n{_tail(hv_log)}")
            time.sleep(0.02)
        cluster = cls(spec, run_dir, proc, ControlClient(info["control"]))
        try:
            for dom in spec.domains:
                created = cluster.client.call("create", domain=_domain_dict(dom))
                say(
                    f"created domain {created['domid']} ({dom.name}): {dom.vcpus} vcpus, kernel {dom.kernel}, "
                    f"backend {dom.backend}, boot {dom.boot}"
                )
        except ControlError as exc:
            cluster.down()
            raise ClusterError(f"creating domains failed: {exc}") from None
        return cluster

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.call("status")
        return data

    def wait(
        self,
        *,
        timeout_s: float = 600.0,
        poll_s: float = 0.05,
        on_status: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until every domain is dead or crashed, or the cluster is idle; return the last status."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(
                    f"the hypervisor exited with code {self.proc.returncode}:\n"
                    f"{_tail(self.run_dir / 'logs' / 'hypervisor.log')}"
                )
            st = self.status()
            if on_status is not None:
                on_status(st)
            states = [d["state"] for d in st["domains"]]
            if states and (all(s in FINAL_STATES for s in states) or st["idle"]):
                return st
            if time.monotonic() > deadline:
                raise ClusterError(f"the cluster did not finish within {timeout_s:.0f} s (states: {states})")
            time.sleep(poll_s)

    def down(self, timeout_s: float = 20.0) -> None:
        """Destroy every domain and stop the hypervisor; kill it if it does not go in time."""
        if self.proc is not None and self.proc.poll() is not None:
            return
        try:
            self.client.call("down", timeout_s=timeout_s)
        except ControlError:
            pass  # an unresponsive hypervisor is signalled and then killed below
        finally:
            self.client.close()
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started_wall


def _domain_dict(dom: DomainSpec) -> dict[str, Any]:
    """The ``create`` command's ``domain`` argument: every key of the domain's spec, cpus and faults included."""
    return dom.to_dict()
