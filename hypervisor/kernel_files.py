"""Reading a domain's kernel image on behalf of whoever asked for the domain.

A ``create`` command names a kernel file, and the hypervisor (often root) reads it and hands its bytes to the
domain's process in the Build. So a path is the requester's word, checked as the requester: every directory on
the way must be searchable by them and the file a regular file they could read, by the ordinary owner / group /
other permission bits (a requester the host does not know as a user gets only what "other" may read). The file is
opened without following a final symlink swapped in after the check and must be the file that was checked.
Errors name the path and the rule; none echoes a byte of the file.

Built-in kernels are read from the run directory's ``kernels/``, where the toolstack put the assembled images
(pvcluster/cluster.py, ``prebuild_kernels``); a missing one leaves the Build without an image, and the domain
process loads it itself.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import attrs

from pvcluster.spec import DomainSpec

# The image travels in one Build frame (pvcluster/bus/codec.py: MAX_FRAME_BYTES, 4 MiB), with room for the rest.
MAX_IMAGE_BYTES = 3 * 1024 * 1024
ELF_MAGIC = b"\x7fELF"


class KernelFileError(Exception):
    pass


@attrs.frozen
class Requester:
    """Who a file is read for: a user id and its groups (uid None: a user this host does not know)."""

    name: str
    uid: int | None
    gids: frozenset[int] = frozenset()

    @classmethod
    def this_process(cls) -> Requester:
        """The hypervisor's own user: on ipc only it can reach the control socket (hypervisor/auth.py)."""
        return cls(_user_name(os.getuid()), os.getuid(), frozenset({os.getgid(), *os.getgroups()}))

    @classmethod
    def named(cls, user: str) -> Requester:
        """A toolstack key's user, looked up in this host's user database."""
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return cls(user, None)
        return cls(user, pw.pw_uid, frozenset(os.getgrouplist(user, pw.pw_gid)))

    def may(self, st: os.stat_result, bits: tuple[int, int, int]) -> bool:
        """Whether this requester has the permission given as (owner, group, other) mode bits on ``st``."""
        if self.uid == 0:
            return True
        owner, group, other = bits
        if self.uid is not None and st.st_uid == self.uid:
            return bool(st.st_mode & owner)
        if st.st_gid in self.gids:
            return bool(st.st_mode & group)
        return bool(st.st_mode & other)


_READ = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
_SEARCH = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def kernel_image(spec: DomainSpec, run_dir: Path, requester: Requester) -> bytes:
    """The bytes of ``spec``'s kernel as ``requester`` may read them; KernelFileError if they may not."""
    if spec.builtin_kernel:
        try:
            return (run_dir / "kernels" / f"{spec.kernel}.elf").read_bytes()
        except OSError:
            return b""
    return read_as(Path(spec.kernel), requester)


def read_as(path: Path, requester: Requester) -> bytes:
    if not path.is_absolute():
        raise KernelFileError(f"kernel {path}: must be an absolute path")
    who = requester.name
    _check_dirs(path, requester)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KernelFileError(f"kernel {path}: {exc.strerror or 'cannot be examined'}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KernelFileError(f"kernel {path}: not a regular file")
    if not requester.may(st, _READ):
        raise KernelFileError(f"kernel {path}: not readable by user {who}")
    if st.st_size > MAX_IMAGE_BYTES:
        raise KernelFileError(f"kernel {path}: {st.st_size} bytes, more than the {MAX_IMAGE_BYTES} a Build carries")
    data = _read_checked(path, st)
    if not data.startswith(ELF_MAGIC):
        raise KernelFileError(f"kernel {path}: not an ELF image")
    return data


def _check_dirs(path: Path, requester: Requester) -> None:
    """Every directory from / to the file's own must be searchable by the requester (symlinks resolved: a link
    does not open a directory the requester could not walk into)."""
    real = Path(os.path.realpath(path))
    for parent in reversed(real.parents):
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise KernelFileError(f"kernel {path}: {exc.strerror or 'cannot be examined'}") from None
        if not requester.may(st, _SEARCH):
            raise KernelFileError(f"kernel {path}: directory {parent} is not searchable by user {requester.name}")


def _read_checked(path: Path, checked: os.stat_result) -> bytes:
    """Read the file that was checked: opened without blocking (a FIFO swapped in), and the same inode."""
    try:
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelFileError(f"kernel {path}: {exc.strerror or 'cannot be opened'}") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino) or not stat.S_ISREG(st.st_mode):
            raise KernelFileError(f"kernel {path}: changed while it was being checked")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(MAX_IMAGE_BYTES + 1)[:MAX_IMAGE_BYTES]
    finally:
        os.close(fd)

