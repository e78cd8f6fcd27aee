# The xen backend: every privileged operation becomes a hypercall through the hypercall page, or a write to
# this vCPU's vcpu_info in shared_info (the virtual interrupt flag is evtchn_upcall_mask).
# set_tss_desc is NULL: the native code runs instead (the null-entry rule). IPIs travel on one event channel
# per vCPU (EVTCHNOP_bind_ipi); the upcall handler runs the same handler bodies as the native IDT vectors.

.equ VIRT_BASE, 0xC0000000
.equ SI_SHARED_INFO, 36
.equ SI_PT_BASE, 60
.equ VCPU_INFO_SIZE, 64
.equ VI_UPCALL_PENDING, 0
.equ VI_UPCALL_MASK, 1
.equ VI_TIME_VERSION, 32
.equ VI_SYSTEM_TIME, 48
.equ MMUEXT_NEW_BASEPTR, 5
.equ MMUEXT_TLB_FLUSH_LOCAL, 6
.equ MMUEXT_INVLPG_LOCAL, 7
.equ MMUEXT_TLB_FLUSH_MULTI, 8
.equ MMUEXT_INVLPG_MULTI, 9
.equ DOMID_SELF, 0x7FF0
.equ EFLAGS_IF, 0x200
.equ EVTCHNOP_send, 4
.equ EVTCHNOP_bind_ipi, 7
.equ CALLBACKOP_register, 0
.equ SI_EVTCHN_PENDING, 2048
.equ SI_EVTCHN_MASK, 2176
.equ IPI_VECTOR_BIT, 16
.equ FLUSH_VECTOR_BIT, 17
.equ CR3_VECTOR_BIT, 18

xen_code_begin:
xen_init:
    push esi
    mov eax, [start_info]
    mov eax, [eax + SI_SHARED_INFO]
    add eax, VIRT_BASE               # shared_info's machine address, seen through the kernel's linear map
    mov [xen_shared_info], eax
    mov esi, msg_xen_init
    call print_num_line
    mov eax, [start_info]            # every vCPU starts on the page tables the builder made
    mov eax, [eax + SI_PT_BASE]
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
    mov [xen_bind_ipi], esi
    mov ebx, EVTCHNOP_bind_ipi
    mov ecx, xen_bind_ipi
    call hc_event_channel_op
    test eax, eax
    jnz .Lxen_init_failed
    mov eax, [xen_bind_ipi + 4]
    mov [xen_ipi_port + esi*4], eax
    inc esi
    jmp .Lxen_bind_next
.Lxen_init_done:
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
    push dword ptr [xen_ipi_port + eax*4]    # struct evtchn_send, on this vCPU's own stack
    mov ebx, EVTCHNOP_send
    mov ecx, esp
    call hc_event_channel_op
    add esp, 4
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
    mov byte ptr [esi + VI_UPCALL_PENDING], 0
    xor ecx, ecx
    xchg ecx, [esi + 4]              # evtchn_pending_sel
    mov edi, [xen_shared_info]
.Lcb_word:
    bsf edx, ecx
    jz .Lcb_words_done
    btr ecx, edx
.Lcb_bits:
    mov eax, [edi + SI_EVTCHN_PENDING + edx*4]
    mov ebx, [edi + SI_EVTCHN_MASK + edx*4]
    not ebx
    and eax, ebx
    bsf ebx, eax
    jz .Lcb_word
    lock btr dword ptr [edi + SI_EVTCHN_PENDING + edx*4], ebx
    mov eax, edx
    shl eax, 5
    add eax, ebx                     # port
    push ecx
    push edx
    call xen_handle_port
    pop edx
    pop ecx
    jmp .Lcb_bits
.Lcb_words_done:
    cmp byte ptr [esi + VI_UPCALL_PENDING], 0
    jne .Lcb_again
    mov byte ptr [esi + VI_UPCALL_MASK], 0
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
    lock inc dword ptr [xen_stray_events]
    ret

# this_vcpu_info() -> eax = &shared_info->vcpu_info[this cpu]; clobbers nothing else
this_vcpu_info:
    call this_cpu
    shl eax, 6                       # VCPU_INFO_SIZE
    add eax, [xen_shared_info]
    ret

xen_irq_disable:
    call this_vcpu_info
    mov byte ptr [eax + VI_UPCALL_MASK], 1
    ret

xen_irq_enable:
    call this_vcpu_info
    mov byte ptr [eax + VI_UPCALL_MASK], 0
    cmp byte ptr [eax + VI_UPCALL_PENDING], 0
    je .Lxen_enable_done
    call xen_force_callback          # an event arrived while masked: take it now
.Lxen_enable_done:
    ret

xen_save_fl:
    call this_vcpu_info
    cmp byte ptr [eax + VI_UPCALL_MASK], 0
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
    mov byte ptr [eax + VI_UPCALL_MASK], 0
    cmp byte ptr [eax + VI_UPCALL_PENDING], 0
    je .Lxen_restore_done
    call xen_force_callback
    ret
.Lxen_restore_masked:
    mov byte ptr [eax + VI_UPCALL_MASK], 1
.Lxen_restore_done:
    ret

# Any hypercall makes the hypervisor deliver pending events on the way back; xen_version(0) is the cheapest.
xen_force_callback:
    push ebx
    xor ebx, ebx
    xor ecx, ecx
    call hc_xen_version
    pop ebx
    ret

xen_halt:
    push ebx
    mov ebx, 1                       # SCHEDOP_block
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
    shr edx, 12
    mov eax, MMUEXT_NEW_BASEPTR
    xor ecx, ecx
    jmp xen_mmuext_one

# set_pte(eax = pte virtual address, edx = value): one MMU_NORMAL_PT_UPDATE with the pte's machine address
xen_set_pte:
    push ebx
    push esi
    sub esp, 16
    sub eax, VIRT_BASE
    mov [esp], eax                   # ptr (low), command 0 in the low bits
    mov dword ptr [esp + 4], 0
    mov [esp + 8], edx               # val
    mov dword ptr [esp + 12], 0
    mov ebx, esp
    mov ecx, 1
    xor edx, edx
    mov esi, DOMID_SELF
    call hc_mmu_update
    add esp, 16
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

# xen_mmuext_one(eax = cmd, edx = arg1, ecx = arg2) -> eax = hypercall result
xen_mmuext_one:
    push ebx
    push esi
    sub esp, 12
    mov [esp], eax
    mov [esp + 4], edx
    mov [esp + 8], ecx
    mov ebx, esp
    mov ecx, 1
    xor edx, edx
    mov esi, DOMID_SELF
    call hc_mmuext_op
    add esp, 12
    pop esi
    pop ebx
    ret

# clock_ns() -> eax: vcpu_time_info.system_time (low 32 bits), read under the version protocol
xen_clock_ns:
    call this_vcpu_info
    mov ecx, eax
.Lxen_clock_retry:
    mov edx, [ecx + VI_TIME_VERSION]
    mov eax, [ecx + VI_SYSTEM_TIME]
    test edx, 1
    jnz .Lxen_clock_retry
    cmp edx, [ecx + VI_TIME_VERSION]
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
xen_shared_info: .long 0
xen_callback_reg:
    .word 0, 0                       # CALLBACKTYPE_event, flags
    .long KERNEL_CS, xen_hypervisor_callback
xen_bind_ipi: .long 0, 0             # struct evtchn_bind_ipi: vcpu, port (out)
xen_ipi_port: .space 4 * MAX_VCPUS
xen_ipi_vectors: .space 4 * MAX_VCPUS
xen_stray_events: .long 0
msg_xen_init_failed: .asciz "pvkern: PANIC: xen backend init failed (callback or IPI port): "
xen_cr3: .space 4 * MAX_VCPUS
msg_xen_init: .asciz "pvkern: xen backend init, shared_info at "
