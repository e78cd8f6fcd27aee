# Robustness workloads (issue 8): inputs that once took the whole cluster down, run on vCPU 0.
#
#   workload=fartimer                    bind VIRQ_TIMER, set_timer_op with deadline 2^64-1, SCHEDOP_block: Xen reads
#                                        the deadline as negative and fires the timer 100 ms later (needs backend=xen)
#   workload=mcflood [mcrounds=N]        N multicalls (default 2) of 512 entries, each a 512-op mmuext_op of
#                                        TLB_FLUSH_LOCAL: 262144 ops a round, which the hypervisor must spread over
#                                        windows (its per-domain work budget) with hypercall continuations
#   workload=hcfuzz [fuzzseed=S] [fuzzcount=N]
#                                        N hypercalls (default 2000) with numbers and argument words from a seeded
#                                        generator (the same list for the same seed): small numbers, random words and
#                                        pointers into a scratch page refilled with random bytes before each call. It
#                                        leaves out only what would stop this vCPU by design (SCHEDOP_block, poll,
#                                        shutdown; VCPUOP_down; iret) or point its upcalls, PTEs and page tables at
#                                        random memory (set_callbacks, callback_op, mmu_update, update_va_mapping),
#                                        and keeps the batches of multicall and mmuext_op short, so they do not
#                                        walk (and write results over) the kernel's own memory
#
# Each prints what it did; robust_work returns (in eax) 0, or 1 when a check failed.

.include "abi.inc"

.equ RB_FLOOD_ENTRIES, 512
.equ RB_FLOOD_OPS, 512
.equ RB_FLOOD_ROUNDS_DEFAULT, 2
.equ RB_FUZZ_COUNT_DEFAULT, 2000
.equ RB_FUZZ_SCRATCH_DWORDS, 64
.equ RB_FUZZ_SCRATCH_BYTES, 4096
.equ RB_FUZZ_MAX_BATCH, 7
.equ RB_FUZZ_NR_RANGE, 40
.equ RB_LCG_MUL, 1103515245
.equ RB_LCG_ADD, 12345
.equ RB_FAR_DEADLINE_WORD, 0xFFFFFFFF

# robust_work() -> eax = 0 (nothing asked for, or done), 1 (a check failed)
robust_work:
    push ebx
    push esi
    push edi
    push ebp
    mov edi, rb_key_timerbomb
    call cmdline_flag
    test eax, eax
    jnz rb_timerbomb
    mov edi, rb_key_mcflood
    call cmdline_flag
    test eax, eax
    jnz rb_mcflood
    mov edi, rb_key_hcfuzz
    call cmdline_flag
    test eax, eax
    jnz rb_hcfuzz
    xor eax, eax
rb_return:
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

rb_fail:
    call print_num_line
    mov eax, 1
    jmp rb_return

# -- timerbomb -------------------------------------------------------------------------------------------------

rb_timerbomb:
    mov dword ptr [rb_virq + EVTCHN_BIND_VIRQ_virq], VIRQ_TIMER
    mov dword ptr [rb_virq + EVTCHN_BIND_VIRQ_vcpu], 0
    mov ebx, EVTCHNOP_bind_virq
    mov ecx, rb_virq
    call hc_event_channel_op
    mov esi, rb_msg_virq_failed
    test eax, eax
    jnz rb_fail
    in eax, CLOCK_PORT
    mov [rb_t0], eax
    call this_vcpu_info              # events off until the block turns them back on: no lost wake-up
    mov byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 1
    mov ebx, RB_FAR_DEADLINE_WORD    # deadline low word
    mov ecx, RB_FAR_DEADLINE_WORD    # deadline high word: 2^64 - 1
    call hc_set_timer_op
    mov esi, rb_msg_timer_failed
    test eax, eax
    jnz rb_fail
    mov ebx, SCHEDOP_block
    xor ecx, ecx
    call hc_sched_op
    in eax, CLOCK_PORT
    sub eax, [rb_t0]
    mov esi, rb_msg_timerbomb
    call print_num_line
    xor eax, eax
    jmp rb_return

# -- mcflood ---------------------------------------------------------------------------------------------------

rb_mcflood:
    mov edi, rb_key_mcrounds
    mov eax, RB_FLOOD_ROUNDS_DEFAULT
    call evw_number
    mov ebp, eax                     # rounds left
    xor ecx, ecx                     # one op array, shared by every entry
.Lrb_ops:
    imul edx, ecx, MMUEXT_OP_SIZE
    mov dword ptr [rb_ops + edx + MMUEXT_OP_cmd], MMUEXT_TLB_FLUSH_LOCAL
    mov dword ptr [rb_ops + edx + MMUEXT_OP_arg1], 0
    mov dword ptr [rb_ops + edx + MMUEXT_OP_arg2], 0
    inc ecx
    cmp ecx, RB_FLOOD_OPS
    jb .Lrb_ops
.Lrb_round:
    test ebp, ebp
    jz .Lrb_flood_done
    xor ecx, ecx                     # the entries again: continuations rewrote their arguments last round
.Lrb_entries:
    mov edx, ecx
    shl edx, MULTICALL_ENTRY_SHIFT
    mov dword ptr [rb_entries + edx + MULTICALL_ENTRY_op], __HYPERVISOR_mmuext_op
    mov dword ptr [rb_entries + edx + MULTICALL_ENTRY_result], 0
    mov dword ptr [rb_entries + edx + MULTICALL_ENTRY_args], rb_ops
    mov dword ptr [rb_entries + edx + MULTICALL_ENTRY_args + 4], RB_FLOOD_OPS
    mov dword ptr [rb_entries + edx + MULTICALL_ENTRY_args + 8], 0
    mov dword ptr [rb_entries + edx + MULTICALL_ENTRY_args + 12], DOMID_SELF
    inc ecx
    cmp ecx, RB_FLOOD_ENTRIES
    jb .Lrb_entries
    mov ebx, rb_entries
    mov ecx, RB_FLOOD_ENTRIES
    call hc_multicall
    mov esi, rb_msg_flood_failed
    test eax, eax
    jnz rb_fail
    mov eax, [rb_entries + (RB_FLOOD_ENTRIES - 1) * MULTICALL_ENTRY_SIZE + MULTICALL_ENTRY_result]
    mov esi, rb_msg_flood_last
    test eax, eax                    # the last entry ran, and all its ops succeeded
    jnz rb_fail
    dec ebp
    jmp .Lrb_round
.Lrb_flood_done:
    mov edi, rb_key_mcrounds
    mov eax, RB_FLOOD_ROUNDS_DEFAULT
    call evw_number
    mov esi, rb_msg_flood
    call print_num_line
    xor eax, eax
    jmp rb_return

# -- hcfuzz ----------------------------------------------------------------------------------------------------

# rb_rand() -> eax: the next word of the seeded linear congruential generator (the high 16 bits of two steps)
# (the multiplier goes through a register: keystone now and then refused `imul eax, eax, SYMBOL` as an invalid
# operand, under load, in one process of hundreds; `mov reg, SYMBOL` it always takes)
rb_rand:
    push edx
    push ecx
    mov ecx, RB_LCG_MUL
    mov eax, [rb_seed]
    imul eax, ecx
    add eax, RB_LCG_ADD
    mov edx, eax
    shr edx, 16
    imul eax, ecx
    add eax, RB_LCG_ADD
    mov [rb_seed], eax
    and eax, 0xFFFF0000
    or eax, edx
    pop ecx
    pop edx
    ret

# rb_arg() -> eax: an argument word: a small number, a random word, a pointer into the scratch page, or -1
rb_arg:
    call rb_rand
    and eax, 3
    jz .Lrb_arg_small
    cmp eax, 1
    je rb_rand                       # tail call: a random word
    cmp eax, 2
    je .Lrb_arg_ptr
    mov eax, 0xFFFFFFFF
    ret
.Lrb_arg_small:
    call rb_rand
    and eax, 15
    ret
.Lrb_arg_ptr:
    call rb_rand
    and eax, RB_FUZZ_SCRATCH_DWORDS * 4 - 4
    add eax, rb_scratch
    ret

rb_hcfuzz:
    mov edi, rb_key_fuzzseed
    mov eax, 1
    call evw_number
    mov [rb_seed], eax
    mov [rb_seed0], eax
    mov edi, rb_key_fuzzcount
    mov eax, RB_FUZZ_COUNT_DEFAULT
    call evw_number
    mov [rb_fuzz_count], eax
    xor ebp, ebp                     # calls issued
.Lrb_fuzz_loop:
    cmp ebp, [rb_fuzz_count]
    jae .Lrb_fuzz_done
    xor ecx, ecx                     # the scratch page gets new random bytes before every call
.Lrb_fill:
    call rb_rand
    mov [rb_scratch + ecx*4], eax
    inc ecx
    cmp ecx, RB_FUZZ_SCRATCH_DWORDS
    jb .Lrb_fill
    call rb_rand
    xor edx, edx
    mov ecx, RB_FUZZ_NR_RANGE
    div ecx
    mov [rb_nr], edx
    mov edi, rb_args
    mov ecx, 5
.Lrb_args:
    call rb_arg
    stosd
    loop .Lrb_args
    call rb_excluded
    test eax, eax
    jnz .Lrb_fuzz_loop               # drawn again: the list stays the same for a seed
    mov eax, [rb_nr]
    cmp eax, __HYPERVISOR_multicall
    je .Lrb_short_batch
    cmp eax, __HYPERVISOR_mmuext_op
    jne .Lrb_issue
.Lrb_short_batch:
    and dword ptr [rb_args + 4], RB_FUZZ_MAX_BATCH
.Lrb_issue:
    mov ebx, [rb_args]
    mov ecx, [rb_args + 4]
    mov edx, [rb_args + 8]
    mov esi, [rb_args + 12]
    mov edi, [rb_args + 16]
    mov eax, [rb_nr]
    int HYPERCALL_VECTOR
    inc ebp
    jmp .Lrb_fuzz_loop
.Lrb_fuzz_done:
    mov esi, rb_msg_fuzz
    mov eax, ebp
    mov ebx, [rb_seed0]
    call print_two_nums
    xor eax, eax
    jmp rb_return

# rb_excluded() -> eax = 1 for a drawn call this vCPU must not make (see the top of the file)
rb_excluded:
    mov eax, [rb_nr]
    mov edx, [rb_args]
    cmp eax, __HYPERVISOR_sched_op
    jne .Lrb_ex_vcpu
    cmp edx, SCHEDOP_block
    je .Lrb_ex_yes
    cmp edx, SCHEDOP_shutdown
    je .Lrb_ex_yes
    cmp edx, SCHEDOP_poll
    je .Lrb_ex_yes
    jmp .Lrb_ex_no
.Lrb_ex_vcpu:
    cmp eax, __HYPERVISOR_vcpu_op
    jne .Lrb_ex_other
    cmp edx, VCPUOP_down
    je .Lrb_ex_yes
    jmp .Lrb_ex_no
.Lrb_ex_other:
    cmp eax, __HYPERVISOR_iret
    je .Lrb_ex_yes
    cmp eax, __HYPERVISOR_set_callbacks
    je .Lrb_ex_yes
    cmp eax, __HYPERVISOR_callback_op
    je .Lrb_ex_yes
    cmp eax, __HYPERVISOR_mmu_update
    je .Lrb_ex_yes
    cmp eax, __HYPERVISOR_update_va_mapping
    je .Lrb_ex_yes
.Lrb_ex_no:
    xor eax, eax
    ret
.Lrb_ex_yes:
    mov eax, 1
    ret

.align 4
rb_t0: .long 0
rb_seed: .long 0
rb_seed0: .long 0
rb_fuzz_count: .long 0
rb_nr: .long 0
rb_args: .space 20
rb_virq: .space EVTCHN_BIND_VIRQ_SIZE
rb_scratch: .space RB_FUZZ_SCRATCH_BYTES           # random bytes at the start; room for what a call writes back
rb_ops: .space RB_FLOOD_OPS * MMUEXT_OP_SIZE
rb_entries: .space RB_FLOOD_ENTRIES * MULTICALL_ENTRY_SIZE
rb_key_timerbomb: .asciz "workload=fartimer"
rb_key_mcflood: .asciz "workload=mcflood"
rb_key_mcrounds: .asciz "mcrounds="
rb_key_hcfuzz: .asciz "workload=hcfuzz"
rb_key_fuzzseed: .asciz "fuzzseed="
rb_key_fuzzcount: .asciz "fuzzcount="
rb_msg_virq_failed: .asciz "pvkern: fartimer: EVTCHNOP_bind_virq failed "
rb_msg_timer_failed: .asciz "pvkern: fartimer: set_timer_op failed "
rb_msg_timerbomb: .asciz "pvkern: fartimer woke after ns "
rb_msg_flood_failed: .asciz "pvkern: mcflood: multicall failed "
rb_msg_flood_last: .asciz "pvkern: mcflood: the last entry's result "
rb_msg_flood: .asciz "pvkern: mcflood rounds done "
rb_msg_fuzz: .asciz "pvkern: hcfuzz issued # calls, seed #"
