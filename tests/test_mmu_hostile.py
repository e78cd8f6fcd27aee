"""A hostile PV guest against the hypervisor's page-table validation: every rule answers with Xen's errno and a
trace event, and a well-behaved domain beside it is unaffected."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvcluster.cluster import Cluster
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

SPEC = """
[cluster]
name = "mmu"
[[domain]]
name = "evil"
vcpus = 2
backend = "xen"
cmdline = "workload=mmuhostile shutdown=poweroff"
[[domain]]
name = "good"
vcpus = 2
backend = "xen"
cmdline = "workload=shootdown shutdown=reboot"
"""

EXPECTED = [  # (reason traced by the hypervisor, errno), in the order the guest tries them
    ("maps-unowned-frame", "EPERM"),
    ("pte-frame-not-owned", "EPERM"),
    ("writable-pagetable", "EBUSY"),  # get_page_from_l1e: could_not_pin
    ("foreign-domid", "EPERM"),
    ("vcpumask-bad-vcpu", "EINVAL"),
    ("baseptr-not-owned", "EPERM"),
    ("maps-unowned-frame", "EPERM"),
    ("pin-frame-not-owned", "EPERM"),
]


def test_hostile_page_table_updates_are_refused(run_dir: Path) -> None:
    with Cluster.start(parse_spec(SPEC), run_dir=run_dir) as cluster:
        final = {d["name"]: d for d in cluster.wait(timeout_s=150)["domains"]}
        evil_console = cluster.client.call("console", dom="evil")
        good_console = cluster.client.call("console", dom="good")
    # the guest checked each errno itself
    assert "pvkern: mmu hostile checks failed: 0" in evil_console, evil_console
    assert (final["evil"]["state"], final["evil"]["shutdown_reason"]) == ("dead", "poweroff")
    denied = [(e["reason"], e["errno"]) for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
              if e["event"] == "mmu.denied" and e["dom"] == final["evil"]["domid"]]
    assert denied == EXPECTED
    # the other domain's shootdowns were untouched
    assert "pvkern: shootdown rounds 40, stale reads 0" in good_console
    assert (final["good"]["state"], final["good"]["shutdown_reason"]) == ("dead", "reboot")
