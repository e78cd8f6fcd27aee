"""An extension's bug is its calling domain's end, and nothing else's: a guest built with the SDK calls a hypercall
whose extension handler raises; that domain crashes with the extension, the hypercall and the exception as its
cause, the built-in kernel's domain beside it runs its shootdowns to the end, and the hypervisor keeps answering."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pvcluster import guestsdk
from pvcluster.cluster import Cluster
from pvcluster.extspec import ExtensionSpec
from pvcluster.spec import parse_spec

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

XEN_HEADER = Path("/usr/include/xen/xen.h")

EXTENSION = '''
def explode(call):
    call.trace("explode.called", arg=call.arg(0))
    raise RuntimeError("boom in the extension")

def register(reg):
    reg.hypercall(51, "explode", explode)
'''

GUEST = r'''
#define PVC_GUEST_OS "explode"
#include <pvc.h>

int main(void)
{
    pvc_printf("explode: calling the extension\n");
    _hypercall1(long, explode, 42);
    pvc_printf("explode: still running after it\n");
    return 0;
}
'''


def test_a_raising_extension_handler_ends_only_its_calling_domain(run_dir: Path) -> None:
    if not XEN_HEADER.exists():
        pytest.skip(f"{XEN_HEADER} is absent (install Xen's public headers, e.g. Debian's libxen-dev)")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on PATH")
    (run_dir / "explode_ext.py").write_text(EXTENSION)
    (run_dir / "explode.c").write_text(GUEST)
    from pvcluster.extensions import load

    defines = load([ExtensionSpec(module="explode_ext", path=str(run_dir))]).c_defines()
    assert defines == ["-D__HYPERVISOR_explode=51"]
    res = subprocess.run(["gcc", *guestsdk.cflags(defines), "-Werror", "-o", str(run_dir / "explode.elf"),
                          str(run_dir / "explode.c"), *guestsdk.ldflags()], capture_output=True, text=True,
                         timeout=120)
    if res.returncode and ("-m32" in res.stderr or "cannot find" in res.stderr):
        pytest.skip(f"gcc cannot build 32-bit code here (gcc-multilib?): {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr
    spec = parse_spec(f"""
[cluster]
name = "explode"
[[extension]]
module = "explode_ext"
path = "{run_dir}"
[[domain]]
name = "explode"
kernel = "{run_dir / 'explode.elf'}"
[[domain]]
name = "bystander"
vcpus = 2
cmdline = "workload=shootdown sdrounds=10 shutdown=poweroff"
""")
    with Cluster.start(spec, run_dir=run_dir / "run") as cluster:
        final = cluster.wait(timeout_s=120)
        doms = {d["name"]: d for d in final["domains"]}
        console = cluster.client.call("console", dom=doms["explode"]["domid"])
        # the hypervisor is still there and answering
        listed = {d["name"]: d["state"] for d in cluster.client.call("list")}
    assert (doms["bystander"]["state"], doms["bystander"]["shutdown_reason"]) == ("dead", "poweroff")
    assert doms["explode"]["state"] == "crashed", doms["explode"]
    assert doms["explode"]["crash"] == ("vcpu 0: extension explode_ext: hypercall explode (51) raised "
                                        "RuntimeError('boom in the extension')")
    assert console == ["explode: calling the extension"]
    assert listed == {"explode": "crashed", "bystander": "dead"}


def test_an_extension_that_does_not_load_stops_the_cluster_with_its_reason(run_dir: Path) -> None:
    from pvcluster.cluster import ClusterError

    (run_dir / "takes_xen_version.py").write_text(
        "def register(reg):\n    reg.hypercall(17, 'my_version', lambda call: 0)\n")
    spec = parse_spec(f"""
[cluster]
name = "refused"
[[extension]]
module = "takes_xen_version"
path = "{run_dir}"
[[domain]]
name = "a"
""")
    with pytest.raises(ClusterError, match="hypercall 17 .* is a built-in family's number; set override = true"):
        Cluster.start(spec, run_dir=run_dir / "run")
