# workload=mmuhostile: page-table updates a PV guest must not be allowed, each checked for Xen's errno.
# (Run it with the xen backend: the builder pins its page tables, so the pinned-table rule applies.)

.include "abi.inc"

.equ FOREIGN_FRAME, 0xF000          # far beyond a small domain's frames

mmu_hostile:
    push ebx
    push esi
    push edi
    xor edi, edi
    call sd_pte_address
    mov [mh_pte], eax

    # 1. map a frame the domain does not own
    mov eax, [mh_pte]
    mov edx, FOREIGN_FRAME * PAGE_SIZE + PTE_FLAGS
    call mh_mmu_update
    mov edx, -XEN_EPERM
    mov esi, msg_mh_foreign_map
    call ops_expect

    # 2. write a page-table entry that lives in a frame the domain does not own
    mov eax, FOREIGN_FRAME * PAGE_SIZE + VIRT_BASE
    mov edx, 0
    call mh_mmu_update
    mov edx, -XEN_EPERM
    mov esi, msg_mh_foreign_table
    call ops_expect

    # 3. map one of its own pinned page-table frames writable
    mov eax, [mh_pte]
    mov edx, eax
    sub edx, VIRT_BASE
    and edx, 0xFFFFF000
    or edx, PTE_FLAGS
    call mh_mmu_update
    mov edx, -XEN_EBUSY              # get_page_from_l1e cannot take the writable type: could_not_pin
    mov esi, msg_mh_pinned_rw
    call ops_expect

    # 4. update another domain's page tables (foreign domid)
    mov eax, [mh_pte]
    mov edx, 0
    mov ecx, 5
    call mh_mmu_update_dom
    mov edx, -XEN_EPERM
    mov esi, msg_mh_foreign_dom
    call ops_expect

    # 5. flush a vCPU the domain does not have
    mov dword ptr [mh_mask], 0x80
    mov eax, MMUEXT_TLB_FLUSH_MULTI
    xor edx, edx
    mov ecx, mh_mask
    call xen_mmuext_one
    mov edx, -XEN_EINVAL
    mov esi, msg_mh_bad_vcpu
    call ops_expect

    # 6. switch to page tables in a frame it does not own
    mov eax, MMUEXT_NEW_BASEPTR
    mov edx, FOREIGN_FRAME
    xor ecx, ecx
    call xen_mmuext_one
    mov edx, -XEN_EPERM
    mov esi, msg_mh_foreign_base
    call ops_expect

    # 7. update_va_mapping to a frame it does not own
    mov ebx, sd_window
    mov ecx, FOREIGN_FRAME * PAGE_SIZE + PTE_FLAGS
    xor edx, edx
    mov esi, UVMF_INVLPG
    call hc_update_va_mapping
    mov edx, -XEN_EPERM
    mov esi, msg_mh_uva
    call ops_expect

    # 8. pin a frame it does not own as a page directory
    mov eax, MMUEXT_PIN_L2_TABLE
    mov edx, FOREIGN_FRAME
    xor ecx, ecx
    call xen_mmuext_one
    mov edx, -XEN_EPERM
    mov esi, msg_mh_pin
    call ops_expect

    mov esi, msg_mh_done
    mov eax, edi
    call print_num_line
    mov eax, edi
    pop edi
    pop esi
    pop ebx
    ret

# mh_mmu_update(eax = pte virtual address, edx = value) -> eax = result; mh_mmu_update_dom also takes ecx = domid
mh_mmu_update:
    mov ecx, DOMID_SELF
mh_mmu_update_dom:
    push ebx
    push esi
    sub esp, MMU_UPDATE_SIZE
    sub eax, VIRT_BASE
    mov [esp + MMU_UPDATE_ptr], eax  # its low bits are the command: MMU_NORMAL_PT_UPDATE (0)
    mov dword ptr [esp + MMU_UPDATE_ptr + 4], 0
    mov [esp + MMU_UPDATE_val], edx
    mov dword ptr [esp + MMU_UPDATE_val + 4], 0
    mov esi, ecx
    mov ebx, esp
    mov ecx, 1
    xor edx, edx
    call hc_mmu_update
    add esp, MMU_UPDATE_SIZE
    pop esi
    pop ebx
    ret

.align 4
mh_pte: .long 0
mh_mask: .long 0
workload_mmuhostile: .long 0
msg_mh_foreign_map: .asciz "pvkern: mmu: FAIL mapping a foreign frame returned "
msg_mh_foreign_table: .asciz "pvkern: mmu: FAIL writing a foreign page table returned "
msg_mh_pinned_rw: .asciz "pvkern: mmu: FAIL mapping a pinned page table writable returned "
msg_mh_foreign_dom: .asciz "pvkern: mmu: FAIL updating another domain returned "
msg_mh_bad_vcpu: .asciz "pvkern: mmu: FAIL flushing vcpu 7 returned "
msg_mh_foreign_base: .asciz "pvkern: mmu: FAIL NEW_BASEPTR to a foreign frame returned "
msg_mh_uva: .asciz "pvkern: mmu: FAIL update_va_mapping to a foreign frame returned "
msg_mh_pin: .asciz "pvkern: mmu: FAIL pinning a foreign frame returned "
msg_mh_done: .asciz "pvkern: mmu hostile checks failed: "
