"""The ``pvcluster`` pytest plugin: a ``cluster`` fixture, a ``pvcluster`` marker, and run logs in failure reports.

PYTEST_DONT_REWRITE: nothing here relies on rewritten asserts, and marking the module keeps pytest from warning
that it cannot rewrite it when a test module imported it (``assert_clean``) before ``-p`` asked for it.

Installed as the ``pvcluster`` entry point of the ``pytest11`` group, so pytest loads it by itself; nothing else in
pvcluster imports this module (or pytest), so pytest stays a dev dependency. A test asks for a cluster by name::

    @pytest.mark.pvcluster(spec={"domain": [{"name": "web", "vcpus": 2, "cmdline": "workload=shootdown"}]}, seed=7)
    def test_something(cluster: Cluster) -> None:
        cluster.inject("preempt", "web.1", duration_ns=50_000)
        assert cluster.wait()["domains"][0]["state"] == "dead"
        assert_clean(cluster)

Design:

* One cluster per test, started before the test body and always brought down after it, however the test ends. The
  fixture is function-scoped on purpose: a cluster's trace is the record of one test's run, and sharing a cluster
  would make one test's faults part of another's evidence.
* The run directory is the test's own, under ``tmp_path``; the spec's ``cluster.run_dir`` is never used, so tests
  cannot collide with each other or with a cluster started by hand, and pytest keeps the directories of recent
  sessions for a post-mortem (``pvcluster check --run-dir``, ``pvcluster up --replay``).
* Problems in the marker (a spec that does not validate, an unknown keyword, a bad seed) fail the test with the
  plain message, never a traceback through the plugin: the message is what the user must fix.
* A failure report gets a ``pvcluster`` section with the run directory and the tail of every process log, also when
  the cluster failed to start (the run directory is known before the hypervisor is launched).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest

from pvcluster.bus.endpoints import Endpoints
from pvcluster.check import check_run, format_report
from pvcluster.cluster import Cluster, ClusterError
from pvcluster.spec import BUILTIN_KERNELS, ClusterSpec, SpecError, load_spec

__all__ = ["LOG_TAIL_LINES", "MARKER", "assert_clean", "failure_section", "log_tails", "spec_for"]

MARKER = "pvcluster"
MARKER_HELP = (
    "pvcluster(spec=None, seed=None): the cluster the `cluster` fixture starts. spec: a TOML file (relative to the "
    "test file's directory), a dict in the TOML layout, or a ClusterSpec; none = the embedded default spec. seed: "
    "overrides cluster.seed."
)
MARKER_KWARGS = ("spec", "seed")
LOG_TAIL_LINES = 20
# A log line longer than this is cut in the report: one runaway line must not bury the others.
LOG_LINE_MAX = 400
# Only the end of a log is read: a chatty process must not make every failure report slow.
LOG_TAIL_BYTES = 64 * 1024

# Where the fixture put the current test's cluster files, for the report hook. Set before the cluster is started,
# so a cluster that fails to start is still reported.
RUN_DIR_KEY = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


# -- the spec a test asks for --------------------------------------------------------------------------------------


def spec_for(base_dir: Path, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, *,
             source: str = "<pvcluster marker>") -> ClusterSpec:
    """The spec a ``pvcluster`` marker with ``args`` and ``kwargs`` asks for (no marker: the default spec).

    Raises SpecError for a spec that does not validate and ValueError for a marker used wrongly (positional
    arguments, unknown keywords, a bad seed); the fixture turns both into a plain test failure. ``base_dir`` is
    where relative paths (the spec file, kernel files of an inline spec) are taken from: the test file's directory,
    so a test means the same files whatever directory pytest runs from. ``source`` names an inline spec in errors.
    """
    kwargs = kwargs or {}
    if args:
        raise ValueError(f"@pytest.mark.{MARKER} takes keyword arguments only ({', '.join(MARKER_KWARGS)}), "
                         f"got {len(args)} positional")
    unknown = sorted(set(kwargs) - set(MARKER_KWARGS))
    if unknown:
        raise ValueError(f"@pytest.mark.{MARKER}: unknown keyword {', '.join(unknown)} "
                         f"(takes: {', '.join(MARKER_KWARGS)})")
    raw = kwargs.get("spec")
    if raw is None:
        spec = load_spec()
    elif isinstance(raw, ClusterSpec):
        spec = raw
    elif isinstance(raw, str | os.PathLike):
        spec = load_spec(base_dir / Path(raw))  # an absolute path stays as it is
    elif isinstance(raw, Mapping):
        spec = ClusterSpec.from_dict({"source": source, **_kernels_from(raw, base_dir)})
    else:
        raise ValueError(f"@pytest.mark.{MARKER}: spec must be a file path, a dict in the TOML layout or a "
                         f"ClusterSpec, got {type(raw).__name__}")
    seed = kwargs.get("seed")
    if seed is None:
        return spec
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"@pytest.mark.{MARKER}: seed must be an integer >= 0, got {seed!r}")
    return attrs.evolve(spec, cluster=attrs.evolve(spec.cluster, seed=seed))


def _kernels_from(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """``data`` with relative kernel paths made absolute against ``base_dir``.

    ClusterSpec.from_dict resolves them against the working directory (it exists to re-read a spec that crossed a
    process boundary, whose paths are absolute already); a spec written in a test file means the test's directory,
    as a spec file means its own. Copies only what it changes: the marker's dict is shared by every test it marks.
    Anything malformed is left for from_dict to report.
    """
    domains = data.get("domain")
    if not isinstance(domains, list | tuple):
        return dict(data)
    fixed: list[Any] = []
    for dom in domains:
        kernel = dom.get("kernel") if isinstance(dom, Mapping) else None
        if (isinstance(kernel, str) and kernel.strip() and kernel not in BUILTIN_KERNELS
                and not kernel.startswith("~") and not Path(kernel).is_absolute()):
            dom = {**dom, "kernel": str(base_dir / kernel)}
        fixed.append(dom)
    return {**data, "domain": fixed}


# -- the fixture ---------------------------------------------------------------------------------------------------


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A started :class:`~pvcluster.cluster.Cluster` of the spec the test's ``pvcluster`` marker names (the default
    spec without one), in its own run directory under ``tmp_path``; brought down after the test, whatever happens.

    Everything a test does with it is the ``Cluster`` API: ``inject``, ``faults``, ``events``, ``wait_for``,
    ``wait``, ``status``, ``client.call``; ``assert_clean`` checks the run's invariants.
    """
    item = request.node
    marker = item.get_closest_marker(MARKER)  # a function's own marker wins over its class's and module's
    try:
        spec = spec_for(request.path.parent, marker.args if marker else (), marker.kwargs if marker else None,
                        source=f"<{MARKER} marker of {item.name}>")
    except (SpecError, ValueError) as exc:
        _fail(str(exc))
    start_dir, files = _run_dir(tmp_path, spec)
    item.stash[RUN_DIR_KEY] = files
    try:
        try:
            started = Cluster.start(spec, run_dir=start_dir)
        except ClusterError as exc:
            _fail(f"the cluster did not start: {exc}")
        try:
            yield started
        finally:
            started.down()
    finally:
        if start_dir != files:
            shutil.rmtree(start_dir.parent, ignore_errors=True)  # only the short symlink's directory


def _run_dir(tmp_path: Path, spec: ClusterSpec) -> tuple[Path, Path]:
    """(the run directory the cluster is started in, where its files are).

    The files always go under ``tmp_path``. An ipc:// socket path must fit in sockaddr_un, though, and a deep
    ``tmp_path`` (a long TMPDIR, pytester's nested base directories) may not leave room: then the cluster is
    started through a short symlink in the system temp directory, removed at teardown, while the files stay under
    ``tmp_path`` with the test's other files. ``Endpoints.for_spec`` is the hypervisor's own check, so the two
    cannot disagree about what fits.
    """
    files = tmp_path / "pvcluster"
    files.mkdir(mode=0o700)  # as `up` makes a run directory: claim_run_dir adopts an empty one as it is
    try:
        Endpoints.for_spec(spec, files)
    except ValueError:
        link = Path(tempfile.mkdtemp(prefix="pvc-")) / "run"
        link.symlink_to(files, target_is_directory=True)
        return link, files
    return files, files


# -- checking a run ------------------------------------------------------------------------------------------------


def assert_clean(run: Cluster | Path) -> None:
    """Fail the test, with the checker's report, unless the run keeps every invariant ``pvcluster check`` checks
    (no stale TLB read, every event delivered once, every hypercall answered once, effects applied, faults traced).

    Call it after ``cluster.wait()``: on a live cluster the checker excuses what has not happened yet. Takes a
    ``Cluster`` or a run directory. Unreadable traces are a failure too, with the checker's reason.
    """
    run_dir = run.run_dir if isinstance(run, Cluster) else Path(run)
    try:
        report = check_run(run_dir)
    except (OSError, ValueError) as exc:
        _fail(f"cannot check the run in {run_dir}: {exc}")
    if not report.ok:
        _fail(f"the run in {run_dir} broke invariants\n{format_report(report)}")


def _fail(message: str) -> NoReturn:
    """Fail the test with ``message`` alone: no traceback (the message is what to fix, the plugin's frames are
    noise), and no "during handling of the above exception" copy of the exception it was made from."""
    raise pytest.fail.Exception(message, pytrace=False) from None


# -- failure reports -----------------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """On a failed setup or call of a test that used the ``cluster`` fixture, add a ``pvcluster`` section: the run
    directory and the last lines of every process log. (Teardown is left alone: by then the cluster is down and a
    teardown failure is the fixture's own, with its own message.)"""
    report: pytest.TestReport = yield
    run_dir = item.stash.get(RUN_DIR_KEY, None)
    if run_dir is not None and report.failed and report.when in ("setup", "call"):
        report.sections.append((MARKER, failure_section(run_dir)))
    return report


def failure_section(run_dir: Path) -> str:
    return (f"run directory: {run_dir}\n"
            f"  (traces in trace/; `pvcluster check --run-dir {run_dir}` checks them)\n"
            + log_tails(run_dir))


def log_tails(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of each process log in ``run_dir/logs``: the hypervisor's first, then the domains'
    in domain-id order."""
    logs = run_dir / "logs"
    paths = sorted(logs.glob("*.log"), key=_log_order) if logs.is_dir() else []
    if not paths:
        return "no process logs (the hypervisor was not started)\n"
    return "".join(_tail_block(p, lines) for p in paths)


def _log_order(path: Path) -> tuple[int, int, str]:
    if path.name == "hypervisor.log":
        return (0, 0, "")
    domid, _, _ = path.stem.removeprefix("dom").partition("-")
    return (1, int(domid), path.name) if domid.isdigit() else (2, 0, path.name)


def _tail_block(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"--- logs/{path.name}: unreadable ({exc.strerror or exc})\n"
    all_lines = text.splitlines()
    if size > LOG_TAIL_BYTES:
        all_lines = all_lines[1:]  # the first line read is likely cut
    if not all_lines:
        return f"--- logs/{path.name}: empty\n"
    tail = [ln if len(ln) <= LOG_LINE_MAX else ln[:LOG_LINE_MAX] + " [...]" for ln in all_lines[-lines:]]
    if size > LOG_TAIL_BYTES:
        shown = f"last {len(tail)} lines"
    elif len(all_lines) > len(tail):
        shown = f"last {len(tail)} of {len(all_lines)} lines"
    else:
        shown = f"all {len(tail)} lines"
    return f"--- logs/{path.name} ({shown}) ---\n" + "".join(f"{ln}\n" for ln in tail)
