# ops_test() -> eax = number of failed checks. Calls every pv op through its (possibly patched) call site and
# checks what it did, in guest code. Ops whose effect needs interrupt delivery between vCPUs (send_ipi,
# halt's wake-up, the native flush_tlb_others) are reported as skipped.

.include "abi.inc"

.equ TEST_TSS_SLOT, 5
.equ TEST_TSS_BASE, 0x12345678
.equ TEST_PTE_VALUE, 0x00003067
.equ TEST_LAZY_PTE_VALUE, 0x00004067
.equ OPBENCH_ROUNDS, 200
.equ SPIN_LIMIT, 1000000

ops_test:
    push ebx
    push esi
    push edi
    xor edi, edi

    PVCALL irq_disable
    PVCALL save_fl
    and eax, EFLAGS_IF
    xor edx, edx
    mov esi, msg_t_irq_disable
    call ops_expect

    PVCALL irq_enable
    PVCALL save_fl
    and eax, EFLAGS_IF
    mov edx, EFLAGS_IF
    mov esi, msg_t_irq_enable
    call ops_expect

    PVCALL save_fl
    mov ebx, eax
    xor eax, eax
    PVCALL restore_fl
    PVCALL save_fl
    and eax, EFLAGS_IF
    xor edx, edx
    mov esi, msg_t_restore_off
    call ops_expect
    mov eax, ebx
    PVCALL restore_fl
    PVCALL save_fl
    and eax, EFLAGS_IF
    mov edx, EFLAGS_IF
    mov esi, msg_t_restore_on
    call ops_expect

    PVCALL read_cr3
    mov ebx, eax
    call copy_live_pgdir
    mov eax, test_page_dir
    sub eax, VIRT_BASE
    PVCALL write_cr3
    PVCALL read_cr3
    mov edx, test_page_dir
    sub edx, VIRT_BASE
    mov esi, msg_t_cr3
    call ops_expect
    mov eax, ebx
    PVCALL write_cr3

    mov eax, test_pte
    mov edx, TEST_PTE_VALUE
    PVCALL set_pte
    mov eax, [test_pte]
    mov edx, TEST_PTE_VALUE
    mov esi, msg_t_set_pte
    call ops_expect

    PVCALL lazy_mmu_begin            # lazy MMU mode: the update and the flushes may wait for lazy_mmu_end
    mov eax, test_pte
    mov edx, TEST_LAZY_PTE_VALUE
    PVCALL set_pte
    mov eax, test_pte
    PVCALL flush_tlb_single
    PVCALL flush_tlb_user
    PVCALL lazy_mmu_end              # xen: one multicall of three entries
    xor edx, edx
    mov esi, msg_t_lazy_end
    call ops_expect
    mov eax, [test_pte]
    mov edx, TEST_LAZY_PTE_VALUE
    mov esi, msg_t_lazy_pte
    call ops_expect

    PVCALL flush_tlb_user
    xor edx, edx
    mov esi, msg_t_flush_user
    call ops_expect
    PVCALL flush_tlb_kernel
    xor edx, edx
    mov esi, msg_t_flush_kernel
    call ops_expect
    mov eax, test_pte
    PVCALL flush_tlb_single

    mov eax, TEST_TSS_SLOT
    mov edx, TEST_TSS_BASE
    PVCALL set_tss_desc
    mov eax, [gdt_table + TEST_TSS_SLOT * 8]
    mov edx, 0x56780067
    mov esi, msg_t_tss_low
    call ops_expect
    mov eax, [gdt_table + TEST_TSS_SLOT * 8 + 4]
    mov edx, 0x12008934
    mov esi, msg_t_tss_high
    call ops_expect

    PVCALL clock_ns
    mov ebx, eax
    mov ecx, 20000
.Lops_burn:
    dec ecx
    jnz .Lops_burn
    PVCALL clock_ns
    sub eax, ebx
    seta al                          # time moved forward
    movzx eax, al
    mov edx, 1
    mov esi, msg_t_clock
    call ops_expect

    # halt: with interrupts off, an IPI to ourselves is held; halt enables them, sleeps and wakes on it
    PVCALL irq_disable
    call this_cpu
    mov ebx, [ipi_count + eax*4]
    mov edx, IPI_VECTOR
    PVCALL send_ipi
    PVCALL halt
    PVCALL irq_enable
    call this_cpu
    mov eax, [ipi_count + eax*4]
    sub eax, ebx
    mov edx, 1
    mov esi, msg_t_halt
    call ops_expect

    cmp dword ptr [nr_vcpus], 2
    jb .Lops_single_cpu
    # send_ipi: vCPU 1 sits in its idle loop; its handler counts the IPI
    mov ebx, [ipi_count + 4]
    mov eax, 1
    mov edx, IPI_VECTOR
    PVCALL send_ipi
    mov ecx, SPIN_LIMIT
.Lops_wait_ipi:
    cmp [ipi_count + 4], ebx
    jne .Lops_ipi_seen
    pause
    dec ecx
    jnz .Lops_wait_ipi
.Lops_ipi_seen:
    mov eax, [ipi_count + 4]
    sub eax, ebx
    mov edx, 1
    mov esi, msg_t_send_ipi
    call ops_expect

    # flush_tlb_others on vCPU 1: it returns once vCPU 1 has flushed (native: its IPI handler acknowledged;
    # xen and vmi: the hypervisor flushed it)
    mov ebx, [flush_count + 4]
    mov dword ptr [test_cpumask], 2
    mov eax, test_cpumask
    mov edx, -1
    PVCALL flush_tlb_others
    xor edx, edx
    mov esi, msg_t_flush_others
    call ops_expect
    cmp dword ptr [backend_id], HYPERVISOR_TYPE_NATIVE
    jne .Lops_done
    mov eax, [flush_count + 4]
    sub eax, ebx
    mov edx, 1
    mov esi, msg_t_flush_acked
    call ops_expect
    jmp .Lops_done
.Lops_single_cpu:
    mov esi, msg_t_single
    xor eax, eax
    call print_num_line
.Lops_done:

    mov esi, msg_t_done
    mov eax, edi
    call print_num_line
    mov eax, edi
    pop edi
    pop esi
    pop ebx
    ret

# ops_expect(eax = got, edx = expected, esi = label): on a mismatch print it and count it in edi
ops_expect:
    cmp eax, edx
    je .Lops_expect_ok
    inc edi
    push edx
    call print_num_line
    pop eax
    mov esi, msg_t_expected
    call print_num_line
.Lops_expect_ok:
    ret

# op_bench(eax = pv_ops slot): OPBENCH_ROUNDS calls of one op through the pv_ops table, with benign arguments
# (the bench subtracts a run without them to get instructions and virtual time per call)
# copy_live_pgdir(eax = machine address of the live page directory): test_page_dir becomes a copy of it, which
# maps the same, so switching cr3 to it is safe. A page directory may not be mapped writable (Xen's NEW_BASEPTR
# refuses one that is), so test_page_dir is mapped writable only while it is copied into; when it is the live one
# already, there is nothing to copy.
copy_live_pgdir:
    push esi
    push edi
    push ebx
    mov esi, eax
    add esi, VIRT_BASE
    mov edi, test_page_dir
    cmp esi, edi
    je .Lcopy_pgdir_done
    mov ebx, edi                     # ebx = the PTE that maps test_page_dir, through the live tables
    shr ebx, 22
    mov ebx, [esi + ebx*4]
    and ebx, 0xFFFFF000
    mov eax, edi
    shr eax, 12
    and eax, 1023
    lea ebx, [ebx + eax*4 + VIRT_BASE]
    mov eax, ebx
    lea edx, [edi - VIRT_BASE + PTE_FLAGS]
    call pgdir_set_pte
    mov ecx, 1024
    rep movs dword ptr es:[edi], dword ptr [esi]
    mov eax, ebx
    mov edx, test_page_dir - VIRT_BASE + PTE_FLAGS
    and edx, 0xFFFFFFFD              # read-only
    call pgdir_set_pte
.Lcopy_pgdir_done:
    pop ebx
    pop edi
    pop esi
    ret

# pgdir_set_pte(eax = pte address, edx = value): set_pte, then flush test_page_dir's TLB entry
pgdir_set_pte:
    PVCALL set_pte
    mov eax, test_page_dir
    PVCALL flush_tlb_single
    ret

op_bench:
    push ebx
    push esi
    mov ebx, eax
    PVCALL read_cr3                  # write_cr3 is benchmarked with a copy of the live page directory
    call copy_live_pgdir
    mov ecx, opbench_nop             # slot NR_PV_OPS: an empty op, the baseline the bench subtracts
    cmp ebx, NR_PV_OPS
    jae .Lopbench_have_target
    mov ecx, [pv_ops + ebx*4]
.Lopbench_have_target:
    mov [opbench_target], ecx
    mov esi, OPBENCH_ROUNDS
.Lopbench_next:
    mov eax, [opbench_args + ebx*8]
    mov edx, [opbench_args + ebx*8 + 4]
    call dword ptr [opbench_target]
    dec esi
    jnz .Lopbench_next
    pop esi
    pop ebx
    ret

.align 4
opbench_args:
    .long 0, 0                                   # init (not benchmarked)
    .long TEST_TSS_SLOT, TEST_TSS_BASE           # set_tss_desc
    .long 0, 0                                   # irq_disable
    .long 0, 0                                   # irq_enable
    .long 0, 0                                   # save_fl
    .long EFLAGS_IF, 0                           # restore_fl
    .long 0, 0                                   # halt (not benchmarked)
    .long 0, 0                                   # read_cr3
    .long test_page_dir - VIRT_BASE, 0           # write_cr3
    .long test_pte, TEST_PTE_VALUE               # set_pte
    .long 0, 0                                   # flush_tlb_user
    .long 0, 0                                   # flush_tlb_kernel
    .long test_pte, 0                            # flush_tlb_single
    .long test_cpumask, -1                       # flush_tlb_others (an empty mask)
    .long 0, 0                                   # send_ipi (not benchmarked)
    .long 0, 0                                   # clock_ns
    .long 0, 0                                   # lazy_mmu_begin
    .long 0, 0                                   # lazy_mmu_end
    .long 0, 0                                   # the empty op
opbench_target: .long 0
opbench_nop:
    ret

.align 4096
test_page_dir: .space 4096
test_pte: .long 0
test_cpumask: .long 0
msg_t_irq_disable: .asciz "pvkern: ops: FAIL irq_disable left IF = "
msg_t_irq_enable: .asciz "pvkern: ops: FAIL irq_enable left IF = "
msg_t_restore_off: .asciz "pvkern: ops: FAIL restore_fl(0) left IF = "
msg_t_restore_on: .asciz "pvkern: ops: FAIL restore_fl(IF) left IF = "
msg_t_cr3: .asciz "pvkern: ops: FAIL read_cr3 after write_cr3 = "
msg_t_set_pte: .asciz "pvkern: ops: FAIL set_pte wrote "
msg_t_lazy_end: .asciz "pvkern: ops: FAIL lazy_mmu_end returned "
msg_t_lazy_pte: .asciz "pvkern: ops: FAIL set_pte in lazy MMU mode wrote "
msg_t_flush_user: .asciz "pvkern: ops: FAIL flush_tlb_user returned "
msg_t_flush_kernel: .asciz "pvkern: ops: FAIL flush_tlb_kernel returned "
msg_t_tss_low: .asciz "pvkern: ops: FAIL set_tss_desc low word "
msg_t_tss_high: .asciz "pvkern: ops: FAIL set_tss_desc high word "
msg_t_clock: .asciz "pvkern: ops: FAIL clock_ns did not advance "
msg_t_flush_others: .asciz "pvkern: ops: FAIL flush_tlb_others returned "
msg_t_halt: .asciz "pvkern: ops: FAIL halt woke with this many IPIs handled: "
msg_t_send_ipi: .asciz "pvkern: ops: FAIL send_ipi to vcpu 1, IPIs it handled: "
msg_t_flush_acked: .asciz "pvkern: ops: FAIL flush_tlb_others: flushes vcpu 1 acknowledged: "
msg_t_single: .asciz "pvkern: ops: one vcpu, send_ipi and flush_tlb_others to others skipped "
msg_t_expected: .asciz "pvkern: ops:      expected "
msg_t_done: .asciz "pvkern: ops test failures: "
