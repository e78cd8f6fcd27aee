from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short run directory: ipc:// socket paths must stay under ~100 bytes, pytest's tmp_path may not."""
    with tempfile.TemporaryDirectory(prefix="pvc-", dir=os.environ.get("PVC_TEST_TMP", "/tmp")) as d:
        yield Path(d)
