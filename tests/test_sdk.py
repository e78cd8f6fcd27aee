"""The guest SDK (pvcluster/sdk/pvc.h, pvc.ld; pvcluster/guestsdk.py): it ships in the package, its numbers are the
simulated machine's (pvcluster/abi/platform.py is their one definition), `pvcluster sdk` prints working flags
(with an extension's hypercall numbers), and `pvcluster new-guest` scaffolds a guest that builds. Booting an SDK
guest in a real cluster: examples/batched_flush/test_batched_flush.py and tests/test_extension_e2e.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from pvcluster import guestsdk
from pvcluster.abi import platform
from pvcluster.abi.platform import Mark
from pvcluster.cli import main

ROOT = Path(__file__).resolve().parent.parent
XEN_HEADER = Path("/usr/include/xen/xen.h")


def _defines(text: str) -> dict[str, int]:
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^#define (PVC_\w+) (0x[0-9A-Fa-f]+|\d+)\s*$", text, re.M)}


def test_the_headers_numbers_are_the_platforms() -> None:
    d = _defines((guestsdk.sdk_dir() / guestsdk.SDK_HEADER).read_text())
    assert d["PVC_CLOCK_PORT"] == platform.CLOCK_PORT
    assert d["PVC_MARK_PORT"] == platform.MARK_PORT
    assert d["PVC_MARK_DETAIL_SHIFT"] == platform.MARK_DETAIL_SHIFT
    marks = {k.removeprefix("PVC_MARK_"): v for k, v in d.items()
             if k.startswith("PVC_MARK_") and k not in ("PVC_MARK_PORT", "PVC_MARK_DETAIL_SHIFT")}
    assert marks and all(Mark[name] == value for name, value in marks.items())
    assert "0xC0001000" in (guestsdk.sdk_dir() / guestsdk.SDK_LDSCRIPT).read_text()
    assert f"{platform.VIRT_BASE:#X}".replace("0X", "0x") in (guestsdk.sdk_dir() / guestsdk.SDK_HEADER).read_text()


def test_the_sdk_is_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pvcluster"]
    shipped = {p.name for p in guestsdk.sdk_dir().iterdir() if p.suffix in (".h", ".ld")}
    assert shipped == {guestsdk.SDK_HEADER, guestsdk.SDK_LDSCRIPT}
    assert {"sdk/*.h", "sdk/*.ld"} <= set(data)


def test_sdk_prints_flags_and_an_extensions_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sdk", "--cflags", "--ldflags"]) == 0
    flags = capsys.readouterr().out.split()
    assert "-m32" in flags and f"-I{guestsdk.sdk_dir()}" in flags
    assert f"-Wl,-T,{guestsdk.sdk_dir() / guestsdk.SDK_LDSCRIPT}" in flags
    (tmp_path / "ext.py").write_text("def register(reg):\n    reg.hypercall(55, 'my_call', lambda call: 0)\n")
    # the spec names a kernel not built yet: only its [[extension]] tables are read
    (tmp_path / "spec.toml").write_text('[[domain]]\nname = "g"\nkernel = "g.elf"\n'
                                        '[[extension]]\nmodule = "ext"\npath = "."\n')
    assert main(["sdk", "--cflags", "--spec", str(tmp_path / "spec.toml")]) == 0
    assert "-D__HYPERVISOR_my_call=55" in capsys.readouterr().out.split()
    (tmp_path / "ext.py").write_text("def register(reg):\n    reg.hypercall(500, 'my_call', lambda call: 0)\n")
    assert main(["sdk", "--cflags", "--spec", str(tmp_path / "spec.toml")]) == 1
    assert "hypercall number must be 0..127" in capsys.readouterr().err


def test_new_guest_scaffolds_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = tmp_path / "my-guest"
    assert main(["new-guest", str(where)]) == 0
    assert sorted(p.name for p in where.iterdir()) == ["Makefile", "main.c", "spec.toml", "test_my_guest.py"]
    assert 'name = "my-guest"' in (where / "spec.toml").read_text()
    assert main(["new-guest", str(where)]) == 1
    assert "would overwrite" in capsys.readouterr().err
    assert main(["new-guest", str(tmp_path / "Bad Name")]) == 2


def _toolchain(work: Path) -> None:
    if not XEN_HEADER.exists():
        pytest.skip(f"{XEN_HEADER} is absent (install Xen's public headers, e.g. Debian's libxen-dev)")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on PATH")
    (work / "probe.c").write_text("void _start(void) { for (;;) ; }\n")
    res = subprocess.run(["gcc", "-m32", "-ffreestanding", "-nostdlib", "-static", "-o", str(work / "probe"),
                          str(work / "probe.c")], capture_output=True, text=True, timeout=120)
    if res.returncode:
        pytest.skip(f"gcc cannot build 32-bit code here: {res.stderr.strip()[-300:]}")


def test_the_scaffold_builds_into_a_xen_guest_image(tmp_path: Path) -> None:
    _toolchain(tmp_path)
    guestsdk.scaffold(tmp_path / "g", "g")
    elf = tmp_path / "g" / "g.elf"
    res = subprocess.run(["gcc", *guestsdk.cflags(), "-Werror", "-o", str(elf), str(tmp_path / "g" / "main.c"),
                          *guestsdk.ldflags()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with elf.open("rb") as f:
        image = ELFFile(f)
        assert image.get_section_by_name(".note.Xen") is not None
        loads = [s for s in image.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads and all(s["p_vaddr"] >= platform.VIRT_BASE for s in loads)
        symtab: Any = image.get_section_by_name(".symtab")
        assert symtab.get_symbol_by_name("hypercall_page")[0]["st_value"] % 4096 == 0
