# The vmi backend: the hypervisor supplies the op code in a read-only ROM page (hypervisor/vmi_rom.py).
# The kernel finds the ROM by its signature, and each non-zero entry of the ROM's table becomes the op;
# a zero entry is NULL, so the native code keeps that op.

.include "abi.inc"

# vmi_probe() -> eax = 0 and vmi_ops filled, or nonzero when no ROM is mapped
vmi_probe:
    cmp dword ptr [VMI_ROM_BASE + VMI_ROM_HEADER_magic], VMI_ROM_MAGIC
    jne .Lvmi_absent
    xor ecx, ecx
.Lvmi_next:
    cmp ecx, [VMI_ROM_BASE + VMI_ROM_HEADER_nr_ops]
    jae .Lvmi_done
    cmp ecx, NR_PV_OPS
    jae .Lvmi_done
    mov eax, [VMI_ROM_BASE + VMI_ROM_HEADER_SIZE + ecx*4]    # the op table follows the header
    test eax, eax
    jz .Lvmi_null
    add eax, VMI_ROM_BASE
.Lvmi_null:
    mov [vmi_ops + ecx*4], eax
    inc ecx
    jmp .Lvmi_next
.Lvmi_done:
    xor eax, eax
    ret
.Lvmi_absent:
    mov eax, 1
    ret

.align 4
vmi_ops: .space 4 * NR_PV_OPS
