# The xen backend: every privileged operation becomes a hypercall through the hypercall page, or a write to
# this vCPU's vcpu_info in shared_info (the virtual interrupt flag is evtchn_upcall_mask, which is set on every
# vCPU at the start of day: vCPU 0 clears it at the end of xen_init, a secondary in its irq_enable or its first
# SCHEDOP_block).
# The kernel runs in ring 1 on Xen's flat selectors (FLAT_RING1_CS/DS). set_tss_desc is NULL: the native code runs
# instead (the null-entry rule), which needs no privilege: it writes the descriptor into the kernel's own table,
# never the CPU's GDT (Linux's Xen backend goes further and ignores TSS descriptors, since Xen keeps its own TSS). IPIs travel on one event channel
# per vCPU (EVTCHNOP_bind_ipi); the upcall handler runs the same handler bodies as the native IDT vectors.

.include "abi.inc"

.equ EFLAGS_IF, 0x200
.equ IPI_VECTOR_BIT, IPI_VECTOR & 31         # xen_send_ipi notes a vector as a bit in a 32-bit word
.equ FLUSH_VECTOR_BIT, FLUSH_VECTOR & 31
.equ CR3_VECTOR_BIT, CR3_VECTOR & 31
.equ XEN_MC_MAX, 64                  # entries in a vCPU's lazy-MMU batch; a full batch is sent at once
# One vCPU's batch area: XEN_MC_MAX multicall entries, then one argument buffer per entry, each big enough for a
# struct mmu_update (the larger of mmu_update and mmuext_op).
.equ XEN_MC_ARGS, XEN_MC_MAX * MULTICALL_ENTRY_SIZE
.equ XEN_MC_AREA, XEN_MC_ARGS + XEN_MC_MAX * MMU_UPDATE_SIZE

xen_code_begin:
xen_init:
    push esi
    mov eax, [start_info]
    mov eax, [eax + START_INFO_shared_info]
    add eax, VIRT_BASE               # shared_info's machine address, seen through the kernel's linear map
    mov [xen_shared_info], eax
    mov esi, msg_xen_init
    call print_num_line
    mov eax, [start_info]            # every vCPU starts on the page tables the builder made
    mov eax, [eax + START_INFO_pt_base]
    test eax, eax
    jz .Lxen_no_pt
    sub eax, VIRT_BASE
.Lxen_no_pt:
    xor ecx, ecx
.Lxen_cr3_fill:
    mov [xen_cr3 + ecx*4], eax
    inc ecx
    cmp ecx, MAX_VCPUS
    jb .Lxen_cr3_fill
    push ebx
    mov ebx, CALLBACKOP_register     # the event upcall enters at xen_hypervisor_callback
    mov ecx, xen_callback_reg
    call hc_callback_op
    test eax, eax
    jnz .Lxen_init_failed
    xor esi, esi                     # one IPI port per vCPU
.Lxen_bind_next:
    cmp esi, [nr_vcpus]
    jae .Lxen_init_done
    mov [xen_bind_ipi + EVTCHN_BIND_IPI_vcpu], esi
    mov ebx, EVTCHNOP_bind_ipi
    mov ecx, xen_bind_ipi
    call hc_event_channel_op
    test eax, eax
    jnz .Lxen_init_failed
    mov eax, [xen_bind_ipi + EVTCHN_BIND_IPI_port]
    mov [xen_ipi_port + esi*4], eax
    inc esi
    jmp .Lxen_bind_next
.Lxen_init_done:
    call xen_irq_enable              # events start masked on every vCPU (the domain builder's shared_info); the
                                     # boot vCPU takes them from here, its callback and IPI ports in place, as
                                     # Linux's start_kernel turns interrupts on once early init is done
    pop ebx
    pop esi
    xor eax, eax
    ret
.Lxen_init_failed:
    mov esi, msg_xen_init_failed
    jmp panic

# send_ipi(eax = vcpu, edx = vector): note the vector for the target, then signal its IPI port
xen_send_ipi:
    and edx, 31
    lock bts dword ptr [xen_ipi_vectors + eax*4], edx
    push ebx
    push dword ptr [xen_ipi_port + eax*4]    # struct evtchn_send (port), on this vCPU's own stack
    mov ebx, EVTCHNOP_send
    mov ecx, esp
    call hc_event_channel_op
    add esp, EVTCHN_SEND_SIZE
    pop ebx
    ret

# The event upcall (entered with a frame eip, cs, eflags on the stack and upcalls masked): clear
# evtchn_upcall_pending, take evtchn_pending_sel, and for every pending and unmasked port clear its bit with a
# locked instruction and handle it. Unmask and return with iret.
xen_hypervisor_callback:
    pushad
    call this_vcpu_info
    mov esi, eax
.Lcb_again:
    mov byte ptr [esi + VCPU_INFO_evtchn_upcall_pending], 0
    xor ecx, ecx
    xchg ecx, [esi + VCPU_INFO_evtchn_pending_sel]
    mov edi, [xen_shared_info]
.Lcb_word:
    bsf edx, ecx
    jz .Lcb_words_done
    btr ecx, edx
.Lcb_bits:
    mov eax, [edi + SHARED_INFO_evtchn_pending + edx*4]
    mov ebx, [edi + SHARED_INFO_evtchn_mask + edx*4]
    not ebx
    and eax, ebx
    bsf ebx, eax
    jz .Lcb_word
    lock btr dword ptr [edi + SHARED_INFO_evtchn_pending + edx*4], ebx
    mov eax, edx
    shl eax, 5                       # 32 ports per word of evtchn_pending
    add eax, ebx                     # port
    push ecx
    push edx
    call xen_handle_port
    pop edx
    pop ecx
    jmp .Lcb_bits
.Lcb_words_done:
    cmp byte ptr [esi + VCPU_INFO_evtchn_upcall_pending], 0
    jne .Lcb_again
    mov byte ptr [esi + VCPU_INFO_evtchn_upcall_mask], 0
    popad
    iretd

# xen_handle_port(eax = port): this vCPU's IPI port runs the handler bodies for the vectors noted
xen_handle_port:
    mov edx, eax
    call this_cpu
    cmp edx, [xen_ipi_port + eax*4]
    jne .Lport_unknown
    xor ecx, ecx
    xchg ecx, [xen_ipi_vectors + eax*4]
    push ecx
    bt ecx, IPI_VECTOR_BIT
    jnc .Lport_no_ipi
    call ipi_body
.Lport_no_ipi:
    pop ecx
    push ecx
    bt ecx, FLUSH_VECTOR_BIT
    jnc .Lport_no_flush
    call flush_body
.Lport_no_flush:
    pop ecx
    bt ecx, CR3_VECTOR_BIT
    jnc .Lport_done
    call cr3_body
.Lport_done:
    ret
.Lport_unknown:
    jmp evw_port_event               # evtchn_work.S: timer ticks, else a stray event

# this_vcpu_info() -> eax = &shared_info->vcpu_info[this cpu]; clobbers nothing else
this_vcpu_info:
    call this_cpu
    shl eax, VCPU_INFO_SHIFT
    add eax, [xen_shared_info]
    ret

xen_irq_disable:
    call this_vcpu_info
    mov byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 1
    ret

xen_irq_enable:
    call this_vcpu_info
    mov byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 0
    cmp byte ptr [eax + VCPU_INFO_evtchn_upcall_pending], 0
    je .Lxen_enable_done
    call xen_force_callback          # an event arrived while masked: take it now
.Lxen_enable_done:
    ret

xen_save_fl:
    call this_vcpu_info
    cmp byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 0
    mov eax, 0
    jne .Lxen_save_masked
    mov eax, EFLAGS_IF
.Lxen_save_masked:
    ret

xen_restore_fl:
    mov edx, eax
    call this_vcpu_info
    test edx, EFLAGS_IF
    jz .Lxen_restore_masked
    mov byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 0
    cmp byte ptr [eax + VCPU_INFO_evtchn_upcall_pending], 0
    je .Lxen_restore_done
    call xen_force_callback
    ret
.Lxen_restore_masked:
    mov byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 1
.Lxen_restore_done:
    ret

# Any hypercall makes the hypervisor deliver pending events on the way back; xen_version(0) is the cheapest.
xen_force_callback:
    push ebx
    xor ebx, ebx                     # XENVER_version
    xor ecx, ecx
    call hc_xen_version
    pop ebx
    ret

xen_halt:
    push ebx
    mov ebx, SCHEDOP_block
    xor ecx, ecx
    call hc_sched_op
    pop ebx
    ret

# read_cr3: Xen keeps no readable cr3 for a PV guest; the kernel caches what it last set, per vCPU
xen_read_cr3:
    call this_cpu
    mov eax, [xen_cr3 + eax*4]
    ret

# write_cr3(eax = machine address of the page directory): MMUEXT_NEW_BASEPTR
xen_write_cr3:
    mov edx, eax
    call this_cpu
    mov [xen_cr3 + eax*4], edx
    cmp dword ptr [xen_mc_count + eax*4], 0
    je .Lxen_cr3_now
    push edx                         # lazy MMU mode: the updates queued so far reach the hypervisor first
    call xen_mc_flush
    pop edx
.Lxen_cr3_now:
    shr edx, PAGE_SHIFT
    mov eax, MMUEXT_NEW_BASEPTR
    xor ecx, ecx
    jmp xen_mmuext_now

# set_pte(eax = pte virtual address, edx = value): one MMU_NORMAL_PT_UPDATE with the pte's machine address
# (in lazy MMU mode queued in this vCPU's multicall batch; returns 0 then)
xen_set_pte:
    push eax
    call this_cpu
    cmp dword ptr [xen_lazy + eax*4], 0
    pop eax
    je .Lxen_set_pte_now
    push edx
    push eax
    mov eax, __HYPERVISOR_mmu_update
    call xen_mc_queue
    pop ecx
    sub ecx, VIRT_BASE
    mov [eax + MMU_UPDATE_ptr], ecx  # its low bits are the command: MMU_NORMAL_PT_UPDATE (0)
    mov dword ptr [eax + MMU_UPDATE_ptr + 4], 0
    pop edx
    mov [eax + MMU_UPDATE_val], edx
    mov dword ptr [eax + MMU_UPDATE_val + 4], 0
    xor eax, eax
    ret
.Lxen_set_pte_now:
    push ebx
    push esi
    sub esp, MMU_UPDATE_SIZE
    sub eax, VIRT_BASE
    mov [esp + MMU_UPDATE_ptr], eax  # its low bits are the command: MMU_NORMAL_PT_UPDATE (0)
    mov dword ptr [esp + MMU_UPDATE_ptr + 4], 0
    mov [esp + MMU_UPDATE_val], edx
    mov dword ptr [esp + MMU_UPDATE_val + 4], 0
    mov ebx, esp
    mov ecx, 1
    xor edx, edx
    mov esi, DOMID_SELF
    call hc_mmu_update
    add esp, MMU_UPDATE_SIZE
    pop esi
    pop ebx
    ret

xen_flush_tlb_user:
xen_flush_tlb_kernel:
    mov eax, MMUEXT_TLB_FLUSH_LOCAL
    xor edx, edx
    xor ecx, ecx
    jmp xen_mmuext_one

# flush_tlb_single(eax = va)
xen_flush_tlb_single:
    mov edx, eax
    mov eax, MMUEXT_INVLPG_LOCAL
    xor ecx, ecx
    jmp xen_mmuext_one

# flush_tlb_others(eax = vCPU bitmap pointer, edx = va or -1): one multicast mmuext_op
xen_flush_tlb_others:
    mov ecx, eax
    cmp edx, -1
    je .Lxen_others_full
    mov eax, MMUEXT_INVLPG_MULTI
    jmp xen_mmuext_one
.Lxen_others_full:
    mov eax, MMUEXT_TLB_FLUSH_MULTI
    xor edx, edx
    jmp xen_mmuext_one

# xen_mmuext_one(eax = cmd, edx = arg1, ecx = arg2) -> eax = hypercall result (in lazy MMU mode the op is
# queued in this vCPU's multicall batch and the result is 0)
xen_mmuext_one:
    push eax
    call this_cpu
    cmp dword ptr [xen_lazy + eax*4], 0
    pop eax
    je xen_mmuext_now
    push ecx
    push edx
    push eax
    mov eax, __HYPERVISOR_mmuext_op
    call xen_mc_queue
    pop ecx
    mov [eax + MMUEXT_OP_cmd], ecx
    pop ecx
    mov [eax + MMUEXT_OP_arg1], ecx
    pop ecx
    mov [eax + MMUEXT_OP_arg2], ecx
    xor eax, eax
    ret
xen_mmuext_now:
    push ebx
    push esi
    sub esp, MMUEXT_OP_SIZE
    mov [esp + MMUEXT_OP_cmd], eax
    mov [esp + MMUEXT_OP_arg1], edx
    mov [esp + MMUEXT_OP_arg2], ecx
    mov ebx, esp
    mov ecx, 1
    xor edx, edx
    mov esi, DOMID_SELF
    call hc_mmuext_op
    add esp, MMUEXT_OP_SIZE
    pop esi
    pop ebx
    ret

# Lazy MMU mode, as Linux's xen backend has it: between lazy_mmu_begin and lazy_mmu_end, set_pte and the TLB
# flush ops append entries to a per-vCPU multicall batch instead of trapping; lazy_mmu_end sends the batch as one
# multicall. Event upcalls are masked for the section (restored at its end), so an upcall handler's own MMU ops
# never land in the batch of the code it interrupted.

# lazy_mmu_begin() -> eax = 0 (a second begin without an end changes nothing)
xen_lazy_mmu_begin:
    call this_cpu
    cmp dword ptr [xen_lazy + eax*4], 0
    jne .Lxen_lazy_begin_done
    mov dword ptr [xen_lazy + eax*4], 1
    mov ecx, eax
    call this_vcpu_info
    movzx edx, byte ptr [eax + VCPU_INFO_evtchn_upcall_mask]
    mov [xen_lazy_mask + ecx*4], edx
    mov byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 1
.Lxen_lazy_begin_done:
    xor eax, eax
    ret

# lazy_mmu_end() -> eax = 0, or the first failure among the batch's entries since lazy_mmu_begin
xen_lazy_mmu_end:
    call this_cpu
    cmp dword ptr [xen_lazy + eax*4], 0
    je .Lxen_lazy_end_idle
    call xen_mc_flush
    call this_cpu
    mov ecx, eax
    mov dword ptr [xen_lazy + ecx*4], 0
    xor eax, eax
    xchg eax, [xen_mc_error + ecx*4]
    cmp dword ptr [xen_lazy_mask + ecx*4], 0
    jne .Lxen_lazy_end_done          # events were masked before the section: they stay masked
    push eax
    mov eax, EFLAGS_IF               # unmask, and take an event that arrived meanwhile
    call xen_restore_fl
    pop eax
.Lxen_lazy_end_done:
    ret
.Lxen_lazy_end_idle:
    xor eax, eax
    ret

# xen_mc_flush() -> eax = 0, or the first failure (the multicall's own error, else the first failing entry's
# result): send this vCPU's batch as one multicall (a single entry as its own hypercall) and empty it. The first
# failure is also kept in xen_mc_error for lazy_mmu_end. Clobbers ecx, edx.
xen_mc_flush:
    push ebx
    push esi
    push edi
    call this_cpu
    mov esi, eax
    xor eax, eax
    mov ecx, [xen_mc_count + esi*4]
    test ecx, ecx
    jz .Lxen_mc_flush_done
    mov dword ptr [xen_mc_count + esi*4], 0
    imul ebx, esi, XEN_MC_AREA
    add ebx, xen_mc_area
    mov edi, ebx
    cmp ecx, 1
    jne .Lxen_mc_multi
    push esi                         # one entry: its hypercall itself, without the multicall (as Linux does)
    push edi
    mov eax, [edi + MULTICALL_ENTRY_op]
    shl eax, HYPERCALL_STUB_SHIFT    # the op's stub in the hypercall page
    add eax, hypercall_page
    mov ebx, [edi + MULTICALL_ENTRY_args]
    mov ecx, [edi + MULTICALL_ENTRY_args + 4]
    mov edx, [edi + MULTICALL_ENTRY_args + 8]
    mov esi, [edi + MULTICALL_ENTRY_args + 12]
    mov edi, [edi + MULTICALL_ENTRY_args + 16]
    call eax
    pop edi
    pop esi
    mov [edi + MULTICALL_ENTRY_result], eax
    test eax, eax
    jnz .Lxen_mc_failed
    jmp .Lxen_mc_flush_done
.Lxen_mc_multi:
    push ecx
    call hc_multicall                # ebx = entries, ecx = count
    pop ecx
    test eax, eax
    jnz .Lxen_mc_failed
.Lxen_mc_scan:
    mov eax, [edi + MULTICALL_ENTRY_result]
    test eax, eax
    jnz .Lxen_mc_failed
    add edi, MULTICALL_ENTRY_SIZE
    dec ecx
    jnz .Lxen_mc_scan
    jmp .Lxen_mc_flush_done
.Lxen_mc_failed:
    cmp dword ptr [xen_mc_error + esi*4], 0
    jne .Lxen_mc_flush_done
    mov [xen_mc_error + esi*4], eax
.Lxen_mc_flush_done:
    pop edi
    pop esi
    pop ebx
    ret

# xen_mc_queue(eax = hypercall nr) -> eax = the new entry's 16-byte argument buffer. The entry is
# nr(buffer, 1, NULL, DOMID_SELF), the shape of mmu_update and mmuext_op; the caller fills the buffer. A full
# batch is sent first. Clobbers ecx, edx.
xen_mc_queue:
    push ebx
    push esi
    mov ebx, eax
    call this_cpu
    mov esi, eax
    cmp dword ptr [xen_mc_count + esi*4], XEN_MC_MAX
    jb .Lxen_mcq_room
    call xen_mc_flush
.Lxen_mcq_room:
    mov ecx, [xen_mc_count + esi*4]
    inc dword ptr [xen_mc_count + esi*4]
    imul eax, esi, XEN_MC_AREA
    add eax, xen_mc_area
    mov edx, ecx
    shl edx, MMU_UPDATE_SHIFT        # the entry's argument buffer
    lea edx, [eax + edx + XEN_MC_ARGS]
    shl ecx, MULTICALL_ENTRY_SHIFT
    add eax, ecx                     # the entry
    mov [eax + MULTICALL_ENTRY_op], ebx
    mov dword ptr [eax + MULTICALL_ENTRY_result], 0
    mov [eax + MULTICALL_ENTRY_args], edx    # args: the buffer, count 1, no done count, DOMID_SELF
    mov dword ptr [eax + MULTICALL_ENTRY_args + 4], 1
    mov dword ptr [eax + MULTICALL_ENTRY_args + 8], 0
    mov dword ptr [eax + MULTICALL_ENTRY_args + 12], DOMID_SELF
    mov dword ptr [eax + MULTICALL_ENTRY_args + 16], 0
    mov dword ptr [eax + MULTICALL_ENTRY_args + 20], 0
    mov eax, edx
    pop esi
    pop ebx
    ret

# clock_ns() -> eax: vcpu_time_info.system_time (low 32 bits), read under the version protocol
xen_clock_ns:
    call this_vcpu_info
    mov ecx, eax
.Lxen_clock_retry:
    mov edx, [ecx + VCPU_INFO_time_version]
    mov eax, [ecx + VCPU_INFO_time_system_time]
    test edx, 1
    jnz .Lxen_clock_retry
    cmp edx, [ecx + VCPU_INFO_time_version]
    jne .Lxen_clock_retry
    ret
xen_code_end:

.align 4
xen_ops:
    .long xen_init, 0
    .long xen_irq_disable, xen_irq_enable, xen_save_fl, xen_restore_fl, xen_halt
    .long xen_read_cr3, xen_write_cr3, xen_set_pte, xen_flush_tlb_user, xen_flush_tlb_kernel
    .long xen_flush_tlb_single, xen_flush_tlb_others
    .long xen_send_ipi
    .long xen_clock_ns
    .long xen_lazy_mmu_begin, xen_lazy_mmu_end
xen_shared_info: .long 0
xen_callback_reg:                    # struct callback_register: type, flags, address (cs, eip)
    .word CALLBACKTYPE_event, 0
    .long FLAT_RING1_CS, xen_hypervisor_callback   # ring 1, on Xen's flat kernel selector (as Linux's)
xen_bind_ipi: .space EVTCHN_BIND_IPI_SIZE    # struct evtchn_bind_ipi: vcpu, port (out)
xen_ipi_port: .space 4 * MAX_VCPUS
xen_ipi_vectors: .space 4 * MAX_VCPUS
xen_stray_events: .long 0
msg_xen_init_failed: .asciz "pvkern: PANIC: xen backend init failed (callback or IPI port): "
xen_cr3: .space 4 * MAX_VCPUS
msg_xen_init: .asciz "pvkern: xen backend init, shared_info at "
.align 4
xen_lazy: .space 4 * MAX_VCPUS       # per vCPU: in lazy MMU mode
xen_lazy_mask: .space 4 * MAX_VCPUS  # per vCPU: evtchn_upcall_mask when the lazy section began
xen_mc_count: .space 4 * MAX_VCPUS   # per vCPU: entries queued
xen_mc_error: .space 4 * MAX_VCPUS   # per vCPU: the first failure since lazy_mmu_begin
.align 32
xen_mc_area: .space XEN_MC_AREA * MAX_VCPUS
