# workload=kexec (xen backend): kexec through the control plane (hypervisor/hypercalls/kexec_op.py). The kernel
# carries a second-stage kernel, an ELF image (kexec2.S, packed by build.py), in its own memory at kexec_image; it
# checks no image is loaded (KEXEC_CMD_kexec_status 0), loads that one as a KEXEC_TYPE_DEFAULT image of one segment
# (KEXEC_CMD_kexec_load: buf = kexec_image, dest_maddr 0, entry_maddr 0, inside it), checks the status is now 1, and
# runs KEXEC_CMD_kexec: the domain ends with shutdown reason "kexec" and the toolstack builds a new domain, same
# name and spec, from the image, which prints its own line and powers off.
# With `kexec=crash` on the command line it loads the image as KEXEC_TYPE_CRASH instead and then crashes
# (SCHEDOP_shutdown with SHUTDOWN_crash): kdump, the toolstack boots the crash image in its place.
#
# kexec_work() -> eax = 0 (not asked for); 1 when a step failed (printed). On success it does not return.

.include "abi.inc"

kexec_work:
    push ebx
    push esi
    push edi
    mov edi, kx_key
    call cmdline_flag
    test eax, eax
    jz kx_return
    mov byte ptr [kx_type], KEXEC_TYPE_DEFAULT
    mov edi, kx_key_crash
    call cmdline_flag
    test eax, eax
    jz kx_typed
    mov byte ptr [kx_type], KEXEC_TYPE_CRASH
kx_typed:
    mov ebx, KEXEC_CMD_kexec_status
    mov ecx, kx_type
    call hc_kexec_op
    mov esi, kx_msg_status_before
    test eax, eax
    jnz kx_fail
    # the segment: the whole image, its room rounded up to whole pages as Xen requires
    mov eax, kexec_image_end
    sub eax, kexec_image
    mov dword ptr [kx_seg + KEXEC_SEGMENT_buf], kexec_image
    mov dword ptr [kx_seg + KEXEC_SEGMENT_buf + 4], 0
    mov [kx_seg + KEXEC_SEGMENT_buf_size], eax
    mov dword ptr [kx_seg + KEXEC_SEGMENT_buf_size + 4], 0
    mov dword ptr [kx_seg + KEXEC_SEGMENT_dest_maddr], 0
    mov dword ptr [kx_seg + KEXEC_SEGMENT_dest_maddr + 4], 0
    shr eax, PAGE_SHIFT
    inc eax
    shl eax, PAGE_SHIFT
    mov [kx_seg + KEXEC_SEGMENT_dest_size], eax
    mov dword ptr [kx_seg + KEXEC_SEGMENT_dest_size + 4], 0
    mov al, [kx_type]
    mov [kx_load + KEXEC_LOAD_type], al
    mov word ptr [kx_load + KEXEC_LOAD_arch], EM_386
    mov dword ptr [kx_load + KEXEC_LOAD_nr_segments], 1
    mov dword ptr [kx_load + KEXEC_LOAD_segments], kx_seg
    mov dword ptr [kx_load + KEXEC_LOAD_segments + 4], 0
    mov dword ptr [kx_load + KEXEC_LOAD_entry_maddr], 0
    mov dword ptr [kx_load + KEXEC_LOAD_entry_maddr + 4], 0
    mov ebx, KEXEC_CMD_kexec_load
    mov ecx, kx_load
    call hc_kexec_op
    mov esi, kx_msg_load_failed
    test eax, eax
    jnz kx_fail
    mov ebx, KEXEC_CMD_kexec_status
    mov ecx, kx_type
    call hc_kexec_op
    mov esi, kx_msg_status_after
    cmp eax, 1
    jne kx_fail
    mov eax, [kx_seg + KEXEC_SEGMENT_buf_size]
    mov esi, kx_msg_loaded
    call print_num_line
    cmp byte ptr [kx_type], KEXEC_TYPE_CRASH
    jne kx_exec_default
    mov dword ptr [shutdown_reason], SHUTDOWN_crash  # kdump: the crash image boots when the domain crashes
    xor eax, eax
    jmp kx_return
kx_exec_default:
    mov dword ptr [kx_exec + KEXEC_EXEC_type], KEXEC_TYPE_DEFAULT
    mov ebx, KEXEC_CMD_kexec
    mov ecx, kx_exec
    call hc_kexec_op
    mov esi, kx_msg_exec_failed      # only reached if the hypervisor refused
kx_fail:
    call print_num_line
    mov eax, 1
kx_return:
    pop edi
    pop esi
    pop ebx
    ret

kx_key: .asciz "workload=kexec"
kx_key_crash: .asciz "kexec=crash"
kx_msg_status_before: .asciz "pvkern: kexec: an image was loaded before the load, status "
kx_msg_load_failed: .asciz "pvkern: kexec: KEXEC_CMD_kexec_load failed "
kx_msg_status_after: .asciz "pvkern: kexec: status after the load "
kx_msg_loaded: .asciz "pvkern: kexec: second stage loaded, bytes "
kx_msg_exec_failed: .asciz "pvkern: kexec: KEXEC_CMD_kexec failed "
.align 8
kx_type: .long 0
kx_exec: .long 0
kx_load: .space KEXEC_LOAD_SIZE
kx_seg: .space KEXEC_SEGMENT_SIZE
