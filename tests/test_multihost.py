"""Clusters across hosts, for real, on one machine: each "host" is a network namespace of its own with its own address
on a veth link (tests/netns.py); the hypervisor runs in one and the domain processes join from the others over tcp
with CurveZMQ, each with nothing but the cluster's public key and its own domain key pair.

Skipped, with the reason, only where this process cannot create network namespaces (not root / no CAP_SYS_ADMIN,
no iproute2); CI runs as root and installs iproute2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli
from netns import NetnsLab, netns_lab

from pvcluster.rundiff import first_divergence
from pvcluster.trace import read_events

pytestmark = pytest.mark.slow

PORT = 7000
RUN_TIMEOUT_S = 300

DOMAINS = (
    ("alpha", "native", "workload=shootdown shutdown=poweroff"),
    ("beta", "xen", "workload=shootdown shutdown=reboot"),
    ("gamma", "xen", "workload=shootdown sdrounds=60 shutdown=poweroff"),
)


def spec_text(*, transport: str, host: str, keys: Path, placement: str,
              domains: tuple[tuple[str, str, str], ...] = DOMAINS, extra: str = "") -> str:
    out = [f"""
[cluster]
name = "multihost"
seed = 7

[hypervisor]
pcpus = 2
unresponsive_s = 5
join_timeout_s = 120
{extra}
[bus]
transport = "{transport}"
host = "{host}"
port = {PORT if transport == "tcp" else 0}
keys = "{keys}"
"""]
    for name, backend, cmdline in domains:
        out.append(f"""
[[domain]]
name = "{name}"
vcpus = 2
backend = "{backend}"
cmdline = "{cmdline}"
placement = "{placement}"
""")
    return "".join(out)


def pvcluster(*args: str) -> list[str]:
    return [sys.executable, "-m", "pvcluster.cli", *args]


def domain_keys(keys: Path, name: str, dest: Path) -> Path:
    """What a domain's host gets: the cluster's public key and its own key pair, nothing else (0600 in 0700)."""
    dest.mkdir(mode=0o700)
    for file in ("cluster.key", f"domain-{name}.key", f"domain-{name}.key_secret"):
        shutil.copy2(keys / file, dest / file)
        (dest / file).chmod(0o600)
    return dest


def hv_events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl") if e["event"] == event]


def start_hypervisor(lab: NetnsLab, spec: Path, run_dir: Path) -> subprocess.Popen[str]:
    return lab.popen(0, pvcluster("up", str(spec), "--run-dir", str(run_dir), "--json", "--quiet",
                                  "--timeout", str(RUN_TIMEOUT_S)),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def join(lab: NetnsLab, host: int, name: str, keys: Path, run_dir: Path) -> subprocess.Popen[str]:
    endpoint = f"tcp://{lab.hosts[0].addr}:{PORT}"
    return lab.popen(host, pvcluster("join", name, "--endpoint", endpoint, "--keys", str(keys),
                                     "--trace-dir", str(run_dir / "trace")),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(up: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = up.communicate(timeout=RUN_TIMEOUT_S + 60)
    assert out.strip(), f"`up` printed no JSON (rc {up.returncode}):\n{err[-3000:]}"
    report: dict[str, Any] = json.loads(out)
    report["rc"] = up.returncode
    return report


def prepare(tmp: Path, lab: NetnsLab | None, placement: str,
            domains: tuple[tuple[str, str, str], ...] = DOMAINS, extra: str = "") -> tuple[Path, Path, Path]:
    """(spec, keys, run_dir) under ``tmp``: on tcp the keys are made first, as an operator would."""
    tmp.mkdir(parents=True, exist_ok=True)
    keys, run_dir = tmp / "keys", tmp / "run"
    tcp = lab is not None
    spec = tmp / "spec.toml"
    spec.write_text(spec_text(transport="tcp" if tcp else "ipc", host=lab.hosts[0].addr if lab else "127.0.0.1",
                              keys=keys, placement=placement, domains=domains, extra=extra))
    if tcp:
        made = run_cli("keys", "create", "--spec", str(spec))
        assert made.returncode == 0, made.stderr
    return spec, keys, run_dir


def test_a_cluster_across_four_hosts_completes_with_the_trace_of_the_same_cluster_run_locally(
        tmp_path: Path) -> None:
    with netns_lab(1 + len(DOMAINS)) as lab:
        spec, keys, run_dir = prepare(tmp_path / "net", lab, "remote")
        started = time.monotonic()
        up = start_hypervisor(lab, spec, run_dir)
        joins = [join(lab, i + 1, name, domain_keys(keys, name, tmp_path / f"host{i + 1}-keys"), run_dir)
                 for i, (name, _, _) in enumerate(DOMAINS)]
        report = finish(up)
        net_wall = time.monotonic() - started
        for proc in joins:
            proc.wait(timeout=30)
        assert report["ok"] and report["rc"] == 0, report
        assert [d["state"] for d in report["domains"]] == ["dead"] * len(DOMAINS)
        # each domain joined over its own host's link, authenticated as itself
        accepted = {e["who"]: e["address"] for e in hv_events(run_dir, "auth.accepted") if e["socket"] == "bus"}
        assert accepted == {f"domain:{name}": lab.hosts[i + 1].addr for i, (name, _, _) in enumerate(DOMAINS)}
        assert {e["dom"] for e in hv_events(run_dir, "domain.joined")} == {1, 2, 3}
        assert all(e["placement"] == "remote" for e in hv_events(run_dir, "domain.joined"))
        assert [e["mode"] for e in hv_events(run_dir, "shootdown")][:1]  # the workload ran
    # the same cluster, every domain started by the hypervisor on this host over ipc
    spec_l, _, run_l = prepare(tmp_path / "local", None, "local")
    started = time.monotonic()
    done = run_cli("up", str(spec_l), "--run-dir", str(run_l), "--json", "--quiet", timeout=RUN_TIMEOUT_S)
    local_wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert first_divergence(run_dir, run_l) is None
    local = json.loads(done.stdout)
    print(f"\nwall (up to the end / windows only): local {local_wall:.2f} s / {local['wall_run_s']:.2f} s, across "
          f"{1 + len(DOMAINS)} namespaces {net_wall:.2f} s / {report['wall_run_s']:.2f} s; vt {report['vt_ns']} ns")


def test_clients_without_a_key_with_a_wrong_key_or_with_a_domain_key_are_refused_across_hosts(
        tmp_path: Path) -> None:
    doms = (("victim", "xen", "workload=forever"),)
    with netns_lab(3) as lab:
        spec, keys, run_dir = prepare(tmp_path, lab, "remote", domains=doms)
        up = start_hypervisor(lab, spec, run_dir)
        victim = join(lab, 1, "victim", domain_keys(keys, "victim", tmp_path / "victim-keys"), run_dir)
        attacker_keys = domain_keys(keys, "victim", tmp_path / "attacker-keys")  # a stolen domain key
        try:
            wait_for(lambda: hv_events(run_dir, "domain.joined") if (run_dir / "trace").exists() else [])
            result = lab.run(2, [sys.executable, str(Path(__file__).with_name("attacker.py")),
                                 f"tcp://{lab.hosts[0].addr}:{PORT}", f"tcp://{lab.hosts[0].addr}:{PORT + 1}",
                                 str(attacker_keys)], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            outcome = json.loads(result.stdout)
            assert outcome == {"no-key-control": None, "no-key-bus": None, "wrong-key-control": None,
                               "wrong-server-key-control": None, "domain-key-control": None,
                               "domain-key-bus-other": "refused"}, outcome
            attacker = lab.hosts[2].addr
            refused = [e for e in hv_events(run_dir, "auth.refused") if e["address"] == attacker]
            assert {e["reason"] for e in refused} >= {"unknown key", "domain key on the control socket"}
            failed = hv_events(run_dir, "auth.handshake_failed")
            assert {e["socket"] for e in failed} >= {"bus", "control"}  # the clients with no CURVE at all
            assert hv_events(run_dir, "domain.join_refused")  # the stolen key claiming another domain
            listed = lab.run(0, pvcluster("list", "--run-dir", str(run_dir), "--json"), capture_output=True,
                             text=True, timeout=60)
            assert [(d["name"], d["state"]) for d in json.loads(listed.stdout)] == [("victim", "running")]
        finally:
            lab.run(0, pvcluster("down", "--run-dir", str(run_dir)), capture_output=True, timeout=60)
            _, err = up.communicate(timeout=120)
            victim.wait(timeout=30)
        assert "brought down before it finished" in err  # `up` says why it ends: someone ran `down`
        assert victim.returncode == 0


def test_a_killed_remote_domain_is_noticed_and_the_others_finish(tmp_path: Path) -> None:
    doms = (*DOMAINS[:2], ("gamma", "xen", "workload=forever"))
    with netns_lab(4) as lab:
        spec, keys, run_dir = prepare(tmp_path, lab, "remote", domains=doms)
        up = start_hypervisor(lab, spec, run_dir)
        procs = {name: join(lab, i + 1, name, domain_keys(keys, name, tmp_path / f"h{i}"), run_dir)
                 for i, (name, _, _) in enumerate(doms)}
        gamma_trace = run_dir / "trace" / "dom3-gamma.jsonl"
        wait_for(lambda: gamma_trace.exists() and "domain.built" in gamma_trace.read_text())
        time.sleep(1)  # it runs a while: its windows are under way
        procs["gamma"].kill()
        report = finish(up)
        states = {d["name"]: (d["state"], d["crash"]) for d in report["domains"]}
        assert states["alpha"][0] == states["beta"][0] == "dead", states
        assert states["gamma"][0] == "crashed" and "no report" in states["gamma"][1], states
        for name in ("alpha", "beta"):
            procs[name].wait(timeout=30)


def wait_for(pred: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
