"""Say where a rank hangs.

A rank stuck in a collective waits silently until the process-group timeout
(`trainer.dist_timeout_s`) ends the run. Two ways to see where it waits, every thread's
Python stack on stderr (the top frame of the main thread names the collective):
- `kill -USR1 <pid>` at any time (`install_stack_dump_signal`);
- automatically, on each rank, when one step runs longer than the timeout (`stack_dump_after`).
Both use `faulthandler`, which prints from its own C thread: it works while the main thread
is blocked inside NCCL or gloo with the GIL held.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys


def _stderr():
    """A stream with a file descriptor (faulthandler writes from C): stderr, or the process's own
    when stderr is replaced (e.g. captured by a test runner)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return sys.__stderr__


def install_stack_dump_signal(sig: int = signal.SIGUSR1) -> None:
    """`kill -USR1 <pid>` prints every thread's stack and the run goes on."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(sig, file=_stderr(), all_threads=True, chain=False)


@contextlib.contextmanager
def stack_dump_after(seconds: float | None):
    """Print every thread's stack (once) if the block is still running after `seconds`."""
    if not seconds or seconds <= 0:
        yield
        return
    faulthandler.dump_traceback_later(seconds, repeat=False, file=_stderr(), exit=False)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
