#!/usr/bin/env python3
"""Set-up and entry points that need nothing but Python (no make): the README's Quick start uses this.

    python3 dev.py up [SPEC] [pvcluster up options]   # the default cluster, ending with its summary
    python3 dev.py test [pytest options]              # the whole test suite
    python3 dev.py bench | lint
    python3 dev.py soak [N] [tools/soak.py options]   # N seeded random fault schedules (default 200), with counts

The first run creates .venv and installs the project with its dev extras; later runs reinstall only when
pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".installed"


def _say(msg: str) -> None:
    print(f"dev.py: {msg}", file=sys.stderr, flush=True)


def ensure_venv() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        return
    if not (BIN / "python").exists():
        _say(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    _say("installing pvcluster and its dev dependencies (first run only; this takes a minute)")
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(want + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test", "bench", "lint", "soak"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    cmd, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    if cmd == "up":
        return subprocess.call([str(BIN / "pvcluster"), "up", *rest])
    if cmd == "test":
        return subprocess.call([str(BIN / "pytest"), "-q", *rest])
    if cmd == "bench":
        return subprocess.call([str(BIN / "python"), "-m", "bench", *rest])
    if cmd == "soak":
        return subprocess.call([str(BIN / "python"), "-m", "tools.soak", *rest])
    lint = ["pvcluster", "hypervisor", "domains", "tests", "examples", "bench", "tools", "dev.py"]
    rc = subprocess.call([str(BIN / "ruff"), "check", *lint])
    return rc or subprocess.call([str(BIN / "mypy"), "pvcluster", "hypervisor", "domains", "tools"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
