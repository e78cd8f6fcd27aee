"""The attack that motivated authentication, replayed against a tcp cluster on 127.0.0.1: an unauthenticated client
listed the domains, destroyed one, and created one with ``kernel = "/etc/shadow"``, which the hypervisor then read
as root. Now no client without a key gets an answer, a domain's key can act neither as another domain nor on the
control socket, and a toolstack user gets the hypervisor to read only files that user could read."""

from __future__ import annotations

import contextlib
import json
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, wait_until

from pvcluster.cluster import Cluster
from pvcluster.control import ControlClient, ControlError, toolstack_keys
from pvcluster.keys import KeyStore, Role
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = pytest.mark.slow

SPEC = """
[cluster]
name = "auth"
[bus]
transport = "tcp"
host = "127.0.0.1"
[[domain]]
name = "victim"
backend = "xen"
cmdline = "workload=forever"
"""


def events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == event]


def stolen_keys(keys: Path, dest: Path) -> Path:
    dest.mkdir(mode=0o700)
    for name in ("cluster.key", "domain-victim.key", "domain-victim.key_secret"):
        shutil.copy2(keys / name, dest / name)
    return dest


def test_no_key_a_stranger_s_key_or_a_domain_key_gets_nothing(run_dir: Path) -> None:
    with Cluster.start(parse_spec(SPEC), run_dir=run_dir / "c") as cluster:
        rd = cluster.run_dir
        wait_until(lambda: cluster.status()["domains"][0]["state"] == "running", timeout=60)
        info = json.loads((rd / "hypervisor.json").read_text())
        assert info["transport"] == "tcp" and (rd / "hypervisor.json").stat().st_mode & 0o777 == 0o600
        keys = Path(info["keys"])
        attacker = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("attacker.py")), info["bus"], info["control"],
             str(stolen_keys(keys, run_dir / "stolen"))], capture_output=True, text=True, timeout=120)
        assert attacker.returncode == 0, attacker.stderr
        assert json.loads(attacker.stdout) == {
            "no-key-control": None, "no-key-bus": None, "wrong-key-control": None,
            "wrong-server-key-control": None, "domain-key-control": None, "domain-key-bus-other": "refused"}
        # every refusal is in the trace
        reasons = {e["reason"] for e in events(rd, "auth.refused")}
        assert {"unknown key", "domain key on the control socket"} <= reasons, reasons
        assert {e["socket"] for e in events(rd, "auth.handshake_failed")} >= {"bus", "control"}
        refused = events(rd, "domain.join_refused")
        assert refused and refused[-1]["reason"] == "its key is domain 'victim''s, not 'other''s"
        # nothing happened: the victim runs on, nothing was created, and no file was read for anyone
        assert [(d["name"], d["state"]) for d in cluster.client.call("list")] == [("victim", "running")]
        assert all(e["cmd"] != "destroy" for e in events(rd, "control.request"))
        # no secret on any process's command line: the domain process was given the key directory, not a key
        secret = KeyStore(keys).keypair(Role.domain("victim"))[1].decode()
        dmesg = " ".join(cluster.client.call("dmesg"))
        pid = int(re.search(r"d1 \(victim\): created, process (\d+)", dmesg).group(1))  # type: ignore[union-attr]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--keys" in argv and str(keys).encode() in argv
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                assert secret.encode() not in (proc / "cmdline").read_bytes()


def test_the_hypervisor_reads_a_kernel_only_as_the_requesting_user_could(run_dir: Path) -> None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this host has no user 'nobody'")
    with Cluster.start(parse_spec(SPEC), run_dir=run_dir / "c") as cluster:
        keys = Path(json.loads((cluster.run_dir / "hypervisor.json").read_text())["keys"])
        made = run_cli("keys", "create", "--dir", str(keys), "--toolstack", "nobody")
        assert made.returncode == 0, made.stderr
        info = json.loads((cluster.run_dir / "hypervisor.json").read_text())
        client = ControlClient(info["control"], curve=toolstack_keys(keys, "nobody"))
        try:
            assert [d["name"] for d in client.call("list")] == ["victim"]  # a toolstack key: commands work
            with pytest.raises(ControlError) as info_exc:
                client.call("create", domain={"name": "evil", "kernel": "/etc/shadow"})
        finally:
            client.close()
        assert str(info_exc.value) == "kernel /etc/shadow: not readable by user nobody"
        refused = events(cluster.run_dir, "control.create_refused")
        assert refused and refused[-1]["user"] == "nobody"
        assert [d["name"] for d in cluster.client.call("list")] == ["victim"]
