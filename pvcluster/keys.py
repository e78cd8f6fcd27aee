"""CURVE key pairs on disk: the hypervisor's server key, one client key per domain and one per toolstack user.

On tcp the bus and the control socket are CurveZMQ servers; the hypervisor's ZAP handler (hypervisor.auth) maps a
client's public key to a ``Role``, and a role to what it may do. The keys live in one directory (callers choose it;
typically RUN_DIR/keys), as pyzmq certificate files so ``zmq.auth.load_certificate`` reads them too:

* ``NAME.key``: the public key alone. A host that only needs to recognise a key (the hypervisor: the domains' and
  users' keys; a remote domain host: ``cluster.key``) holds just this file.
* ``NAME.key_secret``: public and secret key, held only where the key is used.

NAME is ``cluster`` (the hypervisor's server key pair), ``domain-DOMNAME`` or ``toolstack-USER``.

Why the file handling is strict: a secret another user can read lets them act as its role, and a public key file
another user can write lets them swap in their own key (for ``cluster.key``: impersonate the hypervisor). So:

* Every file is created 0600 under a temporary name and published with ``link``, which never replaces a file:
  there is no moment when a secret is readable by others, and two processes creating the same key at once end
  with one key, not a public file from one pair and a secret file from the other. The directory is created 0700.
* Reading a secret refuses a file that group or others may read or write (the fix is ``chmod 600 FILE``); reading a
  public key refuses one that group or others may write. The mode checked is that of the file opened (a symlink's
  target: Kubernetes Secret volumes are symlinks into ``..data/``), through the descriptor read from.
* Kubernetes: mount the Secret with ``defaultMode: 0400``. With ``fsGroup`` the files are group-owned and need
  ``defaultMode: 0440``; set ``PVCLUSTER_KEYS_GROUP_READ=1`` in that container to accept group read on secrets
  (never group or world write, never world read).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Final, Literal, get_args

import attrs
import zmq

from pvcluster.spec import NAME_PATTERN as DOMAIN_NAME_PATTERN

Kind = Literal["cluster", "domain", "toolstack"]
KINDS: Final[tuple[str, ...]] = get_args(Kind)
USER_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
# Set to 1 where secrets are mounted group-readable on purpose (Kubernetes fsGroup with defaultMode 0440).
GROUP_READ_ENV: Final = "PVCLUSTER_KEYS_GROUP_READ"

_DOMAIN_RE: Final = re.compile(DOMAIN_NAME_PATTERN)
_USER_RE: Final = re.compile(USER_NAME_PATTERN)
_Z85_KEY_RE: Final = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
# A certificate is a few hundred bytes; reading stops here, so a huge file named *.key cannot cost memory.
_MAX_CERT_BYTES: Final = 64 * 1024
_SECRET_FORBIDDEN: Final = 0o077
_PUBLIC_FORBIDDEN: Final = 0o022  # group/other write: whoever may write a public key may swap in their own
_BANNER: Final = "#   ZeroMQ CURVE {what} Certificate, written by pvcluster\n#   {note}\n\n"
_SECRET_NOTE: Final = "DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions."
_PUBLIC_NOTE: Final = "Public: copy it to the hosts that must recognise this key."


class KeyFileError(KeyError):
    """A key file is missing, unreadable, malformed or insecure; the message names the file and the fix."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


def _check_name(role: Role, _attribute: attrs.Attribute[str], name: str) -> None:
    ok = {
        "cluster": name == "cluster",
        "domain": bool(_DOMAIN_RE.fullmatch(name)),
        "toolstack": bool(_USER_RE.fullmatch(name)),
    }.get(role.kind, False)
    if not ok:
        raise ValueError(f"invalid {role.kind} key name {name!r}")


@attrs.frozen
class Role:
    """What a key may do: be the hypervisor (``cluster``), one domain's process, or one toolstack user."""

    kind: Kind
    name: str = attrs.field(validator=_check_name)  # domain name, user name, or "cluster"

    @classmethod
    def cluster(cls) -> Role:
        return cls("cluster", "cluster")

    @classmethod
    def domain(cls, name: str) -> Role:
        return cls("domain", name)

    @classmethod
    def toolstack(cls, user: str) -> Role:
        return cls("toolstack", user)

    @property
    def user_id(self) -> str:
        """The ZAP User-Id the hypervisor's handler gives a connection with this key: ``domain:alpha``."""
        return f"{self.kind}:{self.name}"

    @property
    def stem(self) -> str:
        """The key files' name without suffix: ``cluster``, ``domain-alpha``, ``toolstack-root``."""
        return "cluster" if self.kind == "cluster" else f"{self.kind}-{self.name}"

    @classmethod
    def parse(cls, user_id: str) -> Role | None:
        """The role behind a ZAP User-Id, or None for anything ``user_id`` never produces."""
        kind, sep, name = user_id.partition(":")
        return cls._make(kind, name) if sep else None

    @classmethod
    def from_stem(cls, stem: str) -> Role | None:
        """The role whose key files are named ``stem``, or None for a file that is no key of ours."""
        if stem == "cluster":
            return cls.cluster()
        kind, sep, name = stem.partition("-")
        return cls._make(kind, name) if sep and kind != "cluster" else None

    @classmethod
    def _make(cls, kind: str, name: str) -> Role | None:
        if kind not in KINDS:
            return None
        try:
            return cls(kind, name)  # type: ignore[arg-type]  # checked against KINDS just above
        except ValueError:
            return None


def create_command(role: Role) -> str:
    """The command that creates ``role``'s key pair (the CLI's ``keys create``), for error messages."""
    what = "" if role.kind == "cluster" else f" --{role.kind} {role.name}"
    return f"pvcluster keys create --dir DIR{what}"


@attrs.frozen
class KeyInfo:
    """One key as ``pvcluster keys list`` shows it."""

    role: Role
    public_z85: str  # "" when no file of the key could be parsed
    path: str  # the .key_secret file, or the .key file where there is no secret
    mode: int  # permission bits of ``path`` (its target, for a symlink); 0 if it cannot be stat'ed
    has_secret: bool


def current_user() -> str:
    """The invoking user's name, from the uid (not $USER, which any process may set), for ``toolstack-USER``.

    A uid without a passwd entry (containers run with arbitrary uids) or with a name our key names cannot hold
    gives ``uid<N>``."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"
    return name if _USER_RE.fullmatch(name) else f"uid{uid}"


def secure_client(sock: zmq.Socket[Any], keys: KeyStore, role: Role) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the cluster as ``role``: the server's key from
    ``cluster.key`` (or ``cluster.key_secret``), the client's key pair from ``role``'s secret file.
    KeyFileError if a file is missing or insecure."""
    server = keys.public(Role.cluster())
    public, secret = keys.keypair(role)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


class KeyStore:
    """The key files of one directory. Holds no keys in memory: every call reads the files as they are now."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def public_path(self, role: Role) -> Path:
        return self.directory / f"{role.stem}{PUBLIC_SUFFIX}"

    def secret_path(self, role: Role) -> Path:
        return self.directory / f"{role.stem}{SECRET_SUFFIX}"

    # -- creating ------------------------------------------------------------------------------------------------

    def ensure_cluster(self) -> bool:
        return self.ensure(Role.cluster())

    def ensure_domain(self, name: str) -> bool:
        return self.ensure(Role.domain(name))

    def ensure_toolstack(self, user: str) -> bool:
        return self.ensure(Role.toolstack(user))

    def ensure(self, role: Role) -> bool:
        """Create ``role``'s key pair unless it exists; True if this call created it. Never replaces a file.

        A public file without a secret is left alone (the secret lives on another host); a secret without its
        public file gets the public file back, written from the secret."""
        self._make_directory()
        public, secret = self.public_path(role), self.secret_path(role)
        if os.path.lexists(public) and not os.path.lexists(secret):
            return False
        created = False
        if not os.path.lexists(secret):
            pub, sec = zmq.curve_keypair()
            created = _publish(secret, _cert_text(pub, sec))
        if not os.path.lexists(public):
            pub, _ = self.keypair(role)  # what is on disk now: ours, or a concurrent creator's that won
            _publish(public, _cert_text(pub, None))
        return created

    def _make_directory(self) -> None:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            return  # someone's directory, maybe on purpose: its files are 0600 whatever its mode
        os.chmod(self.directory, 0o700)  # mkdir's mode went through the umask

    # -- reading -------------------------------------------------------------------------------------------------

    def keypair(self, role: Role) -> tuple[bytes, bytes]:
        """``role``'s (public, secret) keys, z85, from its secret file; KeyFileError if missing or insecure."""
        path = self.secret_path(role)
        pub, sec = _read_cert(path, _secret_forbidden(), role)
        if sec is None:
            raise KeyFileError(f"{path} holds no secret key: recreate it with `{create_command(role)}`")
        return pub, sec

    def public(self, role: Role) -> bytes:
        """``role``'s public key, z85, from its public file, else from its secret file."""
        path = self.public_path(role)
        if not os.path.lexists(path) and os.path.lexists(self.secret_path(role)):
            return self.keypair(role)[0]
        return _read_cert(path, _PUBLIC_FORBIDDEN, role)[0]

    def clients(self) -> dict[bytes, Role]:
        """Every domain and toolstack public key (z85) in the directory, to its role: what the ZAP handler admits.

        Reads ``.key`` files only (the hypervisor needs no client secret). A file that is malformed, unreadable
        or writable by group/other is skipped, never raised for: one bad file must not lock everyone out. A key
        found under two roles is dropped from both, as nobody can tell which of the two its holder is."""
        found: dict[bytes, Role] = {}
        ambiguous: set[bytes] = set()
        for name in self._names():
            role = _client_role(name)
            if role is None:
                continue
            try:
                pub, _ = _read_cert(self.directory / name, _PUBLIC_FORBIDDEN, role)
            except KeyFileError:
                continue
            if found.setdefault(pub, role) != role:
                ambiguous.add(pub)
        return {pub: role for pub, role in found.items() if pub not in ambiguous}

    def list_keys(self) -> list[KeyInfo]:
        """Every key in the directory, cluster first, then domains and users by name; modes as they are (this is
        where an insecure file shows up, so nothing is refused here)."""
        roles = {role for name in self._names() if (role := _role_of_file(name)) is not None}
        order = sorted(roles, key=lambda r: (KINDS.index(r.kind), r.name))
        return [self._info(role) for role in order]

    def _info(self, role: Role) -> KeyInfo:
        has_secret = os.path.lexists(self.secret_path(role))
        path = self.secret_path(role) if has_secret else self.public_path(role)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0
        return KeyInfo(role, self._public_text(role), str(path), mode, has_secret)

    def _public_text(self, role: Role) -> str:
        for path in (self.public_path(role), self.secret_path(role)):
            try:
                return _read_cert(path, 0, role)[0].decode()
            except KeyFileError:
                continue
        return ""

    def _names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.directory))
        except OSError:  # no directory yet: no keys
            return []


def _client_role(file_name: str) -> Role | None:
    if not file_name.endswith(PUBLIC_SUFFIX):
        return None
    role = Role.from_stem(file_name.removesuffix(PUBLIC_SUFFIX))
    return role if role is not None and role.kind != "cluster" else None


def _role_of_file(file_name: str) -> Role | None:
    for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
        if file_name.endswith(suffix):
            return Role.from_stem(file_name.removesuffix(suffix))
    return None


def _secret_forbidden() -> int:
    if os.environ.get(GROUP_READ_ENV) == "1":
        return _SECRET_FORBIDDEN & ~stat.S_IRGRP
    return _SECRET_FORBIDDEN


# -- the files ---------------------------------------------------------------------------------------------------


def _cert_text(public: bytes, secret: bytes | None) -> bytes:
    """pyzmq's certificate layout (zmq.auth.certs), which ``zmq.auth.load_certificate`` and czmq read."""
    banner = _BANNER.format(what="**Secret**" if secret else "Public", note=_SECRET_NOTE if secret else _PUBLIC_NOTE)
    lines = [banner, "metadata\n", "curve\n", f'    public-key = "{public.decode()}"\n']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"\n')
    return "".join(lines).encode()


def _publish(path: Path, content: bytes) -> bool:
    """Write ``content`` to ``path`` mode 0600, all or nothing; False if ``path`` already exists (left as it is)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # unlike rename, fails if path exists: a key is never replaced
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _read_cert(path: Path, forbidden: int, role: Role) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a certificate file whose mode has none of the ``forbidden`` bits.

    The mode is checked on the descriptor the key is then read from, so a file swapped between the check and the
    read cannot slip through. O_NONBLOCK keeps a FIFO named like a key from hanging the reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(_missing_message(path, role)) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        try:
            _check_mode(path, os.fstat(fd), forbidden)
            content = fh.read(_MAX_CERT_BYTES)
        except OSError as exc:  # EIO and the like: the caller learns which file, not a bare OSError
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    return _parse_cert(path, content)


def _missing_message(path: Path, role: Role) -> str:
    create = f"create it with `{create_command(role)}`"
    if path.name.endswith(SECRET_SUFFIX):
        return f"no key file {path}: {create}"
    return f"no key file {path}: copy it from the host that created the key, or {create}"


def _check_mode(path: Path, st: os.stat_result, forbidden: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbidden:
        raise KeyFileError(
            f"key file {path} is accessible by other users (mode {mode:04o}): run `chmod 600 {path}`"
            + _group_read_hint(mode, forbidden)
        )


def _group_read_hint(mode: int, forbidden: int) -> str:
    if (mode & forbidden & ~stat.S_IRGRP) == 0 and forbidden & stat.S_IRGRP:
        return f" (or, for a group-readable Kubernetes fsGroup mount, set {GROUP_READ_ENV}=1)"
    return ""


def _parse_cert(path: Path, content: bytes) -> tuple[bytes, bytes | None]:
    """The keys in a certificate, read the way ``zmq.auth.load_certificate`` reads them, then checked: z85 keys of
    32 bytes, and a secret key whose public key is the one the file states."""
    public = secret = None
    for raw in content.splitlines():
        line = raw.strip()
        if line.startswith(b"public-key"):
            public = line.split(b"=", 1)[-1].strip(b" \t'\"")
        elif line.startswith(b"secret-key"):
            secret = line.split(b"=", 1)[-1].strip(b" \t'\"")
    if public is None or not _Z85_KEY_RE.fullmatch(public):
        raise KeyFileError(f"key file {path} holds no valid public key")
    if secret is not None and not (_Z85_KEY_RE.fullmatch(secret) and _matches(public, secret)):
        raise KeyFileError(f"key file {path} holds a secret key that does not match its public key")
    return public, secret


def _matches(public: bytes, secret: bytes) -> bool:
    try:
        return zmq.curve_public(secret) == public
    except (zmq.ZMQError, ValueError):
        return False

