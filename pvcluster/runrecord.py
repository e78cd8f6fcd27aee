"""What a run directory records so the run can be replayed: ``run.json`` (the timing model's version, the seed, a
hash of every domain's kernel), next to ``spec.json`` (the spec) and ``faults.jsonl`` (every fault that acted, at
which step and virtual time, the interactive ones included).

``pvcluster up --replay RUN_DIR`` reruns such a directory: the same spec and seed, and every fault injected from the
toolstack acting at exactly the step it acted at before (the spec's scheduled and random faults are planned again
from the spec, the same way). The virtual-time trace is then identical; `pvcluster diff` shows where it is not.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from pvcluster.model import MODEL_VERSION
from pvcluster.spec import BUILTIN_KERNELS, ClusterSpec, SpecError

RUN_RECORD = "run.json"
FAULT_LOG = "faults.jsonl"
REPLAY_INPUT = "replay-faults.json"
# Faults a replay must inject itself: the others come from the spec again.
REPLAYED_ORIGINS = ("interactive",)


class ReplayError(Exception):
    pass


def kernel_hash(kernel: str) -> str:
    """sha256 of a kernel file, or for a built-in kernel of the sources it is assembled from."""
    h = hashlib.sha256()
    if kernel in BUILTIN_KERNELS:
        found = importlib.util.find_spec("domains")
        roots = list(found.submodule_search_locations or []) if found is not None else []
        for root in roots:
            for f in sorted((Path(root) / "kernel").glob("*")):
                if f.suffix in (".S", ".py"):
                    h.update(f.name.encode() + b"\0" + f.read_bytes())
    else:
        h.update(Path(kernel).read_bytes())
    return h.hexdigest()


def write_run_record(run_dir: Path, spec: ClusterSpec, replayed_from: Path | None = None) -> None:
    record = {
        "model_version": MODEL_VERSION,
        "seed": spec.cluster.seed,
        "kernels": {d.name: {"kernel": d.kernel, "sha256": kernel_hash(d.kernel)} for d in spec.domains},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "replayed_from": str(replayed_from) if replayed_from is not None else None,
    }
    (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=1))


def read_fault_log(run_dir: Path) -> list[dict[str, Any]]:
    """The faults that acted in a run (a line cut short by a killed hypervisor is left out)."""
    try:
        lines = (run_dir / FAULT_LOG).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ReplayError(f"{run_dir / FAULT_LOG}:{n}: not JSON") from None
        if isinstance(rec, dict):
            out.append(rec)
    return out


def load_replay(run_dir: Path) -> tuple[ClusterSpec, list[dict[str, Any]]]:
    """The spec and the faults to replay ``run_dir`` with; ReplayError says why it cannot be replayed."""
    try:
        record = json.loads((run_dir / RUN_RECORD).read_text())
        spec_data = json.loads((run_dir / "spec.json").read_text())
    except FileNotFoundError as exc:
        raise ReplayError(f"{run_dir} holds no recorded run ({Path(exc.filename).name} is missing): replay needs a "
                          f"run directory made by `pvcluster up`") from None
    except (OSError, ValueError) as exc:
        raise ReplayError(f"cannot read the run record in {run_dir}: {exc}") from None
    version = record.get("model_version") if isinstance(record, dict) else None
    if version != MODEL_VERSION:
        raise ReplayError(f"{run_dir} was recorded under timing model version {version}, this pvcluster has version "
                          f"{MODEL_VERSION}: its virtual-time trace cannot be reproduced; rerun the spec it was made "
                          f"from with `pvcluster up` instead")
    try:
        spec = ClusterSpec.from_dict(spec_data)
    except SpecError as exc:
        raise ReplayError(f"the spec recorded in {run_dir} is no longer valid: {exc}") from None
    for d in spec.domains:
        want = record.get("kernels", {}).get(d.name, {}).get("sha256")
        try:
            have = kernel_hash(d.kernel)
        except OSError as exc:
            raise ReplayError(f"domain {d.name}'s kernel {d.kernel} cannot be read: {exc}") from None
        if want != have:
            raise ReplayError(f"domain {d.name}'s kernel {d.kernel} changed since the run was recorded "
                              f"(sha256 {have[:16]}..., recorded {str(want)[:16]}...): the replay would differ")
    faults = [r for r in read_fault_log(run_dir) if r.get("origin") in REPLAYED_ORIGINS]
    return spec, faults


def replay_dir(run_dir: Path) -> Path:
    """``<run_dir>-replay-N`` for the first N not taken."""
    n = 1
    while (p := run_dir.with_name(f"{run_dir.name}-replay-{n}")).exists():
        n += 1
    return p
