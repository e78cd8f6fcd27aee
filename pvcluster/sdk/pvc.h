/*
 * pvc.h: the pvcluster guest SDK. One header that makes a C file a bootable 32-bit PV guest for pvcluster
 * (and, for everything but the trace marks and the clock port, for Xen): the user writes
 *
 *     #include <pvc.h>
 *     int main(void) { pvc_printf("hello from vcpu %d\n", 0); return 0; }
 *
 * and builds it with   gcc $(pvcluster sdk --cflags) -o guest.elf main.c $(pvcluster sdk --ldflags)
 *
 * What it provides:
 *   - Xen's ELF notes (guest OS PVC_GUEST_OS, entry, hypercall page, VIRT_BASE 0xC0000000) and the entry point:
 *     _start sets up a stack, fills pvc_start_info / pvc_shared_info and calls main(); main's return value
 *     becomes the shutdown: 0 powers off, anything else crashes the domain (its crash reason in `pvcluster list`);
 *   - the hypercall page and Linux's _hypercallN macros; the number comes from __HYPERVISOR_<name>, so a
 *     hypercall an extension adds is called as _hypercall3(long, my_call, a, b, c) once `pvcluster sdk --cflags
 *     --spec SPEC` has defined its number (pvcluster/extensions.py: one definition, in the extension);
 *   - typed wrappers for the hypercalls a guest needs first (console, sched, event channels, vCPUs, page tables);
 *   - console output: pvc_puts, pvc_printf (%d %i %u %x %p %s %c %%, with l / ll accepted for d u x);
 *   - pvc_check(what, ok, value): one console line "what ok" / "what FAIL <value>", failures counted in
 *     pvc_failures;
 *   - event channels: bind an IPI port, send, poll (SCHEDOP_poll), test and clear pending bits;
 *   - trace marks: pvc_mark(code, detail) writes to the guest-mark port (pvcluster/abi/platform.py MARK_PORT), which
 *     puts a guest.mark event in the trace at the exact virtual time; the PVC_MARK_* codes are the ones
 *     `pvcluster trace` reads (a shootdown is PVC_MARK_SHOOTDOWN_REQUEST .. PVC_MARK_SHOOTDOWN_DONE);
 *   - pvc_clock_ns(): the vCPU's virtual time in ns (low 32 bits) from the clock port;
 *   - starting more vCPUs (pvc_vcpu_start) and shutdown (pvc_shutdown, pvc_poweroff, pvc_crash).
 *
 * The numbers of the simulated machine below (ports, mark codes) are defined once, in pvcluster/abi/platform.py;
 * tests/test_sdk.py checks that this header says the same.
 *
 * Define PVC_NO_ENTRY before including it to bring your own _start, notes and hypercall page.
 */
#ifndef PVC_H
#define PVC_H

#ifndef __XEN_INTERFACE_VERSION__
#define __XEN_INTERFACE_VERSION__ 0x0003020a
#endif
#include <stdarg.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/sched.h>
#include <xen/vcpu.h>
#include <xen/event_channel.h>
#include <xen/version.h>
#include <xen/elfnote.h>
#include <xen/errno.h>

#define PVC_VIRT_BASE 0xC0000000UL
#define PVC_PAGE_SIZE 4096UL
#ifndef PVC_GUEST_OS
#define PVC_GUEST_OS "pvc-guest"
#endif
#ifndef PVC_STACK_SIZE
#define PVC_STACK_SIZE 8192
#endif

/* the simulated machine (pvcluster/abi/platform.py) */
#define PVC_CLOCK_PORT 0x5C
#define PVC_MARK_PORT 0x5D
#define PVC_MARK_DETAIL_SHIFT 8
#define PVC_MARK_SHOOTDOWN_REQUEST 1
#define PVC_MARK_SHOOTDOWN_DONE 2
#define PVC_MARK_SHOOTDOWN_STALE 3
#define PVC_MARK_FLUSH_ACK 4

#define PVC_STR_(x) #x
#define PVC_STR(x) PVC_STR_(x)
#define pvc_barrier() __asm__ volatile ("" ::: "memory")
#define pvc_cpu_relax() __asm__ volatile ("pause" ::: "memory")

int main(void);

start_info_t *pvc_start_info;
shared_info_t *pvc_shared_info;
int pvc_failures;

/* -- notes, entry, hypercall page ------------------------------------------------------------------------------ */

/* Linux's include/linux/elfnote.h, assembler flavour, in an allocated .note.Xen (the linker script keeps it). */
#define PVC_ELFNOTE(type, desc)                             \
    ".pushsection .note.Xen,\"a\",@note\n"                  \
    ".balign 4\n"                                           \
    ".long 2f - 1f, 4f - 3f, " PVC_STR(type) "\n"           \
    "1: .asciz \"Xen\"\n"                                   \
    "2: .balign 4\n"                                        \
    "3: " desc "\n"                                         \
    "4: .balign 4\n"                                        \
    ".popsection\n"

#ifndef PVC_NO_ENTRY
__asm__(
    PVC_ELFNOTE(XEN_ELFNOTE_GUEST_OS, ".asciz \"" PVC_GUEST_OS "\"")
    PVC_ELFNOTE(XEN_ELFNOTE_XEN_VERSION, ".asciz \"xen-3.0\"")
    PVC_ELFNOTE(XEN_ELFNOTE_LOADER, ".asciz \"generic\"")
    PVC_ELFNOTE(XEN_ELFNOTE_VIRT_BASE, ".long 0xC0000000")
    PVC_ELFNOTE(XEN_ELFNOTE_PADDR_OFFSET, ".long 0xC0000000")
    PVC_ELFNOTE(XEN_ELFNOTE_ENTRY, ".long _start")
    PVC_ELFNOTE(XEN_ELFNOTE_HYPERCALL_PAGE, ".long hypercall_page")
    /* vCPU 0 enters with %esi = start_info. A vCPU pvc_vcpu_start brings up enters at pvc_secondary_entry with
       its stack holding the function and its argument. */
    ".pushsection .text.entry,\"ax\",@progbits\n"
    ".globl _start\n"
    "_start:\n"
    "    cld\n"
    "    movl $pvc_boot_stack_top, %esp\n"
    "    pushl %esi\n"
    "    call pvc_boot\n"
    "1:  hlt\n"
    "    jmp 1b\n"
    ".globl pvc_secondary_entry\n"
    "pvc_secondary_entry:\n"
    "    cld\n"
    "    popl %eax\n"
    "    call *%eax\n"
    "2:  hlt\n"
    "    jmp 2b\n"
    /* a page of text the domain builder fills with the hypervisor's stubs, 32 bytes per hypercall number */
    ".balign 4096\n"
    ".globl hypercall_page\n"
    "hypercall_page:\n"
    "    .skip 4096\n"
    ".popsection\n"
    ".pushsection .bss\n"
    ".balign 16\n"
    "pvc_boot_stack:\n"
    "    .skip " PVC_STR(PVC_STACK_SIZE) "\n"
    "pvc_boot_stack_top:\n"
    ".popsection\n"
);
#endif
extern char hypercall_page[4096];
void pvc_secondary_entry(void);

#ifndef PVC_NO_LIBC
/* gcc may emit calls to these for struct copies and clears even in freestanding code: a guest links no libc */
void *memset(void *dst, int c, unsigned long n);
void *memcpy(void *dst, const void *src, unsigned long n);
void *memset(void *dst, int c, unsigned long n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}
void *memcpy(void *dst, const void *src, unsigned long n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}
#endif

/* -- hypercalls (Linux's _hypercallN on x86-32: arguments in ebx, ecx, edx, esi, edi) --------------------------- */

#define _hypercall1(type, name, a1)                                                  \
({                                                                                  \
    long __res, __ign1;                                                             \
    __asm__ volatile ("call hypercall_page + (" PVC_STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1)                                 \
                      : "1" ((long)(a1))                                            \
                      : "memory");                                                  \
    (type)__res;                                                                    \
})
#define _hypercall2(type, name, a1, a2)                                              \
({                                                                                  \
    long __res, __ign1, __ign2;                                                     \
    __asm__ volatile ("call hypercall_page + (" PVC_STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2)                  \
                      : "1" ((long)(a1)), "2" ((long)(a2))                          \
                      : "memory");                                                  \
    (type)__res;                                                                    \
})
#define _hypercall3(type, name, a1, a2, a3)                                          \
({                                                                                  \
    long __res, __ign1, __ign2, __ign3;                                             \
    __asm__ volatile ("call hypercall_page + (" PVC_STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2), "=d" (__ign3)   \
                      : "1" ((long)(a1)), "2" ((long)(a2)), "3" ((long)(a3))        \
                      : "memory");                                                  \
    (type)__res;                                                                    \
})
#define _hypercall4(type, name, a1, a2, a3, a4)                                      \
({                                                                                  \
    long __res, __ign1, __ign2, __ign3, __ign4;                                     \
    __asm__ volatile ("call hypercall_page + (" PVC_STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2), "=d" (__ign3),  \
                        "=S" (__ign4)                                               \
                      : "1" ((long)(a1)), "2" ((long)(a2)), "3" ((long)(a3)),       \
                        "4" ((long)(a4))                                            \
                      : "memory");                                                  \
    (type)__res;                                                                    \
})
#define _hypercall5(type, name, a1, a2, a3, a4, a5)                                  \
({                                                                                  \
    long __res, __ign1, __ign2, __ign3, __ign4, __ign5;                             \
    __asm__ volatile ("call hypercall_page + (" PVC_STR(__HYPERVISOR_##name) " * 32)" \
                      : "=a" (__res), "=b" (__ign1), "=c" (__ign2), "=d" (__ign3),  \
                        "=S" (__ign4), "=D" (__ign5)                                \
                      : "1" ((long)(a1)), "2" ((long)(a2)), "3" ((long)(a3)),       \
                        "4" ((long)(a4)), "5" ((long)(a5))                          \
                      : "memory");                                                  \
    (type)__res;                                                                    \
})

static inline int HYPERVISOR_console_io(int cmd, int count, const char *str)
{ return _hypercall3(int, console_io, cmd, count, str); }
static inline long HYPERVISOR_xen_version(int cmd, void *arg)
{ return _hypercall2(long, xen_version, cmd, arg); }
static inline int HYPERVISOR_sched_op(int cmd, void *arg)
{ return _hypercall2(int, sched_op, cmd, arg); }
static inline int HYPERVISOR_event_channel_op(int cmd, void *arg)
{ return _hypercall2(int, event_channel_op, cmd, arg); }
static inline int HYPERVISOR_vcpu_op(int cmd, int vcpu, void *arg)
{ return _hypercall3(int, vcpu_op, cmd, vcpu, arg); }
static inline int HYPERVISOR_mmuext_op(struct mmuext_op *ops, int count, int *done, domid_t dom)
{ return _hypercall4(int, mmuext_op, ops, count, done, dom); }
/* non-PAE x86-32: (va, pte, flags) */
static inline int HYPERVISOR_update_va_mapping(unsigned long va, unsigned long pte, unsigned long flags)
{ return _hypercall3(int, update_va_mapping, va, pte, flags); }

/* -- console ------------------------------------------------------------------------------------------------- */

static char pvc_line[256];
static unsigned int pvc_len;

static inline void pvc_flush(void)
{
    if (pvc_len)
        HYPERVISOR_console_io(CONSOLEIO_write, (int)pvc_len, pvc_line);
    pvc_len = 0;
}

static inline void pvc_putc(char c)
{
    pvc_line[pvc_len++] = c;
    if (c == '\n' || pvc_len == sizeof(pvc_line))
        pvc_flush();
}

static inline void pvc_puts(const char *s)
{
    while (*s)
        pvc_putc(*s++);
}

/* 64-bit division is libgcc's: numbers print from 32 bits (the l and ll flags are accepted and truncated) */
static inline void pvc_put_unsigned(unsigned long v, unsigned int base)
{
    char digits[12];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n)
        pvc_putc(digits[--n]);
}

static inline void pvc_vprintf(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        int ll = 0;
        if (*fmt != '%') {
            pvc_putc(*fmt);
            continue;
        }
        fmt++;
        while (*fmt == 'l') {
            ll++;
            fmt++;
        }
        switch (*fmt) {
        case 'd': case 'i': {
            long v = ll > 1 ? (long)va_arg(ap, long long) : va_arg(ap, long);
            if (v < 0) {
                pvc_putc('-');
                pvc_put_unsigned(-(unsigned long)v, 10);
            } else {
                pvc_put_unsigned((unsigned long)v, 10);
            }
            break;
        }
        case 'u':
            pvc_put_unsigned(ll > 1 ? (unsigned long)va_arg(ap, unsigned long long) : va_arg(ap, unsigned long), 10);
            break;
        case 'x':
            pvc_put_unsigned(ll > 1 ? (unsigned long)va_arg(ap, unsigned long long) : va_arg(ap, unsigned long), 16);
            break;
        case 'p':
            pvc_puts("0x");
            pvc_put_unsigned((unsigned long)va_arg(ap, void *), 16);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            pvc_puts(s ? s : "(null)");
            break;
        }
        case 'c':
            pvc_putc((char)va_arg(ap, int));
            break;
        case '%':
            pvc_putc('%');
            break;
        case '\0':
            return;
        default:
            pvc_putc('%');
            pvc_putc(*fmt);
        }
    }
}

__attribute__((format(printf, 1, 2))) static inline void pvc_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pvc_vprintf(fmt, ap);
    va_end(ap);
}

/* One console line per check, "<what> ok" or "<what> FAIL <value>"; failures are counted in pvc_failures. */
static inline int pvc_check(const char *what, int ok, long value)
{
    if (ok) {
        pvc_printf("%s ok\n", what);
    } else {
        pvc_printf("%s FAIL %ld\n", what, value);
        pvc_failures++;
    }
    return ok;
}

/* -- the simulated machine: trace marks and the clock port ----------------------------------------------------- */

/* A guest.mark trace event at this instruction's virtual time: code (PVC_MARK_*, or your own above 0x80) and a
   detail (a round, a count) of up to 24 bits. Costs no virtual time. */
static inline void pvc_mark(unsigned int code, unsigned int detail)
{
    uint32_t value = (code & 0xFF) | detail << PVC_MARK_DETAIL_SHIFT;
    __asm__ volatile ("outl %0, %1" : : "a" (value), "Nd" ((uint16_t)PVC_MARK_PORT) : "memory");
}

/* The vCPU's virtual time in ns, low 32 bits (priced as RDTSC). */
static inline uint32_t pvc_clock_ns(void)
{
    uint32_t ns;
    __asm__ volatile ("inl %1, %0" : "=a" (ns) : "Nd" ((uint16_t)PVC_CLOCK_PORT));
    return ns;
}

/* -- event channels (the 2-level ABI: bits in shared_info) ---------------------------------------------------- */

/* A port that notifies vCPU `vcpu` of this domain (EVTCHNOP_bind_ipi); negative: -errno. */
static inline int pvc_evtchn_bind_ipi(unsigned int vcpu)
{
    struct evtchn_bind_ipi op = { .vcpu = vcpu };
    int rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_ipi, &op);
    return rc ? rc : (int)op.port;
}

static inline int pvc_evtchn_send(evtchn_port_t port)
{
    struct evtchn_send op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_send, &op);
}

static inline int pvc_evtchn_pending(evtchn_port_t port)
{
    return (int)((((volatile unsigned long *)pvc_shared_info->evtchn_pending)[port / 32] >> (port % 32)) & 1);
}

/* Clear the pending bit (Xen's guests do it with a locked btr: the hypervisor may set other bits meanwhile). */
static inline void pvc_evtchn_clear(evtchn_port_t port)
{
    __asm__ volatile ("lock btrl %1, %0"
                      : "+m" (((volatile unsigned long *)pvc_shared_info->evtchn_pending)[port / 32])
                      : "Ir" (port % 32) : "memory");
}

/* Block until `port` is pending (SCHEDOP_poll: returns at once if it already is); timeout_ns 0 = none. */
static inline int pvc_evtchn_poll(evtchn_port_t port, uint64_t timeout_ns)
{
    struct sched_poll poll;
    poll.nr_ports = 1;
    poll.timeout = timeout_ns;
    set_xen_guest_handle(poll.ports, &port);
    return HYPERVISOR_sched_op(SCHEDOP_poll, &poll);
}

/* -- memory ----------------------------------------------------------------------------------------------------- */

/* The machine frame behind a kernel virtual address (through start_info's p2m list). */
static inline unsigned long pvc_virt_to_mfn(const void *va)
{
    unsigned long pfn = ((unsigned long)va - PVC_VIRT_BASE) >> 12;
    return ((const unsigned long *)pvc_start_info->mfn_list)[pfn];
}

/* -- vCPUs -------------------------------------------------------------------------------------------------------- */

/* Bring up vCPU `vcpu` running fn(arg) on the stack that ends at stack_top (VCPUOP_initialise + VCPUOP_up), on the
   boot page tables. fn must not return (it may pvc_vcpu_down()). 0 or -errno. */
static inline int pvc_vcpu_start(int vcpu, void (*fn)(void *), void *arg, void *stack_top)
{
    static struct vcpu_guest_context ctx;  /* VCPUOP_initialise copies it: one at a time is enough */
    unsigned long *sp = (unsigned long *)stack_top;
    int rc;
    *--sp = (unsigned long)arg;
    *--sp = 0;  /* the return address fn would see */
    *--sp = (unsigned long)fn;
    memset(&ctx, 0, sizeof(ctx));
    ctx.user_regs.eip = (unsigned long)pvc_secondary_entry;
    ctx.user_regs.esp = (unsigned long)sp;
    ctx.kernel_sp = (unsigned long)sp;
    ctx.ctrlreg[3] = pvc_virt_to_mfn((void *)pvc_start_info->pt_base) << 12;  /* xen_pfn_to_cr3, non-PAE */
    rc = HYPERVISOR_vcpu_op(VCPUOP_initialise, vcpu, &ctx);
    return rc ? rc : HYPERVISOR_vcpu_op(VCPUOP_up, vcpu, 0);
}

static inline void pvc_vcpu_down(int vcpu)
{
    HYPERVISOR_vcpu_op(VCPUOP_down, vcpu, 0);
    for (;;)
        HYPERVISOR_sched_op(SCHEDOP_block, 0);
}

/* -- shutdown --------------------------------------------------------------------------------------------------- */

__attribute__((noreturn)) static inline void pvc_shutdown(unsigned int reason)
{
    struct sched_shutdown sd = { .reason = reason };
    pvc_flush();
    for (;;)
        HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
}

__attribute__((noreturn)) static inline void pvc_poweroff(void) { pvc_shutdown(SHUTDOWN_poweroff); }
__attribute__((noreturn)) static inline void pvc_crash(void) { pvc_shutdown(SHUTDOWN_crash); }

#ifndef PVC_NO_ENTRY
/* _start's C half: the start-of-day pointers, main(), and main's verdict as the shutdown reason. */
__attribute__((noreturn, used)) void pvc_boot(start_info_t *si);
__attribute__((noreturn, used)) void pvc_boot(start_info_t *si)
{
    pvc_start_info = si;
    pvc_shared_info = (shared_info_t *)(PVC_VIRT_BASE + si->shared_info);
    if (main() == 0)
        pvc_poweroff();
    pvc_crash();
}
#endif

#endif /* PVC_H */
