"""Small helpers shared by the unit tests of hypercall families."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile


class RecordingLog:
    """Stands in for the structlog logger a hypercall traces to, keeping every event for assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    warning = info


XEN_HEADERS = Path("/usr/include/xen/xen.h")


def assert_matches_xen_headers(tmp_path: Path, headers: tuple[str, ...], checks: list[tuple[str, int]]) -> None:
    """Compile each C expression against Xen's public headers for x86-32 and compare it with our value.

    The values are read back from the object's .rodata, so layouts are checked as a 32-bit guest compiler sees
    them. Skips where the headers (Debian's libxen-dev) or a gcc that targets -m32 are missing: the project must
    not need them.
    """
    if not XEN_HEADERS.exists():
        pytest.skip("Xen public headers not installed (apt-get install libxen-dev)")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    src = tmp_path / "xenabi.c"
    src.write_text(
        "#define __XEN_INTERFACE_VERSION__ 0x00030205\n"
        "#include <stddef.h>\n#include <stdint.h>\n"
        + "".join(f"#include <xen/{h}.h>\n" for h in headers)
        + "const unsigned int vals[] = {\n"
        + "".join(f"  (unsigned int)({expr}),\n" for expr, _ in checks)
        + "};\n"
    )
    obj = tmp_path / "xenabi.o"
    proc = subprocess.run([gcc, "-m32", "-ffreestanding", "-c", str(src), "-o", str(obj)], capture_output=True,
                          text=True)
    if proc.returncode != 0 and "-m32" in proc.stderr:
        pytest.skip(f"gcc cannot target x86-32 here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    with open(obj, "rb") as fh:
        rodata = ELFFile(fh).get_section_by_name(".rodata")
        assert rodata is not None
        data = rodata.data()
    got = struct.unpack_from(f"<{len(checks)}I", data)
    mismatches = [(expr, want, have) for (expr, want), have in zip(checks, got, strict=True) if want != have]
    assert not mismatches, mismatches
