"""The guest SDK: where its header and linker script are, the gcc flags that use them, and a new guest's scaffold.

The SDK is package data (``pvcluster/sdk/pvc.h``, ``pvcluster/sdk/pvc.ld``, shipped in the wheel): a user writes
``main()`` against Xen's public headers (Debian's libxen-dev puts them in /usr/include/xen) and builds with::

    gcc $(pvcluster sdk --cflags) -o guest.elf main.c $(pvcluster sdk --ldflags)

``--spec SPEC`` adds ``-D__HYPERVISOR_<name>=<nr>`` for each hypercall the spec's extensions register, so the
guest's ``_hypercallN(type, name, ...)`` and the hypervisor's dispatch take the number from one definition.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

SDK_HEADER = "pvc.h"
SDK_LDSCRIPT = "pvc.ld"

# Freestanding 32-bit code without a libc, position-dependent (the builder loads it at its link address), without
# unwind tables (nothing reads them and the linker script drops them).
CFLAGS = ("-m32", "-ffreestanding", "-fno-pic", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
          "-fno-builtin", "-O1", "-Wall")
LDFLAGS = ("-m32", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none")


def sdk_dir() -> Path:
    """The directory holding pvc.h and pvc.ld (inside the installed package)."""
    return Path(str(importlib.resources.files("pvcluster").joinpath("sdk")))


def cflags(defines: list[str] | None = None) -> list[str]:
    return [*CFLAGS, f"-I{sdk_dir()}", *(defines or [])]


def ldflags() -> list[str]:
    return [*LDFLAGS, f"-Wl,-T,{sdk_dir() / SDK_LDSCRIPT}"]


def extension_defines(spec_path: str | None) -> list[str]:
    """The -D flags of the hypercalls the spec's extensions register (none without a spec). Loads the extensions
    as the hypervisor would, so a spec that would not start fails here too (``ExtensionError``)."""
    if spec_path is None:
        return []
    from pvcluster import extspec
    from pvcluster.extensions import load  # only here: imports the user's extension modules

    return load(extspec.from_file(spec_path)).c_defines()


# -- pvcluster new-guest ------------------------------------------------------------------------------------------

_MAIN_C = """\
/* {name}: a pvcluster guest (pvc.h is the SDK: entry, notes, hypercalls, console, events, marks, shutdown). */
#define PVC_GUEST_OS "{name}"
#include <pvc.h>

int main(void)
{{
    long version = HYPERVISOR_xen_version(XENVER_version, 0);

    pvc_printf("{name}: hello from a PV guest, Xen %ld.%ld\\n", version >> 16, version & 0xffff);
    pvc_mark(0x80, 1);  /* a guest.mark event in the trace, code 0x80 (yours: 0x80..0xff), detail 1 */
    pvc_check("{name}: xen_version", version > 0, version);
    pvc_printf("{name}: %d failures\\n", pvc_failures);
    return pvc_failures;  /* 0: power off; anything else: crash */
}}
"""

_SPEC = """\
# {name}: run with `make run` (or: pvcluster up spec.toml --run-dir run)
[cluster]
name = "{name}"
seed = 1

[[domain]]
name = "{name}"
vcpus = 1
memory_mib = 4
kernel = "{name}.elf"    # relative to this file; `make` builds it

# A hypercall extension of your own (see README "Try your own interface"):
# [[extension]]
# module = "my_ext"      # my_ext.py with register(reg)
# path = "."
"""

_MAKEFILE = """\
# {name}: build with the pvcluster SDK (gcc -m32 and Xen's public headers, e.g. Debian's libxen-dev)
PVCLUSTER ?= pvcluster
CFLAGS := $(shell $(PVCLUSTER) sdk --cflags --spec spec.toml)
LDFLAGS := $(shell $(PVCLUSTER) sdk --ldflags)

{name}.elf: main.c
\tgcc $(CFLAGS) -Werror -o $@ main.c $(LDFLAGS)

run: {name}.elf
\t$(PVCLUSTER) up spec.toml --run-dir run

test: {name}.elf
\tpython3 -m pytest -q test_{name}.py

clean:
\trm -rf {name}.elf run

.PHONY: run test clean
"""

_TEST = '''\
"""{name}: build the guest with the SDK, boot it in a real cluster, and check what it printed."""

import shutil
import subprocess
from pathlib import Path

import pytest

from pvcluster import guestsdk
from pvcluster.cluster import Cluster
from pvcluster.spec import load_spec

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_{ident}_boots_and_passes_its_checks(tmp_path: Path) -> None:
    if shutil.which("gcc") is None or not Path("/usr/include/xen/xen.h").exists():
        pytest.skip("needs gcc with -m32 and Xen's public headers (Debian: gcc-multilib libxen-dev)")
    spec_path = HERE / "spec.toml"
    cflags = guestsdk.cflags(guestsdk.extension_defines(str(spec_path)))
    res = subprocess.run(["gcc", *cflags, "-Werror", "-o", str(HERE / "{name}.elf"), str(HERE / "main.c"),
                          *guestsdk.ldflags()], capture_output=True, text=True)
    if res.returncode and "-m32" in res.stderr:
        pytest.skip(f"gcc cannot build 32-bit code here: {{res.stderr[-300:]}}")
    assert res.returncode == 0, res.stderr
    with Cluster.start(load_spec(spec_path), run_dir=tmp_path / "run") as cluster:
        final = cluster.wait(timeout_s=120)
        (dom,) = final["domains"]
        console = cluster.client.call("console", dom=dom["domid"])
    assert console[-1] == "{name}: 0 failures", console
    assert (dom["state"], dom["shutdown_reason"]) == ("dead", "poweroff"), dom
'''


def scaffold(directory: Path, name: str) -> list[Path]:
    """Write a new guest's main.c, spec.toml, Makefile and pytest test into ``directory`` (which must not hold
    any of them yet). Returns the files written."""
    files = {
        "main.c": _MAIN_C,
        "spec.toml": _SPEC,
        "Makefile": _MAKEFILE,
        f"test_{name.replace('-', '_')}.py": _TEST,
    }
    existing = [directory / f for f in files if (directory / f).exists()]
    if existing:
        raise FileExistsError(f"would overwrite {', '.join(str(p) for p in existing)}")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, template in files.items():
        path = directory / fname
        path.write_text(template.format(name=name, ident=name.replace("-", "_")))
        written.append(path)
    return written
