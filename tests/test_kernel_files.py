"""A kernel path from the control socket is a file the hypervisor reads for someone: checked as that someone."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.kernel_files import MAX_IMAGE_BYTES, KernelFileError, Requester, kernel_image, read_as
from pvcluster.spec import parse_domain_dict

ELF = b"\x7fELF\x01\x01\x01" + bytes(57)
# someone who owns nothing here and is in none of its groups
STRANGER = Requester("stranger", 54321, frozenset({54321}))
OWNER = Requester("owner", os.getuid(), frozenset({os.getgid()}))


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory everyone may search (pytest's own is 0700: nobody else could read anything in it)."""
    d = Path(tempfile.mkdtemp(prefix="pvk-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def image(tmp_path: Path, mode: int = 0o644, data: bytes = ELF, dir_mode: int = 0o755) -> Path:
    d = tmp_path / "k"
    d.mkdir(exist_ok=True)
    d.chmod(dir_mode)
    path = d / "guest.elf"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def refused(path: Path, who: Requester = STRANGER) -> str:
    with pytest.raises(KernelFileError) as info:
        read_as(path, who)
    return str(info.value)


def test_a_world_readable_elf_is_read_for_anyone(tmp_path: Path) -> None:
    assert read_as(image(tmp_path), STRANGER) == ELF


def test_a_file_only_its_owner_may_read_is_refused_to_others_without_a_byte_of_it(tmp_path: Path) -> None:
    secret = b"root:$6$salt$hash:19000:0:99999:7:::\n"
    path = image(tmp_path, 0o600, secret)
    msg = refused(path)
    assert msg == f"kernel {path}: not readable by user stranger"
    assert "root:" not in msg
    assert refused(path, OWNER) == f"kernel {path}: not an ELF image"  # the owner may read it, and it is no kernel


def test_group_read_counts_for_members_only(tmp_path: Path) -> None:
    path = image(tmp_path, 0o640)
    member = Requester("member", 54321, frozenset({path.stat().st_gid}))
    assert read_as(path, member) == ELF
    assert "not readable" in refused(path)


def test_every_directory_on_the_way_must_be_searchable(tmp_path: Path) -> None:
    path = image(tmp_path, 0o644, dir_mode=0o700)
    assert refused(path) == f"kernel {path}: directory {path.parent} is not searchable by user stranger"
    assert read_as(path, OWNER) == ELF


def test_a_symlink_is_checked_where_it_leads(tmp_path: Path) -> None:
    target = image(tmp_path, 0o600)
    link = tmp_path / "innocent.elf"
    link.symlink_to(target)
    assert "not readable by user stranger" in refused(link)


def test_only_regular_files_and_no_more_than_a_build_carries(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert refused(fifo, OWNER) == f"kernel {fifo}: not a regular file"
    assert refused(tmp_path, OWNER) == f"kernel {tmp_path}: not a regular file"
    big = image(tmp_path, data=ELF + bytes(MAX_IMAGE_BYTES))
    assert "more than the" in refused(big, OWNER)
    assert refused(tmp_path / "nope", OWNER) == f"kernel {tmp_path / 'nope'}: No such file or directory"
    assert refused(Path("relative.elf"), OWNER) == "kernel relative.elf: must be an absolute path"


def test_root_reads_what_root_may_read(tmp_path: Path) -> None:
    root = Requester("root", 0, frozenset({0}))
    assert read_as(image(tmp_path, 0o000), root) == ELF


def test_an_unknown_user_gets_what_others_may_read() -> None:
    nobody_here = Requester.named("no-such-user-on-this-host")
    assert nobody_here.uid is None
    st = os.stat("/")
    assert nobody_here.may(st, (0, 0, 0o005 & st.st_mode))


def test_create_s_own_spec_check_does_not_look_at_the_file() -> None:
    # the spec check would tell anyone whether a path exists; create leaves the look to read_as
    dom = parse_domain_dict({"name": "a", "kernel": "/no/such/file"}, check_files=False)
    assert dom.kernel == "/no/such/file"
    with pytest.raises(Exception, match="absolute path"):
        parse_domain_dict({"name": "a", "kernel": "relative/file"}, check_files=False)


def test_a_built_in_kernel_comes_from_the_run_directory(tmp_path: Path) -> None:
    dom = parse_domain_dict({"name": "a"})
    assert kernel_image(dom, tmp_path, STRANGER) == b""  # not put there: the domain process loads it
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "pvkern.elf").write_bytes(ELF)
    assert kernel_image(dom, tmp_path, STRANGER) == ELF
