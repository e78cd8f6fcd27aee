"""``pvcluster trace --plot``: the four figures, from a hand-made analysis (fast) and from a real run (slow)."""

from __future__ import annotations

import importlib.util
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pvcluster.trace.plots import FILES, write_plots
from pvcluster.trace.records import Record, RunState

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the plot extra (matplotlib) is not installed")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _check_pngs(paths: list[Path], out: Path) -> None:
    assert [p.name for p in paths] == list(FILES)
    for p in paths:
        assert p.parent == out
        width, height = _png_size(p)
        assert 400 <= width <= 2000 and 300 <= height <= 1500, (p.name, width, height)
        assert 5_000 < p.stat().st_size < 500_000, (p.name, p.stat().st_size)


class _FakeRun:
    """What write_plots needs of a Run: records(), here a domain's run states around one shootdown."""

    def __init__(self, records: list[Record]) -> None:
        self._records = records

    def records(self) -> Iterator[Record]:
        return iter(self._records)


def _state(vt: int, vcpu: int, state: str, previous: str, pcpu: int | None) -> RunState:
    return RunState(vt, "hypervisor", 1, vcpu, state, previous, 0, "test", pcpu)


def _fake() -> tuple[_FakeRun, Any]:
    components = ("initiator", "initiator_preempted", "hypercall", "wait_pcpu", "delivery", "handler", "ack")
    slowest = SimpleNamespace(
        dom=1, name="alpha", mode="native", round=7, initiator=0, start_ns=100_000, end_ns=160_000,
        targets=(1, 2), preempted=1, messages=2, hypercalls=0,
        breakdown=dict.fromkeys(components, 0) | {"wait_pcpu": 50_000, "handler": 10_000},
        critical_target=1, sends=((1, 101_000), (2, 101_500)), flushes=((1, 150_000), (2, 104_000)),
        vcpu_states=(SimpleNamespace(vcpu=0, at_start="running", changes=()),
                     SimpleNamespace(vcpu=1, at_start="runnable", changes=((148_000, "running"),)),
                     SimpleNamespace(vcpu=2, at_start="running", changes=())),
        latency_ns=60_000,
    )
    records: list[Record] = [
        _state(0, 0, "running", "runnable", 0), _state(0, 2, "running", "runnable", 1),
        _state(0, 1, "runnable", "offline", None), _state(90_000, 2, "blocked", "running", None),
        _state(102_000, 2, "running", "blocked", 1), _state(148_000, 1, "running", "runnable", 1),
        _state(149_000, 2, "runnable", "running", None), _state(400_000, 0, "blocked", "running", None),
    ]
    lat_native = [5_000 + 997 * i % 20_000 for i in range(40)] + [60_000]
    lat_pv = [2_000 + 131 * i % 1_500 for i in range(40)]
    analysis = SimpleNamespace(
        shootdowns=[], slowest=[slowest], end_vt_ns=500_000,
        latencies={"native": lat_native, "pv": lat_pv},
        by_targets={("native", 2): lat_native, ("pv", 1): lat_pv[:20], ("pv", 2): lat_pv[20:]},
        breakdown_ns={"native": {"initiator": 40_000, "wait_pcpu": 300_000, "delivery": 41_000, "handler": 80_000,
                                 "ack": 20_000},
                      "pv": {"initiator": 30_000, "hypercall": 50_000}},
    )
    return _FakeRun(records), analysis


@needs_matplotlib
def test_plots_from_a_hand_made_analysis_are_pngs_and_deterministic(tmp_path: Path) -> None:
    run, analysis = _fake()
    first = write_plots(run, analysis, tmp_path / "a")  # type: ignore[arg-type]
    _check_pngs(first, tmp_path / "a")
    again = write_plots(run, analysis, tmp_path / "b")  # type: ignore[arg-type]
    for p, q in zip(first, again, strict=True):
        assert p.read_bytes() == q.read_bytes(), f"{p.name} differs between two writes of one analysis"


@needs_matplotlib
@pytest.mark.parametrize("keep", ["nothing", "no slowest"])
def test_every_figure_is_written_even_with_nothing_to_draw(tmp_path: Path, keep: str) -> None:
    """A run without shootdowns, or an analysis that kept no slowest one (--slowest 0): four PNGs all the same."""
    if keep == "nothing":
        run, analysis = _FakeRun([]), SimpleNamespace(shootdowns=[], slowest=[], latencies={}, by_targets={},
                                                      breakdown_ns={}, end_vt_ns=0)
    else:
        run, analysis = _fake()
        analysis.slowest = []
    paths = write_plots(run, analysis, tmp_path)  # type: ignore[arg-type]
    assert [p.name for p in paths] == list(FILES)
    for p in paths:
        _png_size(p)


def test_missing_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run, analysis = _fake()
    with pytest.raises(RuntimeError, match=r"pip install 'pvcluster\[plot\]'"):
        write_plots(run, analysis, tmp_path)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


@needs_matplotlib
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plots_of_a_real_default_cluster(cluster: Any, tmp_path: Path) -> None:
    from pvcluster.trace import load

    cluster.wait(timeout_s=120)
    run = load(cluster.run_dir)
    analysis = run.analyse(slowest=3)
    assert analysis.slowest, "the default cluster's workload runs shootdowns"
    out = tmp_path / "plots"
    _check_pngs(write_plots(run, analysis, out), out)
