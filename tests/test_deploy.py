"""`pvcluster deploy compose|k8s`: the generated files validate offline (kubernetes-validate's schemas, the Compose
spec's schema vendored by check-jsonschema), say what the spec says, run only commands the CLI has, and carry no key
material; the deploy spec round-trips through parse_spec; the YAML and TOML writers round-trip any value."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes_validate import utils as kv_utils

from pvcluster import cli, deploy
from pvcluster.spec import ClusterSpec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

THREE = """\
[cluster]
name = "trio_3"
seed = 7
run_dir = "runs/here"

[hypervisor]
pcpus = 3
join_timeout_s = 300
unresponsive_s = 12.5

[hypervisor.cost]
ipi_ns = 1200

[hypervisor.cost.insn]
pause = 5000

[bus]
transport = "ipc"
keys = "mykeys"

[[domain]]
name = "gamma"
vcpus = 1
memory_mib = 8
cmdline = "workload=shootdown sdrounds=10 shutdown=poweroff"
backend = "native"
cpus = [2]

[[domain]]
name = "alpha"
vcpus = 2
cmdline = "workload=pingserver peer=2 rounds=50"
faults = ["skip-flush", "ident=0xBEEF"]
placement = "local"

[[domain]]
name = "beta-2"
vcpus = 2
memory_mib = 16
backend = "vmi"
boot = "entry"
patching = false
cmdline = "workload=pingclient peer=1 port=3 rounds=50 note=\\"$HOME ü \\u0001\\""

[[fault]]
kind = "preempt"
target = "alpha.1"
at_ns = 200000
duration_ns = 50000

[faults]
random = { rate = 0.5, kinds = ["preempt", "delay"], until_ns = 1000000, targets = ["gamma"] }
"""
# What each spec's domains are called, in spec order
DOMAINS = {"default": ["alpha", "beta"], "three": ["gamma", "alpha", "beta-2"]}
KEY_MARKER = "Z85-KEY-MATERIAL-MUST-NOT-LEAK"


@pytest.fixture
def specs(tmp_path: Path) -> dict[str, str | None]:
    """Spec arguments by name: None is the embedded default. The three-domain spec's bus.keys directory holds
    key-like files, so a generator that read them would leak KEY_MARKER."""
    (tmp_path / "three.toml").write_text(THREE, encoding="utf-8")
    keys = tmp_path / "mykeys"
    keys.mkdir()
    for name in ("cluster.key", "cluster.key_secret", "domain-alpha.key_secret", "toolstack-me.key_secret"):
        (keys / name).write_text(f"secret-key = \"{KEY_MARKER}\"\n")
    return {"default": None, "three": str(tmp_path / "three.toml")}


def generate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`pvcluster deploy ...` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main(["deploy", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def spec_args(specs: dict[str, str | None], which: str) -> list[str]:
    path = specs[which]
    return [] if path is None else [path]


def k8s_docs(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None], which: str,
             *extra: str) -> list[dict[str, Any]]:
    rc, out, err = generate(capsys, "k8s", *spec_args(specs, which), *extra)
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert all(isinstance(d, dict) for d in docs)
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def expected_deploy_dict(spec: ClusterSpec, port: int = deploy.DEFAULT_PORT) -> dict[str, Any]:
    """The user's spec with exactly the keys a deployment changes."""
    want = spec.to_dict()
    del want["source"]
    want["cluster"]["run_dir"] = ""
    want["bus"] = {"transport": "tcp", "host": "0.0.0.0", "port": port, "keys": deploy.KEYS_DIR}
    for dom in want["domain"]:
        dom["placement"] = "remote"
    return want


def parsed_dict(text: str) -> dict[str, Any]:
    got = parse_spec(text, source="<deploy>").to_dict()
    del got["source"]
    return got


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d["spec"]["template"]


def command_lines(kind: str, docs: list[dict[str, Any]]) -> list[list[str]]:
    """Every container's full command line in generated files."""
    if kind == "compose":
        return [[*s["entrypoint"], *s["command"]] for s in docs[0]["services"].values()]
    return [[*c["command"], *c.get("args", [])] for t in pod_templates(docs)
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def compose_docs(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None], which: str) -> list[Any]:
    rc, out, err = generate(capsys, "compose", *spec_args(specs, which))
    assert rc == 0, err
    return list(yaml.safe_load_all(out))


def validate_compose_file(path: Path) -> None:
    """check-jsonschema's vendored Compose spec schema (offline; --no-cache: nothing is fetched or stored)."""
    exe = BIN / "check-jsonschema"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "check_jsonschema"]
    proc = subprocess.run([*cmd, "--builtin-schema", "vendor.compose-spec", "--no-cache", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


K8S_VERSIONS = sorted({v for v in kv_utils.all_versions() if v.startswith("1.29.")} | {kv_utils.latest_version()})


# ------------------------------------------------------------------------------------------------------ kubernetes


@pytest.mark.parametrize("which", ["default", "three"])
def test_k8s_manifests_validate_with_kubernetes_schemas(capsys: pytest.CaptureFixture[str],
                                                        specs: dict[str, str | None], which: str) -> None:
    docs = k8s_docs(capsys, specs, which)
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim", "Service", "NetworkPolicy",
                                         "Deployment", "Job"]
    for version in K8S_VERSIONS:  # the oldest the Job's backoffLimitPerIndex needs (1.29), and the newest bundled
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_is_strict(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None]) -> None:
    """The validator is not vacuous: an unknown field in a pod template fails it."""
    job = by_kind(k8s_docs(capsys, specs, "default"))["Job"]
    job["spec"]["template"]["spec"]["containers"][0]["comand"] = ["oops"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, kv_utils.latest_version(), strict=True)


@pytest.mark.parametrize("which", ["default", "three"])
def test_k8s_objects_follow_the_spec(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None],
                                     which: str) -> None:
    spec = load_spec(specs[which])
    docs = k8s_docs(capsys, specs, which)
    kinds = by_kind(docs)
    base = f"pvcluster-{spec.cluster.name.replace('_', '-')}"
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "pvcluster"
        assert labels["app.kubernetes.io/instance"] == spec.cluster.name
        assert doc["metadata"]["name"].startswith(base)
        assert "namespace" not in doc["metadata"]
    names = DOMAINS[which]

    # the spec: the deploy spec, which parse_spec reads back as the user's spec but for the deployment's keys
    assert parsed_dict(kinds["ConfigMap"]["data"]["spec.toml"]) == expected_deploy_dict(spec)

    # the hypervisor: one replica, its Service on the bus and control ports, the spec and the keys mounted
    dep = kinds["Deployment"]
    assert dep["spec"]["replicas"] == 1
    hv_pod = dep["spec"]["template"]
    assert hv_pod["metadata"]["labels"]["app.kubernetes.io/component"] == "hypervisor"
    [hv] = hv_pod["spec"]["containers"]
    assert hv["command"] == ["pvcluster"]
    assert hv["args"] == ["up", deploy.SPEC_PATH, "--run-dir", deploy.RUN_DIR, "--serve"]
    svc = kinds["Service"]
    assert svc["metadata"]["name"] == f"{base}-hypervisor"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"bus": 7000, "control": 7001}
    assert svc["spec"]["selector"].items() <= hv_pod["metadata"]["labels"].items()
    hv_volumes = {v["name"]: v for v in hv_pod["spec"]["volumes"]}
    spec_mount = next(m for m in hv["volumeMounts"] if m["mountPath"] == deploy.SPEC_PATH)
    assert hv_volumes[spec_mount["name"]]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]

    # the domains: an Indexed Job, one completion per domain, all at once, the names in spec order
    job = kinds["Job"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == len(names)
    dom_pod = job["template"]
    assert dom_pod["metadata"]["labels"]["app.kubernetes.io/component"] == "domain"
    assert dom_pod["spec"]["restartPolicy"] == "Never"
    [dom] = dom_pod["spec"]["containers"]
    assert dom["command"] == ["pvcluster"]
    args = dom["args"]
    assert args[0] == "join"
    assert args[args.index("--names") + 1].split(",") == names
    assert args[args.index("--endpoint") + 1] == f"tcp://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert args[args.index("--trace-dir") + 1] == f"{deploy.RUN_DIR}/trace"

    # keys from one Secret (named in the output), read-only; domain pods get no cluster secret key
    secret_names = set()
    for pod, container in ((hv_pod, hv), (dom_pod, dom)):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        [keys] = [m for m in container["volumeMounts"] if m["mountPath"] == deploy.KEYS_DIR]
        assert keys["readOnly"] is True
        secret = volumes[keys["name"]]["secret"]
        assert secret["defaultMode"] == 0o400
        secret_names.add(secret["secretName"])
        # the run directory: one claim shared by every pod, mounted where `up --run-dir` and `--trace-dir` point
        [state] = [m for m in container["volumeMounts"] if m["mountPath"] == deploy.STATE_DIR]
        assert volumes[state["name"]]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"][
            "metadata"]["name"]
        # the image's non-root user, the keys group-readable through fsGroup
        ctx = pod["spec"]["securityContext"]
        assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["fsGroup"], ctx["runAsNonRoot"]) == (10001, 10001, 10001,
                                                                                             True)
        assert {"name": "PVCLUSTER_KEYS_GROUP_READ", "value": "1"} in container["env"]
    assert secret_names == {f"{base}-keys"}
    items = {i["key"] for i in next(v for v in dom_pod["spec"]["volumes"] if "secret" in v)["secret"]["items"]}
    assert items == {"cluster.key"} | {f"domain-{n}.key{s}" for n in names for s in ("", "_secret")}
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "storageClassName" not in kinds["PersistentVolumeClaim"]["spec"]


def test_k8s_options(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None]) -> None:
    docs = k8s_docs(capsys, specs, "three", "--namespace", "sims", "--image", "registry.example/pv:1.2",
                    "--port", "9100", "--storage-class", "nfs-client", "--storage-size", "5Gi",
                    "--access-mode", "ReadWriteOnce")
    for doc in docs:
        assert doc["metadata"]["namespace"] == "sims"
        kubernetes_validate.validate(doc, kv_utils.latest_version(), strict=True)
    kinds = by_kind(docs)
    pvc = kinds["PersistentVolumeClaim"]["spec"]
    assert (pvc["storageClassName"], pvc["accessModes"], pvc["resources"]["requests"]["storage"]) == (
        "nfs-client", ["ReadWriteOnce"], "5Gi")
    assert {p["port"] for p in kinds["Service"]["spec"]["ports"]} == {9100, 9101}
    assert tomllib.loads(kinds["ConfigMap"]["data"]["spec.toml"])["bus"]["port"] == 9100
    for template in pod_templates(docs):
        assert {c["image"] for c in template["spec"]["containers"]} == {"registry.example/pv:1.2"}
    dom_pod = kinds["Job"]["spec"]["template"]["spec"]
    assert "tcp://pvcluster-trio-3-hypervisor:9100" in dom_pod["containers"][0]["args"]
    # a ReadWriteOnce volume is shared only on one node: the domains go where the hypervisor is
    [term] = dom_pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "hypervisor"


# -------------------------------------------------------------------------------------------------------- compose


@pytest.mark.parametrize("which", ["default", "three"])
def test_compose_file_validates_and_follows_the_spec(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     specs: dict[str, str | None], which: str) -> None:
    rc, out, err = generate(capsys, "compose", *spec_args(specs, which))
    assert rc == 0, err
    (tmp_path / "compose.yaml").write_text(out)
    validate_compose_file(tmp_path / "compose.yaml")
    [doc] = yaml.safe_load_all(out)
    spec = load_spec(specs[which])
    names = DOMAINS[which]
    services = doc["services"]
    assert sorted(services) == sorted(["hypervisor", *(f"domain-{n}" for n in names)])
    hv = services["hypervisor"]
    assert hv["command"] == ["up", deploy.SPEC_PATH, "--run-dir", deploy.RUN_DIR, "--serve"]
    # a user-defined bridge network that every service is on
    assert doc["networks"] == {"bus": {"driver": "bridge"}}
    assert all(s["networks"] == ["bus"] for s in services.values())
    for n in names:
        svc = services[f"domain-{n}"]
        assert svc["entrypoint"] == ["pvcluster"]
        assert svc["command"] == ["join", n, "--endpoint", "tcp://hypervisor:7000", "--keys", deploy.KEYS_DIR,
                                  "--trace-dir", f"{deploy.RUN_DIR}/trace"]
        assert svc["depends_on"] == {"hypervisor": {"condition": "service_healthy"}}
    # one named volume for the run directory in every container, the keys a read-only bind mount of ./keys
    assert list(doc["volumes"]) == ["state"]
    for service, s in services.items():
        mounts = {m["target"]: m for m in s["volumes"]}
        assert mounts.pop(deploy.STATE_DIR) == {"type": "volume", "source": "state", "target": deploy.STATE_DIR}
        assert all(m["type"] == "bind" and m["read_only"] and m["source"].startswith("./keys") for m in
                   mounts.values())
        if service == "hypervisor":  # the whole key directory
            assert {m["source"] for m in mounts.values()} == {"./keys"}
        else:  # the cluster's public key and the domain's own pair
            name = service.removeprefix("domain-")
            assert {m["source"] for m in mounts.values()} == {
                "./keys/cluster.key", f"./keys/domain-{name}.key", f"./keys/domain-{name}.key_secret"}
            assert all(t == f"{deploy.KEYS_DIR}/{Path(m['source']).name}" for t, m in mounts.items())
        assert s["user"] == "10001:10001"
    # the deploy spec inline, its '$' doubled for Compose's interpolation
    assert hv["configs"] == [{"source": "spec", "target": deploy.SPEC_PATH}]
    content = doc["configs"]["spec"]["content"]
    assert parsed_dict(content.replace("$$", "$")) == expected_deploy_dict(spec)
    if which == "three":
        assert "$$HOME" in content


@pytest.mark.parametrize("kind", ["compose", "k8s"])
def test_no_key_material_in_the_output(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None],
                                       kind: str) -> None:
    rc, out, err = generate(capsys, kind, *spec_args(specs, "three"))
    assert rc == 0, err
    assert KEY_MARKER not in out
    assert not re.search(r"secret-key|public-key|BEGIN [A-Z ]*PRIVATE KEY", out)
    assert "mykeys" not in out  # the user's key directory is replaced by the mounted one
    if kind == "k8s":
        assert not [d for d in yaml.safe_load_all(out) if d["kind"] == "Secret"]


# ------------------------------------------------------------------------------------------- the CLI and its verbs


def generated_command_lines(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None]) -> list[list[str]]:
    lines = []
    for which in specs:
        lines += command_lines("compose", compose_docs(capsys, specs, which))
        lines += command_lines("k8s", k8s_docs(capsys, specs, which))
    assert lines and all(line[0] == "pvcluster" for line in lines)
    return lines


def test_every_verb_the_generated_files_run_exists(capsys: pytest.CaptureFixture[str],
                                                   specs: dict[str, str | None]) -> None:
    verbs = {line[1] for line in generated_command_lines(capsys, specs)}
    assert verbs == {"up", "join"}
    for verb in sorted(verbs):
        with pytest.raises(SystemExit) as exc:
            cli.main([verb, "--help"])
        assert exc.value.code == 0, f"`pvcluster {verb} --help` failed"


def test_every_generated_command_line_parses(capsys: pytest.CaptureFixture[str], specs: dict[str, str | None]) -> None:
    """Beyond the verbs: every option the files pass (up --serve, join --names/--endpoint/--keys/--trace-dir)."""
    for line in generated_command_lines(capsys, specs):
        try:
            args = cli.build_parser().parse_args(line[1:])
        except SystemExit:
            pytest.fail(f"the CLI does not accept `{' '.join(line)}`")
        assert args.command == line[1]


def test_the_real_entry_point(tmp_path: Path, specs: dict[str, str | None],
                              capsys: pytest.CaptureFixture[str]) -> None:
    exe = BIN / "pvcluster"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pvcluster.cli"]
    proc = subprocess.run([*cmd, "deploy", "k8s", str(specs["three"])], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rc, out, _ = generate(capsys, "k8s", str(specs["three"]))
    assert rc == 0 and proc.stdout == out
    proc = subprocess.run([*cmd, "deploy", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Indexed Job" in proc.stdout


def test_output_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path, specs: dict[str, str | None]) -> None:
    out_dir = tmp_path / "out" / "compose"
    rc, out, err = generate(capsys, "compose", str(specs["three"]), "-o", str(out_dir))
    assert rc == 0 and out == "", err
    assert sorted(p.name for p in out_dir.iterdir()) == ["compose.yaml", "spec.toml"]
    validate_compose_file(out_dir / "compose.yaml")
    doc = yaml.safe_load((out_dir / "compose.yaml").read_text())
    assert doc["configs"] == {"spec": {"file": "./spec.toml"}}  # beside compose.yaml: not interpolated, no $$
    spec = load_spec(specs["three"])
    assert parsed_dict((out_dir / "spec.toml").read_text()) == expected_deploy_dict(spec)
    assert (out_dir / "spec.toml").stat().st_mode & 0o777 == 0o644
    assert str(out_dir / "compose.yaml") in err

    k8s_dir = tmp_path / "k8s"
    rc, out, err = generate(capsys, "k8s", str(specs["three"]), "-o", str(k8s_dir))
    assert rc == 0 and out == "", err
    files = sorted(k8s_dir.iterdir())
    assert [p.name for p in files] == ["01-configmap.yaml", "02-persistentvolumeclaim.yaml", "03-service.yaml",
                                       "04-networkpolicy.yaml", "05-deployment.yaml", "06-job.yaml"]
    from_files = [d for p in files for d in yaml.safe_load_all(p.read_text())]
    assert from_files == k8s_docs(capsys, specs, "three")


def test_what_cannot_be_deployed_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nname = "x"\nsedd = 1\n[[domain]]\nname = "a"\nvcpus = 99\n')
    rc, out, err = generate(capsys, "k8s", str(bad))
    assert (rc, out) == (2, "")
    assert "cluster.sedd: unknown key" in err and "domain[0].vcpus" in err

    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(b"\x7fELF")
    spec = tmp_path / "file-kernel.toml"
    spec.write_text(f'[[domain]]\nname = "ok"\n[[domain]]\nname = "custom"\nkernel = "{kernel}"\n')
    for kind in ("compose", "k8s"):
        rc, out, err = generate(capsys, kind, str(spec))
        assert (rc, out) == (2, ""), err
        assert "domain[1] (custom)" in err and "built-in" in err and "Traceback" not in err

    trailing = tmp_path / "trailing.toml"
    trailing.write_text('[cluster]\nname = "ends-"\n[[domain]]\nname = "a"\n')
    rc, _, err = generate(capsys, "k8s", str(trailing))
    assert rc == 2 and "must end with a letter or digit" in err
    rc, _, err = generate(capsys, "compose", str(trailing))
    assert rc == 0, err  # Compose project names may end so

    for argv, words in ((["k8s", "--port", "65535"], "--port"), (["k8s", "--namespace", "Bad_NS"], "--namespace"),
                        (["k8s", "--storage-size", "lots"], "--storage-size"),
                        (["compose", "--namespace", "x"], "only for `pvcluster deploy k8s`"),
                        (["k8s", str(tmp_path / "missing.toml")], "spec file not found")):
        rc, out, err = generate(capsys, *argv)
        assert (rc, out) == (2, ""), argv
        assert words in err


def test_unwritable_output_directory_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _, err = generate(capsys, "k8s", "-o", str(blocker / "sub"))
    assert rc == 2 and "cannot write" in err


# --------------------------------------------------------------------------------------------------- deploy spec


def test_the_deploy_spec_round_trips(specs: dict[str, str | None]) -> None:
    for which in specs:
        spec = load_spec(specs[which])
        for port in (7000, 1, 65534):
            text = deploy.deploy_spec_text(spec, port)
            assert text.isascii()
            assert parsed_dict(text) == expected_deploy_dict(spec, port)
    three = parse_spec(deploy.deploy_spec_text(load_spec(specs["three"])))
    assert three.domain("beta-2").cmdline.endswith('note="$HOME ü \x01"')
    assert [f.kind for f in three.faults] == ["preempt"] and three.random_faults is not None


# ------------------------------------------------------------------------------------------------- the writers

_scalars = (st.text() | st.integers(min_value=-(2**70), max_value=2**70) | st.booleans()
            | st.floats(allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(st.recursive(_scalars | st.none(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20))
def test_yaml_writer_round_trips(value: Any) -> None:
    text = deploy.yaml_text([value, {"k": value}], header="a header\nover two lines")
    assert list(yaml.safe_load_all(text)) == [value, {"k": value}]


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_yaml_writer_keeps_any_multiline_text(text: str) -> None:
    value = {"data": {"spec.toml": text + "\nline two\n"}}
    assert yaml.safe_load(deploy.yaml_text([value])) == value


_toml_scalars = (st.text() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.booleans()
                 | st.floats(allow_nan=False))
_toml_values = st.recursive(_toml_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
_toml_tables = st.recursive(
    st.dictionaries(st.text(max_size=8), _toml_values, max_size=4),
    lambda inner: st.dictionaries(st.text(max_size=8), inner | st.lists(inner, min_size=1, max_size=2) | _toml_values,
                                  max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_toml_tables)
def test_toml_writer_round_trips(table: dict[str, Any]) -> None:
    assert tomllib.loads(deploy.toml_text(table)) == table


# ------------------------------------------------------------------------------------------------------ the image


def test_the_dockerfile_agrees_with_the_generator() -> None:
    """deploy/Dockerfile's user, entry point and cache helpers are the ones the generated files and this module
    assume; .dockerignore lets in exactly what the package is built from."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG UID={deploy.UID}" in text and f"ARG GID={deploy.GID}" in text
    assert re.search(r"^USER \$\{UID\}:\$\{GID\}$", text, re.M)
    assert 'ENTRYPOINT ["pvcluster"]' in text
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    for name in re.findall(r"from pvcluster\.deploy import (\w+)", text):
        assert callable(getattr(deploy, name))
    assert "ENV PVCLUSTER_CACHE_DIR=/opt/pvcluster/cache/kernels" in text
    assert "XDG_CACHE_HOME=/opt/pvcluster/cache" in text
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    assert {w for c in copied for w in c.split()} == {"pyproject.toml", "README.md", "pvcluster", "hypervisor",
                                                      "domains"}
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {line[1:] for line in ignore if line.startswith("!")} == {"pyproject.toml", "README.md", "pvcluster",
                                                                    "hypervisor", "domains"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= {"pvcluster", "hypervisor", "domains"}


def test_prebuilt_caches_serve_a_fresh_process(tmp_path: Path) -> None:
    """What the Dockerfile's build stage stores is what a process with the runtime stage's environment finds, with
    no compiler on PATH (the runtime stage has none)."""
    root = tmp_path / "cache"
    env = {**os.environ, "PVCLUSTER_CACHE_DIR": str(root / "kernels"), "XDG_CACHE_HOME": str(root)}
    code = "import sys; from pvcluster.deploy import prebuild_image_caches as p; print(*p(sys.argv[1]), sep='\\n')"
    proc = subprocess.run([sys.executable, "-c", code, str(root)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = [Path(p) for p in proc.stdout.split()]
    assert [p.parent for p in written] == [root / "kernels", root / "pvcluster"]
    for path in [root, *root.rglob("*")]:
        assert path.stat().st_mode & 0o444 == 0o444, path  # readable by the image's non-root user
    no_cc = tmp_path / "empty-bin"
    no_cc.mkdir()
    check = "from pvcluster.deploy import check_image_caches; check_image_caches()"
    proc = subprocess.run([sys.executable, "-c", check], env={**env, "PATH": str(no_cc)}, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert shutil.which("gcc", path=str(no_cc)) is None
