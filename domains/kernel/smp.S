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
