"""python -m perf profile kernel: how a sampled call stack is counted."""
from __future__ import annotations

from perf.profile_routed import cpu_shares

SCRIPT = """\
    500000 
\t ffffffff8207fc43 tcp_write_xmit
\t ffffffff816dd543 ksys_write
\t ffffffff81000130 entry_SYSCALL_64_after_hwframe
\t           f838f __GI___libc_write

    500000 
\t ffffffff81e75eed tcp_recvmsg
\t ffffffff816dd111 ksys_read
\t ffffffff81000130 entry_SYSCALL_64_after_hwframe

    250000 
\t ffffffff8100aaaa do_epoll_pwait.part.0
\t ffffffff81000130 entry_SYSCALL_64_after_hwframe

    500000 
\t ffffffff8100bbbb __x64_sys_getpid
\t ffffffff81000130 entry_SYSCALL_64_after_hwframe

    500000 
\t             b66 __vdso_clock_gettime
\t           cf439 clock_gettime@@GLIBC_2.17

    250000 
\t ffffffff82077781 tcp_rcv_established
\t ffffffff81eadd34 do_writev
\t ffffffff81000130 entry_SYSCALL_64_after_hwframe
"""


def test_each_sample_goes_to_the_syscall_on_its_stack_or_to_user_space():
    assert cpu_shares(SCRIPT) == {"write": 750000.0, "read": 500000.0, "epoll": 250000.0,
                                  "other kernel": 500000.0, "user space": 500000.0}


def test_nothing_sampled():
    assert cpu_shares("") == {}
