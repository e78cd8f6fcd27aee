"""Cluster spec loading and validation (pvcluster/spec.py)."""

from __future__ import annotations

import json
import os
import pickle
import tomllib
from pathlib import Path

import pytest

from pvcluster.cluster import _domain_dict
from pvcluster.spec import (
    BUILTIN_KERNELS,
    ClusterSpec,
    DomainSpec,
    SpecError,
    default_spec_text,
    load_spec,
    parse_domain_dict,
    parse_spec,
)

# A minimal valid spec; cases append to it so each one isolates a single rule.
BASE = """
[[domain]]
name = "alpha"
"""


def problems_of(text: str, **kw: object) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, **kw)  # type: ignore[arg-type]
    return info.value.problems


def one_problem(text: str) -> str:
    probs = problems_of(text)
    assert len(probs) == 1, probs
    return probs[0]


def with_section(section: str, body: str) -> str:
    return f"[{section}]\n{body}\n{BASE}"


def with_domain(body: str) -> str:
    return f'[[domain]]\nname = "alpha"\n{body}\n'


# ---------------------------------------------------------------------------------------------- default


def test_default_loads_with_two_domains_of_two_vcpus() -> None:
    spec = load_spec()
    assert spec.source == "<default>"
    assert [d.name for d in spec.domains] == ["alpha", "beta"]
    assert [d.vcpus for d in spec.domains] == [2, 2]
    assert spec.domain("beta").cmdline == "workload=shootdown shutdown=reboot"
    assert all(d.builtin_kernel for d in spec.domains)


def test_default_file_holds_exactly_the_documented_schema() -> None:
    expected = {
        "cluster": {"name": "default", "seed": 1, "run_dir": "", "mode": "virtual"},
        "hypervisor": {
            "pcpus": 2,
            "window_ns": 10000,
            "slice_ns": 30000,
            "log_level": "info",
            "cost": {"ps_per_instr": 1000, "hypercall_ns": 400, "hypercall_jitter_ns": 40, "link_ns": 10000,
                     "ipi_ns": 1000, "irq_entry_ns": 100, "mmio_ns": 150, "multicall_entry_ns": 50,
                     "flush_local_ns": 40, "flush_page_ns": 100, "flush_remote_ns": 500, "tlb_refill_ns": 100,
                     "insn": {"alu": 1000, "mem": 2000, "indirect": 5000, "ret": 2000, "iret": 40000,
                              "serialising": 60000, "cr3_write": 100000, "invlpg": 100000, "cli_sti": 4000,
                              "pushf_popf": 8000, "io": 500000, "pause": 4000,
                              "locked": 50000}},
            "unresponsive_s": 30,
            "work_budget": 1024,
            "trace_burst": 20000,
            "trace_rate": 50,
            "link_rto_ns": 40000,
            "partition_limit_ns": 5000000,
            "join_timeout_s": 120,
        },
        "bus": {"transport": "ipc", "host": "127.0.0.1", "port": 0, "keys": ""},
        "domain": [
            {
                "name": n,
                "vcpus": 2,
                "memory_mib": 4,
                "kernel": "pvkern",
                "cmdline": c,
                "backend": b,
                "boot": "ebx",
                "patching": True,
                "faults": [],
                "cpus": [],
                "placement": "local",
                "on_poweroff": "destroy",
                "on_reboot": "preserve",
                "on_crash": "preserve",
            }
            for n, c, b in (("alpha", "workload=shootdown shutdown=poweroff", "native"),
                            ("beta", "workload=shootdown shutdown=reboot", "xen"))
        ],
    }
    assert tomllib.loads(default_spec_text()) == expected
    assert {k: v for k, v in load_spec().to_dict().items() if k != "source"} == expected


def test_default_file_documents_every_key() -> None:
    # Every key line of the first occurrence of each table carries a comment.
    seen: set[str] = set()
    table = ""
    for line in default_spec_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped.split("#")[0].strip()
            continue
        if "=" in stripped and not stripped.startswith("#"):
            key = f"{table}.{stripped.split('=')[0].strip()}"
            if key not in seen:
                assert "#" in stripped, f"undocumented key: {key}"
                seen.add(key)


def test_omitted_sections_and_keys_take_defaults() -> None:
    spec = parse_spec(BASE)
    default = load_spec()
    assert spec.cluster == default.cluster
    assert spec.hypervisor == default.hypervisor
    assert spec.bus == default.bus
    dom = spec.domains[0]
    assert (dom.vcpus, dom.memory_mib, dom.kernel, dom.cmdline, dom.backend, dom.boot, dom.patching) == (
        1,
        4,
        "pvkern",
        "",
        "xen",
        "ebx",
        True,
    )


def test_full_valid_spec() -> None:
    spec = parse_spec(
        """
        [cluster]
        name = "lab-1_x"
        seed = 0
        [hypervisor]
        pcpus = 64
        window_ns = 100
        log_level = "debug"
        [hypervisor.cost]
        ps_per_instr = 1000000
        hypercall_ns = 0
        hypercall_jitter_ns = 0
        link_ns = 100
        [bus]
        transport = "tcp"
        host = "0.0.0.0"
        port = 65534
        [[domain]]
        name = "a"
        vcpus = 32
        memory_mib = 256
        backend = "vmi"
        boot = "entry"
        patching = false
        cmdline = "x"
        """
    )
    assert spec.cluster.name == "lab-1_x"
    assert spec.hypervisor.cost.link_ns == 100
    assert spec.bus.transport == "tcp" and spec.bus.port == 65534
    assert spec.domains[0].vcpus == 32 and spec.domains[0].patching is False


# ------------------------------------------------------------------------------------------- key errors


def test_typo_names_key_and_suggests_fix() -> None:
    prob = one_problem(with_domain("vcpu = 2"))
    assert prob == "domain[0].vcpu: unknown key (did you mean 'vcpus'?)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[clustr]\nname = "x"\n' + BASE, "clustr: unknown key (did you mean 'cluster'?)"),
        (
            with_section("hypervisor.cost", "link = 5"),
            "hypervisor.cost.link: unknown key (did you mean 'link_ns'?)",
        ),
        (with_section("bus", "zzz = 1"), "bus.zzz: unknown key"),
        ('[[domains]]\nname = "a"\n' + BASE, "domains: unknown key (did you mean 'domain'?)"),
    ],
)
def test_unknown_keys_everywhere(text: str, expected: str) -> None:
    assert one_problem(text) == expected


def test_domain_name_is_required() -> None:
    assert one_problem("[[domain]]\nvcpus = 1\n") == "domain[0].name: required key missing"


# ---------------------------------------------------------------------------------------- range / type


def test_negative_vcpus_names_domain_index() -> None:
    text = BASE + '[[domain]]\nname = "beta"\nvcpus = -1\n'
    assert one_problem(text) == "domain[1].vcpus: must be an integer between 1 and 32, got -1"


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        (with_section("cluster", 'name = "Bad"'), "cluster.name", "must be a string matching"),
        (with_section("cluster", f'name = "{"a" * 33}"'), "cluster.name", "must be a string matching"),
        (with_section("cluster", 'name = "-x"'), "cluster.name", "must be a string matching"),
        (with_section("cluster", "seed = -1"), "cluster.seed", "must be an integer >= 0, got -1"),
        (with_section("cluster", "seed = 1.5"), "cluster.seed", "got float 1.5"),
        (with_section("cluster", "run_dir = 3"), "cluster.run_dir", "must be a string, got 3"),
        (with_section("hypervisor", "pcpus = 0"), "hypervisor.pcpus", "between 1 and 64, got 0"),
        (with_section("hypervisor", "pcpus = 65"), "hypervisor.pcpus", "between 1 and 64, got 65"),
        (with_section("hypervisor", "window_ns = 99"), "hypervisor.window_ns", "integer >= 100, got 99"),
        (with_section("hypervisor.cost", "ps_per_instr = 0"), "hypervisor.cost.ps_per_instr", "got 0"),
        (
            with_section("hypervisor.cost", "ps_per_instr = 1000001"),
            "hypervisor.cost.ps_per_instr",
            "between 1 and 1000000",
        ),
        (with_section("hypervisor.cost", "hypercall_ns = -1"), "hypervisor.cost.hypercall_ns", ">= 0"),
        (
            with_section("hypervisor.cost", "hypercall_jitter_ns = -1"),
            "hypervisor.cost.hypercall_jitter_ns",
            ">= 0",
        ),
        (with_section("hypervisor.cost", "link_ns = 0"), "hypervisor.cost.link_ns", ">= 1, got 0"),
        (with_section("bus", "port = 65535"), "bus.port", "between 0 and 65534, got 65535 (the control socket"),
        (with_section("bus", "port = 65536"), "bus.port", "between 0 and 65534, got 65536"),
        (with_section("bus", "port = -1"), "bus.port", "between 0 and 65534"),
        (with_section("bus", 'host = ""'), "bus.host", "must not be empty"),
        (with_section("bus", "host = 1"), "bus.host", "must be a string"),
        (with_domain("vcpus = 33"), "domain[0].vcpus", "between 1 and 32, got 33"),
        (with_domain("memory_mib = 0"), "domain[0].memory_mib", "between 1 and 256, got 0"),
        (with_domain("memory_mib = 257"), "domain[0].memory_mib", "between 1 and 256, got 257"),
        (with_domain('memory_mib = "4"'), "domain[0].memory_mib", 'got "4"'),
        (with_domain("patching = 1"), "domain[0].patching", "must be a boolean"),
        (with_domain('patching = "yes"'), "domain[0].patching", "must be a boolean"),
        (with_domain("cmdline = 5"), "domain[0].cmdline", "must be a string"),
        (with_domain('cmdline = "a\\u0000b"'), "domain[0].cmdline", "NUL"),
        (with_domain(f'cmdline = "{"x" * 1024}"'), "domain[0].cmdline", "shorter than 1024 bytes"),
        # 512 two-byte characters: short in characters, too long in bytes.
        (with_domain(f'cmdline = "{"é" * 512}"'), "domain[0].cmdline", "got 1024 bytes"),
        (with_domain("kernel = 1"), "domain[0].kernel", "must be a string"),
        (with_domain('kernel = ""'), "domain[0].kernel", "built-in kernel"),
        ('[[domain]]\nname = "Alpha"\n', "domain[0].name", "must be a string matching"),
        ("[[domain]]\nname = 7\n", "domain[0].name", "must be a string matching"),
    ],
)
def test_range_and_type_rules(text: str, path: str, fragment: str) -> None:
    prob = one_problem(text)
    assert prob.startswith(f"{path}: "), prob
    assert fragment in prob, prob


@pytest.mark.parametrize("key", ["vcpus", "memory_mib"])
def test_bool_is_not_an_integer(key: str) -> None:
    prob = one_problem(with_domain(f"{key} = true"))
    assert prob.startswith(f"domain[0].{key}: must be an integer") and prob.endswith("got boolean true")


def test_cmdline_just_under_limit_is_fine() -> None:
    spec = parse_spec(with_domain(f'cmdline = "{"x" * 1023}"'))
    assert len(spec.domains[0].cmdline) == 1023


def test_window_must_not_exceed_link_latency() -> None:
    text = "[hypervisor]\nwindow_ns = 5000\n[hypervisor.cost]\nlink_ns = 4000\n" + BASE
    assert one_problem(text) == "hypervisor.window_ns: must be <= hypervisor.cost.link_ns (4000), got 5000"
    # Equal is allowed.
    parse_spec("[hypervisor]\nwindow_ns = 4000\n[hypervisor.cost]\nlink_ns = 4000\n" + BASE)


def test_window_check_skipped_when_link_itself_is_bad() -> None:
    text = "[hypervisor]\nwindow_ns = 5000\n[hypervisor.cost]\nlink_ns = true\n" + BASE
    assert [p.split(":")[0] for p in problems_of(text)] == ["hypervisor.cost.link_ns"]


def test_jitter_must_be_below_hypercall_cost() -> None:
    text = with_section("hypervisor.cost", "hypercall_ns = 40\nhypercall_jitter_ns = 40")
    expected = "hypervisor.cost.hypercall_jitter_ns: must be less than hypercall_ns (40), got 40"
    assert one_problem(text) == expected


# ----------------------------------------------------------------------------------------------- enums


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        (
            with_section("hypervisor", 'log_level = "warn"'),
            "hypervisor.log_level",
            'must be one of "debug", "info", "warning", "error", got "warn" (did you mean \'warning\'?)',
        ),
        (with_section("bus", 'transport = "udp"'), "bus.transport", 'must be one of "ipc", "tcp", got "udp"'),
        (with_domain('backend = "kvm"'), "domain[0].backend", 'must be one of "xen", "native", "vmi"'),
        (with_domain('boot = "grub"'), "domain[0].boot", 'must be one of "ebx", "ident", "entry"'),
        (with_domain("boot = 1"), "domain[0].boot", "got 1"),
        (with_section("cluster", 'mode = "fast"'), "cluster.mode", 'must be one of "virtual", got "fast"'),
    ],
)
def test_enum_rules(text: str, path: str, fragment: str) -> None:
    prob = one_problem(text)
    assert prob.startswith(f"{path}: "), prob
    assert fragment in prob, prob


def test_realtime_mode_is_not_implemented_yet() -> None:
    prob = one_problem(with_section("cluster", 'mode = "realtime"'))
    assert prob.startswith("cluster.mode: ") and "not implemented yet" in prob


# --------------------------------------------------------------------------------------- structure


def test_domain_as_table_instead_of_array() -> None:
    prob = one_problem('[domain]\nname = "alpha"\n')
    assert prob.startswith("domain: must be an array of tables") and "[[domain]]" in prob


def test_domain_array_of_non_tables() -> None:
    assert one_problem("domain = [1]\n") == "domain[0]: must be a table, got 1"


def test_section_must_be_a_table() -> None:
    assert one_problem("hypervisor = 3\n" + BASE) == "hypervisor: must be a table, got 3"


def test_at_least_one_domain() -> None:
    assert one_problem('[cluster]\nname = "x"\n') == "domain: at least one [[domain]] is required"
    assert one_problem("domain = []\n") == "domain: at least one [[domain]] is required"


def test_at_most_64_domains() -> None:
    text = "".join(f'[[domain]]\nname = "d{i}"\n' for i in range(65))
    assert one_problem(text) == "domain: at most 64 domains are allowed, got 65"
    assert len(parse_spec("".join(f'[[domain]]\nname = "d{i}"\n' for i in range(64))).domains) == 64


def test_duplicate_domain_names() -> None:
    text = BASE + '[[domain]]\nname = "beta"\n' + BASE
    assert one_problem(text) == 'domain[2].name: duplicate domain name "alpha" (also used by domain[0])'


def test_toml_syntax_error_has_line_and_column() -> None:
    err = problems_of('[cluster]\nname = "x"\nseed = \n')
    assert len(err) == 1
    assert err[0].startswith("TOML syntax error:") and "line 3" in err[0] and "column" in err[0]


# -------------------------------------------------------------------------------------- collection


def test_all_problems_are_collected() -> None:
    text = """
    [cluster]
    seed = -3
    [hypervisor]
    log_level = "loud"
    [[domain]]
    name = "alpha"
    vcpu = 2
    """
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="my.toml")
    err = info.value
    assert len(err.problems) == 3, err.problems
    paths = [p.split(":")[0] for p in err.problems]
    assert paths == ["cluster.seed", "hypervisor.log_level", "domain[0].vcpu"]
    assert str(err) == "invalid cluster spec my.toml:\n" + "\n".join(f"  - {p}" for p in err.problems)


def test_problems_in_several_domains_are_all_reported() -> None:
    text = '[[domain]]\nname = "a"\nvcpus = 0\n[[domain]]\nvcpus = 99\nboot = "x"\n'
    paths = [p.split(":")[0] for p in problems_of(text)]
    assert paths == ["domain[0].vcpus", "domain[1].name", "domain[1].vcpus", "domain[1].boot"]


def test_spec_error_pickles() -> None:
    try:
        parse_spec("[[domain]]\nvcpus = 0\n", source="x.toml")
    except SpecError as exc:
        again = pickle.loads(pickle.dumps(exc))
        assert again.problems == exc.problems and str(again) == str(exc)
    else:
        pytest.fail("no SpecError")


# ------------------------------------------------------------------------------------------ files


def test_missing_spec_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert info.value.problems == [f"spec file not found: {missing}"]
    assert str(missing) in str(info.value)


def test_load_spec_from_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(BASE)
    spec = load_spec(f)
    assert spec.source == str(f)
    assert load_spec(str(f)) == spec


def test_missing_kernel_file_names_domain_and_path(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[[domain]]\nname = "alpha"\nkernel = "kernels/guest.elf"\n')
    with pytest.raises(SpecError) as info:
        load_spec(f)
    (prob,) = info.value.problems
    expected = tmp_path / "kernels" / "guest.elf"
    assert prob == f'domain[0].kernel: kernel file for domain "alpha" not found: {expected}'


def test_misspelt_builtin_kernel_gets_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    prob = one_problem(with_domain('kernel = "pvkrn"'))
    assert "not found" in prob and "did you mean 'pvkern'?" in prob


def test_kernel_directory_is_rejected(tmp_path: Path) -> None:
    probs = problems_of(with_domain(f'kernel = "{tmp_path}"'))
    assert len(probs) == 1 and "not a regular file" in probs[0] and str(tmp_path) in probs[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_kernel_file(tmp_path: Path) -> None:
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    k.chmod(0)
    probs = problems_of(with_domain(f'kernel = "{k}"'))
    assert len(probs) == 1 and "not readable" in probs[0] and str(k) in probs[0]


def test_relative_kernel_resolves_against_spec_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_dir = tmp_path / "specs"
    (spec_dir / "k").mkdir(parents=True)
    kernel = spec_dir / "k" / "guest.elf"
    kernel.write_bytes(b"\x7fELF")
    f = spec_dir / "c.toml"
    f.write_text('[[domain]]\nname = "alpha"\nkernel = "k/guest.elf"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # CWD must not matter
    spec = load_spec(f)
    assert spec.domains[0].kernel == str(kernel)
    assert Path(spec.domains[0].kernel).is_absolute()
    assert not spec.domains[0].builtin_kernel


def test_relative_kernel_in_parse_spec_uses_base_dir_or_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "guest.elf").write_bytes(b"")
    text = with_domain('kernel = "guest.elf"')
    assert parse_spec(text, base_dir=tmp_path).domains[0].kernel == str(tmp_path / "guest.elf")
    monkeypatch.chdir(tmp_path)
    assert parse_spec(text).domains[0].kernel == str(tmp_path / "guest.elf")


def test_builtin_kernel_name_is_kept() -> None:
    assert parse_spec(with_domain(f'kernel = "{BUILTIN_KERNELS[0]}"')).domains[0].kernel == "pvkern"


# ---------------------------------------------------------------------------------------- run_dir


def test_run_dir_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PVCLUSTER_RUN_DIR", raising=False)
    spec = parse_spec(with_section("cluster", 'name = "c1"'))
    assert spec.resolved_run_dir() == Path(f"/tmp/pvcluster-{os.getuid()}/c1")


def test_run_dir_with_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PVCLUSTER_RUN_DIR", str(tmp_path))
    spec = parse_spec(with_section("cluster", 'name = "c1"'))
    assert spec.resolved_run_dir() == tmp_path / "c1"


def test_explicit_run_dir_wins_and_resolves_against_spec_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PVCLUSTER_RUN_DIR", "/somewhere/else")
    f = tmp_path / "c.toml"
    f.write_text(with_section("cluster", 'run_dir = "runs/here"'))
    spec = load_spec(f)
    assert spec.cluster.run_dir == str(tmp_path / "runs" / "here")
    assert spec.resolved_run_dir() == tmp_path / "runs" / "here"


# ----------------------------------------------------------------------------------- dict round trip


def test_to_dict_from_dict_round_trip(tmp_path: Path) -> None:
    (tmp_path / "guest.elf").write_bytes(b"")
    text = BASE + '[[domain]]\nname = "beta"\nkernel = "guest.elf"\nvcpus = 3\n'
    spec = parse_spec(text, source="rt.toml", base_dir=tmp_path)
    wire = json.loads(json.dumps(spec.to_dict()))
    again = ClusterSpec.from_dict(wire)
    assert again == spec
    assert again.source == "rt.toml"
    assert ClusterSpec.from_dict(load_spec().to_dict()) == load_spec()


def test_from_dict_revalidates() -> None:
    wire = load_spec().to_dict()
    wire["domain"][1]["vcpus"] = 0
    wire["bus"]["bogus"] = 1
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(wire)
    assert info.value.source == "<default>"
    assert [p.split(":")[0] for p in info.value.problems] == ["bus.bogus", "domain[1].vcpus"]


def test_from_dict_rejects_lone_surrogates() -> None:
    wire = load_spec().to_dict()
    wire["domain"][0]["cmdline"] = "a\udc80"
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(wire)
    assert info.value.problems == ["domain[0].cmdline: must be valid Unicode text"]


# ------------------------------------------------------------------------------- hypervisor: new keys


def test_new_hypervisor_keys_default() -> None:
    hv = parse_spec(BASE).hypervisor
    assert (hv.unresponsive_s, hv.work_budget, hv.trace_burst, hv.trace_rate) == (30.0, 1024, 20000, 50)
    assert isinstance(hv.unresponsive_s, float)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("unresponsive_s = 1", 1.0),
        ("unresponsive_s = 0.001", 0.001),
        ("unresponsive_s = 86400", 86400.0),
        ("unresponsive_s = 86400.0", 86400.0),
    ],
)
def test_unresponsive_s_accepts_integers_and_floats_in_range(body: str, expected: float) -> None:
    assert parse_spec(with_section("hypervisor", body)).hypervisor.unresponsive_s == expected


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("0", "got 0"),
        ("0.0", "got float 0.0"),
        ("-1", "got -1"),
        ("86400.5", "got float 86400.5"),
        ("86401", "got 86401"),
        ("nan", "got float nan"),
        ("inf", "got float inf"),
        ('"30"', 'got "30"'),
        ("true", "got boolean true"),
        ("[30]", "got an array"),
    ],
)
def test_unresponsive_s_bounds_and_types(value: str, got: str) -> None:
    prob = one_problem(with_section("hypervisor", f"unresponsive_s = {value}"))
    assert prob == f"hypervisor.unresponsive_s: must be a number greater than 0 and at most 86400, {got}"


@pytest.mark.parametrize(
    ("body", "attr", "value"),
    [
        ("work_budget = 1", "work_budget", 1),
        ("work_budget = 1000000", "work_budget", 1000000),
        ("trace_burst = 0", "trace_burst", 0),
        ("trace_burst = 1", "trace_burst", 1),
        ("trace_rate = 0", "trace_rate", 0),
        ("trace_rate = 100000", "trace_rate", 100000),
    ],
)
def test_budget_and_trace_limits_accept_their_bounds(body: str, attr: str, value: int) -> None:
    assert getattr(parse_spec(with_section("hypervisor", body)).hypervisor, attr) == value


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("work_budget = 0", "hypervisor.work_budget: must be an integer >= 1, got 0"),
        ("work_budget = 1.5", "hypervisor.work_budget: must be an integer >= 1, got float 1.5"),
        ("work_budget = true", "hypervisor.work_budget: must be an integer >= 1, got boolean true"),
        ("trace_burst = -1", "hypervisor.trace_burst: must be an integer >= 0, got -1"),
        ('trace_burst = "20000"', 'hypervisor.trace_burst: must be an integer >= 0, got "20000"'),
        ("trace_rate = -1", "hypervisor.trace_rate: must be an integer >= 0, got -1"),
        ("trace_rate = 0.5", "hypervisor.trace_rate: must be an integer >= 0, got float 0.5"),
        ("trace_rates = 5", "hypervisor.trace_rates: unknown key (did you mean 'trace_rate'?)"),
    ],
)
def test_budget_and_trace_limit_errors(body: str, expected: str) -> None:
    assert one_problem(with_section("hypervisor", body)) == expected


# ------------------------------------------------------------------------------------------ domain cpus


def test_cpus_default_to_every_pcpu() -> None:
    assert parse_spec(BASE).domains[0].cpus == ()
    assert parse_spec(with_domain("cpus = []")).domains[0].cpus == ()


def test_cpus_keep_the_written_order() -> None:
    text = "[hypervisor]\npcpus = 4\n" + with_domain("cpus = [3, 0, 2]")
    assert parse_spec(text).domains[0].cpus == (3, 0, 2)


def test_cpus_are_checked_against_pcpus() -> None:
    text = "[hypervisor]\npcpus = 2\n" + with_domain("cpus = [1, 2]")
    assert one_problem(text) == "domain[0].cpus[1]: pCPU 2 does not exist: hypervisor.pcpus is 2 (ids 0..1)"
    # Without [hypervisor] pcpus is its default, 2.
    assert one_problem(with_domain("cpus = [0, 5]")).startswith("domain[0].cpus[1]: pCPU 5 does not exist")
    assert parse_spec("[hypervisor]\npcpus = 64\n" + with_domain("cpus = [63]")).domains[0].cpus == (63,)


def test_cpus_cross_check_skipped_when_pcpus_is_bad() -> None:
    # pcpus = 0 is already reported; cpus = [5] could be right once pcpus is fixed, so only pcpus is reported.
    text = "[hypervisor]\npcpus = 0\n" + with_domain("cpus = [5]")
    assert [p.split(":")[0] for p in problems_of(text)] == ["hypervisor.pcpus"]
    # No pcpus can make 64 valid, so that is still reported.
    text = "[hypervisor]\npcpus = true\n" + with_domain("cpus = [64]")
    assert problems_of(text)[1:] == [
        "domain[0].cpus[0]: pCPU 64 does not exist: there are at most 64 (ids 0..63)"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", "domain[0].cpus: must be an array of pCPU ids (integers >= 0), got 3"),
        ('"0-1"', 'domain[0].cpus: must be an array of pCPU ids (integers >= 0), got "0-1"'),
        ("[-1]", "domain[0].cpus[0]: must be a pCPU id (an integer >= 0), got -1"),
        ("[0, true]", "domain[0].cpus[1]: must be a pCPU id (an integer >= 0), got boolean true"),
        ("[0, 1.0]", "domain[0].cpus[1]: must be a pCPU id (an integer >= 0), got float 1.0"),
        ('["0"]', 'domain[0].cpus[0]: must be a pCPU id (an integer >= 0), got "0"'),
        ("[[0]]", "domain[0].cpus[0]: must be a pCPU id (an integer >= 0), got an array"),
        ("[1, 0, 1]", "domain[0].cpus[2]: duplicate pCPU 1 (also cpus[0])"),
        (str(list(range(65))), "domain[0].cpus: at most 64 pCPU ids, got 65"),
    ],
)
def test_cpus_errors(value: str, expected: str) -> None:
    assert one_problem("[hypervisor]\npcpus = 64\n" + with_domain(f"cpus = {value}")) == expected


def test_cpus_problems_in_every_domain_are_reported() -> None:
    text = '[[domain]]\nname = "a"\ncpus = [2, 2]\n[[domain]]\nname = "b"\ncpus = [0, 0, 9]\n'
    assert [p.split(":")[0] for p in problems_of(text)] == [
        "domain[0].cpus[0]", "domain[0].cpus[1]", "domain[1].cpus[1]", "domain[1].cpus[2]"
    ]


# ---------------------------------------------------------------------------------------- domain faults


@pytest.mark.parametrize(
    ("value", "faults", "ident"),
    [
        ("[]", (), None),
        ('["skip-flush"]', ("skip-flush",), None),
        ('["ident=0xdeadbeef"]', ("ident=0xdeadbeef",), 0xDEADBEEF),
        ('["ident=0xDEADBEEF"]', ("ident=0xdeadbeef",), 0xDEADBEEF),
        ('["ident=0x1"]', ("ident=0x00000001",), 1),
        ('["ident=0x00000000"]', ("ident=0x00000000",), 0),
        ('["ident=0xabc", "skip-flush"]', ("ident=0x00000abc", "skip-flush"), 0xABC),
    ],
)
def test_faults_are_normalised(value: str, faults: tuple[str, ...], ident: int | None) -> None:
    dom = parse_spec(with_domain(f"faults = {value}")).domains[0]
    assert dom.faults == faults
    assert dom.ident_fault == ident


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"skip-flush"', "domain[0].faults: must be an array of fault names"),
        ("[1]", "domain[0].faults[0]: must be a fault name"),
        ('["skip_flush"]', "domain[0].faults[0]: unknown fault \"skip_flush\" (known: \"skip-flush\", "
                           "\"ident=0xNNNNNNNN\" (1 to 8 hex digits)) (did you mean 'skip-flush'?)"),
        ('["ident=0x"]', 'domain[0].faults[0]: must be ident=0x followed by 1 to 8 hex digits, got "ident=0x"'),
        ('["ident=0x123456789"]', "domain[0].faults[0]: must be ident=0x followed by 1 to 8 hex digits"),
        ('["ident=deadbeef"]', "domain[0].faults[0]: must be ident=0x followed by 1 to 8 hex digits"),
        ('["ident=0xdeadbeeg"]', "domain[0].faults[0]: must be ident=0x followed by 1 to 8 hex digits"),
        ('["ident=0x1 "]', "domain[0].faults[0]: must be ident=0x followed by 1 to 8 hex digits"),
        ('["ident=0x1", "ident=0x1"]', "domain[0].faults[1]: at most one ident= fault per domain (another is "
                                       "faults[0])"),
        ('["ident=0x1", "skip-flush", "ident=0x2"]', "domain[0].faults[2]: at most one ident= fault per domain"),
        ('["skip-flush", "skip-flush"]', 'domain[0].faults[1]: duplicate fault "skip-flush" (also faults[0])'),
    ],
)
def test_fault_errors(value: str, expected: str) -> None:
    prob = one_problem(with_domain(f"faults = {value}"))
    assert prob.startswith(expected), prob


# --------------------------------------------------------------------------- round trip of the new keys

NEW_KEYS = """
[hypervisor]
pcpus = 4
unresponsive_s = 2.5
work_budget = 7
trace_burst = 0
trace_rate = 0
[[domain]]
name = "a"
cpus = [3, 1]
faults = ["ident=0xDEAD", "skip-flush"]
[[domain]]
name = "b"
"""


def test_new_keys_round_trip_through_to_dict_and_from_dict() -> None:
    spec = parse_spec(NEW_KEYS)
    wire = spec.to_dict()
    assert wire["hypervisor"] | {"cost": None} == {
        "pcpus": 4, "window_ns": 10000, "slice_ns": 30000, "log_level": "info", "cost": None,
        "unresponsive_s": 2.5, "work_budget": 7, "trace_burst": 0, "trace_rate": 0, "link_rto_ns": 40000,
        "partition_limit_ns": 5000000, "join_timeout_s": 120.0,
    }
    assert wire["domain"][0]["cpus"] == [3, 1] and wire["domain"][0]["faults"] == ["ident=0x0000dead", "skip-flush"]
    assert wire["domain"][1]["cpus"] == [] and wire["domain"][1]["faults"] == []
    again = ClusterSpec.from_dict(json.loads(json.dumps(wire)))
    assert again == spec
    assert again.domains[0].cpus == (3, 1)


def test_from_dict_cross_checks_cpus_against_pcpus() -> None:
    wire = parse_spec(NEW_KEYS).to_dict()
    wire["hypervisor"]["pcpus"] = 2
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(wire)
    assert info.value.problems == ["domain[0].cpus[0]: pCPU 3 does not exist: hypervisor.pcpus is 2 (ids 0..1)"]


# ------------------------------------------------------------------- one domain, as `create` receives it


def test_parse_domain_dict_defaults() -> None:
    dom = parse_domain_dict({"name": "a"})
    assert dom == DomainSpec("a", 1, 4, "pvkern", "", "xen", "ebx", True, (), ())


def test_parse_domain_dict_without_pcpus_checks_only_the_largest_machine() -> None:
    assert parse_domain_dict({"name": "a", "cpus": [63, 0]}).cpus == (63, 0)
    with pytest.raises(SpecError) as info:
        parse_domain_dict({"name": "a", "cpus": [64]})
    assert info.value.problems == ["domain.cpus[0]: pCPU 64 does not exist: there are at most 64 (ids 0..63)"]


def test_parse_domain_dict_with_pcpus_cross_checks_cpus() -> None:
    assert parse_domain_dict({"name": "a", "cpus": [1]}, pcpus=2).cpus == (1,)
    with pytest.raises(SpecError) as info:
        parse_domain_dict({"name": "a", "cpus": [0, 2, 0]}, pcpus=2)
    assert info.value.source == "<create>"
    assert info.value.problems == [
        "domain.cpus[1]: pCPU 2 does not exist: hypervisor.pcpus is 2 (ids 0..1)",
        "domain.cpus[2]: duplicate pCPU 0 (also cpus[0])",
    ]


def test_parse_domain_dict_normalises_faults() -> None:
    dom = parse_domain_dict({"name": "a", "faults": ["ident=0xBEEF"]})
    assert dom.faults == ("ident=0x0000beef",) and dom.ident_fault == 0xBEEF


def test_create_command_payload_carries_every_domain_key() -> None:
    spec = parse_spec(NEW_KEYS)
    for dom in spec.domains:
        payload = _domain_dict(dom)
        assert set(payload) == set(spec.to_dict()["domain"][0]) - {"source"}
        assert parse_domain_dict(json.loads(json.dumps(payload)), pcpus=spec.hypervisor.pcpus) == dom
