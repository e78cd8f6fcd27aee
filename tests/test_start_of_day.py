"""The start-of-day contract a guest built elsewhere relies on, checked in guest code: a C guest compiled against
Xen's public headers (as tests/test_foreign_guest.py's) finds events masked on every vCPU, a complete vcpu_time_info
whose formula over RDTSC gives the hypervisor's virtual time, a seeded wallclock, a console ring whose backend
drains it into ``pvcluster console`` and the trace, and a mapped, zeroed xenstore page with its event channel.
Two runs of the same spec and seed give the same trace."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cguest import C_ELFNOTE, C_HYPERCALLS, VIRT_BASE, XEN_HEADER, build_guest, c_xen_notes
from test_foreign_guest import _hypercalls

from hypervisor.core import boot_wallclock
from pvcluster.abi.platform import BACKEND_DOMID
from pvcluster.abi.xen import EvtchnStat, Hypercall
from pvcluster.cluster import Cluster
from pvcluster.rundiff import first_divergence
from pvcluster.spec import parse_spec
from pvcluster.trace import read_events

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SEED = 5
DELAY_NS = 1_000_000  # the timer the guest blocks on, set from the time it computed
RING_LINES = 3  # long lines through the ring after the short one: together more than out[] holds, so it wraps
RING_LINE_LEN = 900

GUEST_C = r"""
/* The start-of-day contract, checked by a guest that knows only Xen's public headers. */
#define __XEN_INTERFACE_VERSION__ 0x00030205
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/vcpu.h>
#include <xen/event_channel.h>
#include <xen/elfnote.h>
#include <xen/io/console.h>

#define VIRT_BASE @VIRT_BASE@UL
#define DELAY_NS @DELAY_NS@ULL
#define RING_LINES @RING_LINES@
#define RING_LINE_LEN @RING_LINE_LEN@
#define barrier() __asm__ volatile ("" ::: "memory")

""" + C_ELFNOTE + c_xen_notes("sod-c") + r"""
/* vCPU 0 enters at _start (%esi = start_info); vCPU 1 at secondary_start, on the stack its context names. */
__asm__(
    ".pushsection .text\n"
    ".globl _start\n"
    "_start:\n"
    "    cld\n"
    "    movl $boot_stack_top, %esp\n"
    "    pushl %esi\n"
    "    call start_kernel\n"
    "5:  hlt\n"
    "    jmp 5b\n"
    ".globl secondary_start\n"
    "secondary_start:\n"
    "    cld\n"
    "    call secondary_main\n"
    "6:  hlt\n"
    "    jmp 6b\n"
    ".balign 4096\n"
    ".globl hypercall_page\n"
    "hypercall_page:\n"
    "    .skip 4096\n"
    ".popsection\n"
    ".pushsection .bss\n"
    ".balign 16\n"
    "boot_stack:\n"
    "    .skip 8192\n"
    "boot_stack_top:\n"
    "secondary_stack:\n"
    "    .skip 8192\n"
    "secondary_stack_top:\n"
    ".popsection\n"
);

extern char hypercall_page[4096], secondary_stack_top[];
void secondary_start(void);

""" + C_HYPERCALLS + r"""
static int console_io(int cmd, int count, const char *str) { return _hypercall3(int, console_io, cmd, count, str); }
static int sched_op(int cmd, void *arg) { return _hypercall2(int, sched_op, cmd, arg); }
static int event_channel_op(int cmd, void *arg) { return _hypercall2(int, event_channel_op, cmd, arg); }
static int vcpu_op(int cmd, int vcpu, void *arg) { return _hypercall3(int, vcpu_op, cmd, vcpu, arg); }
/* x86-32: the absolute deadline in ns, low word then high word (Linux's HYPERVISOR_set_timer_op) */
static int set_timer_op(uint64_t deadline)
{
    return _hypercall2(int, set_timer_op, (unsigned long)deadline, (unsigned long)(deadline >> 32));
}

/* -- console output through console_io, one line at a time ------------------------------------------------- */

static char line[512];
static unsigned int len;

static void put_str(const char *s) { while (*s && len < sizeof(line) - 1) line[len++] = *s++; }
static void put_dec(unsigned long v)
{
    char digits[12];
    int n = 0;
    do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n && len < sizeof(line) - 1) line[len++] = digits[--n];
}
static void put_int(long v) { if (v < 0) { put_str("-"); v = -v; } put_dec((unsigned long)v); }
static void put_hex64(uint64_t v)   /* 64-bit values in hex: decimal would need libgcc's 64-bit division */
{
    int shift;
    put_str("0x");
    for (shift = 60; shift >= 0 && len < sizeof(line) - 1; shift -= 4)
        line[len++] = "0123456789abcdef"[(v >> shift) & 15];
}
static void flush_line(void) { put_str("\n"); console_io(CONSOLEIO_write, (int)len, line); len = 0; }

static int failures;
static void check(const char *what, int ok, long value)
{
    put_str("sod: check "); put_str(what); put_str(ok ? " ok " : " FAIL "); put_int(value); flush_line();
    failures += !ok;
}

/* -- the paravirtual clock ----------------------------------------------------------------------------------- */

static uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("rdtsc" : "=a" (lo), "=d" (hi));
    return (uint64_t)hi << 32 | lo;
}

/* ((delta << shift) * mul) >> 32, the 64x32 product in two halves (Linux's pvclock_scale_delta) */
static uint64_t scale_delta(uint64_t delta, uint32_t mul, int8_t shift)
{
    if (shift < 0) delta >>= -shift; else delta <<= shift;
    return (((delta & 0xFFFFFFFFu) * mul) >> 32) + (delta >> 32) * mul;
}

/* system_time + scaled TSC delta, under the version protocol; the TSC it used in *tsc */
static uint64_t pvclock_ns(volatile struct vcpu_time_info *t, uint64_t *tsc)
{
    uint32_t version;
    uint64_t ns;
    do {
        version = t->version;
        barrier();
        *tsc = rdtsc();
        ns = t->system_time + scale_delta(*tsc - t->tsc_timestamp, t->tsc_to_system_mul, t->tsc_shift);
        barrier();
    } while ((version & 1) || version != t->version);
    return ns;
}

/* -- vCPU 1 --------------------------------------------------------------------------------------------------- */

static shared_info_t *shinfo;
static volatile int secondary_mask = -1, secondary_done;

void secondary_main(void)
{
    secondary_mask = shinfo->vcpu_info[1].evtchn_upcall_mask;   /* first thing: what it entered with */
    barrier();
    secondary_done = 1;
    for (;;)
        sched_op(SCHEDOP_block, 0);
}

static struct vcpu_guest_context ctx;

static void bring_up_vcpu1(start_info_t *si)
{
    ctx.user_regs.eip = (unsigned long)secondary_start;
    ctx.user_regs.esp = (unsigned long)secondary_stack_top;
    ctx.kernel_sp = ctx.user_regs.esp;
    ctx.ctrlreg[3] = si->pt_base - VIRT_BASE;  /* xen_pfn_to_cr3(virt_to_mfn(swapper_pg_dir)) */
    check("vcpu1_initialise", vcpu_op(VCPUOP_initialise, 1, &ctx) == 0, 0);
    check("vcpu1_up", vcpu_op(VCPUOP_up, 1, 0) == 0, 0);
    while (!secondary_done)
        sched_op(SCHEDOP_yield, 0);
}

/* -- the rings ------------------------------------------------------------------------------------------------ */

static int page_is_zero(unsigned long mfn)
{
    const volatile uint32_t *p = (const volatile uint32_t *)(VIRT_BASE + (mfn << 12));
    unsigned int i;
    for (i = 0; i < 1024; i++)
        if (p[i])
            return 0;
    return 1;
}

static int backend_bound(evtchn_port_t port)
{
    struct evtchn_status st = { .dom = DOMID_SELF, .port = port };
    return event_channel_op(EVTCHNOP_status, &st) == 0 && st.status == EVTCHNSTAT_interdomain
           && st.u.interdomain.dom == @BACKEND_DOMID@;
}

/* hvc_xen's write: copy into out[] at out_prod (masked), publish out_prod, notify the backend's port */
static void ring_write(struct xencons_interface *intf, evtchn_port_t port, const char *s, unsigned int n)
{
    XENCONS_RING_IDX prod = intf->out_prod;
    struct evtchn_send send = { .port = port };
    unsigned int i;
    for (i = 0; i < n; i++)
        intf->out[MASK_XENCONS_IDX(prod++, intf->out)] = s[i];
    barrier();
    intf->out_prod = prod;
    event_channel_op(EVTCHNOP_send, &send);
}

static char ring_line[RING_LINE_LEN + 1];

static void console_ring(start_info_t *si)
{
    struct xencons_interface *intf = (struct xencons_interface *)(VIRT_BASE + (si->console.domU.mfn << 12));
    static const char hello[] = "sod-c: hello through the console ring\n";
    int k, consumed = 1;
    ring_write(intf, si->console.domU.evtchn, hello, sizeof(hello) - 1);
    consumed &= intf->out_cons == intf->out_prod;
    for (k = 0; k < RING_LINES; k++) {
        int i;
        for (i = 0; i < RING_LINE_LEN - 1; i++)
            ring_line[i] = (char)('a' + (i + k) % 26);
        ring_line[0] = (char)('0' + k);
        ring_line[RING_LINE_LEN - 1] = '\n';
        ring_write(intf, si->console.domU.evtchn, ring_line, RING_LINE_LEN);
        consumed &= intf->out_cons == intf->out_prod;
    }
    check("ring_consumed", consumed, (long)intf->out_cons);
    check("ring_wrapped", intf->out_prod > sizeof(intf->out), (long)intf->out_prod);
}

/* -- start of day --------------------------------------------------------------------------------------------- */

void start_kernel(start_info_t *si)
{
    int mask0, masked = 0, i;
    uint32_t wc_version, wc_sec, wc_nsec;
    uint64_t t1, t2, tsc1, tsc2, prev, now, tsc;
    volatile struct vcpu_time_info *time;
    struct evtchn_bind_virq virq = { .virq = VIRQ_TIMER, .vcpu = 0 };
    struct sched_shutdown sd;

    shinfo = (shared_info_t *)(VIRT_BASE + si->shared_info);
    mask0 = shinfo->vcpu_info[0].evtchn_upcall_mask;   /* before anything could change it */
    for (i = 0; i < XEN_LEGACY_MAX_VCPUS; i++)
        masked += shinfo->vcpu_info[i].evtchn_upcall_mask == 1;
    check("mask_vcpu0_at_entry", mask0 == 1, mask0);
    check("mask_every_vcpu_info", masked == XEN_LEGACY_MAX_VCPUS, masked);

    time = &shinfo->vcpu_info[0].time;
    check("time_version_even", (time->version & 1) == 0, (long)time->version);
    check("time_mul_nonzero", time->tsc_to_system_mul != 0, (long)time->tsc_to_system_mul);
    check("time_shift_nonzero", time->tsc_shift != 0, time->tsc_shift);
    put_str("sod: time mul="); put_dec(time->tsc_to_system_mul); put_str(" shift="); put_int(time->tsc_shift);
    flush_line();

    do {
        wc_version = shinfo->wc_version;
        barrier();
        wc_sec = shinfo->wc_sec;
        wc_nsec = shinfo->wc_nsec;
        barrier();
    } while ((wc_version & 1) || wc_version != shinfo->wc_version);
    check("wc_version_even", (wc_version & 1) == 0, (long)wc_version);
    check("wc_sec_nonzero", wc_sec != 0, 0);
    put_str("sod: wallclock wc_sec="); put_dec(wc_sec); put_str(" wc_nsec="); put_dec(wc_nsec); flush_line();

    check("store_mfn", si->store_mfn != 0, (long)si->store_mfn);
    check("store_evtchn", si->store_evtchn != 0, (long)si->store_evtchn);
    check("store_page_zero", page_is_zero(si->store_mfn), 0);   /* mapped: a read of it would fault otherwise */
    check("store_port_bound", backend_bound(si->store_evtchn), 0);
    check("console_mfn", si->console.domU.mfn != 0, (long)si->console.domU.mfn);
    check("console_evtchn", si->console.domU.evtchn != 0, (long)si->console.domU.evtchn);
    check("console_page_zero", page_is_zero(si->console.domU.mfn), 0);
    check("console_port_bound", backend_bound(si->console.domU.evtchn), 0);

    bring_up_vcpu1(si);
    check("mask_vcpu1_at_entry", secondary_mask == 1, secondary_mask);

    /* the clock never goes back, read after read */
    prev = pvclock_ns(time, &tsc);
    for (i = 0; i < 100; i++) {
        now = pvclock_ns(time, &tsc);
        if (now < prev)
            break;
        prev = now;
    }
    check("clock_monotonic", i == 100, i);

    /* block on a timer set from the computed time: the trace shows the call's own virtual time beside it */
    check("bind_virq_timer", event_channel_op(EVTCHNOP_bind_virq, &virq) == 0, 0);
    t1 = pvclock_ns(time, &tsc1);
    set_timer_op(t1 + DELAY_NS);
    sched_op(SCHEDOP_block, 0);
    t2 = pvclock_ns(time, &tsc2);
    set_timer_op(t2 + DELAY_NS);
    set_timer_op(0);
    check("woke_after_deadline", t2 >= t1 + DELAY_NS, (long)(t2 - t1));
    check("woke_soon_after", t2 - t1 < DELAY_NS + 100000, (long)(t2 - t1));
    /* the TSC ran at the rate the scale says: 2.5 ticks a ns, to 0.1% (no 64-bit division: that is libgcc's) */
    check("tsc_rate", (tsc2 - tsc1) * 2000 > (t2 - t1) * 4995 && (tsc2 - tsc1) * 2000 < (t2 - t1) * 5005,
          (long)(tsc2 - tsc1));
    put_str("sod: timer t1="); put_hex64(t1); put_str(" t2="); put_hex64(t2); flush_line();

    console_ring(si);

    put_str("sod: done, failures="); put_dec((unsigned long)failures); flush_line();
    sd.reason = failures ? SHUTDOWN_crash : SHUTDOWN_poweroff;
    sched_op(SCHEDOP_shutdown, &sd);
    for (;;)
        ;
}
"""


def _source() -> str:
    values = {"DELAY_NS": DELAY_NS, "RING_LINES": RING_LINES, "RING_LINE_LEN": RING_LINE_LEN,
              "BACKEND_DOMID": BACKEND_DOMID, "VIRT_BASE": hex(VIRT_BASE)}
    return re.sub(r"@(\w+)@", lambda m: str(values[m.group(1)]), GUEST_C)


def _run(run_dir: Path, kernel: Path) -> tuple[dict[str, Any], list[str]]:
    spec = parse_spec(f"""
[cluster]
name = "sod"
seed = {SEED}
[[domain]]
name = "sod"
vcpus = 2
memory_mib = 4
kernel = "{kernel}"
""")
    with Cluster.start(spec, run_dir=run_dir) as cluster:
        final = cluster.wait(timeout_s=120)
        (dom,) = final["domains"]
        console = cluster.client.call("console", dom=dom["domid"])
    return dom, console


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Path, dict[str, Any], list[str]]]]:
    """Two runs of the guest with the same spec and seed."""
    elf = build_guest(tmp_path_factory.mktemp("sodguest"), _source(), name="sod",
                      headers=(XEN_HEADER, Path("/usr/include/xen/io/console.h")))
    with contextlib.ExitStack() as stack:
        out = []
        for _ in range(2):  # short run directories: ipc:// socket paths must stay under ~100 bytes
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pvc-sod-", dir="/tmp")))
            dom, console = _run(run_dir, elf)
            out.append((run_dir, dom, console))
        yield out


def _value(console: list[str], prefix: str, name: str) -> str:
    [line] = [ln for ln in console if ln.startswith(prefix)]
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match, line
    return match.group(1)


def test_every_check_in_guest_code_passes(runs: list[tuple[Path, dict[str, Any], list[str]]]) -> None:
    for _, dom, console in runs:
        checks = [ln for ln in console if ln.startswith("sod: check ")]
        assert len(checks) >= 20 and all(" ok " in ln for ln in checks), checks
        assert "sod: done, failures=0" in console, console
        assert (dom["state"], dom["shutdown_reason"], dom["crash"]) == ("dead", "poweroff", ""), dom


def test_the_time_the_guest_computes_is_the_hypervisors_virtual_time(
        runs: list[tuple[Path, dict[str, Any], list[str]]]) -> None:
    run_dir, dom, console = runs[0]
    timers = [e for e in _hypercalls(run_dir, dom["domid"]) if e["nr"] == Hypercall.set_timer_op]
    assert len(timers) == 3 and timers[-1]["args"][:2] == [0, 0]  # set, set again, cancel
    t1, t2 = (int(_value(console, "sod: timer", n), 16) for n in ("t1", "t2"))
    for event, computed in zip(timers, (t1, t2), strict=False):
        deadline = event["args"][0] | event["args"][1] << 32
        assert deadline == computed + DELAY_NS
        # computed a handful of instructions before the trap: the trace's virtual time of the call is just after it
        assert 0 <= event["vt_ns"] - computed < 200, (event["vt_ns"], computed)
    [expired] = [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
                 if e["event"] == "timer.expired" and e.get("dom") == dom["domid"]]
    assert expired["vt_ns"] == t1 + DELAY_NS <= t2


def test_the_wallclock_comes_from_the_seed(runs: list[tuple[Path, dict[str, Any], list[str]]]) -> None:
    seen = {(int(_value(c, "sod: wallclock", "wc_sec")), int(_value(c, "sod: wallclock", "wc_nsec")))
            for _, _, c in runs}
    assert seen == {boot_wallclock(SEED)}
    assert boot_wallclock(SEED) != boot_wallclock(SEED + 1)


def test_the_console_ring_reaches_the_console_and_the_trace(
        runs: list[tuple[Path, dict[str, Any], list[str]]]) -> None:
    run_dir, dom, console = runs[0]
    ring = ["sod-c: hello through the console ring"]
    ring += [str(k) + "".join(chr(ord("a") + (i + k) % 26) for i in range(1, RING_LINE_LEN - 1))
             for k in range(RING_LINES)]
    assert [ln for ln in console if ln.startswith(("sod-c:", "0", "1", "2"))] == ring
    traced = [e["text"] for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
              if e["event"] == "console" and e.get("via") == "ring" and e.get("dom") == dom["domid"]]
    assert traced == ring


def test_the_rings_ports_are_bound_to_their_backends(runs: list[tuple[Path, dict[str, Any], list[str]]]) -> None:
    run_dir, dom, _ = runs[0]
    status = [e for e in read_events(run_dir / "trace" / "hypervisor.jsonl")
              if e["event"] == "evtchn.status" and e.get("dom") == dom["domid"]]
    assert [(e["port"], e["status"]) for e in status] == [(1, EvtchnStat.interdomain.name),
                                                         (2, EvtchnStat.interdomain.name)]


def test_same_spec_and_seed_same_trace(runs: list[tuple[Path, dict[str, Any], list[str]]]) -> None:
    (a, _, _), (b, _, _) = runs
    assert first_divergence(a, b) is None
