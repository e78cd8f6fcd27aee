/* The vCPU block hook in C: virtual time per translated block, without Python on the common path.
 *
 * Unicorn calls pv_block_hook before each translated block runs. It stops emulation when the vCPU's clock has
 * reached the slice end (so that block does not run), and otherwise adds the block's cost: the sum of its
 * instructions' costs by class (pvcluster/costs.py) at ps_per_instr = 1000, scaled by the vCPU's ps_per_instr.
 * Count and cost come from a table keyed by (address, size) whose entries also hold the
 * block's bytes: a block is known only if its bytes are the same as when it was counted, so code that changed
 * (pvops call-site patching, self-modifying code) is counted again. Comparing the bytes is exact, and cheaper than
 * hashing them on every block. The bytes are found the way the CPU fetched them: through the guest's page tables
 * at the current CR3 (walked afresh for every block, as domains/paging.py walks them), over the guest RAM or the
 * ROM region.
 *
 * Two memos keep the common path short, neither of which can change a count: CR3 as last read (re-read after
 * each emu_start and after any block that may load it, see current_cr3), and each vCPU's direct-mapped slots of
 * the entries it used last (a slot is a hint: its bytes are compared like any entry's).
 *
 * Python is called back only on a miss (it counts with capstone and this file stores the answer) and when the
 * bytes cannot be read here (not mapped, or not RAM nor ROM: Python reads them and counts, nothing is stored).
 *
 * RDTSC (pv_rdtsc_hook, a UC_HOOK_INSN hook) returns the vCPU's virtual time in TSC ticks, never the host's
 * counter: the clock before the running block was charged, plus what the block's instructions before the RDTSC
 * cost (so it reads the instant of its own instruction, as a guest mark does). That prefix cost is asked of Python
 * once per RDTSC site of a stored block and kept in the block's entry.
 *
 * No Python.h and no libunicorn at link time: Unicorn's entry points come in as function pointers, from the
 * library the Python binding loaded. Plain C11 so a bare `gcc -shared` builds it.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Mirrors domains/paging.py: non-PAE two-level tables, 4 KiB pages, PSE off (bit 7 of a PDE is ignored). */
#define PAGE 0x1000u
#define FRAME 0xFFFFF000u
#define PTE_PRESENT 1u
/* A translated block never spans more than two pages; more pieces than this is not a block Unicorn made. */
#define MAX_PIECES 4
/* The clock is relative to a base Python keeps, so the sum saturates here rather than wrap (see pv_vcpu). */
#define CLOCK_MAX UINT64_MAX
/* Slots of a vCPU's direct-mapped memo of the entries it used last (a power of two). */
#define RECENT 256

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef int (*emu_stop_fn)(void *uc);
/* Count the block at addr: its size bytes, or NULL when this file could not read them. Returns the block's
 * instruction count (1..65535) in the low 16 bits and its cost in ps at ps_per_instr = 1000 above them; < 1 on
 * error. */
typedef int64_t (*count_fn)(uint64_t addr, uint32_t size, const uint8_t *bytes);
#define COUNT_BITS 16
#define COUNT_MASK ((1 << COUNT_BITS) - 1)
/* The cost in ps (at ps_per_instr = 1000) of the size instructions' bytes at addr (NULL: Python reads them); < 0 on
 * error. Asked for the part of a block before an RDTSC. */
typedef int64_t (*price_fn)(uint64_t addr, uint32_t size, const uint8_t *bytes);
/* RDTSC sites whose prefix cost an entry keeps; a block with more asks Python for the rest each time. */
#define TSC_SITES 4

typedef struct entry {
    struct entry *next;
    uint64_t addr;
    uint32_t size;
    int64_t packed; /* what count_fn returned: the instruction count and the cost */
    uint32_t writes_cr; /* the bytes hold the opcode of `mov crN, r32`: CR3 may differ after this block */
    uint32_t tsc_sites; /* RDTSC sites priced so far: their offsets in the block and the cost before each */
    uint32_t tsc_off[TSC_SITES];
    int64_t tsc_before[TSC_SITES];
    uint8_t bytes[];
} entry;

/* Instruction counts of the blocks a domain's vCPUs have run (one table per domain, like InsnCounter). */
typedef struct {
    entry **buckets;
    uint64_t mask;
    uint64_t used;
} table;

/* One vCPU's hook state; every field is 64 bits wide so the ctypes mirror (domains/blockhook.py) has no padding
 * to get wrong. pv_vcpu_size() lets Python check the layout. */
typedef struct {
    reg_read_fn reg_read;
    emu_stop_fn emu_stop;
    count_fn count;
    table *counts;
    const uint8_t *ram;
    uint64_t ram_size;
    const uint8_t *rom;
    uint64_t rom_base;
    uint64_t rom_size;
    int64_t cr3_regid;
    uint64_t ps_per_instr;
    uint64_t clock_ps; /* since the base Python holds: Python's clock_ps = base + this */
    uint64_t end_ps;   /* the slice end, on the same base */
    uint64_t instructions;
    uint64_t misses;     /* calls into Python that counted a block (stored or not) */
    uint64_t unreadable; /* of which: blocks whose bytes this file could not read */
    uint64_t failed;     /* the Python callback raised: emulation was stopped, Python re-raises */
    uint64_t cr3;        /* CR3 as last read, valid while cr3_known (see current_cr3) */
    uint64_t cr3_known;  /* Python clears it before emu_start and whenever it loads CR3 */
    uint64_t block_addr; /* the block running now, and the clock before it was charged: Python prices an */
    uint64_t block_ps;   /* instruction's own instant from them (a guest mark, a clock read) */
    /* RDTSC: the registers it writes, Unicorn's uc_reg_write, Python's price_fn, the base of clock_ps (Python's
     * clock = base_ps + clock_ps, saturated), the ps in a TSC tick, and the stored entry of the block running now
     * (NULL when its bytes could not be read here) */
    reg_write_fn reg_write;
    price_fn price;
    int64_t eip_regid;
    int64_t eax_regid;
    int64_t edx_regid;
    uint64_t base_ps;
    uint64_t ps_per_tick;
    entry *block_entry;
    uint64_t tsc_reads; /* RDTSCs answered; of which tsc_priced asked Python for their prefix */
    uint64_t tsc_priced;
    entry *recent[RECENT]; /* the entries this vCPU last used, by address: a hit here skips the shared table */
    int64_t ecx_regid;     /* RDTSCP also writes ECX (IA32_TSC_AUX) */
    uint64_t pae;          /* the domain's tables are PAE (3 levels, 64-bit entries): domains/paging_pae.py */
} pv_vcpu;

typedef struct {
    const uint8_t *p;
    uint32_t n;
} piece;

uint64_t pv_vcpu_size(void) { return sizeof(pv_vcpu); }

table *pv_table_new(void) {
    table *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    t->mask = 1023;
    t->buckets = calloc(t->mask + 1, sizeof *t->buckets);
    if (t->buckets == NULL) {
        free(t);
        return NULL;
    }
    return t;
}

void pv_table_free(table *t) {
    if (t == NULL)
        return;
    for (uint64_t i = 0; i <= t->mask; i++) {
        entry *e = t->buckets[i];
        while (e != NULL) {
            entry *next = e->next;
            free(e);
            e = next;
        }
    }
    free(t->buckets);
    free(t);
}

uint64_t pv_table_used(const table *t) { return t->used; }

static uint64_t bucket_of(uint64_t addr, uint32_t size) {
    uint64_t h = (addr ^ ((uint64_t)size << 32)) * 0x9E3779B97F4A7C15ull; /* Fibonacci hashing */
    return h ^ (h >> 29);
}

/* Doubling when the table is as full as it has buckets keeps chains short; a failed allocation only costs
 * longer chains. */
static void grow(table *t) {
    uint64_t mask = t->mask * 2 + 1;
    entry **buckets = calloc(mask + 1, sizeof *buckets);
    if (buckets == NULL)
        return;
    for (uint64_t i = 0; i <= t->mask; i++) {
        entry *e = t->buckets[i];
        while (e != NULL) {
            entry *next = e->next;
            uint64_t b = bucket_of(e->addr, e->size) & mask;
            e->next = buckets[b];
            buckets[b] = e;
            e = next;
        }
    }
    free(t->buckets);
    t->buckets = buckets;
    t->mask = mask;
}

static uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4); /* little-endian host, as the guest */
    return v;
}

static uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

#define PAE_ADDR 0x000FFFFFFFFFF000ull

/* domains.paging_pae.translate(ram, cr3, va, write=False): L3 (4 entries at CR3 & ~0x1F), L2, L1 of 512 64-bit
 * entries each. */
static int translate_pae(const pv_vcpu *s, uint32_t cr3, uint32_t va, uint64_t *pa) {
    uint64_t at = (uint64_t)(cr3 & 0xFFFFFFE0u) + (uint64_t)(va >> 30) * 8;
    unsigned shift[2] = {21, 12};
    for (int level = 0; level < 3; level++) {
        if (at + 8 > s->ram_size)
            return 0;
        uint64_t e = load64(s->ram + at);
        if (!(e & PTE_PRESENT))
            return 0;
        if (level == 2) {
            *pa = (e & PAE_ADDR) | (va & (PAGE - 1));
            return 1;
        }
        at = (e & PAE_ADDR) + (uint64_t)((va >> shift[level]) & 511) * 8;
    }
    return 0;
}

/* domains.paging.translate(ram, cr3, va, write=False), entry for entry: 1 and *pa set, or 0 if not mapped. */
static int translate(const pv_vcpu *s, uint32_t cr3, uint32_t va, uint64_t *pa) {
    if (s->pae)
        return translate_pae(s, cr3, va, pa);
    uint64_t at = (cr3 & FRAME) | (va >> 20 & 0xFFC);
    if (at + 4 > s->ram_size)
        return 0;
    uint32_t pde = load32(s->ram + at);
    if (!(pde & PTE_PRESENT))
        return 0;
    at = (pde & FRAME) | (va >> 10 & 0xFFC);
    if (at + 4 > s->ram_size)
        return 0;
    uint32_t pte = load32(s->ram + at);
    if (!(pte & PTE_PRESENT))
        return 0;
    *pa = (pte & FRAME) | (va & (PAGE - 1));
    return 1;
}

/* Where n bytes at physical pa are, in RAM or the ROM (what Vcpu.fetch reads); NULL when neither holds them. */
static const uint8_t *physical(const pv_vcpu *s, uint64_t pa, uint32_t n) {
    if (pa + n <= s->ram_size)
        return s->ram + pa;
    if (s->rom != NULL && pa >= s->rom_base && pa + n <= s->rom_base + s->rom_size)
        return s->rom + (pa - s->rom_base);
    return NULL;
}

/* CR3 as the CPU has it now. Reading it through uc_reg_read costs more than all the rest of the hook, so it is
 * read once per emu_start and again only after a block that may have written a control register: inside
 * emulation only `mov crN, r32` (0F 22) loads CR3, and it ends its translated block, so the next block's hook is
 * the first to run after it. (Python loads CR3 only between emu_starts.) */
static int current_cr3(pv_vcpu *s, void *uc, uint32_t *cr3) {
    if (!s->cr3_known) {
        uint64_t value = 0;
        if (s->reg_read(uc, (int)s->cr3_regid, &value) != 0)
            return 0;
        s->cr3 = value;
        s->cr3_known = 1;
    }
    *cr3 = (uint32_t)s->cr3;
    return 1;
}

/* Whether bytes may hold `mov crN, r32`: 0F 22 anywhere (in an operand too: that costs only a re-read). */
static uint32_t may_write_cr(const uint8_t *b, uint32_t n) {
    for (uint32_t i = 0; i + 1 < n; i++)
        if (b[i] == 0x0F && b[i + 1] == 0x22)
            return 1;
    return 0;
}

/* The block's bytes as host pieces, one per page; the number of pieces, or -1 if any byte is unreadable. */
static int block_pieces(pv_vcpu *s, void *uc, uint64_t addr, uint32_t size, piece *out) {
    uint32_t cr3;
    if (!current_cr3(s, uc, &cr3))
        return -1;
    uint32_t va = (uint32_t)addr;
    if ((va & (PAGE - 1)) + size <= PAGE) { /* the common case: one page */
        uint64_t pa;
        if (!translate(s, cr3, va, &pa) || (out[0].p = physical(s, pa, size)) == NULL)
            return -1;
        out[0].n = size;
        return 1;
    }
    int k = 0;
    while (size > 0) {
        if (k == MAX_PIECES)
            return -1;
        uint32_t n = PAGE - (va & (PAGE - 1));
        if (n > size)
            n = size;
        uint64_t pa;
        if (!translate(s, cr3, va, &pa))
            return -1;
        const uint8_t *p = physical(s, pa, n);
        if (p == NULL)
            return -1;
        out[k].p = p;
        out[k].n = n;
        k++;
        va += n;
        size -= n;
    }
    return k;
}

/* memcmp(a, b, n) == 0, inline: blocks are tens of bytes, where a call into libc costs more than comparing. */
static inline int equal(const uint8_t *a, const uint8_t *b, uint32_t n) {
    uint64_t x, y;
    for (; n >= 8; a += 8, b += 8, n -= 8) {
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        if (x != y)
            return 0;
    }
    for (; n > 0; a++, b++, n--)
        if (*a != *b)
            return 0;
    return 1;
}

static int same_bytes(const entry *e, const piece *pieces, int k) {
    uint32_t off = 0;
    for (int i = 0; i < k; i++) {
        if (!equal(e->bytes + off, pieces[i].p, pieces[i].n))
            return 0;
        off += pieces[i].n;
    }
    return 1;
}

/* A first sighting (or changed bytes): Python counts, the table keeps the count with a copy of the bytes. */
static entry *miss(pv_vcpu *s, uint64_t addr, uint32_t size, const piece *pieces, int k) {
    table *t = s->counts;
    entry *e = malloc(sizeof *e + size);
    if (e == NULL)
        return NULL;
    uint32_t off = 0;
    for (int i = 0; i < k; i++) {
        memcpy(e->bytes + off, pieces[i].p, pieces[i].n);
        off += pieces[i].n;
    }
    s->misses++;
    int64_t n = s->count(addr, size, e->bytes);
    if (n < 1 || (n & COUNT_MASK) == 0) {
        free(e);
        return NULL;
    }
    e->addr = addr;
    e->size = size;
    e->packed = n;
    e->writes_cr = may_write_cr(e->bytes, size);
    e->tsc_sites = 0;
    if (t->used >= t->mask + 1)
        grow(t);
    uint64_t b = bucket_of(addr, size) & t->mask;
    e->next = t->buckets[b];
    t->buckets[b] = e;
    t->used++;
    return e;
}

/* The stored entry for these bytes, moved to the front of its chain (code that alternates between versions finds
 * the current one first); NULL if there is none. */
static entry *lookup(table *t, uint64_t addr, uint32_t size, const piece *pieces, int k) {
    entry **head = &t->buckets[bucket_of(addr, size) & t->mask];
    for (entry **link = head, *e = *head; e != NULL; link = &e->next, e = e->next) {
        if (e->addr != addr || e->size != size)
            continue;
        if (k == 1 ? !equal(e->bytes, pieces[0].p, size) : !same_bytes(e, pieces, k))
            continue;
        if (link != head) {
            *link = e->next;
            e->next = *head;
            *head = e;
        }
        return e;
    }
    return NULL;
}

static int64_t block_count(pv_vcpu *s, void *uc, uint64_t addr, uint32_t size) {
    piece pieces[MAX_PIECES];
    int k = block_pieces(s, uc, addr, size, pieces);
    s->block_entry = NULL;
    if (k < 0) {
        s->misses++;
        s->unreadable++;
        s->cr3_known = 0; /* bytes unseen here: they may write CR3 */
        return s->count(addr, size, NULL);
    }
    entry **slot = &s->recent[(addr ^ addr >> 8) & (RECENT - 1)];
    entry *e = *slot;
    if (e == NULL || e->addr != addr || e->size != size
        || (k == 1 ? !equal(e->bytes, pieces[0].p, size) : !same_bytes(e, pieces, k))) {
        e = lookup(s->counts, addr, size, pieces, k);
        if (e == NULL)
            e = miss(s, addr, size, pieces, k);
        if (e == NULL)
            return -1;
        *slot = e;
    }
    if (e->writes_cr)
        s->cr3_known = 0;
    s->block_entry = e;
    return e->packed;
}

static uint64_t add_sat(uint64_t a, uint64_t b) { return a > CLOCK_MAX - b ? CLOCK_MAX : a + b; }

/* UC_HOOK_BLOCK callback (uc_cb_hookcode_t); user_data is the vCPU's pv_vcpu. */
void pv_block_hook(void *uc, uint64_t addr, uint32_t size, void *user_data) {
    pv_vcpu *s = user_data;
    if (s->clock_ps >= s->end_ps) {
        s->emu_stop(uc); /* from a block hook: this block does not run */
        return;
    }
    int64_t packed = block_count(s, uc, addr, size);
    if (packed < 1 || (packed & COUNT_MASK) == 0) {
        s->failed = 1;
        s->emu_stop(uc);
        return;
    }
    uint64_t weight = (uint64_t)packed >> COUNT_BITS, cost = weight;
    if (s->ps_per_instr != 1000) { /* a faster or slower CPU (the slow fault): every class scales alike */
        if (__builtin_mul_overflow(weight, s->ps_per_instr, &cost))
            cost = CLOCK_MAX;
        else
            cost /= 1000;
    }
    s->instructions += (uint64_t)(packed & COUNT_MASK);
    s->block_addr = addr;
    s->block_ps = s->clock_ps;
    s->clock_ps = add_sat(s->clock_ps, cost);
}

/* The cost of the running block's instructions before the one at offset off: from its entry, or asked of Python
 * (and kept, for up to TSC_SITES sites). < 0 when Python could not price it. */
static int64_t cost_before(pv_vcpu *s, uint32_t off) {
    entry *e = s->block_entry;
    if (e == NULL || e->addr != s->block_addr || off > e->size)
        return s->price(s->block_addr, off, NULL);
    for (uint32_t i = 0; i < e->tsc_sites; i++)
        if (e->tsc_off[i] == off)
            return e->tsc_before[i];
    s->tsc_priced++;
    int64_t ps = s->price(s->block_addr, off, e->bytes);
    if (ps >= 0 && e->tsc_sites < TSC_SITES) {
        e->tsc_off[e->tsc_sites] = off;
        e->tsc_before[e->tsc_sites++] = ps;
    }
    return ps;
}

/* UC_HOOK_INSN callback for UC_X86_INS_RDTSC (Unicorn's uc_cb_insn_cpuid_t): EDX:EAX = the virtual TSC at this
 * instruction's instant; returning 1 skips the emulated RDTSC, which would read the host's counter. */
uint32_t pv_rdtsc_hook(void *uc, void *user_data) {
    pv_vcpu *s = user_data;
    uint64_t eip = 0;
    if (s->reg_read(uc, (int)s->eip_regid, &eip) != 0) {
        s->failed = 1;
        s->emu_stop(uc);
        return 1;
    }
    uint32_t off = (uint32_t)eip - (uint32_t)s->block_addr; /* EIP is synced to the RDTSC before the hook */
    int64_t before = off == 0 ? 0 : cost_before(s, off);
    if (before < 0) {
        s->failed = 1;
        s->emu_stop(uc);
        return 1;
    }
    uint64_t cost = (uint64_t)before;
    if (s->ps_per_instr != 1000 && __builtin_mul_overflow(cost, s->ps_per_instr, &cost))
        cost = CLOCK_MAX;
    else if (s->ps_per_instr != 1000)
        cost /= 1000;
    uint64_t at = add_sat(add_sat(s->base_ps, s->block_ps), cost);
    uint64_t tsc = at / s->ps_per_tick;
    uint64_t lo = (uint32_t)tsc, hi = tsc >> 32;
    s->reg_write(uc, (int)s->eax_regid, &lo);
    s->reg_write(uc, (int)s->edx_regid, &hi);
    s->tsc_reads++;
    return 1;
}

/* UC_HOOK_INSN callback for UC_X86_INS_RDTSCP: RDTSC's virtual answer, and ECX = IA32_TSC_AUX, which no vCPU here
 * can set (no MSR is exposed), so 0 as Xen leaves it; left alone, Unicorn's RDTSCP reads the host's counter. */
uint32_t pv_rdtscp_hook(void *uc, void *user_data) {
    pv_vcpu *s = user_data;
    uint32_t skip = pv_rdtsc_hook(uc, user_data);
    uint64_t aux = 0;
    s->reg_write(uc, (int)s->ecx_regid, &aux);
    return skip;
}
