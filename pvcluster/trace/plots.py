"""``pvcluster trace --plot DIR``: the analysis as PNG figures, one job per function.

* ``latency_cdf.png``: each design's shootdown latency CDF;
* ``latency_vs_targets.png``: latency against the number of vCPUs asked to flush, per design;
* ``breakdown.png``: where a design's mean shootdown goes (``COMPONENTS``), as stacked bars;
* ``slowest_timeline.png``: the run states of the slowest shootdown's domain around it, with its sends and flushes.

matplotlib is an optional dependency (the ``plot`` extra), imported only when figures are asked for. The figures
are drawn with matplotlib's object API on an Agg canvas (no pyplot: no global figure state, no GUI backend picked
from the environment) under matplotlib's default style (a user's matplotlibrc cannot change them), and saved
without the ``Software`` PNG tag, so one analysis gives the same bytes on every run with the same matplotlib.

Times are virtual: the axes say "virtual µs" so nobody reads them as wall-clock time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvcluster.trace.records import RunState
from pvcluster.trace.shootdowns import COMPONENTS, Shootdown

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

    from pvcluster.trace.analyse import Analysis
    from pvcluster.trace.run import Run

__all__ = ["FILES", "write_plots"]

FILES = ("latency_cdf.png", "latency_vs_targets.png", "breakdown.png", "slowest_timeline.png")
DPI = 100
# Known designs keep one colour in every figure (the order analyse names them in); others take the next free one.
_MODE_ORDER = ("native", "pv", "pv (vmi rom)", "cr3 (native)", "cr3 (xen)", "cr3 (vmi)")
_STATE_COLOURS = {"running": "#2ca02c", "runnable": "#ff7f0e", "blocked": "#7f9fbf", "offline": "#d0d0d0"}
# A latency spread wider than this (max / min) gets a log axis: one slow tail must not squash the rest to a line.
_LOG_SPREAD = 20.0
_INSTALL_HINT = "plotting needs matplotlib: pip install 'pvcluster[plot]'"


def write_plots(run: Run, analysis: Analysis, out_dir: Path) -> list[Path]:
    """Write the four figures (``FILES``) into ``out_dir`` (created if missing); the paths written.

    ``analysis`` must come from ``run`` (the timeline re-reads the run's run states around the slowest shootdown).
    A figure with nothing to show (a run without shootdowns) is still written, saying so, so a script that expects
    the four files finds them. Raises RuntimeError when matplotlib is not installed.
    """
    try:
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError(_INSTALL_HINT) from exc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latencies = analysis.latencies  # a property that copies: read it once
    colours = _mode_colours(latencies)
    drawers = {
        "latency_cdf.png": lambda fig: _latency_cdf(fig, latencies, colours),
        "latency_vs_targets.png": lambda fig: _latency_vs_targets(fig, analysis.by_targets, colours),
        "breakdown.png": lambda fig: _breakdown(fig, analysis.breakdown_ns, latencies, COMPONENTS),
        "slowest_timeline.png": lambda fig: _slowest_timeline(fig, run, analysis),
    }
    written: list[Path] = []
    with matplotlib.style.context("default"):
        for name in FILES:
            fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
            FigureCanvasAgg(fig)
            drawers[name](fig)
            path = out_dir / name
            fig.savefig(path, dpi=DPI, metadata={"Software": None})
            written.append(path)
    return written


# -- shared helpers ------------------------------------------------------------------------------------------------


def _mode_colours(latencies: Mapping[str, Sequence[int]]) -> dict[str, str]:
    modes = [m for m in _MODE_ORDER if m in latencies] + sorted(m for m in latencies if m not in _MODE_ORDER)
    known = {m: f"C{i}" for i, m in enumerate(_MODE_ORDER)}
    spare = iter(f"C{i}" for i in range(len(_MODE_ORDER), 10))
    return {m: known.get(m) or next(spare, "k") for m in modes}


def _us(ns: float) -> float:
    return ns / 1000.0


def _wide(values_us: Iterable[float]) -> bool:
    """Whether positive values spread wider than ``_LOG_SPREAD``: a log axis then."""
    vals = [v for v in values_us if v > 0]
    return bool(vals) and max(vals) / min(vals) > _LOG_SPREAD


def _log_axis(ax: Axes, which: str) -> None:
    """A log scale on ``which`` ("x" or "y") labelled with plain numbers (2, 5, 20, 100), not 2×10⁰ (mathtext is
    also the slowest text matplotlib lays out)."""
    from matplotlib.ticker import LogFormatter

    axis: Axis
    if which == "x":
        ax.set_xscale("log")
        axis = ax.xaxis
    else:
        ax.set_yscale("log")
        axis = ax.yaxis
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (what the tables print), so the figure and the table agree."""
    return sorted_vals[min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))]


# -- 1. latency CDF ------------------------------------------------------------------------------------------------


def _latency_cdf(fig: Figure, latencies: Mapping[str, Sequence[int]], colours: Mapping[str, str]) -> None:
    ax = fig.add_subplot()
    ax.set_title("TLB shootdown latency by design (CDF)")
    series = {m: sorted(_us(v) for v in latencies[m]) for m in colours if latencies[m]}
    if not series:
        _empty(ax, "no shootdowns in this run")
        return
    for mode, vals in series.items():
        n = len(vals)
        ys = [(i + 1) / n for i in range(n)]
        label = f"{mode} (n={n}, p50 {_quantile(vals, 0.5):.1f}, p99 {_quantile(vals, 0.99):.1f} µs)"
        ax.step(vals, ys, where="post", color=colours[mode], label=label, linewidth=1.8)
    if _wide(v for vals in series.values() for v in vals):
        _log_axis(ax, "x")
    ax.set_xlabel("latency, request to done (virtual µs)")
    ax.set_ylabel("fraction of shootdowns ≤ latency")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")


# -- 2. latency vs targets -----------------------------------------------------------------------------------------


def _latency_vs_targets(fig: Figure, by_targets: Mapping[tuple[str, int], Sequence[int]],
                        colours: Mapping[str, str]) -> None:
    ax = fig.add_subplot()
    ax.set_title("TLB shootdown latency by number of targets")
    cells = {k: v for k, v in by_targets.items() if v}
    if not cells:
        _empty(ax, "no shootdowns in this run")
        return
    modes = [m for m in colours if any(k[0] == m for k in cells)]
    modes += sorted({k[0] for k in cells} - set(modes))
    width = 0.8 / max(1, len(modes))  # each design's points sit in its own slot around the integer target count
    all_us: list[float] = []
    for i, mode in enumerate(modes):
        colour = colours.get(mode, "k")
        offset = (i - (len(modes) - 1) / 2) * width
        xs_med: list[float] = []
        meds: list[float] = []
        for ntargets in sorted(n for m, n in cells if m == mode):
            vals = sorted(_us(v) for v in cells[(mode, ntargets)])
            all_us += vals
            x0 = ntargets + offset
            # spread the points across the slot in a fixed pattern (no RNG), so equal latencies stay visible
            xs = [x0 + width * 0.7 * ((j * 0.618034) % 1.0 - 0.5) for j in range(len(vals))]
            ax.scatter(xs, vals, s=10, color=colour, alpha=0.45, linewidths=0)
            med = _quantile(vals, 0.5)
            ax.hlines(med, x0 - width * 0.45, x0 + width * 0.45, color=colour, linewidth=2.5)
            xs_med.append(x0)
            meds.append(med)
        ax.plot(xs_med, meds, color=colour, linewidth=1.2, marker="_", label=f"{mode} (median)")
    if _wide(all_us):
        _log_axis(ax, "y")
    ax.set_xticks(sorted({n for _, n in cells}))
    ax.set_xlabel("vCPUs asked to flush (targets)")
    ax.set_ylabel("latency, request to done (virtual µs)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")


# -- 3. breakdown --------------------------------------------------------------------------------------------------


def _breakdown(fig: Figure, breakdown_ns: Mapping[str, Mapping[str, int]], latencies: Mapping[str, Sequence[int]],
               components: Sequence[str]) -> None:
    ax = fig.add_subplot()
    ax.set_title("Where a shootdown's latency goes (mean per shootdown)")
    modes = [m for m in _mode_colours(latencies) if latencies.get(m) and m in breakdown_ns]
    if not modes:
        _empty(ax, "no shootdowns in this run")
        return
    # components the analysis may add later still get drawn, after the known ones
    extra = sorted({c for m in modes for c in breakdown_ns[m]} - set(components))
    comps = [*components, *extra]
    xs = list(range(len(modes)))
    bottoms = [0.0] * len(modes)
    for ci, comp in enumerate(comps):
        means = [_us(breakdown_ns[m].get(comp, 0)) / len(latencies[m]) for m in modes]
        if not any(means):
            continue  # a component no design spends time in would only clutter the legend
        ax.bar(xs, means, bottom=bottoms, color=f"C{ci % 10}", label=comp, width=0.6, edgecolor="white",
               linewidth=0.5)
        bottoms = [b + v for b, v in zip(bottoms, means, strict=True)]
    for x, total, mode in zip(xs, bottoms, modes, strict=True):
        ax.annotate(f"{total:.1f} µs\n(n={len(latencies[mode])})", (x, total), ha="center", va="bottom",
                    fontsize="small", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(xs, modes)
    ax.set_xlabel("design")
    ax.set_ylabel("mean time per shootdown (virtual µs)")
    ax.set_ylim(0, max(bottoms) * 1.18 or 1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="component")


# -- 4. slowest shootdown timeline ---------------------------------------------------------------------------------


def _state_intervals(run: Run, sd: Shootdown, lo: int, hi: int) -> dict[int, list[tuple[int, int, str]]]:
    """vCPU -> (start_ns, end_ns, state) covering [lo, hi] as far as the trace says, for the shootdown's domain.

    Run states come from the run's records (the state each vCPU was in at ``lo`` is its last change before it);
    the analysis' own ``vcpu_states`` of the shootdown fill in a vCPU the records say nothing about.
    """
    last: dict[int, tuple[int, str]] = {}  # vcpu -> (since, state) as of the record stream's position
    out: dict[int, list[tuple[int, int, str]]] = {}
    # The reader may deliver a record up to its merge slack late: read on a little past the window before stopping.
    stop = hi + max(hi - lo, 200_000)
    for rec in run.records():
        if rec.vt_ns > stop:
            break
        if not isinstance(rec, RunState) or rec.dom != sd.dom or rec.vcpu is None:
            continue
        t = min(max(rec.vt_ns, lo), hi)
        if rec.vt_ns > hi:
            continue  # a late-read change past the window has nothing to draw
        prev = last.get(rec.vcpu)
        if prev is not None:
            t = max(t, prev[0])  # a record the merge delivered late must not draw a bar backwards
            if t > prev[0]:
                out.setdefault(rec.vcpu, []).append((prev[0], t, prev[1]))
        last[rec.vcpu] = (t, rec.state)
    for vcpu, (since, state) in last.items():
        if since < hi:
            out.setdefault(vcpu, []).append((since, hi, state))
    for vs in sd.vcpu_states:
        if out.get(vs.vcpu):
            continue
        points = [(sd.start_ns, vs.at_start), *((min(max(t, lo), hi), s) for t, s in vs.changes)]
        ends = [t for t, _ in points[1:]] + [sd.end_ns]
        out[vs.vcpu] = [(t, e, s) for (t, s), e in zip(points, ends, strict=True) if e > t]
    return out


def _slowest_timeline(fig: Figure, run: Run, analysis: Analysis) -> None:
    ax = fig.add_subplot()
    if not analysis.slowest:
        ax.set_title("Slowest shootdown: run-state timeline")
        # an analysis asked to keep no slowest shootdown (--slowest 0) has none to draw, though the run had some
        _empty(ax, "no slowest shootdown in this analysis (analyse with slowest >= 1)" if any(
            analysis.latencies.values()) else "no shootdowns in this run")
        return
    sd = analysis.slowest[0]
    span = max(sd.end_ns - sd.start_ns, 1)
    pad = max(span // 4, 2_000)
    lo, hi = max(0, sd.start_ns - pad), sd.end_ns + pad
    intervals = _state_intervals(run, sd, lo, hi)
    vcpus = sorted(set(intervals) | {sd.initiator, *sd.targets} | {v for v, _ in sd.sends} | {v for v, _ in sd.flushes})
    row = {v: i for i, v in enumerate(vcpus)}

    def rel(ns: float) -> float:  # the axis: virtual µs since the request, so the numbers stay short
        return _us(ns - sd.start_ns)

    seen_states: set[str] = set()
    for vcpu, spans in sorted(intervals.items()):
        for start, end, state in spans:
            colour = _STATE_COLOURS.get(state, "#9467bd")
            ax.broken_barh([(rel(start), _us(end - start))], (row[vcpu] - 0.35, 0.7), facecolors=colour,
                           edgecolor="none")
            seen_states.add(state)
    ax.axvspan(0.0, rel(sd.end_ns), color="0.2", alpha=0.08, zorder=0)
    ax.axvline(0.0, color="0.2", linestyle="--", linewidth=1)
    ax.axvline(rel(sd.end_ns), color="0.2", linestyle="--", linewidth=1)
    for target, t in sd.sends:
        # an arrow from the initiator's row to the target's at the moment the IPI/event/hypercall left
        ax.annotate("", xy=(rel(t), row[target]), xytext=(rel(t), row[sd.initiator]),
                    arrowprops={"arrowstyle": "->", "color": "#d62728", "linewidth": 1.2})
    if sd.sends:
        ax.scatter([rel(t) for _, t in sd.sends], [row[sd.initiator] for _ in sd.sends], marker="o", s=24,
                   color="#d62728", zorder=3)
    if sd.flushes:
        ax.scatter([rel(t) for _, t in sd.flushes], [row[v] for v, _ in sd.flushes], marker="X", s=60,
                   color="black", zorder=3)

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    states = [s for s in _STATE_COLOURS if s in seen_states] + sorted(seen_states - set(_STATE_COLOURS))
    handles: list[Any] = [Patch(color=_STATE_COLOURS.get(s, "#9467bd"), label=s) for s in states]
    handles += [Line2D([], [], color="#d62728", marker="o", markersize=5, label="send (initiator → target)"),
                Line2D([], [], color="black", marker="X", linestyle="none", markersize=7, label="target's TLB flushed"),
                Patch(color="0.2", alpha=0.15, label="shootdown (request → done)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_yticks(range(len(vcpus)), [f"vCPU {v}" + (" (initiator)" if v == sd.initiator else "") for v in vcpus])
    ax.set_ylim(-0.6, len(vcpus) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(rel(lo), rel(hi))
    ax.set_xlabel(f"virtual µs since the request (at {_us(sd.start_ns):,.1f} µs)")
    ax.set_title(f"Slowest shootdown: dom{sd.dom} {sd.name} ({sd.mode}), round {sd.round}\n"
                 f"{_us(sd.latency_ns):.1f} µs, {len(sd.targets)} target(s), {sd.preempted} preempted at the request")
    ax.grid(True, axis="x", alpha=0.3)
