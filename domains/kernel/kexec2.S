# The second stage workload=kexec boots into (kexec_work.S): a kernel of its own, assembled and packed as an ELF
# with Xen's notes by domains/kernel/build.py (kexec_stage2) and carried inside pvkern as data (kexec_image). The
# control plane builds a new domain from it, with the old domain's spec: its command line is pvkern's, so this
# kernel ignores it, says on the console that it is the second stage (how a run tells the two boots apart), and
# powers off, so the run ends.

.include "abi.inc"

_start:
pv_entry_ident:
pv_entry_xen:
pv_entry_vmi:
pv_entry_native:
    mov ebx, CONSOLEIO_write
    mov ecx, k2_msg_end
    sub ecx, k2_msg                  # the message's length
    mov edx, k2_msg
    call hc_console_io
    mov ebx, SCHEDOP_shutdown
    mov ecx, k2_reason               # struct sched_shutdown
    call hc_sched_op
k2_hang:                             # only if the hypervisor refused the shutdown
    pause
    jmp k2_hang

k2_msg: .ascii "pvkern-kexec2: second stage up, kexec'd by the control plane\n"
k2_msg_end:
.align 4
k2_reason: .long SHUTDOWN_poweroff
