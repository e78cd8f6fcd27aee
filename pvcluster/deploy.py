"""``pvcluster deploy compose|k8s [SPEC]``: container deployments generated from a cluster spec.

The generated files are a function of the spec and a few options, so they never drift from it:

* the DEPLOY spec: the user's spec with ``bus.transport = "tcp"``, ``bus.host = "0.0.0.0"``, a fixed ``bus.port``,
  ``bus.keys = /etc/pvcluster/keys``, no ``cluster.run_dir`` (the hypervisor's ``--run-dir`` says it) and every
  domain ``placement = "remote"``; everything else is unchanged. It is written as TOML (``toml_text``: Python's
  tomllib only reads) and mounted at /etc/pvcluster/spec.toml in the hypervisor's container;
* ``compose``: one Compose file, a hypervisor service (``pvcluster up SPEC --run-dir RUN --serve``) and one service
  per domain (``pvcluster join NAME --endpoint tcp://hypervisor:PORT ...``) on a user-defined bridge network, the run
  directory on one named volume, the keys a read-only bind mount of ./keys;
* ``k8s``: a ConfigMap (the deploy spec), a PersistentVolumeClaim (the shared run directory), a Service and a
  NetworkPolicy for the hypervisor's bus and control ports, the hypervisor's Deployment, and the domains as one
  Indexed Job whose completion index picks the domain (``pvcluster join --names a,b,...``); keys from a Secret
  the user creates (the files never contain key material).

YAML is written by ``yaml_text`` (block style; strings that YAML 1.1 or 1.2 could read as anything but a string
are quoted), so the toolstack needs no YAML library. deploy/README.md walks through both deployments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from pvcluster.spec import ClusterSpec, load_spec

__all__ = [
    "DeployError",
    "Options",
    "compose_document",
    "deploy_spec_table",
    "deploy_spec_text",
    "k8s_documents",
    "toml_text",
    "yaml_text",
]

DEFAULT_IMAGE = "pvcluster:latest"
DEFAULT_PORT = 7000
SPEC_PATH = "/etc/pvcluster/spec.toml"
KEYS_DIR = "/etc/pvcluster/keys"
# The shared volume is mounted here and `up` creates the run directory inside it: a volume's own root belongs to
# root (Kubernetes) or may hold lost+found, and `up` only adopts a directory that is ours and empty or marked.
STATE_DIR = "/var/lib/pvcluster"
RUN_DIR = f"{STATE_DIR}/run"
TRACE_DIR = f"{RUN_DIR}/trace"
# deploy/Dockerfile's non-root user
UID = 10001
GID = 10001
# Secret files in a pod are root-owned, readable through fsGroup: the key loader accepts group-readable files then.
KEYS_GROUP_READ_ENV = "PVCLUSTER_KEYS_GROUP_READ"
# A domain process is about 55 MiB with 2 vCPUs (README "Performance"), plus its guest's memory.
DOMAIN_BASE_MIB = 100
HYPERVISOR_REQUEST_MIB = 256
HYPERVISOR_LIMIT_MIB = 1024
ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce")
KINDS = ("compose", "k8s")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")

DESCRIPTION = """\
Generate a container deployment of a cluster spec: `compose` (a Docker Compose file: one hypervisor service and
one service per domain on a user-defined network) or `k8s` (Kubernetes manifests: the hypervisor's Deployment and
Service, the domains as an Indexed Job whose completion index names the domain, the spec in a ConfigMap, the run
directory on a ReadWriteMany volume, CURVE keys from a Secret you create). Multi-document YAML on stdout, or files
in -o DIR. The spec the containers run is SPEC with bus.transport = "tcp", bus.host = "0.0.0.0", bus.port = --port,
bus.keys = /etc/pvcluster/keys and every domain placement = "remote". Only built-in kernels (the image carries
them) can be deployed. deploy/README.md walks through both."""


class DeployError(Exception):
    """A spec or option `pvcluster deploy` cannot turn into a deployment; the CLI exits 2 with the message."""


@attrs.frozen
class Options:
    image: str = DEFAULT_IMAGE
    port: int = DEFAULT_PORT
    namespace: str | None = None  # k8s: metadata.namespace of every object (None: kubectl's current namespace)
    storage_class: str | None = None  # k8s: the run volume's storage class (None: the cluster's default)
    storage_size: str = "1Gi"
    access_mode: str = "ReadWriteMany"  # ReadWriteOnce: every pod is scheduled on the hypervisor's node


# --------------------------------------------------------------------------------------------- the deploy spec


def check_deployable(spec: ClusterSpec, opts: Options) -> None:
    """Raise DeployError listing everything that keeps ``spec`` (with ``opts``) from being deployed."""
    problems = []
    for i, dom in enumerate(spec.domains):
        if not dom.builtin_kernel:
            problems.append(f"domain[{i}] ({dom.name}): kernel {dom.kernel} is a file; a deployed cluster runs only "
                            f"the built-in kernels the image carries (pvkern), so use one of those or build an image "
                            f"with a built-in kernel of your own")
    if not 1 <= opts.port <= 65534:
        problems.append(f"--port: must be 1..65534 (the control socket binds port + 1), got {opts.port}")
    if not _IMAGE.fullmatch(opts.image):
        problems.append(f"--image: not an image reference: {opts.image!r}")
    if opts.namespace is not None and not (len(opts.namespace) <= 63 and _DNS_LABEL.fullmatch(opts.namespace)):
        problems.append(f"--namespace: must be a DNS label (lower-case letters, digits, '-'), got {opts.namespace!r}")
    if opts.storage_class is not None and not _dns_subdomain(opts.storage_class):
        problems.append(f"--storage-class: not a storage class name: {opts.storage_class!r}")
    if not _QUANTITY.fullmatch(opts.storage_size):
        problems.append(f"--storage-size: not a Kubernetes quantity (e.g. 1Gi, 500Mi): {opts.storage_size!r}")
    if opts.access_mode not in ACCESS_MODES:
        problems.append(f"--access-mode: must be one of {', '.join(ACCESS_MODES)}, got {opts.access_mode!r}")
    if problems:
        raise DeployError(f"cannot deploy {spec.source}:" + "".join(f"\n  - {p}" for p in problems))


def deploy_spec_table(spec: ClusterSpec, port: int = DEFAULT_PORT) -> dict[str, Any]:
    """The deploy spec in the TOML layout: ``spec`` with the bus, run directory and placements containers need."""
    table = spec.to_dict()
    del table["source"]
    del table["cluster"]["run_dir"]  # `up --run-dir` says where
    table["bus"] = {"transport": "tcp", "host": "0.0.0.0", "port": port, "keys": KEYS_DIR}
    for dom in table["domain"]:
        dom["placement"] = "remote"
    return table


def deploy_spec_text(spec: ClusterSpec, port: int = DEFAULT_PORT, generator: str = "pvcluster deploy") -> str:
    head = (f"# The cluster spec the containers run, generated by `{generator}` from {_printable(spec.source)}:\n"
            f"# the bus on tcp, 0.0.0.0:{port} (control socket {port + 1}), keys in {KEYS_DIR}, every domain remote.\n"
            f"# Regenerate it rather than edit it.\n\n")
    return head + toml_text(deploy_spec_table(spec, port))


# -------------------------------------------------------------------------------------------- names and labels


def _dns_subdomain(name: str) -> bool:
    return len(name) <= 253 and all(_DNS_LABEL.fullmatch(p) for p in name.split("."))


def _k8s_base(spec: ClusterSpec) -> str:
    """``pvcluster-NAME``, NAME with '_' as '-' (object names allow no '_'); refused if it cannot be a label."""
    name = spec.cluster.name
    if not name[-1].isalnum():
        raise DeployError(f"cannot deploy {spec.source}: cluster.name {name!r} must end with a letter or digit to "
                          f"name Kubernetes objects and label values")
    return f"pvcluster-{name.replace('_', '-')}"


def _labels(spec: ClusterSpec, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "pvcluster", "app.kubernetes.io/instance": spec.cluster.name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "pvcluster-deploy"}


def _selector(spec: ClusterSpec, component: str) -> dict[str, str]:
    return {k: v for k, v in _labels(spec, component).items() if k != "app.kubernetes.io/managed-by"}


def _domain_request_mib(memory_mib: int) -> int:
    return DOMAIN_BASE_MIB + memory_mib


def hypervisor_args() -> list[str]:
    """The hypervisor container's command line (after ``pvcluster``); the port is in the deploy spec."""
    return ["up", SPEC_PATH, "--run-dir", RUN_DIR, "--serve"]


def join_args(endpoint: str, names: Sequence[str], indexed: bool) -> list[str]:
    """A domain container's command line (after ``pvcluster``): one name, or ``--names`` for an Indexed Job."""
    who = ["--names", ",".join(names)] if indexed else [names[0]]
    return ["join", *who, "--endpoint", endpoint, "--keys", KEYS_DIR, "--trace-dir", TRACE_DIR]


# ------------------------------------------------------------------------------------------------------ compose


def compose_document(spec: ClusterSpec, opts: Options, spec_file: str | None = None) -> dict[str, Any]:
    """The Compose file. ``spec_file``: the deploy spec's file, relative to the Compose file; None: inline (``configs:
    content``, its '$' doubled so Compose's interpolation leaves it alone)."""
    check_deployable(spec, opts)
    endpoint = f"tcp://hypervisor:{opts.port}"
    state = {"type": "volume", "source": "state", "target": STATE_DIR}

    def keys(*files: str) -> list[dict[str, Any]]:
        """Read-only binds of ./keys (the directory, or only ``files`` of it); a missing one is an error, not an
        empty directory Docker made up."""
        where = [("./keys", KEYS_DIR)] if not files else [(f"./keys/{f}", f"{KEYS_DIR}/{f}") for f in files]
        return [{"type": "bind", "source": src, "target": dst, "read_only": True, "bind": {"create_host_path": False}}
                for src, dst in where]

    common: dict[str, Any] = {
        "image": opts.image,
        "user": f"{UID}:{GID}",
        "init": True,  # signals reach pvcluster, and nothing is left unreaped
        "read_only": True,
        "tmpfs": ["/tmp"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "networks": ["bus"],
        "entrypoint": ["pvcluster"],
    }
    services: dict[str, Any] = {
        "hypervisor": {
            **common,
            "command": hypervisor_args(),
            "configs": [{"source": "spec", "target": SPEC_PATH}],
            # the hypervisor serves every domain and the toolstack: the whole key directory
            "volumes": [*keys(), state],
            "expose": [str(opts.port), str(opts.port + 1)],
            # hypervisor.json appears once the bus is bound (and `up` deletes a stale one first): the domains start
            # then, so none touches the run directory before `up` has claimed it
            "healthcheck": {"test": ["CMD", "test", "-f", f"{RUN_DIR}/hypervisor.json"], "interval": "2s",
                            "timeout": "5s", "retries": 150},
            "restart": "no",
            "deploy": {"resources": {"reservations": {"memory": f"{HYPERVISOR_REQUEST_MIB}M"},
                                     "limits": {"memory": f"{HYPERVISOR_LIMIT_MIB}M"}}},
        },
    }
    for dom in spec.domains:
        mib = _domain_request_mib(dom.memory_mib)
        services[f"domain-{dom.name}"] = {
            **common,
            "command": join_args(endpoint, [dom.name], indexed=False),
            # a domain gets the cluster's public key and its own pair, nothing else
            "volumes": [*keys("cluster.key", f"domain-{dom.name}.key", f"domain-{dom.name}.key_secret"), state],
            "depends_on": {"hypervisor": {"condition": "service_healthy"}},
            "restart": "no",
            "deploy": {"resources": {"reservations": {"memory": f"{mib}M"}, "limits": {"memory": f"{4 * mib}M"}}},
        }
    if spec_file is None:
        config = {"content": deploy_spec_text(spec, opts.port, "pvcluster deploy compose").replace("$", "$$")}
    else:
        config = {"file": spec_file}
    return {
        "name": f"pvcluster-{spec.cluster.name}",
        "services": services,
        "networks": {"bus": {"driver": "bridge"}},
        "volumes": {"state": {}},
        "configs": {"spec": config},
    }


# --------------------------------------------------------------------------------------------------- kubernetes


def k8s_documents(spec: ClusterSpec, opts: Options) -> list[dict[str, Any]]:
    """ConfigMap, PersistentVolumeClaim, Service, NetworkPolicy, Deployment (hypervisor), Indexed Job (domains)."""
    check_deployable(spec, opts)
    base = _k8s_base(spec)
    names = {"spec": f"{base}-spec", "state": f"{base}-state", "hypervisor": f"{base}-hypervisor",
             "keys": f"{base}-keys", "domains": f"{base}-domains"}
    text = deploy_spec_text(spec, opts.port, "pvcluster deploy k8s")

    def meta(name: str, component: str) -> dict[str, Any]:
        m: dict[str, Any] = {"name": name}
        if opts.namespace:
            m["namespace"] = opts.namespace
        m["labels"] = _labels(spec, component)
        return m

    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(names["spec"], "hypervisor"),
                  "data": {"spec.toml": text}}
    pvc_spec: dict[str, Any] = {"accessModes": [opts.access_mode],
                                "resources": {"requests": {"storage": opts.storage_size}}}
    if opts.storage_class:
        pvc_spec["storageClassName"] = opts.storage_class
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(names["state"], "run-directory"),
           "spec": pvc_spec}
    ports = [{"name": "bus", "port": opts.port, "targetPort": "bus", "protocol": "TCP"},
             {"name": "control", "port": opts.port + 1, "targetPort": "control", "protocol": "TCP"}]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta(names["hypervisor"], "hypervisor"),
               "spec": {"type": "ClusterIP", "selector": _selector(spec, "hypervisor"), "ports": ports}}
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(names["hypervisor"],
                                                                                        "hypervisor"),
        "spec": {
            "podSelector": {"matchLabels": _selector(spec, "hypervisor")},
            "policyTypes": ["Ingress"],
            # only this cluster's domain pods reach the bus; the control socket is for `kubectl exec` (local)
            "ingress": [{"from": [{"podSelector": {"matchLabels": _selector(spec, "domain")}}],
                         "ports": [{"protocol": "TCP", "port": opts.port}]}],
        },
    }
    state_volume = {"name": "state", "persistentVolumeClaim": {"claimName": names["state"]}}
    tmp_volume = {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    mounts = [{"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
              {"name": "state", "mountPath": STATE_DIR},
              {"name": "tmp", "mountPath": "/tmp"}]
    env = [{"name": KEYS_GROUP_READ_ENV, "value": "1"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    hv_container = {
        "name": "hypervisor",
        "image": opts.image,
        "command": ["pvcluster"],
        "args": hypervisor_args(),
        "ports": [{"name": "bus", "containerPort": opts.port, "protocol": "TCP"},
                  {"name": "control", "containerPort": opts.port + 1, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": [{"name": "spec", "mountPath": SPEC_PATH, "subPath": "spec.toml", "readOnly": True},
                         *mounts],
        "readinessProbe": {"exec": {"command": ["test", "-f", f"{RUN_DIR}/hypervisor.json"]},
                           "periodSeconds": 2, "failureThreshold": 1},
        "resources": {"requests": {"cpu": "500m", "memory": f"{HYPERVISOR_REQUEST_MIB}Mi"},
                      "limits": {"memory": f"{HYPERVISOR_LIMIT_MIB}Mi"}},
        "securityContext": _container_security(),
    }
    hv_pod = {
        "metadata": {"labels": _selector(spec, "hypervisor"),
                     # a changed spec changes the template, so `kubectl apply` restarts the hypervisor with it
                     "annotations": {"pvcluster/spec-sha256": hashlib.sha256(text.encode()).hexdigest()}},
        "spec": {
            **_pod_security(),
            "containers": [hv_container],
            "volumes": [{"name": "spec", "configMap": {"name": names["spec"]}},
                        # the hypervisor serves every domain and the toolstack: the whole Secret
                        {"name": "keys", "secret": {"secretName": names["keys"], "defaultMode": 0o400}},
                        state_volume, tmp_volume],
        },
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(names["hypervisor"], "hypervisor"),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"},  # never two hypervisors on one run directory
                 "selector": {"matchLabels": _selector(spec, "hypervisor")}, "template": hv_pod},
    }
    domain_names = [d.name for d in spec.domains]
    mib = _domain_request_mib(max(d.memory_mib for d in spec.domains))
    dom_container = {
        "name": "domain",
        "image": opts.image,
        "command": ["pvcluster"],
        # JOB_COMPLETION_INDEX (set by Kubernetes in an Indexed Job's pods) picks the name
        "args": join_args(f"tcp://{names['hypervisor']}:{opts.port}", domain_names, indexed=True),
        "env": env,
        "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "250m", "memory": f"{mib}Mi"}, "limits": {"memory": f"{4 * mib}Mi"}},
        "securityContext": _container_security(),
    }
    # Every pod of the Job runs from one template, so each holds every domain's key pair (not the cluster's secret
    # key, nor the toolstack's keys): deploy/README.md says how to split it into one Job per domain.
    key_items = [{"key": "cluster.key", "path": "cluster.key"}]
    for name in domain_names:
        key_items += [{"key": f"domain-{name}.key", "path": f"domain-{name}.key"},
                      {"key": f"domain-{name}.key_secret", "path": f"domain-{name}.key_secret"}]
    dom_pod_spec: dict[str, Any] = {
        **_pod_security(),
        "restartPolicy": "Never",
        "containers": [dom_container],
        "volumes": [{"name": "keys", "secret": {"secretName": names["keys"], "defaultMode": 0o400,
                                                "items": key_items}},
                    state_volume, tmp_volume],
    }
    if opts.access_mode == "ReadWriteOnce":
        # a ReadWriteOnce volume is shared by the pods of one node: run every domain beside the hypervisor
        dom_pod_spec["affinity"] = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": _selector(spec, "hypervisor")},
             "topologyKey": "kubernetes.io/hostname"}]}}
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta(names["domains"], "domain"),
        "spec": {
            "completionMode": "Indexed",
            "completions": len(domain_names),
            "parallelism": len(domain_names),
            # a domain process is not retried (the hypervisor has ended its domain), and one domain's failure
            # leaves the others running
            "backoffLimitPerIndex": 0,
            "maxFailedIndexes": len(domain_names),
            "template": {"metadata": {"labels": _selector(spec, "domain")}, "spec": dom_pod_spec},
        },
    }
    return [config_map, pvc, service, policy, deployment, job]


def _pod_security() -> dict[str, Any]:
    return {
        "automountServiceAccountToken": False,  # neither process talks to the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": GID, "fsGroup": GID,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
    }


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


# ----------------------------------------------------------------------------------------------------- writers


def toml_text(table: Mapping[str, Any]) -> str:
    """``table`` as TOML: tables, arrays of tables, strings, integers, floats, booleans and arrays of those.

    Strings come out as basic strings with every character outside printable ASCII escaped, so the text is ASCII.
    """
    out: list[str] = []
    _toml_table(table, (), out)
    return "\n".join(out).lstrip("\n") + "\n"


def _toml_table(table: Mapping[str, Any], path: tuple[str, ...], out: list[str]) -> None:
    def is_table(v: object) -> bool:
        return isinstance(v, Mapping)

    def is_table_array(v: object) -> bool:
        return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)

    for k, v in table.items():
        if not is_table(v) and not is_table_array(v):
            out.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in table.items():
        sub = (*path, k)
        if is_table(v):
            out += ["", f"[{'.'.join(map(_toml_key, sub))}]"]
            _toml_table(v, sub, out)
        elif is_table_array(v):
            for item in v:
                out += ["", f"[[{'.'.join(map(_toml_key, sub))}]]"]
                _toml_table(item, sub, out)


def _toml_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, got {key!r}")
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


_TOML_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\b", "\\b"), ("\t", "\\t"), ("\n", "\\n"), ("\f", "\\f"),
                 ("\r", "\\r"))


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        esc = next((e for c, e in _TOML_ESCAPES if c == ch), None)
        if esc is not None:
            out.append(esc)
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(f"\\U{ord(ch):08X}")
    return '"' + "".join(out) + '"'


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def yaml_text(documents: Sequence[Any], header: str = "") -> str:
    """``documents`` as one YAML stream (``---`` before each), block style; ``header`` lines become comments.

    Plain scalars only where no YAML 1.1 or 1.2 reader can take them for anything but a string (a letter or '/'
    first, no spaces, no yes/no/on/off/y/n/null words); other strings double-quoted with every character YAML
    cannot carry raw escaped; multi-line text such as the spec as a literal block.
    """
    lines = [f"# {_printable(h)}".rstrip() for h in header.splitlines()]
    for doc in documents:
        lines.append("---")
        lines += _yaml_block(doc, 0) if _yaml_is_block(doc) else [_yaml_scalar(doc)]
    return "\n".join(lines) + "\n"


_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
_YAML_PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9_./:,=@+-]*")


def _yaml_is_block(v: object) -> bool:
    return isinstance(v, Mapping | list | tuple) and bool(v)


def _yaml_block(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"YAML keys here are strings, got {k!r}")
            out += _yaml_attach(f"{pad}{_yaml_scalar(k)}:", v, indent + 2)
    else:
        for item in value:
            if _yaml_is_block(item):
                inner = _yaml_block(item, indent + 2)
                out += [f"{pad}- {inner[0][indent + 2:]}", *inner[1:]]
            else:
                out += _yaml_attach(f"{pad}-", item, indent + 2)
    return out


def _yaml_attach(head: str, v: Any, indent: int) -> list[str]:
    if _yaml_is_block(v):
        return [head, *_yaml_block(v, indent)]
    if isinstance(v, str) and _yaml_literal_ok(v):
        pad = " " * indent
        return [f"{head} |", *(f"{pad}{line}" if line else "" for line in v[:-1].split("\n"))]
    return [f"{head} {_yaml_scalar(v)}"]


def _yaml_literal_ok(s: str) -> bool:
    """A literal block (``|``) keeps ``s`` exactly: printable ASCII lines, one final newline, no leading blank."""
    return (s.endswith("\n") and not s.endswith("\n\n") and "\n" in s[:-1] and not s.startswith((" ", "\n"))
            and all(" " <= ch <= "~" or ch == "\n" for ch in s)
            and all(line.strip() or not line for line in s.split("\n")))


def _yaml_scalar(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        text = repr(v)
        return text if "." in text or "n" in text else text.replace("e", ".0e", 1)  # 1e+16: 1.0e+16 in YAML 1.1
    if isinstance(v, Mapping):
        return "{}"
    if isinstance(v, list | tuple):
        return "[]"
    if not isinstance(v, str):
        raise TypeError(f"no YAML form for {type(v).__name__}")
    if _YAML_PLAIN.fullmatch(v) and not v.endswith(":") and v.lower() not in _YAML_WORDS:
        return v
    out = []
    for ch in json.dumps(v, ensure_ascii=False)[1:-1]:
        code = ord(ch)
        # YAML's printable set, less what YAML 1.1 takes for line breaks and the byte order mark
        if code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029, 0xFEFF) or 0xD800 <= code <= 0xDFFF \
                or code in (0xFFFE, 0xFFFF):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


# ------------------------------------------------------------------------------------------------------ the CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``pvcluster deploy``'s arguments (cli.py registers the verb)."""
    p.add_argument("kind", choices=KINDS, help="compose: a Docker Compose file; k8s: Kubernetes manifests")
    p.add_argument("spec", nargs="?", help="cluster spec (TOML); default: the embedded default spec")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="write files to DIR instead of YAML on stdout (compose: compose.yaml and spec.toml; "
                   "k8s: one file per object)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the pvcluster image (default {DEFAULT_IMAGE}; "
                   "deploy/Dockerfile builds it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"the bus port (default {DEFAULT_PORT}); the control socket is port + 1")
    k8s = p.add_argument_group("k8s only")
    k8s.add_argument("--namespace", help="metadata.namespace of every object (default: none, kubectl's current one)")
    k8s.add_argument("--storage-class", help="storage class of the run-directory volume (default: the cluster's)")
    k8s.add_argument("--storage-size", default="1Gi", help="size of the run-directory volume (default 1Gi)")
    k8s.add_argument("--access-mode", choices=ACCESS_MODES, default="ReadWriteMany",
                     help="the run-directory volume's access mode (default ReadWriteMany; ReadWriteOnce schedules "
                     "every domain pod on the hypervisor's node)")


def run(args: argparse.Namespace) -> int:
    """``pvcluster deploy``: raises DeployError (exit 2) or SpecError (exit 2, from the CLI's handler)."""
    if args.kind == "compose":
        k8s_only = [("--namespace", args.namespace, None), ("--storage-class", args.storage_class, None),
                    ("--storage-size", args.storage_size, "1Gi"), ("--access-mode", args.access_mode, "ReadWriteMany")]
        given = [name for name, value, default in k8s_only if value != default]
        if given:
            raise DeployError(f"{', '.join(given)}: only for `pvcluster deploy k8s`")
    spec = load_spec(args.spec)
    opts = Options(image=args.image, port=args.port, namespace=args.namespace, storage_class=args.storage_class,
                   storage_size=args.storage_size, access_mode=args.access_mode)
    header = (f"Generated by `pvcluster deploy {args.kind}` from {spec.source}; regenerate rather than edit.\n"
              f"Keys: deploy/README.md (`pvcluster keys create`); they are never in these files.")
    out_dir = Path(args.output) if args.output else None
    if args.kind == "compose":
        if out_dir is None:
            sys.stdout.write(yaml_text([compose_document(spec, opts)], header))
            return 0
        doc = compose_document(spec, opts, spec_file="./spec.toml")
        files = {"spec.toml": deploy_spec_text(spec, opts.port, "pvcluster deploy compose"),
                 "compose.yaml": yaml_text([doc], header)}
    else:
        docs = k8s_documents(spec, opts)
        if out_dir is None:
            sys.stdout.write(yaml_text(docs, header))
            return 0
        files = {f"{i:02d}-{d['kind'].lower()}.yaml": yaml_text([d], header) for i, d in enumerate(docs, 1)}
    _write_files(out_dir, files)
    for name in files:
        print(f"wrote {out_dir / name}", file=sys.stderr)
    if args.kind == "compose":
        print(f"the keys go in {out_dir / 'keys'} (`pvcluster keys create --spec SPEC --dir {out_dir / 'keys'}`), "
              f"then: docker compose -f {out_dir / 'compose.yaml'} up", file=sys.stderr)
    return 0


def _write_files(out_dir: Path, files: Mapping[str, str]) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = out_dir / name
            tmp = out_dir / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o644)  # Compose bind-mounts spec.toml into a container that runs as another user
            tmp.replace(path)
    except OSError as exc:
        raise DeployError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------- the image's caches


def prebuild_image_caches(root: str | Path) -> list[Path]:
    """deploy/Dockerfile's build stage: every built-in kernel assembled into ROOT/kernels and the C block hook
    compiled into ROOT/pvcluster, the layout ``PVCLUSTER_CACHE_DIR=ROOT/kernels`` and ``XDG_CACHE_HOME=ROOT`` give,
    all readable by anyone. The runtime image then needs neither keystone's assembling nor a compiler."""
    from domains.blockhook import _build
    from domains.kernel.build import cached_kernel, cached_kernel_path
    from pvcluster.spec import BUILTIN_KERNELS

    root = Path(root)
    written = []
    for name in BUILTIN_KERNELS:
        cached_kernel(name, root / "kernels")
        path = cached_kernel_path(name, root / "kernels")
        assert path is not None
        if not path.is_file():
            raise DeployError(f"the built-in kernel {name} could not be stored in {path.parent}")
        written.append(path)
    hook = _build()
    (root / "pvcluster").mkdir(parents=True, exist_ok=True)
    target = root / "pvcluster" / hook.name
    if hook.resolve() != target.resolve():
        shutil.copyfile(hook, target)
    written.append(target)
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
                   | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0))
    return written


def check_image_caches() -> None:
    """deploy/Dockerfile's runtime stage, as the runtime user: the caches hit without a compiler (or raise)."""
    from domains.blockhook import library
    from domains.kernel.build import cached_kernel_path
    from pvcluster.spec import BUILTIN_KERNELS

    for name in BUILTIN_KERNELS:
        path = cached_kernel_path(name)
        if path is None or not path.is_file():
            raise DeployError(f"built-in kernel {name} is not in the image's kernel cache ({path})")
        path.read_bytes()
    library()  # compiling would fail here: the runtime stage has no compiler
