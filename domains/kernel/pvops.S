# paravirt_ops: one table of function pointers in guest memory, grouped by area as Linux's paravirt_types.h
# groups them. Slots (4 bytes each; the VMI ROM uses the same order):
#   init:  0 init
#   cpu:   1 set_tss_desc
#   irq:   2 irq_disable  3 irq_enable  4 save_fl  5 restore_fl  6 halt
#   mmu:   7 read_cr3  8 write_cr3  9 set_pte  10 flush_tlb_user  11 flush_tlb_kernel  12 flush_tlb_single
#          13 flush_tlb_others
#   apic:  14 send_ipi
#   time:  15 clock_ns
#   lazy:  16 lazy_mmu_begin  17 lazy_mmu_end (after the VMI ROM's 16 slots, which the ROM does not have: NULL)
# Calling convention: arguments in eax, edx, ecx; result in eax; an op may clobber eax, ecx and edx.
# Call sites are written `PVCALL op` (the builder's preprocessor turns each into `call [pv_ops + 4*slot]` and
# records it in the patch-site table pv_patch_sites: u32 slot, u32 site, u32 length).
# NR_PV_OPS and the slot order come from pvcluster/abi/pvops.py.

.include "abi.inc"

# pv_install(eax = backend id) -> eax = 0, or nonzero if the backend is not available.
# pv_ops starts as the native table; only the backend's non-NULL entries are copied over it.
pv_install:
    push esi
    push edi
    push ebx
    mov ebx, eax
    mov esi, native_ops
    mov edi, pv_ops
    mov ecx, NR_PV_OPS
    rep movs dword ptr es:[edi], dword ptr [esi]
    cmp ebx, HYPERVISOR_TYPE_NATIVE
    je .Linstall_ok
    mov esi, xen_ops
    cmp ebx, HYPERVISOR_TYPE_XEN
    je .Linstall_copy
    call vmi_probe                   # fills vmi_ops from the ROM; eax = 0 when a ROM was found
    test eax, eax
    jnz .Linstall_done
    mov esi, vmi_ops
.Linstall_copy:
    xor ecx, ecx
.Linstall_next:
    mov eax, [esi + ecx*4]
    test eax, eax
    jz .Linstall_null
    mov [pv_ops + ecx*4], eax
.Linstall_null:
    inc ecx
    cmp ecx, NR_PV_OPS
    jb .Linstall_next
.Linstall_ok:
    xor eax, eax
.Linstall_done:
    pop ebx
    pop edi
    pop esi
    ret

# pv_patch(): rewrite every recorded call site. A site whose op is still the native one and has an inline
# template becomes those instructions; any other site becomes a direct `call`, given a ds prefix so that it
# fills the 6-byte site as one instruction. What is left is filled with one multi-byte nop, as Linux does.
pv_patch:
    push ebx
    push esi
    push edi
    push ebp
    mov ebx, pv_patch_sites
.Lpatch_next:
    cmp ebx, pv_patch_sites_end
    jae .Lpatch_done
    mov ecx, [ebx]                   # slot
    mov edi, [ebx + 4]               # site
    mov ebp, [ebx + 8]               # length
    mov eax, [pv_ops + ecx*4]
    cmp eax, [native_ops + ecx*4]
    jne .Lpatch_direct
    mov esi, [native_inline + ecx*8]
    test esi, esi
    jz .Lpatch_direct
    mov ecx, [native_inline + ecx*8 + 4]
    sub ebp, ecx
    rep movsb
    inc dword ptr [patched_inline]
    jmp .Lpatch_pad
.Lpatch_direct:
    mov byte ptr [edi], 0x3E         # ds: prefix, so the call is 6 bytes
    mov byte ptr [edi + 1], 0xE8
    lea edx, [edi + 6]
    sub eax, edx
    mov [edi + 2], eax
    add edi, 6
    sub ebp, 6
    inc dword ptr [patched_direct]
.Lpatch_pad:
    test ebp, ebp
    jle .Lpatch_site_done
    cmp ebp, 5
    ja .Lpatch_site_done             # templates leave at most 5 bytes
    mov esi, [nop_table + ebp*4]
    mov ecx, ebp
    rep movsb
.Lpatch_site_done:
    add ebx, 12
    jmp .Lpatch_next
.Lpatch_done:
    mov esi, msg_patched
    mov eax, [patched_inline]
    mov ebx, [patched_direct]
    call print_two_nums
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

# pv_ops_dump(): one letter per slot saying whose code it runs: N native, X xen, V the VMI ROM
pv_ops_dump:
    push ebx
    push edi
    push esi
    call line_buffer
    mov esi, msg_ops_dump
    call put_until_hash
    xor ecx, ecx
.Ldump_next:
    mov eax, [pv_ops + ecx*4]
    mov dl, 0x3F                     # '?'
    cmp eax, native_code_begin
    jb .Ldump_not_native
    cmp eax, native_code_end
    jae .Ldump_not_native
    mov dl, 0x4E                     # 'N'
.Ldump_not_native:
    cmp eax, xen_code_begin
    jb .Ldump_not_xen
    cmp eax, xen_code_end
    jae .Ldump_not_xen
    mov dl, 0x58                     # 'X'
.Ldump_not_xen:
    cmp eax, VMI_ROM_BASE
    jb .Ldump_put
    mov dl, 0x56                     # 'V'
.Ldump_put:
    mov [edi], dl
    inc edi
    inc ecx
    cmp ecx, NR_PV_OPS
    jb .Ldump_next
    pop esi
    jmp line_end

# irq_bench(): irqbench_rounds irq_disable/irq_enable pairs through the pv_ops call sites
irq_bench:
    push esi
    mov esi, [irqbench_rounds]
.Lirqbench_next:
    PVCALL irq_disable
    PVCALL irq_enable
    dec esi
    jnz .Lirqbench_next
    mov esi, msg_irqbench_done
    mov eax, [irqbench_rounds]
    call print_num_line
    pop esi
    ret

# ---------------------------------------------------------------------------------------------------
# The native backend: what the kernel does on bare hardware (here: the simulated machine).
native_code_begin:
native_init:
    push esi
    mov esi, msg_native_init
    xor eax, eax
    call print_num_line
    pop esi
    xor eax, eax
    ret

# set_tss_desc(eax = GDT slot, edx = TSS base): an available 32-bit TSS descriptor, limit 0x67
native_set_tss_desc:
    lea ecx, [gdt_table + eax*8]
    mov eax, edx
    shl eax, 16
    or eax, 0x67
    mov [ecx], eax
    mov eax, edx
    and eax, 0xFF000000
    or eax, 0x00008900
    shr edx, 16
    and edx, 0xFF
    or eax, edx
    mov [ecx + 4], eax
    ret

native_irq_disable:
    cli
    ret
native_irq_enable:
    sti
    ret
native_save_fl:
    pushfd
    pop eax
    ret
native_restore_fl:
    push eax
    popfd
    ret
native_halt:
    sti
    hlt
    ret
native_read_cr3:
    mov eax, cr3
    ret
native_write_cr3:
    mov cr3, eax
    ret
# set_pte(eax = pte address, edx = value)
native_set_pte:
    mov [eax], edx
    ret
native_flush_tlb_user:
native_flush_tlb_kernel:
    mov eax, cr3
    mov cr3, eax
    xor eax, eax
    ret
native_flush_tlb_single:
    invlpg [eax]
    ret
# flush_tlb_others(eax = vCPU bitmap pointer, edx = va or -1): IPIs and acknowledgements (smp.S)
native_flush_tlb_others_entry:
    jmp native_flush_tlb_others
# send_ipi(eax = vcpu, edx = vector): the local APIC's ICR (high word: destination, low word: vector)
native_send_ipi:
    shl eax, APIC_ID_SHIFT
    mov [APIC_BASE + APIC_ICR_HIGH], eax
    or edx, 0x4000                   # level: assert
    mov [APIC_BASE + APIC_ICR_LOW], edx
    xor eax, eax
    ret
# clock_ns() -> eax: the platform clock port (virtual nanoseconds, low 32 bits)
native_clock_ns:
    mov edx, CLOCK_PORT
    in eax, dx
    ret
# lazy_mmu_begin(), lazy_mmu_end() -> eax = 0: on bare hardware every update takes effect at once
native_lazy_mmu_begin:
native_lazy_mmu_end:
    xor eax, eax
    ret
native_code_end:

# Inline replacements the patcher may use for sites whose op is still native: (pointer, length) per slot
native_inline:
    .long 0, 0                       # init
    .long 0, 0                       # set_tss_desc
    .long inline_cli, 1              # irq_disable
    .long inline_sti, 1              # irq_enable
    .long inline_save_fl, 2          # save_fl
    .long inline_restore_fl, 2       # restore_fl
    .long 0, 0                       # halt
    .long inline_read_cr3, 3         # read_cr3
    .long inline_write_cr3, 3        # write_cr3
    .long inline_set_pte, 2          # set_pte
    .long 0, 0                       # flush_tlb_user
    .long 0, 0                       # flush_tlb_kernel
    .long inline_invlpg, 3           # flush_tlb_single
    .long 0, 0                       # flush_tlb_others
    .long 0, 0                       # send_ipi
    .long 0, 0                       # clock_ns
    .long 0, 0                       # lazy_mmu_begin
    .long 0, 0                       # lazy_mmu_end
inline_cli:
    cli
inline_sti:
    sti
inline_save_fl:
    pushfd
    pop eax
inline_restore_fl:
    push eax
    popfd
inline_read_cr3:
    mov eax, cr3
inline_write_cr3:
    mov cr3, eax
inline_set_pte:
    mov [eax], edx
inline_invlpg:
    invlpg [eax]

# one nop instruction of each length 1..5 (the encodings Intel recommends)
nop_1: .byte 0x90
nop_2: .byte 0x66, 0x90
nop_3: .byte 0x0F, 0x1F, 0x00
nop_4: .byte 0x0F, 0x1F, 0x40, 0x00
nop_5: .byte 0x0F, 0x1F, 0x44, 0x00, 0x00
.align 4
nop_table: .long 0, nop_1, nop_2, nop_3, nop_4, nop_5
native_ops:
    .long native_init, native_set_tss_desc
    .long native_irq_disable, native_irq_enable, native_save_fl, native_restore_fl, native_halt
    .long native_read_cr3, native_write_cr3, native_set_pte, native_flush_tlb_user, native_flush_tlb_kernel
    .long native_flush_tlb_single, native_flush_tlb_others_entry
    .long native_send_ipi
    .long native_clock_ns
    .long native_lazy_mmu_begin, native_lazy_mmu_end
pv_ops: .space 4 * NR_PV_OPS
patched_inline: .long 0
patched_direct: .long 0
.align 8
gdt_table: .space 8 * 16
msg_native_init: .asciz "pvkern: native backend init "
msg_patched: .asciz "pvkern: patched call sites: # inline, # direct"
msg_ops_dump: .asciz "pvkern: pv_ops "
msg_irqbench_done: .asciz "pvkern: irq bench rounds: "
