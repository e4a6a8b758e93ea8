"""Helper processes that live exactly as long as the rank that started them.

A rank starts two kinds of helpers: megatron's checkpoint-writer manager and the reward
scorer. Both must survive the signals that ask the rank to stop gracefully (SIGTERM from
Slurm or torchrun, Ctrl-C's SIGINT, which the terminal sends to the whole process group):
the rank still needs them to finish its step and write the checkpoint. And both must die
when the rank dies, however it dies: a rank SIGKILLed by torchrun after its shutdown
timeout would otherwise leave them running. So a helper ignores SIGINT and SIGTERM and asks
the kernel for SIGKILL when its parent goes (Linux `PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1
_GRACEFUL = (signal.SIGINT, signal.SIGTERM)


def owner() -> tuple[int, bool]:
    """What a helper started now needs to know about its parent: its pid, and whether the
    kernel may tie the helper's life to it (PR_SET_PDEATHSIG fires when the *thread* that
    started the child ends, so only a child of the main thread may use it)."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def die_with_parent(parent_pid: int, pdeathsig: bool = True) -> None:
    """Call first thing in a helper process: ignore the graceful-stop signals, die with the parent."""
    for sig in _GRACEFUL:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _GRACEFUL)  # blocked since birth (see below); now ignored
    if pdeathsig:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the helper ends when its pipe or socket does
            pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def graceful_signals_blocked():
    """Start helpers inside this block: they are born with SIGINT and SIGTERM blocked (the signal
    mask survives fork and exec), so none reaches them before `die_with_parent` ignores them.
    In this process the signals are only held back: one that arrives meanwhile is delivered at
    the end of the block (or to another thread), never lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _GRACEFUL)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
