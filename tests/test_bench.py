"""The benchmark suite's frame (bench/): its command line and the JSON document it writes, from stubbed
measurements. Nothing here times anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/__main__.py: bench/ is a directory of the checkout, not an installed package."""
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.__main__ as main

    return main


def test_help_lists_every_section() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for name in ("mips", "rtt", "ping", "slowdown", "scale", "pvops", "multicall", "--only", "--quick", "--json"):
        assert name in out


def _stubs(bench: ModuleType) -> dict[str, Any]:
    from bench.suite import Section, Target

    def good(opts: Any, say: Any) -> Section:
        return Section("good", "a measured section", headers=["x", "y"], rows=[["a", "1"]], data={"y": 1},
                       targets=[Target("fast enough", 1.0, "s", "<=", 3.0), Target("slow", 5.0, "x", "<=", 2.0)])

    def absent(opts: Any, say: Any) -> Section:
        return Section("absent", "a module not written yet", status="not available",
                       targets=[Target("unmeasured", None, "x", ">=", 0.5, "not available")])

    def broken(opts: Any, say: Any) -> Section:
        raise RuntimeError("the cluster fell over")

    return {"good": good, "absent": absent, "broken": broken}


def test_the_json_document_has_every_key_from_stubbed_measurements(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.suite import Options

    out = tmp_path / "bench.json"
    rc = bench.run(Options(only=("good", "absent", "broken")), _stubs(bench), str(out))
    assert rc == 1  # a section failed: the others still ran and were reported
    doc = json.loads(out.read_text())
    assert {"machine", "options", "sections", "targets"} <= doc.keys()
    assert {"cpu", "cores", "python", "unicorn", "pyzmq"} <= doc["machine"].keys()
    assert {k: v["status"] for k, v in doc["sections"].items()} == {
        "good": "ok", "absent": "not available", "broken": "error"}
    assert "the cluster fell over" in doc["sections"]["broken"]["note"]
    assert doc["sections"]["good"]["data"] == {"y": 1}
    assert [(t["section"], t["what"], t["pass"]) for t in doc["targets"]] == [
        ("good", "fast enough", True), ("good", "slow", False), ("absent", "unmeasured", None)]
    printed = capsys.readouterr().out
    assert "MISS" in printed and "pass" in printed and "not available" in printed


def test_json_to_stdout_is_one_document(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.suite import Options

    assert bench.run(Options(only=("good",)), _stubs(bench), "-") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sections"]["good"]["status"] == "ok"
    assert "a measured section" in captured.err  # the tables went to stderr


def test_only_and_quick_choose_sections_and_sizes(bench: ModuleType) -> None:
    args = bench.build_parser().parse_args(["--only", "scale,ping", "--quick", "--scale-vcpus", "4"])
    opts = bench.options(args)
    assert opts.only == ("ping", "scale")  # suite order
    assert (opts.ping_rounds, opts.scale_domains, opts.scale_vcpus) == (1000, (1, 2, 4), (4,))
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--only", "nosuch"])
