# Interrupts between vCPUs: the IDT (native and vmi), the IPI and TLB-flush handlers, and native
# flush_tlb_others. Under xen the same handler bodies run from the event-channel upcall (backend_xen.S).
# The vectors (IPI_VECTOR, FLUSH_VECTOR, CR3_VECTOR) are in the generated include: the trace analysis counts them.

.include "abi.inc"

# setup_idt(): gates for the IPI and flush vectors, then lidt (keystone mis-encodes lidt with a 0x66 prefix,
# which would load only 24 bits of the base, so the instruction is spelled out)
setup_idt:
    push eax
    mov eax, IPI_VECTOR
    mov edx, ipi_interrupt
    call set_gate
    mov eax, FLUSH_VECTOR
    mov edx, flush_interrupt
    call set_gate
    mov eax, CR3_VECTOR              # shootdown.S
    mov edx, cr3_interrupt
    call set_gate
    mov eax, idt_desc
    .byte 0x0F, 0x01, 0x18           # lidt [eax]
    pop eax
    ret

# set_gate(eax = vector, edx = handler): a present ring-0 32-bit interrupt gate
set_gate:
    lea ecx, [idt_table + eax*8]
    mov [ecx], dx
    mov word ptr [ecx + 2], KERNEL_CS
    mov byte ptr [ecx + 4], 0
    mov byte ptr [ecx + 5], 0x8E
    shr edx, 16
    mov [ecx + 6], dx
    ret

ipi_interrupt:
    pushad
    call ipi_body
    mov dword ptr [APIC_BASE + APIC_EOI], 0
    popad
    iretd

flush_interrupt:
    pushad
    call flush_body
    mov dword ptr [APIC_BASE + APIC_EOI], 0
    popad
    iretd

# ipi_body(): count the IPI on this vCPU
ipi_body:
    call this_cpu
    lock inc dword ptr [ipi_count + eax*4]
    ret

# flush_body(): flush this vCPU's TLB, then acknowledge the request the initiator is waiting on
flush_body:
    PVCALL flush_tlb_user
    call this_cpu
    lock inc dword ptr [flush_count + eax*4]
    mov dword ptr [flush_request + eax*4], 0
    jmp flush_ack_mark

# flush_ack_mark(): the guest mark the trace analysis times a target's handler by (it ends at this acknowledgement)
flush_ack_mark:
    push edx
    mov eax, MARK_FLUSH_ACK
    mov edx, MARK_PORT
    out dx, eax                      # mark: this target flushed and acknowledged
    pop edx
    ret

# native flush_tlb_others(eax = vCPU bitmap pointer, edx = va or -1): an IPI to each target, then wait until
# every target's handler has flushed and acknowledged
native_flush_tlb_others:
    push ebx
    push esi
    mov esi, [eax]
    xor ebx, ebx
.Lnfo_send:
    cmp ebx, MAX_VCPUS
    jae .Lnfo_wait
    bt esi, ebx
    jnc .Lnfo_next
    mov dword ptr [flush_request + ebx*4], 1
    mov eax, ebx
    mov edx, FLUSH_VECTOR
    PVCALL send_ipi
.Lnfo_next:
    inc ebx
    jmp .Lnfo_send
.Lnfo_wait:
    xor ebx, ebx
.Lnfo_check:
    cmp ebx, MAX_VCPUS
    jae .Lnfo_done
    bt esi, ebx
    jnc .Lnfo_acked
.Lnfo_spin:
    cmp dword ptr [flush_request + ebx*4], 0
    je .Lnfo_acked
    pause
    jmp .Lnfo_spin
.Lnfo_acked:
    inc ebx
    jmp .Lnfo_check
.Lnfo_done:
    xor eax, eax
    pop esi
    pop ebx
    ret

.align 8
idt_table: .space 256 * 8
idt_desc:
    .word 256 * 8 - 1
    .long idt_table
.align 4
ipi_count: .space 4 * MAX_VCPUS
flush_count: .space 4 * MAX_VCPUS
flush_request: .space 4 * MAX_VCPUS

.equ IW_WAKES, 20
.equ IW_GAP_NS, 25000

# workload=ipiwake [wakes=N]: vCPU 0 wakes vCPU 1 out of its idle loop's halt with an IPI, N times (default IW_WAKES),
# IW_GAP_NS apart so that vCPU 1 has halted and given up its pCPU each time, and waits for its handler to count it.
# The trace times each wake-up (apic.ipi, irq.enter). Returns 0 (done, or not asked for).
ipiwake_run:
    push ebx
    push esi
    push edi
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    mov edi, str_ipiwake_key
    call find_after                  # pvkern.S
    test eax, eax
    jz .Liw_done
    cmp dword ptr [nr_vcpus], 2
    jb .Liw_done
    mov edi, str_wakes_key
    mov eax, IW_WAKES
    call evw_number                  # evtchn_work.S
    mov ebx, eax                     # wake-ups left
.Liw_round:
    test ebx, ebx
    jz .Liw_done
    call iw_sleep
    mov eax, [ipi_count + 4]
    mov [iw_before], eax
    mov eax, ebx
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_IPIWAKE_SENT
    mov edx, MARK_PORT
    out dx, eax                      # mark: the wake-up is sent
    mov eax, 1
    mov edx, IPI_VECTOR
    PVCALL send_ipi
.Liw_wait:
    mov eax, [ipi_count + 4]
    cmp eax, [iw_before]
    jne .Liw_woken
    pause
    jmp .Liw_wait
.Liw_woken:
    mov eax, ebx
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_IPIWAKE_SEEN
    mov edx, MARK_PORT
    out dx, eax                      # mark: vCPU 1's handler has counted it
    dec ebx
    jmp .Liw_round
.Liw_done:
    xor eax, eax
    pop edi
    pop esi
    pop ebx
    ret

# iw_sleep(): spin IW_GAP_NS of virtual time on the clock port
iw_sleep:
    mov edx, CLOCK_PORT
    in eax, dx
    mov ecx, eax
.Liw_spin:
    pause
    in eax, dx
    sub eax, ecx
    cmp eax, IW_GAP_NS
    jb .Liw_spin
    ret

.align 4
iw_before: .long 0
str_ipiwake_key: .asciz "workload=ipiwake"
str_wakes_key: .asciz "wakes="
.align 4
