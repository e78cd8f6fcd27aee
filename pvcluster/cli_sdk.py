"""The guest SDK's verbs: `pvcluster sdk` (the gcc flags that build a guest with pvc.h and pvc.ld) and
`pvcluster new-guest DIR` (a guest to start from: main.c, a spec, a Makefile and a pytest test)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pvcluster import guestsdk
from pvcluster.extensions import ExtensionError
from pvcluster.spec import NAME_PATTERN

SDK_HELP = """\
Print the gcc flags that build a 32-bit PV guest with the pvcluster SDK (pvc.h, pvc.ld: shipped in the package):

  gcc $(pvcluster sdk --cflags) -o guest.elf main.c $(pvcluster sdk --ldflags)

With --spec, --cflags also defines __HYPERVISOR_<name> for every hypercall the spec's [[extension]]s register.
Without a flag: the SDK's directory.
"""


def add_parsers(sub: Any, after: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sdk", parents=[after], help="gcc flags for a guest built with the SDK (pvc.h)",
                       description=SDK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cflags", action="store_true", help="compiler flags (-m32, freestanding, -I the SDK)")
    p.add_argument("--ldflags", action="store_true", help="linker flags (-T pvc.ld, no libc)")
    p.add_argument("--spec", help="a cluster spec: define the hypercall numbers of its extensions (with --cflags)")
    p.set_defaults(fn=cmd_sdk)

    p = sub.add_parser("new-guest", parents=[after], help="scaffold a C guest built with the SDK: main.c, "
                       "spec.toml, Makefile and a pytest test")
    p.add_argument("dir", help="the directory to create (or an empty one)")
    p.add_argument("--name", help="the guest's (and domain's) name (default: the directory's name)")
    p.set_defaults(fn=cmd_new_guest)


def cmd_sdk(args: argparse.Namespace) -> int:
    if not (args.cflags or args.ldflags):
        print(guestsdk.sdk_dir())
        return 0
    flags: list[str] = []
    if args.cflags:
        try:
            flags += guestsdk.cflags(guestsdk.extension_defines(args.spec))
        except ExtensionError as exc:
            print(f"pvcluster sdk: {exc}", file=sys.stderr)
            return 1
    if args.ldflags:
        flags += guestsdk.ldflags()
    print(" ".join(flags))
    return 0


def cmd_new_guest(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    name = args.name or directory.absolute().name
    if not re.fullmatch(NAME_PATTERN, name):
        print(f"pvcluster new-guest: the name must match {NAME_PATTERN} (give --name), got {name!r}", file=sys.stderr)
        return 2
    try:
        written = guestsdk.scaffold(directory, name)
    except (FileExistsError, OSError) as exc:
        print(f"pvcluster new-guest: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"next: cd {directory} && make && make run   (or: make test)")
    return 0
