"""Hostile cluster specs and CLI input: every command fails with one clear error, never a Python traceback.

The CLI tests run the real `pvcluster` CLI in a subprocess, because the point is what a user sees on the
terminal (exit code, stderr), and every command loads the spec to find the run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvcluster.bus.endpoints import CONTROL_PORT_OFFSET, Endpoints
from pvcluster.spec import (
    MAX_NESTING,
    MAX_PORT,
    ClusterSpec,
    SpecError,
    load_spec,
    parse_domain_dict,
    parse_spec,
)

pytestmark = pytest.mark.timeout(120)

DOMAIN = '[[domain]]\nname = "a"\ncmdline = "shutdown=poweroff"\n'
# Deep enough that tomllib's recursive parser runs out of Python stack (its limit is ~1000 frames).
DEEP = 3000


def _deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_inline_table(depth: int) -> str:
    return "{a = " * depth + "1" + "}" * depth


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvcluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def _spec_problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    return info.value.problems


# ------------------------------------------------------------------------------------ deep nesting, unit


@pytest.mark.parametrize(
    "text",
    [
        f"x = {_deep_array(DEEP)}\n{DOMAIN}",
        f"x = {_deep_inline_table(DEEP)}\n{DOMAIN}",
        f"{DOMAIN}faults = {_deep_array(DEEP)}\n",
        f"[cluster]\nname = {_deep_inline_table(DEEP)}\n{DOMAIN}",
    ],
    ids=["array", "inline-table", "domain-key", "cluster-key"],
)
def test_toml_too_deep_for_the_parser_is_a_spec_error(text: str) -> None:
    (prob,) = _spec_problems(text)
    assert "nested too deeply" in prob


def test_nesting_the_parser_can_read_is_reported_with_its_key_path() -> None:
    (prob,) = _spec_problems(f"{DOMAIN}faults = {_deep_array(100)}\n")
    assert prob.startswith("domain[0].faults[0][0]") and f"more than {MAX_NESTING} levels" in prob


def test_deep_dotted_keys_are_a_spec_error() -> None:
    # Dotted keys build nested tables without recursion in tomllib, so they reach the checker.
    (prob,) = _spec_problems("x." + ".".join(["a"] * 5000) + " = 1\n" + DOMAIN)
    assert prob.startswith("x.a.a") and "nested too deeply" in prob


def _deep_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _deep_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("deep", [_deep_list(100_000), _deep_dict(100_000)], ids=["list", "dict"])
def test_from_dict_rejects_deep_values(deep: object) -> None:
    wire = load_spec().to_dict()
    wire["domain"][0]["cmdline"] = deep
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(wire)
    (prob,) = info.value.problems
    assert prob.startswith("domain[0].cmdline") and "nested too deeply" in prob


@pytest.mark.parametrize("deep", [_deep_list(100_000), _deep_dict(100_000)], ids=["list", "dict"])
def test_create_payload_rejects_deep_values(deep: object) -> None:
    with pytest.raises(SpecError) as info:
        parse_domain_dict({"name": "a", "faults": deep})
    (prob,) = info.value.problems
    assert prob.startswith("domain.faults") and "nested too deeply" in prob
    with pytest.raises(SpecError):
        parse_domain_dict(deep)


def test_self_referencing_value_is_a_spec_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SpecError):
        parse_domain_dict({"name": "a", "cpus": loop})


# ------------------------------------------------------------------------------- other hostile values


def test_integer_literal_too_long_for_python_is_a_spec_error() -> None:
    (prob,) = _spec_problems(f"[cluster]\nseed = 1{'0' * 5000}\n{DOMAIN}")
    assert "integer" in prob and "digits" in prob and "set_int_max_str_digits" not in prob


def test_huge_integer_from_a_dict_is_described_without_printing_it() -> None:
    wire = load_spec().to_dict()
    wire["cluster"]["seed"] = -(10**5000)
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(wire)
    (prob,) = info.value.problems
    assert prob.startswith("cluster.seed: must be an integer >= 0, got a negative integer of")


@pytest.mark.parametrize("key", ["kernel", "run_dir"])
def test_tilde_of_an_unknown_user_is_a_spec_error(key: str) -> None:
    body = 'kernel = "~nosuchuser-pvc/k.elf"\n' if key == "kernel" else ""
    head = '[cluster]\nrun_dir = "~nosuchuser-pvc/run"\n' if key == "run_dir" else ""
    (prob,) = _spec_problems(f"{head}{DOMAIN}{body}")
    assert "~nosuchuser-pvc" in prob and "home directory" in prob


@pytest.mark.parametrize(("section", "key"), [("bus", "host"), ("cluster", "run_dir")])
def test_lone_surrogates_from_a_dict_are_a_spec_error(section: str, key: str) -> None:
    wire = load_spec().to_dict()
    wire[section][key] = "/x\ud800"
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(wire)
    assert info.value.problems == [f"{section}.{key}: must be valid Unicode text"]


def test_kernel_with_lone_surrogate_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as info:
        parse_domain_dict({"name": "a", "kernel": "/k\ud800"})
    assert info.value.problems == ["domain.kernel: must be valid Unicode text"]
    # The message itself must be printable and sendable (msgpack refuses lone surrogates).
    str(info.value).encode("utf-8")


def test_messages_about_unprintable_keys_stay_encodable() -> None:
    wire = load_spec().to_dict()
    wire["bus"]["\udc80"] = 1
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(wire)
    str(info.value).encode("utf-8")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["cluster", "hypervisor", "bus"]), key=st.text(max_size=12), value=_JSON)
def test_any_json_value_anywhere_gives_a_spec_or_a_spec_error(section: str, key: str, value: object) -> None:
    wire = load_spec().to_dict()
    wire[section][key] = value
    wire["domain"][0][key] = value
    try:
        ClusterSpec.from_dict(wire)
    except SpecError as exc:
        str(exc).encode("utf-8")
    try:
        parse_domain_dict(wire["domain"][0], pcpus=2)
    except SpecError as exc:
        str(exc).encode("utf-8")


# ------------------------------------------------------------------------------------------ bus port


def test_highest_bus_port_leaves_room_for_the_control_socket() -> None:
    assert MAX_PORT + CONTROL_PORT_OFFSET == 65535
    (prob,) = _spec_problems(f'[bus]\ntransport = "tcp"\nport = 65535\n{DOMAIN}')
    assert prob.startswith("bus.port: must be an integer between 0 and 65534, got 65535")
    assert "port + 1" in prob
    assert parse_spec(f'[bus]\ntransport = "tcp"\nport = 65534\n{DOMAIN}').bus.port == 65534


def test_endpoints_put_the_control_socket_one_port_up(tmp_path: Path) -> None:
    spec = parse_spec(f'[bus]\ntransport = "tcp"\nport = 65534\n{DOMAIN}')
    ep = Endpoints.for_spec(spec, tmp_path)
    assert (ep.bus, ep.control) == ("tcp://127.0.0.1:65534", "tcp://127.0.0.1:65535")


def test_endpoints_refuse_a_port_whose_control_port_does_not_exist(tmp_path: Path) -> None:
    # A spec that skipped validation (e.g. built by hand) must not bind a port that cannot exist.
    spec = parse_spec(f'[bus]\ntransport = "tcp"\nport = 65534\n{DOMAIN}')
    bad = ClusterSpec(spec.cluster, spec.hypervisor, type(spec.bus)("tcp", "127.0.0.1", 65535), spec.domains, "x")
    with pytest.raises(ValueError, match="65534"):
        Endpoints.for_spec(bad, tmp_path)


# ------------------------------------------------------------------------------- real CLI processes

SPEC_COMMANDS = [
    ["list"],
    ["down"],
    ["trace"],
    ["dmesg"],
    ["console", "a"],
    ["destroy", "a"],
    ["pause", "a"],
    ["unpause", "a"],
]


def _write(run_dir: Path, text: str, name: str = "spec.toml") -> str:
    path = run_dir / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("command", [["up"], *SPEC_COMMANDS], ids=lambda c: c[0])
def test_every_command_rejects_a_deeply_nested_spec_cleanly(run_dir: Path, command: list[str]) -> None:
    spec = _write(run_dir, f"x = {_deep_array(DEEP)}\n{DOMAIN}")
    args = [*command, spec] if command == ["up"] else [*command, "--spec", spec]
    proc = _cli(*args)
    _assert_clean_failure(proc, 2, f"invalid cluster spec {spec}", "nested too deeply")
    assert not (run_dir / "hypervisor.json").exists()


@pytest.mark.parametrize(
    "body",
    [
        f"[cluster]\nname = {_deep_inline_table(DEEP)}\n{DOMAIN}",
        f"{DOMAIN}faults = {_deep_array(200)}\n",
        "x." + ".".join(["a"] * 5000) + " = 1\n" + DOMAIN,
    ],
    ids=["inline-table", "readable-depth", "dotted-keys"],
)
def test_up_rejects_other_deep_specs_cleanly(run_dir: Path, body: str) -> None:
    _assert_clean_failure(_cli("up", _write(run_dir, body)), 2, "invalid cluster spec", "nested too deeply")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (f"[cluster]\nseed = 1{'0' * 5000}\n{DOMAIN}", "digits"),
        (f'{DOMAIN}kernel = "~nosuchuser-pvc/k.elf"\n', "home directory"),
        # Rich markup in a message must be printed as text: "[/]" used to crash the error printer itself.
        (f'"[/]" = 1\n{DOMAIN}', '"[/]": unknown key'),
        ('[domain]\nname = "a"\n', "write [[domain]] for each domain, not [domain]"),
    ],
    ids=["long-integer", "tilde-user", "markup-key", "markup-message"],
)
def test_up_rejects_hostile_values_cleanly(run_dir: Path, body: str, needle: str) -> None:
    proc = _cli("up", _write(run_dir, body))
    _assert_clean_failure(proc, 2, "invalid cluster spec")
    assert needle in " ".join(proc.stderr.split()), proc.stderr


def test_up_rejects_bus_port_65535(run_dir: Path) -> None:
    spec = _write(run_dir, f'[bus]\ntransport = "tcp"\nport = 65535\n{DOMAIN}')
    proc = _cli("up", spec, "--run-dir", str(run_dir / "c"), "--timeout", "20")
    _assert_clean_failure(proc, 2, "bus.port", "65534")
    assert not (run_dir / "c").exists()  # rejected before anything was created


def _fake_hypervisor(run_dir: Path) -> str:
    """A run directory whose hypervisor.json names a live process (this one) and an endpoint ZeroMQ refuses."""
    (run_dir / "hypervisor.json").write_text(json.dumps({"pid": os.getpid(), "control": "bogus"}))
    return str(run_dir)


def test_unexpected_error_is_one_line_without_traceback(run_dir: Path) -> None:
    proc = _cli("list", "--run-dir", _fake_hypervisor(run_dir), env={"PVCLUSTER_DEBUG": ""})
    _assert_clean_failure(proc, 1, "error:", "bogus", "--debug")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--debug", "list"], {}), (["list", "--debug"], {}), (["list"], {"PVCLUSTER_DEBUG": "1"})],
    ids=["global-flag", "command-flag", "env"],
)
def test_unexpected_error_shows_traceback_on_request(run_dir: Path, args: list[str], env: dict[str, str]) -> None:
    proc = _cli(*args, "--run-dir", _fake_hypervisor(run_dir), env=env)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "bogus" in proc.stderr


def test_trace_of_unreadable_traces_is_a_clear_error(run_dir: Path) -> None:
    (run_dir / "trace").mkdir()
    (run_dir / "trace" / "hypervisor.jsonl").write_text("not json\n")
    proc = _cli("trace", "--run-dir", str(run_dir))
    _assert_clean_failure(proc, 1, "error:", str(run_dir))
