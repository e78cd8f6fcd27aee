"""The on-disk cache of the built-in kernel image (domains/kernel/build.py): what domain processes read instead of
assembling the kernel with keystone themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from domains.kernel import build


def _no_assembly(name: str = "pvkern") -> bytes:
    raise AssertionError("assembled although the image was in the cache")


def test_a_miss_builds_and_stores_the_image_and_a_hit_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = build.cached_kernel("pvkern", tmp_path)
    assert image == build.build_kernel("pvkern")
    stored = build.cached_kernel_path("pvkern", tmp_path)
    assert stored is not None and stored.read_bytes() == image
    assert [p.name for p in tmp_path.iterdir()] == [stored.name]  # no temporary file left behind
    monkeypatch.setattr(build, "build_kernel", _no_assembly)
    assert build.cached_kernel("pvkern", tmp_path) == image


def test_the_cache_directory_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.CACHE_DIR_ENV, str(tmp_path / "k"))
    assert build.kernel_cache_dir() == tmp_path / "k"
    monkeypatch.delenv(build.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.kernel_cache_dir() == tmp_path / "xdg" / "pvcluster" / "kernels"


def test_a_cache_that_cannot_be_written_only_costs_the_build(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert build.cached_kernel("pvkern", blocker / "kernels") == build.build_kernel("pvkern")


def test_another_keystone_gets_another_image(monkeypatch: pytest.MonkeyPatch) -> None:
    before = build.kernel_cache_key("pvkern")
    monkeypatch.setattr(build, "_keystone_version", lambda: "0.0.0-other")
    build.kernel_cache_key.cache_clear()
    try:
        assert build.kernel_cache_key("pvkern") != before
    finally:
        build.kernel_cache_key.cache_clear()
