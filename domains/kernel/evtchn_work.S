# Event-channel workloads (issue 5), selected on the command line; they need backend=xen (shared_info is reached
# through the xen backend's pointer) and run on vCPU 0:
#
#   workload=pingserver peer=D [rounds=N]         EVTCHNOP_alloc_unbound for domain D, print the port, then echo N
#                                                 events back on it (send after each one received)
#   workload=pingclient peer=D port=P [rounds=N]  EVTCHNOP_bind_interdomain to D's port P (retried, yielding, until
#                                                 the server has allocated it), then N round trips: send, wait for the
#                                                 echo with SCHEDOP_poll; guest marks on MARK_PORT bracket each round
#                                                 trip (MARK_PING_SENT, MARK_PING_ECHO; the round in the detail)
#   workload=timer [ticks=N]                      bind VIRQ_TIMER on vCPU 0, start a 1 ms periodic timer, sleep in
#                                                 SCHEDOP_block N times; each wake must bring exactly one tick (counted
#                                                 by the upcall handler) and at least a period of virtual time
#
# The ping ports are masked in shared_info (no upcall): events are waited for with SCHEDOP_poll and consumed with a
# locked btr on the pending bit. Each side checks for lost events (a poll that times out with nothing pending) and
# duplicated ones (the port pending when no echo is outstanding) and prints its counts; a client whose peer went
# away (its port back to unbound: EVTCHNOP_status) prints that and stops.
# Returns (in eax) 0, or 1 when a check failed (the kernel then shuts down with reason crash).

.include "abi.inc"

.equ EVW_ROUNDS_DEFAULT, 10000
.equ EVW_TICKS_DEFAULT, 10
.equ EVW_PERIOD_NS, 1000000
.equ EVW_POLL_TIMEOUT_NS, 10000000
.equ EVW_BIND_TRIES, 100000

# evtchn_work() -> eax = 0 (nothing asked for, or the workload passed), 1 (a check failed)
evtchn_work:
    push ebx
    push esi
    push edi
    push ebp
    mov edi, evw_key_server
    call cmdline_flag
    test eax, eax
    jnz evw_server
    mov edi, evw_key_client
    call cmdline_flag
    test eax, eax
    jnz evw_client
    mov edi, evw_key_timer
    call cmdline_flag
    test eax, eax
    jnz evw_timer
    xor eax, eax
evw_return:
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

# evw_fail(esi = message, eax = value): print it and return 1 from evtchn_work
evw_fail:
    call print_num_line
    mov eax, 1
    jmp evw_return

# evw_number(edi = key, eax = default) -> eax: the decimal number after key on the command line, or the default
evw_number:
    push esi
    push ebx
    mov ebx, eax
    mov esi, [start_info]
    add esi, START_INFO_cmd_line
    call find_after
    test eax, eax
    jz .Levw_num_done
    xor ebx, ebx
.Levw_num_digit:
    movzx ecx, byte ptr [eax]
    sub ecx, 0x30
    cmp ecx, 9
    ja .Levw_num_done
    imul ebx, ebx, 10
    add ebx, ecx
    inc eax
    jmp .Levw_num_digit
.Levw_num_done:
    mov eax, ebx
    pop ebx
    pop esi
    ret

# evw_mask_port(): set evw_port's bit in evtchn_mask, so its events raise no upcall
evw_mask_port:
    mov eax, [xen_shared_info]
    mov ecx, [evw_port]
    lock bts dword ptr [eax + SHARED_INFO_evtchn_mask], ecx
    ret

# evw_take() -> eax = 1 if evw_port was pending (the bit is now clear), else 0
evw_take:
    mov eax, [xen_shared_info]
    mov ecx, [evw_port]
    lock btr dword ptr [eax + SHARED_INFO_evtchn_pending], ecx
    setc al
    movzx eax, al
    ret

# evw_send(): EVTCHNOP_send on evw_port
evw_send:
    push ebx
    mov eax, [evw_port]
    mov [evw_send_arg + EVTCHN_SEND_port], eax
    mov ebx, EVTCHNOP_send
    mov ecx, evw_send_arg
    call hc_event_channel_op
    test eax, eax
    jz .Levw_send_ok
    inc dword ptr [evw_send_errors]
.Levw_send_ok:
    pop ebx
    ret

# evw_wait() -> eax = 1 when evw_port's event came (consumed), 0 when the poll timed out with nothing pending
evw_wait:
    push ebx
    call evw_take
    test eax, eax
    jnz .Levw_wait_done
    call this_vcpu_info              # the poll timeout is absolute system time: now + EVW_POLL_TIMEOUT_NS
    mov ecx, [eax + VCPU_INFO_time_system_time]
    mov edx, [eax + VCPU_INFO_time_system_time + 4]
    add ecx, EVW_POLL_TIMEOUT_NS
    adc edx, 0
    mov [evw_poll + SCHED_POLL_timeout], ecx
    mov [evw_poll + SCHED_POLL_timeout + 4], edx
    mov eax, [evw_port]
    mov [evw_poll_ports], eax
    mov ebx, SCHEDOP_poll
    mov ecx, evw_poll
    call hc_sched_op
    test eax, eax
    jz .Levw_wait_polled
    inc dword ptr [evw_poll_errors]
.Levw_wait_polled:
    call evw_take
.Levw_wait_done:
    pop ebx
    ret

# evw_mark(eax = round, edx = code): a guest mark on MARK_PORT, value code | round << MARK_DETAIL_SHIFT
evw_mark:
    shl eax, MARK_DETAIL_SHIFT
    or eax, edx
    mov edx, MARK_PORT
    out dx, eax
    ret

# -- workload=pingserver ------------------------------------------------------------------------------------
evw_server:
    mov edi, evw_key_peer
    xor eax, eax
    call evw_number
    mov word ptr [evw_alloc + EVTCHN_ALLOC_UNBOUND_dom], DOMID_SELF
    mov [evw_alloc + EVTCHN_ALLOC_UNBOUND_remote_dom], ax
    mov edi, evw_key_rounds
    mov eax, EVW_ROUNDS_DEFAULT
    call evw_number
    mov [evw_rounds], eax
    mov ebx, EVTCHNOP_alloc_unbound
    mov ecx, evw_alloc
    call hc_event_channel_op
    mov esi, evw_msg_alloc_failed
    test eax, eax
    jnz evw_fail
    mov eax, [evw_alloc + EVTCHN_ALLOC_UNBOUND_port]
    mov [evw_port], eax
    call evw_mask_port
    mov esi, evw_msg_server_port
    mov eax, [evw_port]
    call print_num_line
    xor ebp, ebp                     # events echoed
    xor edi, edi                     # consecutive timeouts
.Levw_srv_loop:
    cmp ebp, [evw_rounds]
    jae .Levw_srv_done
    call evw_wait
    test eax, eax
    jz .Levw_srv_timeout
    xor edi, edi
    inc ebp
    call evw_send
    jmp .Levw_srv_loop
.Levw_srv_timeout:
    inc edi                          # the client may not have bound yet: wait up to 100 timeouts for it
    cmp edi, 100
    jb .Levw_srv_loop
    inc dword ptr [evw_lost]
.Levw_srv_done:
    mov esi, evw_msg_server_done
    mov eax, ebp
    mov ebx, [evw_lost]
    call print_two_nums
    jmp evw_report

# -- workload=pingclient ------------------------------------------------------------------------------------
evw_client:
    mov edi, evw_key_peer
    xor eax, eax
    call evw_number
    mov [evw_bind + EVTCHN_BIND_INTERDOMAIN_remote_dom], ax
    mov edi, evw_key_port
    xor eax, eax
    call evw_number
    mov [evw_bind + EVTCHN_BIND_INTERDOMAIN_remote_port], eax
    mov edi, evw_key_rounds
    mov eax, EVW_ROUNDS_DEFAULT
    call evw_number
    mov [evw_rounds], eax
    mov edi, EVW_BIND_TRIES
.Levw_bind_retry:
    mov ebx, EVTCHNOP_bind_interdomain
    mov ecx, evw_bind
    call hc_event_channel_op
    test eax, eax
    jz .Levw_bound
    mov esi, eax
    dec edi
    jz .Levw_bind_failed
    mov ebx, SCHEDOP_yield           # the server has not offered the port yet: let time pass, try again
    xor ecx, ecx
    call hc_sched_op
    jmp .Levw_bind_retry
.Levw_bind_failed:
    mov eax, esi
    mov esi, evw_msg_bind_failed
    jmp evw_fail
.Levw_bound:
    mov eax, [evw_bind + EVTCHN_BIND_INTERDOMAIN_local_port]
    mov [evw_port], eax
    call evw_mask_port
    call evw_take                    # a fresh binding starts pending (Xen's rule): not an echo
    mov esi, evw_msg_client_bound
    mov eax, [evw_port]
    mov ebx, EVW_BIND_TRIES
    sub ebx, edi                     # retries
    call print_two_nums
    xor ebp, ebp                     # round trips done
.Levw_cli_loop:
    cmp ebp, [evw_rounds]
    jae .Levw_cli_done
    call evw_take                    # pending with no request outstanding: a duplicated event
    add [evw_dups], eax
    mov eax, ebp
    mov edx, MARK_PING_SENT
    call evw_mark
    call evw_send
    call evw_wait
    test eax, eax
    jz .Levw_cli_timeout
    mov eax, ebp
    mov edx, MARK_PING_ECHO
    call evw_mark
    inc ebp
    jmp .Levw_cli_loop
.Levw_cli_timeout:
    mov eax, [evw_port]              # nothing came: has the peer gone (our end back to unbound)?
    mov [evw_status + EVTCHN_STATUS_port], eax
    mov word ptr [evw_status + EVTCHN_STATUS_dom], DOMID_SELF
    mov ebx, EVTCHNOP_status
    mov ecx, evw_status
    call hc_event_channel_op
    cmp dword ptr [evw_status + EVTCHN_STATUS_status], EVTCHNSTAT_unbound
    jne .Levw_cli_lost
    mov esi, evw_msg_peer_closed
    mov eax, [evw_port]
    mov ebx, [evw_status + EVTCHN_STATUS_status]
    call print_two_nums
    mov esi, evw_msg_client_done
    mov eax, ebp
    mov ebx, [evw_dups]
    call print_two_nums
    xor eax, eax                     # the peer going away is not a failure of ours
    jmp evw_return
.Levw_cli_lost:
    inc dword ptr [evw_lost]
.Levw_cli_done:
    mov esi, evw_msg_client_done
    mov eax, ebp
    mov ebx, [evw_dups]
    call print_two_nums
    mov esi, evw_msg_lost
    mov eax, [evw_lost]
    call print_num_line

# both ping sides end here: failed if anything was lost or duplicated or a hypercall failed
evw_report:
    mov esi, evw_msg_errors
    mov eax, [evw_send_errors]
    mov ebx, [evw_poll_errors]
    call print_two_nums
    mov eax, [evw_lost]
    or eax, [evw_dups]
    or eax, [evw_send_errors]
    or eax, [evw_poll_errors]
    setnz al
    movzx eax, al
    jmp evw_return

# -- workload=timer -----------------------------------------------------------------------------------------
evw_timer:
    mov edi, evw_key_ticks
    mov eax, EVW_TICKS_DEFAULT
    call evw_number
    mov [evw_rounds], eax
    mov dword ptr [evw_virq + EVTCHN_BIND_VIRQ_virq], VIRQ_TIMER
    mov dword ptr [evw_virq + EVTCHN_BIND_VIRQ_vcpu], 0  # on vCPU 0
    mov ebx, EVTCHNOP_bind_virq
    mov ecx, evw_virq
    call hc_event_channel_op
    mov esi, evw_msg_virq_failed
    test eax, eax
    jnz evw_fail
    mov eax, [evw_virq + EVTCHN_BIND_VIRQ_port]
    mov [evw_timer_port], eax
    mov ebx, VCPUOP_set_periodic_timer
    xor ecx, ecx
    mov edx, evw_period
    call hc_vcpu_op
    mov esi, evw_msg_periodic_failed
    test eax, eax
    jnz evw_fail
    mov esi, evw_msg_timer_port
    mov eax, [evw_timer_port]
    mov ebx, EVW_PERIOD_NS
    call print_two_nums
    xor ebp, ebp                     # wakes
.Levw_tick_loop:
    cmp ebp, [evw_rounds]
    jae .Levw_tick_done
    call this_vcpu_info              # events off until the block, which turns them back on (no lost wake-up)
    mov byte ptr [eax + VCPU_INFO_evtchn_upcall_mask], 1
    mov edi, [evw_ticks_seen]
    mov ebx, SCHEDOP_block
    xor ecx, ecx
    call hc_sched_op                 # returns once the tick's upcall is pending; the handler runs right after
    in eax, CLOCK_PORT
    mov edx, [evw_ticks_seen]
    sub edx, edi
    cmp edx, 1                       # exactly one tick per wake
    je .Levw_tick_counted
    inc dword ptr [evw_tick_miscount]
.Levw_tick_counted:
    test ebp, ebp
    jz .Levw_tick_first
    mov edx, eax
    sub edx, [evw_last_wake]
    cmp edx, EVW_PERIOD_NS           # and at least a period of virtual time since the last one
    jae .Levw_tick_first
    inc dword ptr [evw_tick_early]
.Levw_tick_first:
    mov [evw_last_wake], eax
    test ebp, ebp
    jnz .Levw_tick_next
    mov [evw_first_wake], eax
.Levw_tick_next:
    inc ebp
    jmp .Levw_tick_loop
.Levw_tick_done:
    mov ebx, VCPUOP_stop_periodic_timer
    xor ecx, ecx
    xor edx, edx
    call hc_vcpu_op
    mov esi, evw_msg_ticks
    mov eax, ebp
    mov ebx, [evw_ticks_seen]
    call print_two_nums
    mov esi, evw_msg_tick_checks
    mov eax, [evw_tick_miscount]
    mov ebx, [evw_tick_early]
    call print_two_nums
    mov esi, evw_msg_tick_span
    mov eax, [evw_last_wake]
    sub eax, [evw_first_wake]
    call print_num_line
    mov eax, [evw_tick_miscount]
    or eax, [evw_tick_early]
    setnz al
    movzx eax, al
    jmp evw_return

# evw_port_event(edx = port): the upcall handler's fallback for a port that is not an IPI port (xen_handle_port
# jumps here): count timer ticks; anything else is a stray event
evw_port_event:
    cmp edx, [evw_timer_port]
    jne .Levw_stray
    test edx, edx
    jz .Levw_stray
    lock inc dword ptr [evw_ticks_seen]
    ret
.Levw_stray:
    lock inc dword ptr [xen_stray_events]
    ret

.align 4
evw_port: .long 0
evw_rounds: .long 0
evw_lost: .long 0
evw_dups: .long 0
evw_send_errors: .long 0
evw_poll_errors: .long 0
evw_timer_port: .long 0
evw_ticks_seen: .long 0
evw_tick_miscount: .long 0
evw_tick_early: .long 0
evw_last_wake: .long 0
evw_first_wake: .long 0
evw_send_arg: .space EVTCHN_SEND_SIZE               # struct evtchn_send: port
evw_alloc: .space EVTCHN_ALLOC_UNBOUND_SIZE         # struct evtchn_alloc_unbound: dom, remote_dom, port (out)
evw_bind: .space EVTCHN_BIND_INTERDOMAIN_SIZE       # struct evtchn_bind_interdomain: remote_dom, remote_port,
                                                    # local_port (out)
evw_status: .space EVTCHN_STATUS_SIZE               # struct evtchn_status: dom, port, status, vcpu, union
evw_virq: .space EVTCHN_BIND_VIRQ_SIZE              # struct evtchn_bind_virq: virq, vcpu, port (out)
evw_period: .long EVW_PERIOD_NS, 0                  # struct vcpu_set_periodic_timer: u64 period_ns
evw_poll: .long evw_poll_ports, 1, 0, 0             # struct sched_poll: ports, nr_ports, u64 timeout
evw_poll_ports: .long 0
evw_key_server: .asciz "workload=pingserver"
evw_key_client: .asciz "workload=pingclient"
evw_key_timer: .asciz "workload=timer"
evw_key_peer: .asciz "peer="
evw_key_port: .asciz "port="
evw_key_rounds: .asciz "rounds="
evw_key_ticks: .asciz "ticks="
evw_msg_alloc_failed: .asciz "pingserver: alloc_unbound failed: "
evw_msg_server_port: .asciz "pingserver: port "
evw_msg_server_done: .asciz "pingserver: echoed # events, lost #"
evw_msg_bind_failed: .asciz "pingclient: bind_interdomain failed: "
evw_msg_client_bound: .asciz "pingclient: bound port # after # retries"
evw_msg_client_done: .asciz "pingclient: # round trips, # duplicated"
evw_msg_lost: .asciz "pingclient: lost "
evw_msg_peer_closed: .asciz "pingclient: peer closed: port # status #"
evw_msg_errors: .asciz "ping: send errors #, poll errors #"
evw_msg_virq_failed: .asciz "timer: bind_virq failed: "
evw_msg_periodic_failed: .asciz "timer: set_periodic_timer failed: "
evw_msg_timer_port: .asciz "timer: VIRQ_TIMER on port #, period # ns"
evw_msg_ticks: .asciz "timer: # wakes, # ticks"
evw_msg_tick_checks: .asciz "timer: # miscounted, # early"
evw_msg_tick_span: .asciz "timer: first to last wake ns "
