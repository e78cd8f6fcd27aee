# workload=mcbench: page-table updates batched in lazy MMU mode (pv_ops lazy_mmu_begin / lazy_mmu_end), which
# the xen backend sends as one multicall per batch.
#
# mcbatch=NN (1..64, default 1) updates per lazy section, mcupdates=NN (1..64, default 64) updates in all. Each
# update points the PTE that maps sd_window (shootdown.S) at sd_frame_a or sd_frame_b in turn (PTE_FLAGS);
# afterwards guest code checks that the PTE holds the last value and that every lazy_mmu_end returned 0, then
# puts the original PTE back. Guest marks on MARK_PORT bracket the updates: MARK_MCBENCH_START before the first
# (detail: the batch size), MARK_MCBENCH_END after the last, before the check (detail: the updates),
# MARK_MCBENCH_FAIL when a check failed (detail: the failures).

.include "abi.inc"

.equ MC_MAX_BATCH, XEN_MC_MAX

# mc_bench() -> eax = number of failed checks (0 when workload=mcbench is not on the command line)
mc_bench:
    push ebx
    push esi
    push edi
    push ebp
    mov edi, str_mcbench_key
    call cmdline_flag
    test eax, eax
    jz .Lmc_return
    mov edi, str_mcbatch_key
    mov eax, 1
    call mc_cmdline_num
    mov [mc_batch], eax
    mov edi, str_mcupdates_key
    mov eax, MC_MAX_BATCH
    call mc_cmdline_num
    mov [mc_updates], eax
    call sd_pte_address
    mov [mc_pte], eax
    mov eax, [eax]
    mov [mc_saved_pte], eax
    mov [mc_expect], eax
    xor ebp, ebp                     # failures
    mov eax, [mc_batch]
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_MCBENCH_START
    mov edx, MARK_PORT
    out dx, eax                      # mark: the first update starts
    xor esi, esi                     # updates done
.Lmc_section:
    cmp esi, [mc_updates]
    jae .Lmc_updated
    PVCALL lazy_mmu_begin
    xor edi, edi                     # updates in this section
.Lmc_update:
    cmp edi, [mc_batch]
    jae .Lmc_section_end
    cmp esi, [mc_updates]
    jae .Lmc_section_end
    mov ebx, esi
    and ebx, 1
    mov edx, [sd_frames + ebx*4]     # alternate between the kernel's two data frames
    sub edx, VIRT_BASE
    or edx, PTE_FLAGS
    mov [mc_expect], edx
    mov eax, [mc_pte]
    PVCALL set_pte
    inc esi
    inc edi
    jmp .Lmc_update
.Lmc_section_end:
    PVCALL lazy_mmu_end
    test eax, eax
    jz .Lmc_section
    inc ebp                          # the batch (or an entry of it) failed
    mov [mc_last_error], eax
    jmp .Lmc_section
.Lmc_updated:
    mov eax, [mc_updates]
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_MCBENCH_END
    mov edx, MARK_PORT
    out dx, eax                      # mark: every update done
    mov eax, [mc_pte]
    mov eax, [eax]
    cmp eax, [mc_expect]
    je .Lmc_pte_ok
    inc ebp
    mov esi, msg_mc_bad_pte
    call print_num_line
.Lmc_pte_ok:
    test ebp, ebp
    jz .Lmc_report
    mov eax, ebp
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_MCBENCH_FAIL
    mov edx, MARK_PORT
    out dx, eax                      # mark: a check failed
    mov esi, msg_mc_error
    mov eax, [mc_last_error]
    call print_num_line
.Lmc_report:
    mov eax, [mc_pte]                # put the original mapping back
    mov edx, [mc_saved_pte]
    PVCALL set_pte
    mov esi, msg_mc_done
    mov eax, [mc_updates]
    mov ebx, [mc_batch]
    call print_two_nums
    mov esi, msg_mc_failures
    mov eax, ebp
    call print_num_line
    mov eax, ebp
.Lmc_return:
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

# mc_cmdline_num(edi = key, eax = default) -> eax: the one- or two-digit decimal number after key, clamped to
# 1..MC_MAX_BATCH, or the default when the key is absent or not followed by a digit
mc_cmdline_num:
    push esi
    push eax
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    call find_after
    test eax, eax
    jz .Lmc_num_default
    movzx edx, byte ptr [eax]
    sub edx, 0x30
    cmp edx, 9
    ja .Lmc_num_default
    movzx ecx, byte ptr [eax + 1]
    sub ecx, 0x30
    cmp ecx, 9
    ja .Lmc_num_one_digit
    imul edx, edx, 10
    add edx, ecx
.Lmc_num_one_digit:
    pop eax
    mov eax, edx
    test eax, eax
    jnz .Lmc_num_not_zero
    mov eax, 1
.Lmc_num_not_zero:
    cmp eax, MC_MAX_BATCH
    jbe .Lmc_num_done
    mov eax, MC_MAX_BATCH
    jmp .Lmc_num_done
.Lmc_num_default:
    pop eax
.Lmc_num_done:
    pop esi
    ret

.align 4
mc_batch: .long 1
mc_updates: .long MC_MAX_BATCH
mc_pte: .long 0
mc_saved_pte: .long 0
mc_expect: .long 0
mc_last_error: .long 0
str_mcbench_key: .asciz "workload=mcbench"
str_mcbatch_key: .asciz "mcbatch="
str_mcupdates_key: .asciz "mcupdates="
msg_mc_done: .asciz "pvkern: mcbench updates #, batch #"
msg_mc_failures: .asciz "pvkern: mcbench check failures: "
msg_mc_bad_pte: .asciz "pvkern: mcbench: FAIL the PTE holds "
msg_mc_error: .asciz "pvkern: mcbench: FAIL a lazy section returned "
