/*
 * batched-flush: a guest built with the pvcluster SDK that uses the batched_flush extension hypercall
 * (batched_flush_ext.py) for TLB shootdowns, and checks in its own code that they work.
 *
 *   gcc $(pvcluster sdk --cflags --spec spec.toml) -o guest.elf guest.c $(pvcluster sdk --ldflags)
 *
 * vCPU 0 is the initiator; vCPUs 1..NR_VCPUS-1 are targets. Each round:
 *   1. every vCPU reads the PAGES window pages, so each vCPU's TLB holds their current translations;
 *   2. vCPU 0 remaps each window page to another frame with update_va_mapping and no flush (UVMF_NONE): every
 *      TLB is now stale;
 *   3. between the SHOOTDOWN_REQUEST and SHOOTDOWN_DONE marks (what `pvcluster trace` measures): one
 *      batched_flush call with one request per page for every vCPU, completion on an IPI event-channel port; the
 *      call returns at once and vCPU 0 waits for the completion event (SCHEDOP_poll);
 *   4. every vCPU reads the window pages again: each must see the new frame's contents. A stale read is counted,
 *      marked (SHOOTDOWN_STALE) and fails the run.
 * Before the rounds, the hypercall's refusals are checked (bad count, bad vCPU mask, bad port, unmapped array).
 */
#define PVC_GUEST_OS "batched-flush"
#include <pvc.h>

#ifndef __HYPERVISOR_batched_flush
#error "build with $(pvcluster sdk --cflags --spec spec.toml): it defines the extension's hypercall number"
#endif

#ifndef NR_VCPUS
#define NR_VCPUS 3
#endif
#ifndef ROUNDS
#define ROUNDS 20
#endif
#define PAGES 4
#define ALL_VCPUS ((1u << NR_VCPUS) - 1)
#define FLUSH_ALL 0xFFFFFFFFu
#define PTE_FLAGS 0x63  /* present, writable, accessed, dirty */

struct pvc_flush_req {
    uint32_t vcpumask;
    uint32_t va;
};

static inline long HYPERVISOR_batched_flush(struct pvc_flush_req *reqs, unsigned int count, evtchn_port_t port)
{
    return _hypercall3(long, batched_flush, reqs, count, port);
}

/* the frames each window page is switched between, and the window pages themselves */
static uint32_t frames[2][PAGES][1024] __attribute__((aligned(4096)));
static volatile uint32_t window[PAGES][1024] __attribute__((aligned(4096)));
static char stacks[NR_VCPUS][4096] __attribute__((aligned(16)));

/* the round protocol: vCPU 0 sets `step` (round << 2 | what), each target acts once and counts itself in `acks` */
#define STEP_READ 1
#define STEP_CHECK 2
#define STEP_EXIT 3
static volatile uint32_t step, acks, stale_reads;

static uint32_t magic(unsigned int which, unsigned int page) { return 0xB0F10000u | which << 8 | page; }

static void atomic_inc(volatile uint32_t *p) { __asm__ volatile ("lock incl %0" : "+m" (*p) : : "memory"); }

/* every window page, as this vCPU's TLB translates it now: the number of pages that do not hold `which`'s values
   (which < 0: only touch them) */
static unsigned int read_window(int which, unsigned int round)
{
    unsigned int p, bad = 0;
    for (p = 0; p < PAGES; p++) {
        uint32_t v = window[p][0];
        if (which >= 0 && v != magic((unsigned int)which, p)) {
            bad++;
            pvc_mark(PVC_MARK_SHOOTDOWN_STALE, round);
        }
    }
    return bad;
}

static void target(void *arg)
{
    uint32_t seen = 0;
    (void)arg;
    for (;;) {
        uint32_t now;
        while ((now = step) == seen)
            pvc_cpu_relax();
        seen = now;
        if ((now & 3) == STEP_EXIT)
            break;
        if ((now & 3) == STEP_CHECK) {
            unsigned int bad = read_window((int)((now >> 2) & 1), now >> 2);
            if (bad)
                __asm__ volatile ("lock addl %1, %0" : "+m" (stale_reads) : "r" (bad) : "memory");
        } else {
            read_window(-1, now >> 2);
        }
        atomic_inc(&acks);
    }
    atomic_inc(&acks);
    for (;;)
        HYPERVISOR_sched_op(SCHEDOP_block, 0);
}

/* vCPU 0: tell the targets to do `what` in `round` and wait until each has */
static void all_targets(unsigned int round, unsigned int what)
{
    acks = 0;
    pvc_barrier();
    step = round << 2 | what;
    while (acks != NR_VCPUS - 1)
        pvc_cpu_relax();
}

static void check_refusals(evtchn_port_t port)
{
    struct pvc_flush_req one = { ALL_VCPUS, FLUSH_ALL };
    struct pvc_flush_req bad_mask = { 1u << 31, FLUSH_ALL };
    struct pvc_flush_req empty = { 0, FLUSH_ALL };

    pvc_check("refuse: count 0", HYPERVISOR_batched_flush(&one, 0, port) == -XEN_EINVAL, 0);
    pvc_check("refuse: count 65", HYPERVISOR_batched_flush(&one, 65, port) == -XEN_EINVAL, 65);
    pvc_check("refuse: a vCPU it lacks", HYPERVISOR_batched_flush(&bad_mask, 1, port) == -XEN_EINVAL, 31);
    pvc_check("refuse: no vCPU", HYPERVISOR_batched_flush(&empty, 1, port) == -XEN_EINVAL, 0);
    pvc_check("refuse: a port not bound", HYPERVISOR_batched_flush(&one, 1, 1000) == -XEN_EINVAL, 1000);
    pvc_check("refuse: unmapped requests",
              HYPERVISOR_batched_flush((struct pvc_flush_req *)0x1000, 1, port) == -XEN_EFAULT, 0x1000);
    pvc_check("synchronous flush (no port)", HYPERVISOR_batched_flush(&one, 1, 0) == 0, 0);
    pvc_check("no completion event when refused", !pvc_evtchn_pending(port), (long)port);
}

int main(void)
{
    struct pvc_flush_req reqs[PAGES];
    unsigned int r, p, v, completed = 0, early = 0, flush_errors = 0, remap_errors = 0, own_stale = 0;
    int port = pvc_evtchn_bind_ipi(0);

    pvc_printf("batched-flush: %d vCPUs, %d rounds of %d pages\n", NR_VCPUS, ROUNDS, PAGES);
    pvc_check("bind completion port", port > 0, port);
    for (p = 0; p < PAGES; p++) {
        frames[0][p][0] = magic(0, p);
        frames[1][p][0] = magic(1, p);
    }
    for (v = 1; v < NR_VCPUS; v++)
        pvc_check("start target vcpu", pvc_vcpu_start((int)v, target, 0, stacks[v] + sizeof(stacks[v])) == 0,
                  (long)v);
    check_refusals((evtchn_port_t)port);

    for (r = 0; r < ROUNDS; r++) {
        unsigned int which = r & 1;
        all_targets(r, STEP_READ);
        read_window(-1, r);
        for (p = 0; p < PAGES; p++) {
            unsigned long pte = pvc_virt_to_mfn(frames[which][p]) << 12 | PTE_FLAGS;
            remap_errors += HYPERVISOR_update_va_mapping((unsigned long)window[p], pte, UVMF_NONE) != 0;
            reqs[p].vcpumask = ALL_VCPUS;
            reqs[p].va = (uint32_t)(unsigned long)window[p];
        }
        pvc_mark(PVC_MARK_SHOOTDOWN_REQUEST, r);
        flush_errors += HYPERVISOR_batched_flush(reqs, PAGES, (evtchn_port_t)port) != 0;
        early += pvc_evtchn_pending((evtchn_port_t)port);  /* already complete when the call returned? */
        pvc_evtchn_poll((evtchn_port_t)port, 0);
        if (pvc_evtchn_pending((evtchn_port_t)port)) {
            completed++;
            pvc_evtchn_clear((evtchn_port_t)port);
        }
        pvc_mark(PVC_MARK_SHOOTDOWN_DONE, r);
        own_stale += read_window((int)which, r);
        all_targets(r, STEP_CHECK);
    }
    all_targets(ROUNDS, STEP_EXIT);

    pvc_check("remaps accepted", remap_errors == 0, remap_errors);
    pvc_check("batched flushes accepted", flush_errors == 0, flush_errors);
    pvc_check("a completion event for every batch", completed == ROUNDS, completed);
    pvc_check("no stale read on vcpu 0", own_stale == 0, own_stale);
    pvc_check("no stale read on the targets", stale_reads == 0, stale_reads);
    pvc_printf("batched-flush: completion already there at return in %u of %u rounds\n", early, ROUNDS);
    pvc_printf("batched-flush: %d failures\n", pvc_failures);
    return pvc_failures;
}
