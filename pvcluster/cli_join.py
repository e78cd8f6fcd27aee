"""The verbs for clusters that span hosts: `pvcluster keys` (CurveZMQ key pairs) and `pvcluster join` (run a domain
process that joins a hypervisor somewhere else)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pvcluster.keys import KeyStore, current_user
from pvcluster.spec import load_spec

KEYS_ENV = "PVCLUSTER_KEYS"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # what a Kubernetes Indexed Job gives each pod

KEYS_HELP = """\
Create or list the CurveZMQ key pairs of a tcp cluster. Every file is 0600 in a 0700 directory; no key is ever
overwritten. `create` makes the cluster's key pair, the --toolstack users' keys (default: yours) and the --domain
keys (default, with a spec or without --dir: one per domain the spec declares); `pvcluster up` does the same on
tcp, so the owner needs no set-up.

A domain on another host needs only `cluster.key` and its own `domain-NAME.key_secret`, copied there (0600);
another toolstack user needs `cluster.key` and their own `toolstack-USER.key_secret`, and the hypervisor needs
their public key (`toolstack-USER.key`) in its key directory.
"""

JOIN_HELP = """\
Run one domain process that joins a running cluster as the declared domain NAME (a `placement = "remote"` domain
of the spec, or one created later): it connects to the hypervisor's bus endpoint, authenticates with its domain's
key (on tcp), and runs the domain until the hypervisor stops it. Secrets come only from the key directory.

In a Kubernetes Indexed Job, give --names A,B,C instead of NAME: the pod joins as the name at index
$JOB_COMPLETION_INDEX.
"""


def add_parsers(sub: Any, after: argparse.ArgumentParser) -> None:
    p = sub.add_parser("keys", parents=[after], help="create or list CurveZMQ keys (tcp clusters)",
                       description=KEYS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("create", "list"))
    where = p.add_argument_group("where the keys are (first that applies)")
    where.add_argument("--dir", help="the key directory itself")
    where.add_argument("--run-dir", help="a run directory: its keys/ (unless the spec's bus.keys says otherwise)")
    where.add_argument("--spec", help="a cluster spec: its bus.keys, else <run_dir>/keys (default: the embedded spec)")
    p.add_argument("--domain", action="append", default=[], metavar="NAME", help="create a domain's key (repeatable)")
    p.add_argument("--toolstack", action="append", default=[], metavar="USER",
                   help="create a toolstack user's key (repeatable)")
    p.add_argument("--json", action="store_true", help="list: one JSON document")
    p.set_defaults(fn=cmd_keys)

    p = sub.add_parser("join", parents=[after], help="run a domain process that joins a cluster (another host, a "
                       "container, a batch job)", description=JOIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="the domain to join as")
    p.add_argument("--names", help=f"comma-separated names; the one at index ${INDEX_ENV} is taken")
    p.add_argument("--endpoint", required=True, help="the hypervisor's bus endpoint, e.g. tcp://10.0.0.1:7000")
    p.add_argument("--keys", default=os.environ.get(KEYS_ENV),
                   help=f"key directory with cluster.key and domain-NAME.key_secret (tcp; default ${KEYS_ENV})")
    p.add_argument("--trace-dir", default="trace", help="where the domain's trace file goes (default ./trace)")
    p.add_argument("--join-wait", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the hypervisor to answer (120)")
    p.set_defaults(fn=cmd_join)


def _keys_dir(args: argparse.Namespace) -> Path:
    if args.dir:
        return Path(args.dir).absolute()
    spec = load_spec(args.spec)
    run_dir = Path(args.run_dir).absolute() if args.run_dir else None
    return spec.keys_dir(run_dir).absolute()


def cmd_keys(args: argparse.Namespace) -> int:
    store = KeyStore(_keys_dir(args))
    if args.action == "create":
        made = _create(store, args)
        print(f"{store.directory}: created {', '.join(made)}" if made else f"{store.directory}: nothing to create",
              file=sys.stderr)
    keys = store.list_keys()
    if args.json:
        print(json.dumps({"dir": str(store.directory), "keys": [
            {"kind": k.role.kind, "name": k.role.name, "public": k.public_z85, "file": k.path,
             "mode": f"{k.mode:04o}", "secret": k.has_secret} for k in keys]}))
        return 0
    for k in keys:
        print(f"{k.role.kind:<9} {k.role.name:<24} {k.public_z85}  {k.mode:04o} {k.path}")
    return 0


def _create(store: KeyStore, args: argparse.Namespace) -> list[str]:
    """The cluster's pair; the --domain keys, else (with a spec, or without --dir) every domain of the spec; the
    --toolstack keys, else the invoking user's."""
    made = ["cluster"] if store.ensure_cluster() else []
    domains, users = list(args.domain), list(args.toolstack) or [current_user()]
    if not domains and (args.spec or not args.dir):
        domains = [d.name for d in load_spec(args.spec).domains]
    made += [f"domain-{n}" for n in domains if store.ensure_domain(n)]
    made += [f"toolstack-{u}" for u in users if store.ensure_toolstack(u)]
    return made


def _join_name(args: argparse.Namespace) -> str:
    if args.name:
        return str(args.name)
    if not args.names:
        raise SystemExit("pvcluster join: give the domain's NAME, or --names with $" + INDEX_ENV)
    names = [n for n in args.names.split(",") if n]
    raw = os.environ.get(INDEX_ENV, "")
    if not raw.isascii() or not raw.isdigit() or int(raw) >= len(names):
        raise SystemExit(f"pvcluster join: ${INDEX_ENV}={raw!r} does not index --names ({len(names)} names)")
    return names[int(raw)]


def cmd_join(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "domains", "--endpoint", args.endpoint, "--name", _join_name(args),
            "--trace-dir", str(Path(args.trace_dir).absolute()), "--join-wait", str(args.join_wait)]
    if args.keys:
        argv += ["--keys", str(Path(args.keys).absolute())]
    sys.stdout.flush()
    os.execv(sys.executable, argv)  # the domain process replaces this one: signals reach it directly
