"""Every ABI number the guest kernel uses has one definition, in pvcluster/abi: no .S file types one by hand.

(a) no ``.equ`` in domains/kernel/*.S defines a name the generated include (pvcluster/abi/asm.py) defines;
(b) every ``.equ`` left there is listed in KERNEL_PRIVATE_EQUS (domains/kernel/build.py), and the list has no
    stale entries;
(c) the include round-trips: assembled with keystone, each generated name gives its Python value;
(d) no hypercall number or sub-op is an immediate: ``mov eax, N`` before ``int 0x82`` or ``mov ebx, N`` before
    ``call hc_*`` (and the vector itself is ``HYPERCALL_VECTOR``).
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import keystone
import pytest

from domains.kernel import build
from domains.kernel.build import KERNEL_PRIVATE_EQUS, KernelBuildError, expand_includes, preprocess
from pvcluster.abi import asm
from pvcluster.abi.layouts import START_INFO, StartInfo
from pvcluster.abi.platform import VIRT_BASE

KERNEL_DIR = Path(build.__file__).parent
SOURCES = sorted(KERNEL_DIR.glob("*.S"))
_EQU = re.compile(r"^\s*\.equ\s+(\w+)\s*,")
_LABEL = re.compile(r"^\s*[.\w]+:")
_CONTROL = re.compile(r"^\s*(j\w+|call|ret|iretd?|int)\b")
_HYPERCALL = re.compile(r"^\s*(int\s+(?P<vector>\S+)|call\s+hc_\w+)\s*$")
_IMMEDIATE_MOV = re.compile(r"^\s*mov\s+(?P<reg>eax|ebx)\s*,\s*-?(0x[0-9a-fA-F]+|\d+)\s*$")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, code without its comment) of each line of a .S file; instructions hold no strings."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        yield n, line.split("#", 1)[0].rstrip()


def _equs() -> list[tuple[str, str]]:
    """(file:line, name) of every .equ in the kernel's sources."""
    return [(f"{p.name}:{n}", m.group(1)) for p in SOURCES for n, code in _lines(p) if (m := _EQU.match(code))]


def _generated() -> set[str]:
    return {c.name for c in asm.constants()}


def test_the_kernel_sources_exist() -> None:
    assert {p.name for p in SOURCES} >= set(build.KERNEL_FILES["pvkern"])


def test_no_source_defines_a_name_the_generated_include_defines() -> None:
    generated = _generated()
    bad = [f"{where}: .equ {name} is an ABI number: use the generated name" for where, name in _equs()
           if name in generated]
    assert not bad, "\n".join(bad)


def test_every_equ_left_is_a_listed_kernel_private_constant() -> None:
    bad = [f"{where}: .equ {name} is not in KERNEL_PRIVATE_EQUS (domains/kernel/build.py): an ABI number belongs in "
           "pvcluster/abi, a kernel-private one in that table with its reason" for where, name in _equs()
           if name not in KERNEL_PRIVATE_EQUS]
    assert not bad, "\n".join(bad)


def test_the_private_table_lists_only_constants_the_sources_define() -> None:
    defined = [name for _, name in _equs()]
    assert not set(KERNEL_PRIVATE_EQUS) - set(defined), "stale KERNEL_PRIVATE_EQUS entries"
    assert not set(KERNEL_PRIVATE_EQUS) & _generated(), "a kernel-private name shadows a generated one"
    assert len(defined) == len(set(defined)), "a .equ defined twice"
    assert all(reason.strip() for reason in KERNEL_PRIVATE_EQUS.values())


def _assemble(source: str, base: int = VIRT_BASE) -> bytes:
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    encoding, _ = ks.asm(preprocess(expand_includes(source)), base)
    return bytes(encoding or b"")


def test_the_include_round_trips_through_keystone() -> None:
    consts = asm.constants()
    data = _assemble(f'.include "{asm.INCLUDE_NAME}"\n' + "".join(f".long {c.name}\n" for c in consts))
    got = dict(zip((c.name for c in consts), struct.unpack(f"<{len(consts)}I", data), strict=True))
    assert got == {c.name: c.value & 0xFFFFFFFF for c in consts}


def test_generated_names_assemble_as_their_values_in_instructions() -> None:
    c = {k.name: k.value for k in asm.constants()}
    # struct offsets against a forward label (keystone's weak spot, which the builder's textual .equ expansion avoids)
    names = """
        mov eax, __HYPERVISOR_mmuext_op
        mov ebx, SCHEDOP_block
        mov edx, -XEN_EPERM
        mov ecx, [eax + VCPUGCTX_user_regs_eip]
        mov dword ptr [buf + EVTCHN_STATUS_status], EVTCHNSTAT_unbound
        shl eax, VCPU_INFO_SHIFT
        in eax, CLOCK_PORT
        buf: .space EVTCHN_STATUS_SIZE
    """
    numbers = f"""
        mov eax, {c["__HYPERVISOR_mmuext_op"]}
        mov ebx, {c["SCHEDOP_block"]}
        mov edx, -{c["XEN_EPERM"]}
        mov ecx, [eax + {c["VCPUGCTX_user_regs_eip"]}]
        mov dword ptr [buf + {c["EVTCHN_STATUS_status"]}], {c["EVTCHNSTAT_unbound"]}
        shl eax, {c["VCPU_INFO_SHIFT"]}
        in eax, {c["CLOCK_PORT"]}
        buf: .space {c["EVTCHN_STATUS_SIZE"]}
    """
    assert _assemble(f'.include "{asm.INCLUDE_NAME}"\n{names}') == _assemble(numbers)
    assert c["VCPUGCTX_user_regs_eip"] == 548 and c["EVTCHNOP_send"] == 4 and c["MMUEXT_TLB_FLUSH_MULTI"] == 8


def test_no_hypercall_number_or_sub_op_is_typed_as_a_number() -> None:
    bad = []
    for path in SOURCES:
        run: list[tuple[int, str]] = []  # the straight-line instructions since the last label or jump
        for n, code in _lines(path):
            if not code.strip():
                continue
            call = _HYPERCALL.match(code)
            if call:
                if call.group("vector") not in (None, "HYPERCALL_VECTOR"):
                    bad.append(f"{path.name}:{n}: {code.strip()!r}: use int HYPERCALL_VECTOR")
                reg = "eax" if call.group("vector") else "ebx"
                bad += [f"{path.name}:{k}: {prev.strip()!r} before {code.strip()!r}: use the generated name"
                        for k, prev in run if (m := _IMMEDIATE_MOV.match(prev)) and m.group("reg") == reg]
            if _LABEL.match(code) or _CONTROL.match(code):
                run = []
            else:
                run.append((n, code))
    assert not bad, "\n".join(bad)


def test_the_builder_refuses_an_abi_name_defined_by_hand() -> None:
    with pytest.raises(KernelBuildError, match="DOMID_SELF is defined twice"):
        preprocess(expand_includes(f'.include "{asm.INCLUDE_NAME}"\n.equ DOMID_SELF, 0x7FF0\n'))
    with pytest.raises(KernelBuildError, match="only include"):
        expand_includes('.include "xen.inc"\n')


def test_the_include_is_expanded_once_and_names_stay_out_of_strings_and_comments() -> None:
    text = expand_includes(f'.include "{asm.INCLUDE_NAME}"\n.include "{asm.INCLUDE_NAME}"\n')
    assert text.count(".equ SCHEDOP_block,") == 1
    out = preprocess(expand_includes(
        f'.include "{asm.INCLUDE_NAME}"\nmov ebx, SCHEDOP_block  # SCHEDOP_block\nmsg: .asciz "SCHEDOP_block #"\n'))
    assert 'mov ebx, 1  # SCHEDOP_block' in out and '.asciz "SCHEDOP_block #"' in out


def test_the_include_says_it_is_generated_and_the_module_prints_it() -> None:
    text = asm.include_text()
    assert "GENERATED by pvcluster.abi.asm" in text and "DO NOT EDIT" in text
    assert ".equ __HYPERVISOR_sched_op, 29\n" in text and ".equ VCPUGCTX_SIZE, 2800\n" in text
    out = subprocess.run([sys.executable, "-m", "pvcluster.abi.asm"], capture_output=True, text=True, check=True)
    assert out.stdout == text


def test_start_info_pack_follows_its_layout() -> None:
    raw = StartInfo(nr_pages=11, shared_info=22, pt_base=33, nr_pt_frames=44, cmd_line=b"hi").pack()
    assert len(raw) == START_INFO.size
    for member, value in {"nr_pages": 11, "shared_info": 22, "pt_base": 33, "nr_pt_frames": 44}.items():
        assert struct.unpack_from("<I", raw, START_INFO.offset(member))[0] == value
    assert raw[START_INFO.offset("cmd_line") :].startswith(b"hi\0")
