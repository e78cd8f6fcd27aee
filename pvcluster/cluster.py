"""Launching a cluster and watching it: the Python API behind `pvcluster up`, also used by test scripts.

with Cluster.start(load_spec(path)) as cluster:
    final = cluster.wait()           # until every domain has shut down, crashed, or the cluster idles
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvcluster import faults, launch, runrecord
from pvcluster.control import ControlClient, ControlError, read_hypervisor_info
from pvcluster.keys import KeyStore, current_user
from pvcluster.spec import ClusterSpec, DomainSpec
from pvcluster.tracequery import TraceCursor, TraceQuery

FINAL_STATES = frozenset({"dead", "crashed"})
START_TIMEOUT_S = 30.0
# Written into every run directory `up` creates. Starting a run deletes the previous run's files (STALE), so a
# directory without the marker (a user's project, $HOME, ...) is never used: its logs/ or trace/ are not ours.
RUN_DIR_MARKER = ".pvcluster-run"
STALE = ("trace", "logs", "kernels", "hypervisor.json", "bus.sock", "control.sock", "run.json", "faults.jsonl",
         "replay-faults.json")


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
        if proc is not None:
            client.hypervisor_exited = lambda: proc.poll() is not None

    @classmethod
    def start(
        cls,
        spec: ClusterSpec,
        *,
        run_dir: Path | None = None,
        detach: bool = False,
        progress: Callable[[str], None] | None = None,
        replay: list[dict[str, Any]] | None = None,
        replayed_from: Path | None = None,
        restore: tuple[Path, dict[str, Any]] | None = None,
    ) -> Cluster:
        """Start the hypervisor in ``run_dir`` and create the spec's domains. ``replay``: recorded interactive
        faults (``runrecord.load_replay``) to act at the steps they acted at in the run ``replayed_from``.
        ``restore``: a save file and its image (``pvcluster.savefile.read``): the hypervisor continues the cluster
        saved there, its domains and all, instead of creating the spec's; restored into the directory it was saved
        from, the traces are cut back to where they were at the save, so they go on as the saved run's did."""
        say = progress or (lambda _msg: None)
        run_dir = (run_dir or spec.resolved_run_dir()).absolute()
        claim_run_dir(run_dir, spec.cluster.name)
        info = read_hypervisor_info(run_dir)
        if info is not None:
            raise ClusterError(
                f"a cluster is already running in {run_dir} (hypervisor pid {info['pid']}); "
                f"stop it with `pvcluster down --run-dir {run_dir}`"
            )
        if restore is not None and run_dir == Path(restore[1]["run_dir"]):
            _rewind_run(run_dir, restore[1])
        else:
            _remove_stale(run_dir)
        (run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
        try:
            runrecord.write_run_record(run_dir, spec, replayed_from)
        except OSError as exc:
            raise ClusterError(f"cannot record the run in {run_dir}: {exc}") from None
        prebuild_kernels(spec, say, run_dir)
        if spec.bus.transport == "tcp":
            ensure_keys(spec, run_dir, say)
        say(f"starting the hypervisor in {run_dir}")
        argv = launch.python_module_argv(
            "hypervisor", "--spec-json", str(run_dir / "spec.json"), "--run-dir", str(run_dir)
        )
        if replay:
            (run_dir / runrecord.REPLAY_INPUT).write_text(json.dumps(replay))
            argv += ["--replay", str(run_dir / runrecord.REPLAY_INPUT)]
        if restore is not None:
            argv += ["--restore", str(restore[0].absolute())]
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
        cluster = cls(spec, run_dir, proc, ControlClient.for_run_dir(run_dir))
        if restore is not None:
            say(f"restoring {restore[0]} (virtual time {restore[1]['vt_ns']} ns)")
            return cluster
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
        except BaseException:  # Ctrl-C while the domains are being created: nothing outlives the toolstack, and
            cluster.down()  # the control socket is closed (an open one would hold the interpreter's exit)
            raise
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
                if self.proc.returncode == 0:
                    raise ClusterError("the cluster was brought down before it finished (`pvcluster down`)")
                raise ClusterError(
                    f"the hypervisor exited with code {self.proc.returncode}:\n"
                    f"{_tail(self.run_dir / 'logs' / 'hypervisor.log')}"
                )
            try:
                st = self.status()
            except ControlError:
                if self.proc is not None and self.proc.poll() is not None:
                    continue  # stopped meanwhile (`pvcluster down` from elsewhere): said at the top of the loop
                raise
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

    # -- faults and trace conditions, for test scripts -------------------------------------------------------

    def inject(self, kind: str, target: str | int, *, at_ns: int | None = None, wait_s: float = 30.0,
               **params: int) -> dict[str, Any]:
        """Inject a fault (``pvcluster inject --help`` lists the kinds): ``target`` is a domain (name or id) or, for
        vCPU faults, ``"name.N"``. Without ``at_ns`` it acts at the next step; one that ends a domain (kill,
        crash, destroy) acts at once. Waits up to ``wait_s`` for it to act and returns its record (``outcome``
        says what it did; "planned" if it had not acted yet). FaultError for a request the catalog refuses (a kind that
        is not built in is the hypervisor's to check, against the kinds its extensions add: ``ControlError``)."""
        req = faults.checked_here(kind, str(target), at_ns, params)
        timeout = wait_s + 10.0
        record: dict[str, Any] = self.client.call("inject", timeout_s=timeout, kind=req.kind, target=req.target,
                                                  at_ns=req.at_ns, params=dict(req.params), wait_s=wait_s)
        return record

    def dump(self, dom: str | int, path: str | Path, *, force: bool = False,
             timeout_s: float = 120.0) -> dict[str, Any]:
        """Write the domain's ELF core to ``path`` (README "Dumps and the debugger"); what was written."""
        rec: dict[str, Any] = self.client.call("dump", timeout_s=timeout_s, dom=dom, path=str(Path(path).absolute()),
                                               force=force)
        return rec

    def gdb(self, dom: str | int, port: int = 0) -> int:
        """Have the hypervisor serve the GDB remote protocol for the domain on 127.0.0.1; the port."""
        return int(self.client.call("gdb", dom=dom, port=port)["port"])

    def faults(self) -> dict[str, Any]:
        """``{"done": [records of faults that acted], "pending": [...], "vt_ns": now}``."""
        data: dict[str, Any] = self.client.call("faults")
        return data

    def events(self, event: str | None = None, *, dom: str | int | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Trace events so far (from every process's trace), optionally only ``event`` about domain ``dom`` whose
        ``fields`` have the given values."""
        return list(TraceQuery(self.run_dir, event, self._domid(dom), fields).scan(TraceCursor()))

    def wait_for(self, event: str, *, dom: str | int | None = None, timeout_s: float = 60.0,
                 where: Callable[[dict[str, Any]], bool] | None = None, **fields: Any) -> dict[str, Any]:
        """Wait until a trace event ``event`` (about domain ``dom``, with ``fields``, and ``where(event)`` true)
        appears in any process's trace; return it. ClusterError after ``timeout_s`` wall seconds, or when the
        hypervisor exits first."""
        query = TraceQuery(self.run_dir, event, self._domid(dom), fields, where)
        cursor = TraceCursor()
        deadline = time.monotonic() + timeout_s
        while True:
            found = next(iter(query.scan(cursor)), None)
            if found is not None:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"the hypervisor exited (code {self.proc.returncode}) before {query}")
            if time.monotonic() > deadline:
                raise ClusterError(f"no {query} within {timeout_s:g} s; traces in {self.run_dir / 'trace'}")
            time.sleep(0.05)

    def _domid(self, dom: str | int | None) -> int | None:
        if dom is None or isinstance(dom, int):
            return dom
        if dom.isascii() and dom.isdigit():
            return int(dom)
        for d in self.client.call("list"):
            if d["name"] == dom:
                return int(d["domid"])
        raise ClusterError(f"no domain named {dom!r}")


def prebuild_kernels(spec: ClusterSpec, say: Callable[[str], None], run_dir: Path | None = None) -> None:
    """Put the spec's built-in kernels in the on-disk kernel cache, so that the domain processes, which start all at
    once, find them there and never load keystone; and in ``run_dir``/kernels, where the hypervisor reads the image
    it sends each domain in its Build (so a domain on another host needs no kernel of its own)."""
    # Imported here: the verbs that only talk to a running cluster need none of it.
    from domains.kernel.build import KernelBuildError, cached_kernel, cached_kernel_path

    for name in sorted({d.kernel for d in spec.domains if d.builtin_kernel}):
        path = cached_kernel_path(name)
        if path is None or not path.exists():
            say(f"assembling the built-in kernel {name}")
        try:
            image = cached_kernel(name)
        except KernelBuildError:
            continue  # each domain fails to build it again and reports the error as its own ("bad-builtin")
        if run_dir is not None:
            (run_dir / "kernels").mkdir(mode=0o700, exist_ok=True)
            (run_dir / "kernels" / f"{name}.elf").write_bytes(image)


def ensure_keys(spec: ClusterSpec, run_dir: Path, say: Callable[[str], None]) -> None:
    """On tcp the owner needs no set-up: the cluster's key pair, the invoking user's toolstack key and a key for
    every declared domain are created where missing (files 0600 in a 0700 directory)."""
    store = KeyStore(spec.keys_dir(run_dir))
    made = ["cluster"] if store.ensure_cluster() else []
    user = current_user()
    made += [f"toolstack-{user}"] if store.ensure_toolstack(user) else []
    made += [f"domain-{d.name}" for d in spec.domains if store.ensure_domain(d.name)]
    if made:
        say(f"created CurveZMQ keys in {store.directory}: {', '.join(made)}")


def _domain_dict(dom: DomainSpec) -> dict[str, Any]:
    """The ``create`` command's ``domain`` argument: every key of the domain's spec, cpus and faults included."""
    return dom.to_dict()


# ------------------------------------------------------------------------------------------ run directory


def claim_run_dir(run_dir: Path, cluster_name: str) -> None:
    """Make ``run_dir`` a run directory `up` may clear, or raise ClusterError without touching anything.

    A missing directory is created (mode 0700: traces and sockets are the user's alone) and an empty one is
    adopted; either gets the marker. An existing one must carry the marker of an earlier run and be ours.
    """
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(mode=0o700)
    except FileExistsError:
        _check_reusable(run_dir)
    except OSError as exc:
        raise ClusterError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from None
    else:
        run_dir.chmod(0o700)  # mkdir's mode passes through the umask
    if not _has_marker(run_dir):
        try:
            _write_marker(run_dir, cluster_name)
        except OSError as exc:
            raise ClusterError(f"cannot write {run_dir / RUN_DIR_MARKER}: {exc.strerror or exc}") from None


def _check_reusable(run_dir: Path) -> None:
    try:
        st = run_dir.stat()
        empty = stat.S_ISDIR(st.st_mode) and not any(os.scandir(run_dir))
    except OSError as exc:
        raise ClusterError(f"cannot use {run_dir} as the run directory: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ClusterError(f"cannot use {run_dir} as the run directory: it exists and is not a directory")
    if st.st_uid != os.geteuid():
        # e.g. planted in /tmp by another user, who could then read our traces and reach our sockets.
        raise ClusterError(
            f"refusing to use {run_dir} as the run directory: it belongs to uid {st.st_uid}, not to you"
        )
    if not empty and not _has_marker(run_dir):
        raise ClusterError(
            f"refusing to use {run_dir} as the run directory: it is not empty and has no {RUN_DIR_MARKER} file, "
            f"so `pvcluster up` did not create it, and starting a run there would delete its trace/ and logs/ "
            f"directories and its sockets. "
            f"Choose a new or empty directory (--run-dir, or cluster.run_dir in the spec); if it is a run directory "
            f"of an older pvcluster, delete it first"
        )


def _has_marker(run_dir: Path) -> bool:
    try:
        return stat.S_ISREG((run_dir / RUN_DIR_MARKER).lstat().st_mode)  # a symlink is not our marker
    except OSError:
        return False


def _write_marker(run_dir: Path, cluster_name: str) -> None:
    """A small TOML file saying what the directory is, so whoever finds it knows not to keep files in it."""
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    text = (
        "# pvcluster run directory, made by `pvcluster up`. Every `up` into it first deletes the previous run's\n"
        f"# {', '.join(STALE)}: keep nothing of yours in them.\n"
        f"cluster = {json.dumps(cluster_name)}\n"
        f"created = {created}\n"
    )
    tmp = run_dir / f"{RUN_DIR_MARKER}.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / RUN_DIR_MARKER)


def _rewind_run(run_dir: Path, image: dict[str, Any]) -> None:
    """A restore into the run directory it was saved from: the previous run's files go, except its traces and fault
    record, cut back to their sizes at the save (a trace file begun after it goes too)."""
    positions = image["traces"]
    for name in STALE:
        if name not in ("trace", "faults.jsonl"):
            p = run_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.is_symlink() or p.exists():
                p.unlink()
    trace = run_dir / "trace"
    if trace.is_dir() and not trace.is_symlink():
        for p in trace.iterdir():
            size = positions.get(p.name)
            if size is None or not p.is_file() or p.is_symlink():
                p.unlink()
            elif p.stat().st_size >= size:
                os.truncate(p, size)
    faults_file = run_dir / "faults.jsonl"
    if faults_file.is_file() and not faults_file.is_symlink() and faults_file.stat().st_size >= image["faults_bytes"]:
        os.truncate(faults_file, image["faults_bytes"])


def _remove_stale(run_dir: Path) -> None:
    """Delete the previous run's files; only called on a directory claim_run_dir accepted."""
    for name in STALE:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.is_symlink() or p.exists():
            p.unlink()
