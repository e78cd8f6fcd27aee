"""The CURVE key store (pvcluster/keys.py): private files from the first byte, keys never replaced, insecure or
missing files refused with the fix in the message, and the client table the hypervisor's ZAP handler uses."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import zmq
import zmq.auth

from pvcluster.keys import GROUP_READ_ENV, KeyFileError, KeyInfo, KeyStore, Role, current_user, secure_client


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "run" / "keys")


def test_created_files_are_private_and_readable_by_pyzmq(store: KeyStore) -> None:
    old = os.umask(0)  # the most permissive umask: the modes must not come from it
    try:
        assert store.ensure_cluster()
    finally:
        os.umask(old)
    assert mode_of(store.directory) == 0o700
    role = Role.cluster()
    for path in (store.public_path(role), store.secret_path(role)):
        assert mode_of(path) == 0o600
    public, secret = store.keypair(role)
    assert zmq.auth.load_certificate(store.secret_path(role)) == (public, secret)
    assert zmq.auth.load_certificate(store.public_path(role)) == (public, None)
    assert zmq.curve_public(secret) == public
    assert store.public(role) == public
    assert sorted(os.listdir(store.directory)) == ["cluster.key", "cluster.key_secret"]  # no temporary left


def test_ensure_is_idempotent_and_never_replaces_a_key(store: KeyStore) -> None:
    assert store.ensure_domain("alpha")
    first = store.keypair(Role.domain("alpha"))
    assert not store.ensure_domain("alpha")
    assert store.keypair(Role.domain("alpha")) == first
    assert store.ensure_toolstack("root") and not store.ensure_toolstack("root")


def test_concurrent_creators_end_with_one_consistent_pair(store: KeyStore) -> None:
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(store.ensure_domain("alpha"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    public, _ = store.keypair(Role.domain("alpha"))
    assert zmq.auth.load_certificate(store.public_path(Role.domain("alpha")))[0] == public


def test_a_secret_without_its_public_file_gets_it_back(store: KeyStore) -> None:
    role = Role.domain("alpha")
    store.ensure(role)
    public = store.public(role)
    store.public_path(role).unlink()
    assert not store.ensure(role)
    assert store.public_path(role).exists() and store.public(role) == public


def test_a_public_key_alone_is_left_alone(store: KeyStore, tmp_path: Path) -> None:
    """The hypervisor's host holds a remote domain's public key only: ensure must not make a new pair for it."""
    remote = KeyStore(tmp_path / "remote")
    remote.ensure_domain("alpha")
    store.ensure_cluster()
    (store.directory / "domain-alpha.key").write_bytes(remote.public_path(Role.domain("alpha")).read_bytes())
    assert not store.ensure_domain("alpha")
    assert not store.secret_path(Role.domain("alpha")).exists()
    assert store.public(Role.domain("alpha")) == remote.public(Role.domain("alpha"))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644, 0o666])
def test_an_insecure_secret_is_refused_with_the_fix(store: KeyStore, mode: int) -> None:
    store.ensure_cluster()
    path = store.secret_path(Role.cluster())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as err:
        store.keypair(Role.cluster())
    assert str(path) in str(err.value) and f"chmod 600 {path}" in str(err.value)


def test_group_read_is_accepted_only_when_asked_for(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes fsGroup mounts: 0440 secrets, group-owned."""
    store.ensure_cluster()
    path = store.secret_path(Role.cluster())
    os.chmod(path, 0o440)
    with pytest.raises(KeyFileError, match=GROUP_READ_ENV):
        store.keypair(Role.cluster())
    monkeypatch.setenv(GROUP_READ_ENV, "1")
    assert store.keypair(Role.cluster())
    os.chmod(path, 0o460)  # group write stays refused
    with pytest.raises(KeyFileError, match="chmod 600"):
        store.keypair(Role.cluster())
    os.chmod(path, 0o444)  # so does world read
    with pytest.raises(KeyFileError, match="chmod 600"):
        store.keypair(Role.cluster())


def test_a_writable_public_key_is_refused(store: KeyStore) -> None:
    """Whoever may write cluster.key may swap in their own server key."""
    store.ensure_cluster()
    path = store.public_path(Role.cluster())
    os.chmod(path, 0o644)
    assert store.public(Role.cluster())  # world-readable is what a public key is for
    os.chmod(path, 0o622)
    with pytest.raises(KeyFileError, match="chmod 600"):
        store.public(Role.cluster())


def test_a_missing_key_names_the_file_and_the_command(store: KeyStore) -> None:
    with pytest.raises(KeyFileError) as err:
        store.keypair(Role.domain("alpha"))
    msg = str(err.value)
    assert str(store.secret_path(Role.domain("alpha"))) in msg
    assert "pvcluster keys create --dir DIR --domain alpha" in msg
    with pytest.raises(KeyFileError) as err:
        store.public(Role.cluster())
    msg = str(err.value)
    assert str(store.public_path(Role.cluster())) in msg and "pvcluster keys create --dir DIR" in msg
    assert isinstance(err.value, KeyError)


def test_a_symlinked_secret_is_checked_through_its_target(store: KeyStore, tmp_path: Path) -> None:
    """Kubernetes Secret volumes: NAME -> ..data/NAME -> ..2024_01_01/NAME."""
    source = KeyStore(tmp_path / "source")
    source.ensure_domain("alpha")
    role = Role.domain("alpha")
    data = tmp_path / "mount" / "..2024_01_01"
    data.mkdir(parents=True)
    for path in (source.public_path(role), source.secret_path(role)):
        (data / path.name).write_bytes(path.read_bytes())
        os.chmod(data / path.name, 0o400)
    (tmp_path / "mount" / "..data").symlink_to("..2024_01_01")
    for name in ("domain-alpha.key", "domain-alpha.key_secret"):
        (tmp_path / "mount" / name).symlink_to(f"..data/{name}")
    mounted = KeyStore(tmp_path / "mount")
    assert mounted.keypair(role) == source.keypair(role)
    assert mounted.clients() == {source.public(role): role}
    os.chmod(data / "domain-alpha.key_secret", 0o444)  # the link's own mode (0777) is never what counts
    with pytest.raises(KeyFileError, match="chmod 600"):
        mounted.keypair(role)


def test_clients_maps_domain_and_user_keys_and_skips_bad_files(store: KeyStore) -> None:
    store.ensure_cluster()
    store.ensure_domain("alpha")
    store.ensure_domain("beta-2")
    store.ensure_toolstack("root")
    (store.directory / "domain-broken.key").write_text("curve\n    public-key = \"short\"\n")
    (store.directory / "toolstack-bad name.key").write_bytes(store.public_path(Role.domain("alpha")).read_bytes())
    (store.directory / "notes.txt").write_text("hello")
    os.mkfifo(store.directory / "domain-fifo.key")  # must not hang the reader
    clients = store.clients()
    assert clients == {
        store.public(Role.domain("alpha")): Role.domain("alpha"),
        store.public(Role.domain("beta-2")): Role.domain("beta-2"),
        store.public(Role.toolstack("root")): Role.toolstack("root"),
    }
    assert store.public(Role.cluster()) not in clients  # the server's key is no client's


def test_clients_drops_a_key_claimed_by_two_roles(store: KeyStore) -> None:
    store.ensure_domain("alpha")
    store.ensure_toolstack("root")
    copy = store.directory / "toolstack-mallory.key"
    copy.write_bytes(store.public_path(Role.domain("alpha")).read_bytes())
    os.chmod(copy, 0o600)
    assert store.clients() == {store.public(Role.toolstack("root")): Role.toolstack("root")}


def test_clients_skips_a_writable_public_key(store: KeyStore) -> None:
    store.ensure_domain("alpha")
    os.chmod(store.public_path(Role.domain("alpha")), 0o666)
    assert store.clients() == {}


def test_clients_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert KeyStore(tmp_path / "nowhere").clients() == {}


def test_list_keys(store: KeyStore, tmp_path: Path) -> None:
    store.ensure_toolstack("root")
    store.ensure_domain("beta")
    store.ensure_domain("alpha")
    store.ensure_cluster()
    remote = KeyStore(tmp_path / "remote")
    remote.ensure_domain("gamma")
    (store.directory / "domain-gamma.key").write_bytes(remote.public_path(Role.domain("gamma")).read_bytes())
    os.chmod(store.secret_path(Role.domain("beta")), 0o644)
    keys = store.list_keys()
    assert [k.role for k in keys] == [Role.cluster(), Role.domain("alpha"), Role.domain("beta"),
                                      Role.domain("gamma"), Role.toolstack("root")]
    by_role = {k.role: k for k in keys}
    assert by_role[Role.domain("beta")] == KeyInfo(
        Role.domain("beta"), store.public(Role.domain("beta")).decode(),
        str(store.secret_path(Role.domain("beta"))), 0o644, True)  # insecure, shown as it is
    gamma = by_role[Role.domain("gamma")]
    assert not gamma.has_secret and gamma.path == str(store.public_path(Role.domain("gamma")))
    assert gamma.public_z85 == remote.public(Role.domain("gamma")).decode()


def test_a_mismatched_secret_is_refused(store: KeyStore) -> None:
    store.ensure_cluster()
    path = store.secret_path(Role.cluster())
    other_public, _ = zmq.curve_keypair()
    text = path.read_text()
    public = store.public(Role.cluster()).decode()
    path.write_text(text.replace(public, other_public.decode()))
    with pytest.raises(KeyFileError, match="does not match"):
        store.keypair(Role.cluster())


@pytest.mark.parametrize("user_id,role", [
    ("domain:alpha", Role.domain("alpha")),
    ("toolstack:root", Role.toolstack("root")),
    ("toolstack:jane.doe", Role.toolstack("jane.doe")),
    ("cluster:cluster", Role.cluster()),
    ("domain:Alpha", None),  # the spec's domain names are lower case
    ("domain:", None),
    ("domain:../x", None),
    ("cluster:other", None),
    ("admin:root", None),
    ("root", None),
])
def test_role_parse(user_id: str, role: Role | None) -> None:
    assert Role.parse(user_id) == role
    if role is not None:
        assert role.user_id == user_id
        assert Role.from_stem(role.stem) == role


def test_role_names_are_validated() -> None:
    with pytest.raises(ValueError):
        Role.domain("../../etc")
    with pytest.raises(ValueError):
        Role.toolstack("-rf")
    assert Role.from_stem("toolstack-a.key") == Role.toolstack("a.key")  # files toolstack-a.key.key{,_secret}


def test_current_user_is_a_valid_key_name() -> None:
    assert Role.toolstack(current_user())


def test_secure_client_makes_a_curve_client(store: KeyStore) -> None:
    store.ensure_cluster()
    store.ensure_domain("alpha")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        secure_client(sock, store, Role.domain("alpha"))  # tests/test_auth.py connects with it
        assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE and sock.getsockopt(zmq.CURVE_SERVER) == 0
        with pytest.raises(KeyFileError, match="toolstack nobody"):
            secure_client(sock, store, Role.toolstack("nobody"))
    finally:
        sock.close(linger=0)
        ctx.term()
