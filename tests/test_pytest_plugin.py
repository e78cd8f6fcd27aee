"""The pytest plugin: the ``cluster`` fixture and its marker, ``assert_clean``, and the failure report section.

The plugin is exercised the way a user meets it, through pytester runs of small test files; those that start a
hypervisor are ``slow`` and keep to tiny clusters (a 1-vCPU domain that powers off at once, ~2 s a launch). The
inner runs load the plugin with ``-p`` and disable entry-point autoloading: with the package installed, the
``pvcluster`` entry point would otherwise register the same module a second time, which pluggy refuses.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from runfiles import clean_run

from pvcluster.pytest_plugin import _run_dir, assert_clean, log_tails, spec_for
from pvcluster.spec import SpecError, load_spec

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "test_faults_example.py"
TINY = 'spec={"domain": [{"name": "tiny", "cmdline": "shutdown=poweroff"}]}'


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.Pytester]:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    yield pytester


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pvcluster.pytest_plugin", "-p", "no:cacheprovider", *args)


# -- packaging and docs --------------------------------------------------------------------------------------------


def test_the_readme_shows_the_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Testing with pytest\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert EXAMPLE.read_text() in blocks
    assert readme.index("\n## Testing with pytest\n") < readme.index("\n## Layout\n")


def test_pyproject_registers_the_plugin_keeps_pytest_optional_and_collects_the_examples() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {"pvcluster": "pvcluster.pytest_plugin"}
    assert not any(dep.startswith("pytest") for dep in project["project"]["dependencies"])
    assert any(re.match(r"pytest\b", dep) for dep in project["project"]["optional-dependencies"]["dev"])
    assert "examples" in project["tool"]["pytest"]["ini_options"]["testpaths"]


def test_no_pvcluster_module_but_the_plugin_imports_pytest() -> None:
    code = (
        "import pkgutil, sys, pvcluster\n"
        "for m in pkgutil.walk_packages(pvcluster.__path__, 'pvcluster.'):\n"
        "    if m.name != 'pvcluster.pytest_plugin':\n"
        "        __import__(m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'pytest' or n.startswith(('_pytest', 'pluggy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# -- the spec a marker asks for (no processes) ---------------------------------------------------------------------


def test_no_marker_is_the_default_spec_and_seed_overrides_it(tmp_path: Path) -> None:
    assert spec_for(tmp_path) == load_spec()
    seeded = spec_for(tmp_path, kwargs={"seed": 42})
    assert seeded.cluster.seed == 42 and seeded.domains == load_spec().domains


def test_an_inline_spec_gets_defaults_and_kernel_paths_from_the_test_directory(tmp_path: Path) -> None:
    (tmp_path / "guest.elf").write_bytes(b"\x7fELF")  # the spec checks it is a readable file, not what is in it
    raw = {"domain": [{"name": "a", "cmdline": "workload=shootdown shutdown=poweroff"},
                      {"name": "b", "kernel": "guest.elf"}]}
    spec = spec_for(tmp_path, kwargs={"spec": raw})
    assert spec.hypervisor == load_spec().hypervisor and spec.bus == load_spec().bus
    assert [(d.name, d.backend, d.kernel) for d in spec.domains] == [
        ("a", "xen", "pvkern"), ("b", "xen", str(tmp_path / "guest.elf"))]
    assert raw["domain"][1]["kernel"] == "guest.elf"  # the marker's dict is shared: not changed in place


def test_a_spec_file_is_found_from_the_test_directory(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "one.toml").write_text('[cluster]\nseed = 5\n[[domain]]\nname = "solo"\n')
    spec = spec_for(tmp_path, kwargs={"spec": "specs/one.toml"})
    assert (spec.cluster.seed, [d.name for d in spec.domains]) == (5, ["solo"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"spec": {"domain": [{"name": "a", "vcpus": 0}]}}, "domain[0].vcpus: must be an integer between 1 and 32"),
    ({"spec": "missing.toml"}, "spec file not found"),
    ({"spec": 3}, "spec must be a file path, a dict in the TOML layout or a ClusterSpec, got int"),
    ({"start": False}, "unknown keyword start (takes: spec, seed)"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_a_bad_marker_says_what_is_wrong(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((SpecError, ValueError)) as info:
        spec_for(tmp_path, kwargs=kwargs)
    assert message in str(info.value)


def test_the_marker_takes_keywords_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"keyword arguments only \(spec, seed\), got 1 positional"):
        spec_for(tmp_path, ("specs/one.toml",))


def test_a_bad_inline_spec_fails_the_test_with_the_spec_errors_only(inner: pytest.Pytester) -> None:
    inner.makepyfile("""
        import pytest

        @pytest.mark.pvcluster(spec={"domain": [{"name": "a", "backend": "xenn"}], "bus": {"port": 70000}})
        def test_bad(cluster):
            pass
    """)
    result = _run(inner)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "invalid cluster spec <pvcluster marker of test_bad>:" in out
    assert "domain[0].backend: must be one of" in out and "(did you mean 'xen'?)" in out
    assert "bus.port: must be an integer between 0 and 65534" in out
    assert "Traceback" not in out and "pytest_plugin.py" not in out and "During handling" not in out
    errors = out.split("short test summary info")[0]  # pytest's summary repeats the message, as for any error
    assert errors.count("bus.port: must be") == 1
    assert "- pvcluster -" not in out  # nothing was started, so there is no run to report


# -- helpers (no processes) ----------------------------------------------------------------------------------------


def test_log_tails_hypervisor_first_then_domains_by_id(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "hypervisor.log").write_text("".join(f"hv line {i}\n" for i in range(1, 26)))
    (logs / "dom10-ten.log").write_text("ten\n")
    (logs / "dom2-two.log").write_text("two: " + "x" * 1000 + "\n")
    (logs / "dom1-one.log").write_text("")
    text = log_tails(tmp_path)
    heads = [line for line in text.splitlines() if line.startswith("---")]
    assert heads == ["--- logs/hypervisor.log (last 20 of 25 lines) ---", "--- logs/dom1-one.log: empty",
                     "--- logs/dom2-two.log (all 1 lines) ---", "--- logs/dom10-ten.log (all 1 lines) ---"]
    assert "hv line 5\n" not in text and "hv line 6\n" in text and "hv line 25\n" in text
    assert "two: " + "x" * 395 + " [...]\n" in text
    assert log_tails(tmp_path / "nowhere") == "no process logs (the hypervisor was not started)\n"


def test_a_run_directory_too_deep_for_ipc_sockets_is_reached_through_a_short_symlink(tmp_path: Path) -> None:
    spec = load_spec()
    start, files = _run_dir(tmp_path, spec)
    assert start == files == tmp_path / "pvcluster" and files.is_dir()
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    start, files = _run_dir(deep, spec)
    try:
        assert files == deep / "pvcluster" and files.is_dir()
        assert start.is_symlink() and start.resolve() == files.resolve() and len(str(start / "control.sock")) < 100
    finally:
        start.unlink()
        start.parent.rmdir()


def test_assert_clean_passes_a_clean_run_and_fails_with_the_report(tmp_path: Path) -> None:
    assert_clean(clean_run(tmp_path / "clean").write())
    run = clean_run(tmp_path / "stale")
    run.shootdown(1, 2, 900_000, stale=True)
    with pytest.raises(pytest.fail.Exception) as info:
        assert_clean(run.write())
    assert "check: FAIL: 1 violations" in str(info.value) and "stale-tlb-read" in str(info.value)
    with pytest.raises(pytest.fail.Exception, match="cannot check the run in"):
        assert_clean(tmp_path / "nothing")


# -- real clusters -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_spec_file_cluster_runs_and_a_failing_test_reports_its_run_and_logs(inner: pytest.Pytester) -> None:
    """Also through the short symlink: the base directory is too deep for the ipc:// socket paths."""
    basetemp = inner.path / ("deep" * 20)
    inner.mkdir("specs")
    (inner.path / "specs" / "tiny.toml").write_text(
        '[cluster]\nname = "fromfile"\nrun_dir = "/nonexistent/never-used"\n'
        '[[domain]]\nname = "filedom"\ncmdline = "shutdown=poweroff"\n')
    inner.makepyfile(f"""
        import pytest

        @pytest.mark.pvcluster(spec="specs/tiny.toml", seed=9)
        def test_from_file(cluster, tmp_path):
            (tmp_path / "started-in").write_text(str(cluster.run_dir))
            assert cluster.run_dir.resolve() == (tmp_path / "pvcluster").resolve() != cluster.run_dir
            assert (cluster.spec.cluster.name, cluster.spec.cluster.seed) == ("fromfile", 9)
            final = cluster.wait(timeout_s=60)
            assert [(d["name"], d["state"]) for d in final["domains"]] == [("filedom", "dead")]

        @pytest.mark.pvcluster({TINY})
        def test_fails(cluster):
            cluster.wait(timeout_s=60)
            assert False, "the test's own failure"
    """)
    result = _run(inner, "-v", f"--basetemp={basetemp}")
    result.assert_outcomes(passed=1, failed=1)
    started_in = Path((basetemp / "test_from_file0" / "started-in").read_text())
    assert not started_in.exists() and not started_in.parent.exists()  # the symlink went at teardown
    out = result.stdout.str()
    assert out.count("- pvcluster -") == 1
    section = out.split("- pvcluster -", 1)[1]
    match = re.search(r"^run directory: (\S+)$", section, re.M)
    assert match is not None, section
    run_dir = Path(match.group(1))
    assert run_dir == basetemp / "test_fails0" / "pvcluster"
    assert "--- logs/hypervisor.log" in section and "--- logs/dom1-tiny.log" in section
    assert "the test's own failure" in out
    # the cluster was brought down after the failure: the hypervisor wrote its last line and left
    assert not (run_dir / "hypervisor.json").exists()
    assert (run_dir / "logs" / "hypervisor.log").read_text().strip().endswith("hypervisor: stopped")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_cluster_that_fails_to_start_is_reported_with_the_hypervisor_log(inner: pytest.Pytester) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        inner.makepyfile(f"""
            import pytest

            @pytest.mark.pvcluster(spec={{"bus": {{"transport": "tcp", "port": {port}}}, "domain": [{{"name": "a"}}]}})
            def test_never_starts(cluster):
                pass
        """)
        result = _run(inner)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "the cluster did not start: the hypervisor exited with code 1 while starting" in out
    assert "During handling" not in out
    section = out.split("- pvcluster -", 1)[1]
    assert "run directory: " in section and "--- logs/hypervisor.log" in section
    assert "Address already in use" in section
