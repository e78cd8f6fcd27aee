# workload=shootdown: TLB shootdowns under a chosen design, checked for stale reads in guest code.
#
# vCPU 0 is the initiator. Each round it writes the round number into a fresh frame, points the test page's PTE
# at that frame (set_pte), flushes its own TLB entry, and asks the other vCPUs to flush (flush_tlb_others, or
# IPIs whose handler reloads cr3 when tlbflush=cr3). It then publishes the round; every other vCPU, spinning in
# its loop, reads the test page and must see the new round number: anything else is a stale read through its
# own TLB, reported on the console and in the trace. Guest marks on MARK_PORT bracket each shootdown (the round in
# the detail): MARK_SHOOTDOWN_REQUEST, MARK_SHOOTDOWN_DONE when flush_tlb_others returned, MARK_SHOOTDOWN_STALE.

.include "abi.inc"

.equ SD_ROUNDS, 40                  # the default; sdrounds=N on the command line sets another (at least 1)
.equ PTE_FLAGS, 0x63

# shootdown_run() -> eax = number of stale reads seen by all vCPUs
shootdown_run:
    push ebx
    push esi
    push edi
    mov edi, sd_key_rounds
    mov eax, SD_ROUNDS
    call evw_number                  # evtchn_work.S
    test eax, eax
    jnz .Lsd_rounds_set
    inc eax
.Lsd_rounds_set:
    mov [sd_rounds], eax
    call sd_pte_address
    mov [sd_pte], eax
    mov dword ptr [sd_mask], 0
    mov ecx, 1
.Lsd_mask:
    cmp ecx, [nr_vcpus]
    jae .Lsd_mask_done
    bts dword ptr [sd_mask], ecx
    inc ecx
    jmp .Lsd_mask
.Lsd_mask_done:
    mov dword ptr [sd_started], 1    # the targets start reading (their loop: shootdown_target)
    mov esi, 1
.Lsd_round:
    cmp esi, [sd_rounds]
    ja .Lsd_finished
    # wait until every target has checked the previous round, so each one has the old translation cached
    mov eax, [nr_vcpus]
    dec eax
    imul eax, esi
    sub eax, [nr_vcpus]
    inc eax
.Lsd_wait_acks:
    cmp [sd_acks], eax
    jae .Lsd_acked
    pause
    jmp .Lsd_wait_acks
.Lsd_acked:
    mov ebx, esi
    and ebx, 1
    mov edi, [sd_frames + ebx*4]     # the frame for this round (alternates between two)
    mov [edi], esi                   # its content: the round number (written through the kernel's map)
    mov eax, [sd_pte]
    mov edx, edi
    sub edx, VIRT_BASE
    or edx, PTE_FLAGS
    PVCALL set_pte
    mov eax, sd_window
    PVCALL flush_tlb_single
    mov eax, esi
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_SHOOTDOWN_REQUEST
    mov edx, MARK_PORT
    out dx, eax                      # mark: shootdown requested
    cmp dword ptr [sd_cr3_mode], 0
    jne .Lsd_cr3
    mov eax, sd_mask
    mov edx, sd_window
    PVCALL flush_tlb_others
    jmp .Lsd_flushed
.Lsd_cr3:
    call cr3_flush_others
.Lsd_flushed:
    mov eax, esi
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_SHOOTDOWN_DONE
    mov edx, MARK_PORT
    out dx, eax                      # mark: every target flushed (or will before it next runs)
    mov [sd_round], esi              # publish: targets read the window now
    inc esi
    jmp .Lsd_round
.Lsd_finished:
    mov eax, [nr_vcpus]              # wait for the last round's checks
    dec eax
    imul eax, [sd_rounds]
.Lsd_wait_last:
    cmp [sd_acks], eax
    jae .Lsd_report
    pause
    jmp .Lsd_wait_last
.Lsd_report:
    mov esi, msg_sd_done
    mov eax, [sd_rounds]
    mov ebx, [sd_stale]
    call print_two_nums
    mov eax, [sd_stale]
    pop edi
    pop esi
    pop ebx
    ret

# shootdown_target(): a non-initiator vCPU's loop: for each published round, read the window and check it
shootdown_target:
    PVCALL irq_enable
    mov esi, 0                       # last round checked
.Lsdt_wait:
    cmp dword ptr [sd_started], 0
    je .Lsdt_pause
    mov eax, [sd_round]
    cmp eax, esi
    jne .Lsdt_check
    cmp esi, [sd_rounds]
    jae .Lsdt_idle
.Lsdt_pause:
    pause
    jmp .Lsdt_wait
.Lsdt_check:
    mov esi, eax
    mov eax, [sd_window]             # through this vCPU's own TLB
    cmp eax, esi
    je .Lsdt_ok
    lock inc dword ptr [sd_stale]
    push eax
    mov eax, esi
    shl eax, MARK_DETAIL_SHIFT
    or eax, MARK_SHOOTDOWN_STALE
    mov edx, MARK_PORT
    out dx, eax                      # mark: stale read
    pop eax
    push esi
    mov esi, msg_sd_stale
    call print_num_line
    pop esi
.Lsdt_ok:
    lock inc dword ptr [sd_acks]
    jmp .Lsdt_wait
.Lsdt_idle:
    PVCALL halt
    jmp .Lsdt_idle

# sd_pte_address() -> eax = virtual address of the PTE that maps sd_window (through the page tables the
# builder made: start_info.pt_base is the page directory's virtual address)
sd_pte_address:
    mov eax, [start_info]
    mov eax, [eax + START_INFO_pt_base]
    mov edx, sd_window
    shr edx, 22
    mov eax, [eax + edx*4]           # the PDE
    and eax, 0xFFFFF000
    add eax, VIRT_BASE               # the L1 table through the kernel's linear map
    mov edx, sd_window
    shr edx, 12
    and edx, 0x3FF
    lea eax, [eax + edx*4]
    ret

# cr3_flush_others(): the "cr3" design: an IPI to every target, whose handler reloads its page-table base
cr3_flush_others:
    push ebx
    mov ebx, 1
.Lcfo_send:
    cmp ebx, [nr_vcpus]
    jae .Lcfo_wait
    mov dword ptr [flush_request + ebx*4], 1
    mov eax, ebx
    mov edx, CR3_VECTOR
    PVCALL send_ipi
    inc ebx
    jmp .Lcfo_send
.Lcfo_wait:
    mov ebx, 1
.Lcfo_check:
    cmp ebx, [nr_vcpus]
    jae .Lcfo_done
.Lcfo_spin:
    cmp dword ptr [flush_request + ebx*4], 0
    je .Lcfo_next
    pause
    jmp .Lcfo_spin
.Lcfo_next:
    inc ebx
    jmp .Lcfo_check
.Lcfo_done:
    pop ebx
    ret

# cr3_body(): reload this vCPU's page-table base (a full flush), then acknowledge
cr3_body:
    PVCALL read_cr3
    PVCALL write_cr3
    call this_cpu
    lock inc dword ptr [flush_count + eax*4]
    mov dword ptr [flush_request + eax*4], 0
    jmp flush_ack_mark               # smp.S

cr3_interrupt:
    pushad
    call cr3_body
    mov dword ptr [APIC_BASE + APIC_EOI], 0
    popad
    iretd

.align 4
sd_pte: .long 0
sd_mask: .long 0
sd_round: .long 0
sd_started: .long 0
sd_acks: .long 0
sd_stale: .long 0
sd_cr3_mode: .long 0
sd_rounds: .long SD_ROUNDS          # set by shootdown_run before the targets start (sd_started)
sd_key_rounds: .asciz "sdrounds="
.align 4
workload_shootdown: .long 0
sd_frames: .long sd_frame_b, sd_frame_a
msg_sd_done: .asciz "pvkern: shootdown rounds #, stale reads #"
msg_sd_stale: .asciz "pvkern: STALE read through the TLB: saw round "
.align 4096
sd_window: .space 4096
sd_frame_a: .space 4096
sd_frame_b: .space 4096
