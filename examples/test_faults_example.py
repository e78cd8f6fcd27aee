"""Preempt a vCPU in the middle of TLB shootdowns: both guests still finish, and every invariant holds."""

import pytest

from pvcluster.cluster import Cluster
from pvcluster.pytest_plugin import assert_clean

SHOOTDOWN = {"vcpus": 2, "cmdline": "workload=shootdown shutdown=poweroff"}


@pytest.mark.slow
@pytest.mark.pvcluster(spec={"domain": [{"name": "web", "backend": "xen", **SHOOTDOWN},
                                        {"name": "db", "backend": "native", **SHOOTDOWN}]})
def test_a_preempted_vcpu_does_not_break_shootdowns(cluster: Cluster) -> None:
    fault = cluster.inject("preempt", "web.1", duration_ns=50_000)
    outcome = cluster.wait_for("fault.outcome", dom="web", fid=fault["fid"])
    assert outcome["outcome"].startswith("vcpu 1 held")

    final = cluster.wait(timeout_s=60)
    assert {d["name"]: (d["state"], d["shutdown_reason"]) for d in final["domains"]} == {
        "web": ("dead", "poweroff"),
        "db": ("dead", "poweroff"),
    }
    assert_clean(cluster)
