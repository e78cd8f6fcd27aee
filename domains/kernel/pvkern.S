# pvkern: the built-in guest kernel (x86-32, Intel syntax, assembled by keystone).
#
# Boot (Xen PV convention): vCPU 0 enters at _start with %esi = start_info. It reads the command line,
# counts its vCPUs with VCPUOP_is_up, brings the others up with VCPUOP_initialise + VCPUOP_up, waits until
# each has said hello on the console, runs the selected workload and shuts down with the reason the command
# line names (shutdown=poweroff|reboot|suspend|crash|watchdog).
#
# Hypercalls go through the hypervisor-filled hypercall page: `call hc_<name>` (labels made by the builder).
# Conventions: routines preserve ebx, esi, edi, ebp unless stated; results in eax.
#
# Every ABI number (hypercall and sub-op numbers, struct offsets, the simulated platform's ports and addresses) comes
# from the generated include (pvcluster/abi/asm.py; `python -m pvcluster.abi.asm` prints it). The kernel defines
# only its own constants, each listed in KERNEL_PRIVATE_EQUS (domains/kernel/build.py).
# The kernel's backend ids are the hypervisor types of the "ebx" protocol (HYPERVISOR_TYPE_XEN, _VMI, _NATIVE).

.include "abi.inc"

.equ MAX_VCPUS, XEN_LEGACY_MAX_VCPUS
.equ LINE_LEN, 128
.equ STACK_SIZE, 4096
.equ HCBENCH_ROUNDS, 2000
.equ IRQBENCH_ROUNDS, 1000
.equ NOSUCH_HYPERCALL, 99

# The three boot protocols (paravirt-thread-2006.txt). Each ends in pv_boot(eax = backend id).
# "ebx": one common entry point; %ebx = hypervisor type (0 xen, 1 vmi, anything else native).
_start:
    cld
    mov [start_info], esi
    mov esp, boot_stack_top
    mov dword ptr [boot_protocol], BOOT_PROTOCOL_EBX
    mov eax, HYPERVISOR_TYPE_NATIVE
    cmp ebx, HYPERVISOR_TYPE_XEN
    jne .Lebx_not_xen
    mov eax, HYPERVISOR_TYPE_XEN
.Lebx_not_xen:
    cmp ebx, HYPERVISOR_TYPE_VMI
    jne .Lebx_not_vmi
    mov eax, HYPERVISOR_TYPE_VMI
.Lebx_not_vmi:
    jmp pv_boot

# "ident": a 32-bit hypervisor ident at the start of the start-info block, matched against each backend's.
pv_entry_ident:
    cld
    mov [start_info], esi
    mov esp, boot_stack_top
    mov dword ptr [boot_protocol], BOOT_PROTOCOL_IDENT
    mov edx, [esi + START_INFO_magic]
    mov [boot_ident], edx
    mov eax, HYPERVISOR_TYPE_XEN
    cmp edx, BOOT_IDENT_XEN
    je pv_boot
    mov eax, HYPERVISOR_TYPE_VMI
    cmp edx, BOOT_IDENT_VMI
    je pv_boot
    mov eax, HYPERVISOR_TYPE_NATIVE
    cmp edx, BOOT_IDENT_NATIVE
    je pv_boot
    mov esi, msg_unknown_ident
    mov eax, edx
    jmp panic

# "entry": one entry point per hypervisor, named in the image's metadata (symbols pv_entry_<backend>).
pv_entry_xen:
    mov eax, HYPERVISOR_TYPE_XEN
    jmp entry_common
pv_entry_vmi:
    mov eax, HYPERVISOR_TYPE_VMI
    jmp entry_common
pv_entry_native:
    mov eax, HYPERVISOR_TYPE_NATIVE
entry_common:
    cld
    mov [start_info], esi
    mov esp, boot_stack_top
    mov dword ptr [boot_protocol], BOOT_PROTOCOL_ENTRY
    jmp pv_boot

# panic(esi = message, eax = number): print it and shut down with the crash reason
panic:
    call print_num_line
    mov dword ptr [shutdown_reason], SHUTDOWN_crash
    jmp .Lshutdown

# pv_boot(eax = backend id): install the backend's ops over the native defaults, patch, init, run
pv_boot:
    mov [backend_id], eax
    call parse_cmdline
    mov eax, [backend_id]
    call pv_install
    test eax, eax
    jz .Linstalled
    mov esi, msg_install_failed
    jmp panic
.Linstalled:
    call count_vcpus                 # the backend's init sets up per-vCPU state (xen: IPI ports)
    mov [nr_vcpus], eax
    cmp dword ptr [backend_id], HYPERVISOR_TYPE_XEN
    je .Lidt_done
    call setup_idt                   # native and vmi take IPIs through the IDT; xen through event upcalls
.Lidt_done:
    cmp dword ptr [no_patching], 0
    jne .Lpatched
    call pv_patch
.Lpatched:
    PVCALL init
    cmp dword ptr [backend_id], HYPERVISOR_TYPE_VMI
    jne .Linit_checked
    cmp eax, VMI_INIT_SIGNATURE      # the ROM's init answers with its signature
    je .Linit_checked
    mov esi, msg_vmi_init_failed
    jmp panic
.Linit_checked:
    mov esi, msg_boot_protocol
    mov eax, [boot_protocol]
    mov ebx, [backend_id]
    call print_two_nums
    call pv_ops_dump

    mov esi, msg_boot
    xor eax, eax
    mov ebx, [nr_vcpus]
    call print_two_nums

    # bring up the secondaries: each gets its own stack and its id in %ebx
    mov ebx, 1
.Lbring_up:
    cmp ebx, [nr_vcpus]
    jae .Lwait_secondaries
    call vcpu_start
    inc ebx
    jmp .Lbring_up

.Lwait_secondaries:
    mov eax, [nr_vcpus]
    dec eax
    cmp [vcpus_done], eax
    jae .Lsecondaries_done
    mov ebx, SCHEDOP_yield
    xor ecx, ecx
    call hc_sched_op
    jmp .Lwait_secondaries

.Lsecondaries_done:
    xor ebx, ebx
    call hello
    cmp dword ptr [workload_hcbench], 0
    je .Lno_hcbench
    call hypercall_bench
.Lno_hcbench:
    cmp dword ptr [workload_mmuhostile], 0
    je .Lno_mmuhostile
    call mmu_hostile
    test eax, eax
    jz .Lno_mmuhostile
    mov dword ptr [shutdown_reason], SHUTDOWN_crash
.Lno_mmuhostile:
    call mc_bench                    # workload=mcbench (multicall_bench.S); returns 0 when not asked for
    test eax, eax
    jz .Lno_mcbench
    mov dword ptr [shutdown_reason], SHUTDOWN_crash
.Lno_mcbench:
    call evtchn_work                 # workload=pingserver|pingclient|timer (evtchn_work.S); 0 when not asked for
    test eax, eax
    jz .Lno_evtchn_work
    mov dword ptr [shutdown_reason], SHUTDOWN_crash
.Lno_evtchn_work:
    call robust_work                 # workload=timerbomb|mcflood|hcfuzz (robust.S); 0 when not asked for
    test eax, eax
    jz .Lno_robust_work
    mov dword ptr [shutdown_reason], SHUTDOWN_crash
.Lno_robust_work:
    call kexec_work                  # workload=kexec (kexec_work.S); 0 when not asked for, no return when done
    test eax, eax
    jz .Lno_kexec_work
    mov dword ptr [shutdown_reason], SHUTDOWN_crash
.Lno_kexec_work:
    call ipiwake_run                 # workload=ipiwake (smp.S); returns 0
    cmp dword ptr [workload_shootdown], 0
    je .Lno_shootdown
    call shootdown_run
    test eax, eax
    jz .Lno_shootdown
    mov dword ptr [shutdown_reason], SHUTDOWN_crash  # a stale read ends the run as a crash: it cannot go unnoticed
.Lno_shootdown:
    cmp dword ptr [workload_ops], 0
    je .Lno_ops
    call ops_test
    test eax, eax
    jz .Lno_ops
    mov dword ptr [shutdown_reason], SHUTDOWN_crash  # a failed op check ends in a crash
.Lno_ops:
    mov eax, [irqbench_rounds]
    test eax, eax
    jz .Lno_irqbench
    call irq_bench
.Lno_irqbench:
    mov eax, [opbench_slot]
    test eax, eax
    js .Lno_opbench
    call op_bench
.Lno_opbench:
    cmp dword ptr [workload_forever], 0
    je .Lno_forever
    mov esi, msg_forever
    xor eax, eax
    call print_num_line
.Lforever:
    pause
    jmp .Lforever
.Lno_forever:
    cmp dword ptr [workload_hostile], 0
    je .Lshutdown
    call hostile_checks
    test eax, eax
    jz .Lshutdown
    mov dword ptr [shutdown_reason], SHUTDOWN_crash  # a failed check ends in a crash, so it cannot go unnoticed

.Lshutdown:
    mov esi, msg_shutdown
    mov eax, [shutdown_reason]
    call print_num_line
    mov ebx, SCHEDOP_shutdown
    mov ecx, shutdown_reason         # struct sched_shutdown: the reason
    call hc_sched_op
    # only reached if the hypervisor refused
    mov esi, msg_shutdown_failed
    call print_num_line
.Lhang:
    hlt
    jmp .Lhang

# ---------------------------------------------------------------------------------------------------
# vcpu_start(ebx = vcpu id): VCPUOP_initialise with a context that enters secondary_entry, then VCPUOP_up
vcpu_start:
    push ebx
    push edi
    mov edi, vcpu_ctx
    mov ecx, VCPUGCTX_SIZE / 4
    xor eax, eax
    rep stosd
    mov dword ptr [vcpu_ctx + VCPUGCTX_user_regs_eip], secondary_entry
    mov dword ptr [vcpu_ctx + VCPUGCTX_user_regs_ebx], ebx
    cmp dword ptr [backend_id], HYPERVISOR_TYPE_XEN
    jne .Lctx_no_callback
    mov dword ptr [vcpu_ctx + VCPUGCTX_event_callback_cs], FLAT_RING1_CS
    mov dword ptr [vcpu_ctx + VCPUGCTX_event_callback_eip], xen_hypervisor_callback
.Lctx_no_callback:
    mov eax, ebx
    inc eax
    shl eax, 12                      # STACK_SIZE
    add eax, secondary_stacks
    mov [vcpu_ctx + VCPUGCTX_user_regs_esp], eax
    mov ecx, ebx                     # vcpu id
    mov ebx, VCPUOP_initialise
    mov edx, vcpu_ctx
    call hc_vcpu_op
    test eax, eax
    jnz .Lstart_failed
    mov ebx, VCPUOP_up
    mov ecx, [esp + 4]
    xor edx, edx
    call hc_vcpu_op
    test eax, eax
    jnz .Lstart_failed
    pop edi
    pop ebx
    ret
.Lstart_failed:
    mov esi, msg_start_failed
    call print_num_line
    mov dword ptr [shutdown_reason], SHUTDOWN_crash
    jmp .Lshutdown

secondary_entry:
    cmp dword ptr [backend_id], HYPERVISOR_TYPE_XEN
    je .Lsecondary_no_idt
    mov eax, idt_desc                # the IDT register is per CPU: every vCPU loads the shared table
    .byte 0x0F, 0x01, 0x18           # lidt [eax]
.Lsecondary_no_idt:
    call hello
    lock inc dword ptr [vcpus_done]
    cmp dword ptr [workload_shootdown], 0
    jne shootdown_target
    PVCALL irq_enable
.Lsecondary_idle:                    # the idle loop: sleep until an interrupt or event, handle it, sleep again
    PVCALL halt
    jmp .Lsecondary_idle

# hello(ebx = vcpu id): "pvkern: vcpu N of M online"
hello:
    push ebx
    mov esi, msg_hello
    mov eax, ebx
    mov ebx, [nr_vcpus]
    call print_two_nums
    pop ebx
    ret

# this_cpu() -> eax = this vCPU's id, found from the stack it runs on; clobbers nothing else
this_cpu:
    mov eax, esp
    sub eax, secondary_stacks
    shr eax, 12                      # STACK_SIZE
    cmp eax, MAX_VCPUS
    jb .Lthis_cpu_done
    xor eax, eax                     # the boot stack: vCPU 0
.Lthis_cpu_done:
    ret

# count_vcpus() -> eax: the first id for which VCPUOP_is_up fails (-ENOENT) is the vCPU count
count_vcpus:
    push ebx
    push esi
    xor esi, esi
.Lcount_next:
    cmp esi, MAX_VCPUS
    jae .Lcount_done
    mov ebx, VCPUOP_is_up
    mov ecx, esi
    xor edx, edx
    call hc_vcpu_op
    test eax, eax
    js .Lcount_done
    inc esi
    jmp .Lcount_next
.Lcount_done:
    mov eax, esi
    pop esi
    pop ebx
    ret

# parse_cmdline(): shutdown=<reason> and workload=hostile
parse_cmdline:
    push ebx
    push esi
    push edi
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    mov edi, str_shutdown_key
    call find_after
    test eax, eax
    jz .Lparse_workload
    movzx ecx, byte ptr [eax]
    xor edx, edx
    mov ebx, reason_letters
.Lreason_scan:
    movzx eax, byte ptr [ebx + edx]
    test eax, eax
    jz .Lreason_unknown
    cmp eax, ecx
    je .Lreason_found
    inc edx
    jmp .Lreason_scan
.Lreason_unknown:
    mov esi, msg_bad_reason
    xor eax, eax
    call print_num_line
    mov edx, SHUTDOWN_crash          # an unknown reason is a configuration bug: crash loudly
.Lreason_found:
    mov [shutdown_reason], edx
.Lparse_workload:
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    mov edi, str_hostile_key
    call find_after
    test eax, eax
    setnz al
    movzx eax, al
    mov [workload_hostile], eax
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    mov edi, str_hcbench_key
    call find_after
    test eax, eax
    setnz al
    movzx eax, al
    mov [workload_hcbench], eax
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    mov edi, str_forever_key
    call find_after
    test eax, eax
    setnz al
    movzx eax, al
    mov [workload_forever], eax
    mov edi, str_ops_key
    call cmdline_flag
    mov [workload_ops], eax
    mov edi, str_shootdown_key
    call cmdline_flag
    mov [workload_shootdown], eax
    mov edi, str_mmuhostile_key
    call cmdline_flag
    mov [workload_mmuhostile], eax
    mov edi, str_cr3_key
    call cmdline_flag
    mov [sd_cr3_mode], eax
    mov edi, str_nopatch_key
    call cmdline_flag
    mov [no_patching], eax
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    mov edi, str_opbench_key
    call find_after
    test eax, eax
    jz .Lno_opbench_key
    movzx edx, byte ptr [eax]        # one or two decimal digits: the pv_ops slot
    sub edx, 0x30
    movzx ecx, byte ptr [eax + 1]
    sub ecx, 0x30
    cmp ecx, 9
    ja .Lopbench_one_digit
    imul edx, edx, 10
    add edx, ecx
.Lopbench_one_digit:
    mov [opbench_slot], edx
.Lno_opbench_key:
    mov edi, str_irqbench_key
    call cmdline_flag
    test eax, eax
    jz .Lno_irqbench_key
    mov dword ptr [irqbench_rounds], IRQBENCH_ROUNDS
.Lno_irqbench_key:
    pop edi
    pop esi
    pop ebx
    ret

# cmdline_flag(edi = key) -> eax = 1 if the command line contains key, else 0
cmdline_flag:
    push esi
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    call find_after
    test eax, eax
    setnz al
    movzx eax, al
    pop esi
    ret

# find_after(esi = haystack, edi = needle) -> eax = address just past the first match, or 0
find_after:
    push ebx
    push esi
.Lfind_outer:
    cmp byte ptr [esi], 0
    je .Lfind_none
    xor ecx, ecx
.Lfind_inner:
    movzx eax, byte ptr [edi + ecx]
    test eax, eax
    jz .Lfind_hit
    movzx ebx, byte ptr [esi + ecx]
    cmp eax, ebx
    jne .Lfind_miss
    inc ecx
    jmp .Lfind_inner
.Lfind_hit:
    lea eax, [esi + ecx]
    pop esi
    pop ebx
    ret
.Lfind_miss:
    inc esi
    jmp .Lfind_outer
.Lfind_none:
    xor eax, eax
    pop esi
    pop ebx
    ret

# ---------------------------------------------------------------------------------------------------
# hypercall_bench(): HCBENCH_ROUNDS back-to-back XENVER_version calls, for round-trip measurements
hypercall_bench:
    push ebx
    push esi
    mov esi, HCBENCH_ROUNDS
.Lhcbench_next:
    xor ebx, ebx                     # XENVER_version
    xor ecx, ecx
    call hc_xen_version
    dec esi
    jnz .Lhcbench_next
    mov esi, msg_hcbench_done
    mov eax, HCBENCH_ROUNDS
    call print_num_line
    pop esi
    pop ebx
    ret

# ---------------------------------------------------------------------------------------------------
# hostile_checks() -> eax = number of failed checks. Each makes a hypercall with bad arguments and
# compares the errno with the one Xen returns.
hostile_checks:
    push ebx
    push esi
    push edi
    xor edi, edi                     # failures

    mov eax, NOSUCH_HYPERCALL
    int HYPERCALL_VECTOR
    mov edx, -XEN_ENOSYS
    mov esi, msg_check_nosys
    call check_result

    mov ebx, CONSOLEIO_write         # from an unmapped buffer
    mov ecx, 16
    mov edx, 0x10
    call hc_console_io
    mov edx, -XEN_EFAULT
    mov esi, msg_check_console
    call check_result

    mov ebx, SCHEDOP_shutdown        # with an unmapped argument
    mov ecx, 0x20
    call hc_sched_op
    mov edx, -XEN_EFAULT
    mov esi, msg_check_shutdown_ptr
    call check_result

    mov ebx, SCHEDOP_shutdown        # with a reason that does not exist
    mov ecx, bogus_reason
    call hc_sched_op
    mov edx, -XEN_EINVAL
    mov esi, msg_check_shutdown_reason
    call check_result

    mov ebx, VCPUOP_is_up            # on a vCPU the domain does not have
    mov ecx, 99
    xor edx, edx
    call hc_vcpu_op
    mov edx, -XEN_ENOENT
    mov esi, msg_check_vcpu
    call check_result

    mov ebx, XENVER_get_features     # into an unmapped buffer
    mov ecx, 0x30
    call hc_xen_version
    mov edx, -XEN_EFAULT
    mov esi, msg_check_features
    call check_result

    mov ebx, VCPUOP_initialise       # of a vCPU that is already up (vCPU 0)
    xor ecx, ecx
    mov edx, vcpu_ctx
    call hc_vcpu_op
    mov edx, -XEN_EEXIST
    mov esi, msg_check_reinit
    call check_result

    mov esi, msg_hostile_done
    mov eax, edi
    call print_num_line
    mov eax, edi
    pop edi
    pop esi
    pop ebx
    ret

# check_result(eax = got, edx = expected, esi = label): prints "<label> <got>", counts a failure in edi
check_result:
    push edx
    push eax
    call print_num_line
    pop eax
    pop edx
    cmp eax, edx
    je .Lcheck_ok
    inc edi
    mov esi, msg_check_failed
    mov eax, edx
    call print_num_line
.Lcheck_ok:
    ret

# ---------------------------------------------------------------------------------------------------
# Console output. Each vCPU formats into its own line buffer (indexed by the id in the line's owner).
# print_num_line(esi = text, eax = number): "<text><number>\n"
print_num_line:
    push ebx
    push edi
    push eax
    call line_begin
    pop eax
    call put_num
    jmp line_end

# print_two_nums(esi = "A#B#C", eax = first, ebx = second): "A<first>B<second>C\n"
print_two_nums:
    push ebx
    push edi
    push ebx
    push eax
    call line_buffer
    call put_until_hash
    pop eax
    call put_num
    call put_until_hash
    pop eax
    call put_num
    call put_until_hash
    jmp line_end

# line_begin(esi = text): edi = this vCPU's line buffer with the text copied in
line_begin:
    call line_buffer
    jmp put_until_hash

# put_until_hash(esi = text) appends at edi up to a '#' or the NUL; esi ends just past it
put_until_hash:
    lodsb
    test al, al
    jz .Lput_done
    cmp al, 0x23
    je .Lput_done
    stosb
    jmp put_until_hash
.Lput_done:
    ret

# line_buffer() -> edi: a per-vCPU buffer, found from the stack the vCPU runs on
line_buffer:
    mov edi, esp
    sub edi, secondary_stacks
    shr edi, 12                      # STACK_SIZE
    cmp edi, MAX_VCPUS
    jb .Lbuf_ok
    mov edi, MAX_VCPUS               # the boot stack: vCPU 0's own slot
.Lbuf_ok:
    shl edi, 7                       # LINE_LEN
    add edi, line_buffers
    ret

# put_num(eax = signed number) appends its decimal form at edi
put_num:
    push ebx
    push edx
    push ecx
    test eax, eax
    jns .Lpositive
    mov byte ptr [edi], 0x2d
    inc edi
    neg eax
.Lpositive:
    mov ebx, 10
    xor ecx, ecx
.Ldigits:
    xor edx, edx
    div ebx
    add dl, 0x30
    push edx
    inc ecx
    test eax, eax
    jnz .Ldigits
.Lemit:
    pop eax
    stosb
    loop .Lemit
    pop ecx
    pop edx
    pop ebx
    ret

# line_end: finishes the line started by line_begin (caller pushed ebx, edi) and writes it out
line_end:
    mov byte ptr [edi], 0x0a
    inc edi
    mov eax, edi
    and eax, 0xFFFFFF80              # back to the buffer start (buffers are LINE_LEN aligned)
    mov edx, eax                     # buffer
    mov ecx, edi
    sub ecx, eax                     # count
    mov ebx, CONSOLEIO_write
    call hc_console_io
    pop edi
    pop ebx
    ret

# ---------------------------------------------------------------------------------------------------
.align 4
start_info: .long 0
nr_vcpus: .long 0
vcpus_done: .long 0
shutdown_reason: .long 0
workload_hostile: .long 0
workload_hcbench: .long 0
workload_forever: .long 0
workload_ops: .long 0
no_patching: .long 0
irqbench_rounds: .long 0
opbench_slot: .long -1
boot_protocol: .long 0
boot_ident: .long 0
backend_id: .long 0
bogus_reason: .long 77               # no SHUTDOWN_* has this number

str_shutdown_key: .asciz "shutdown="
str_hostile_key: .asciz "workload=hostile"
str_hcbench_key: .asciz "workload=hcbench"
str_forever_key: .asciz "workload=forever"
msg_forever: .asciz "pvkern: spinning forever "
str_ops_key: .asciz "workload=ops"
str_shootdown_key: .asciz "workload=shootdown"
str_mmuhostile_key: .asciz "workload=mmuhostile"
str_cr3_key: .asciz "tlbflush=cr3"
str_irqbench_key: .asciz "workload=irqbench"
str_opbench_key: .asciz "opbench="
str_nopatch_key: .asciz "noreplace-paravirt"
msg_unknown_ident: .asciz "pvkern: PANIC: unknown hypervisor ident "
msg_vmi_init_failed: .asciz "pvkern: PANIC: the VMI ROM's init did not answer with its signature: "
msg_install_failed: .asciz "pvkern: PANIC: backend could not be installed "
msg_boot_protocol: .asciz "pvkern: boot protocol # (0 ebx, 1 ident, 2 entry), backend # (0 xen, 1 vmi, 2 native)"
msg_hcbench_done: .asciz "pvkern: hypercall bench rounds: "
reason_letters: .asciz "prscw"
msg_boot: .asciz "pvkern: booting on vcpu #, # vcpus"
msg_hello: .asciz "pvkern: vcpu # of # online"
msg_shutdown: .asciz "pvkern: shutting down, reason "
msg_shutdown_failed: .asciz "pvkern: SCHEDOP_shutdown failed: "
msg_start_failed: .asciz "pvkern: failed to start a vcpu: "
msg_bad_reason: .asciz "pvkern: unknown shutdown= reason, crashing "
msg_check_nosys: .asciz "pvkern: hostile: unknown hypercall -> "
msg_check_console: .asciz "pvkern: hostile: console write from unmapped buffer -> "
msg_check_shutdown_ptr: .asciz "pvkern: hostile: shutdown with unmapped argument -> "
msg_check_shutdown_reason: .asciz "pvkern: hostile: shutdown with reason 77 -> "
msg_check_vcpu: .asciz "pvkern: hostile: is_up on vcpu 99 -> "
msg_check_features: .asciz "pvkern: hostile: get_features into unmapped buffer -> "
msg_check_reinit: .asciz "pvkern: hostile: initialise vcpu 0 again -> "
msg_check_failed: .asciz "pvkern: hostile: CHECK FAILED, expected "
msg_hostile_done: .asciz "pvkern: hostile checks failed: "

.align 128
line_buffers: .space LINE_LEN * (MAX_VCPUS + 1)
.align 4
vcpu_ctx: .space VCPUGCTX_SIZE
.align 4096
secondary_stacks: .space STACK_SIZE * MAX_VCPUS
boot_stack: .space STACK_SIZE
boot_stack_top:
