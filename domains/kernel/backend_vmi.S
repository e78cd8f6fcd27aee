# The vmi backend: the hypervisor supplies the op code in a read-only ROM page (hypervisor/vmi_rom.py).
# The kernel finds the ROM by its signature, and each non-zero entry of the ROM's table becomes the op;
# a zero entry is NULL, so the native code keeps that op.

# vmi_probe() -> eax = 0 and vmi_ops filled, or nonzero when no ROM is mapped
vmi_probe:
    cmp dword ptr [VMI_ROM_BASE], VMI_MAGIC
    jne .Lvmi_absent
    xor ecx, ecx
.Lvmi_next:
    cmp ecx, [VMI_ROM_BASE + 8]
    jae .Lvmi_done
    cmp ecx, NR_PV_OPS
    jae .Lvmi_done
    mov eax, [VMI_ROM_BASE + 16 + ecx*4]
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
