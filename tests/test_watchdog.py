"""A rank that waits too long says where: every thread's Python stack on stderr."""

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_step_that_outlasts_the_timeout_prints_where_it_waits():
    r = _run("""
        import time
        from mcore_rl.distributed.watchdog import stack_dump_after

        def waiting_in_a_collective():
            time.sleep(1.5)

        with stack_dump_after(0.3):
            waiting_in_a_collective()
        with stack_dump_after(5):  # finishes in time: nothing printed, the timer is cancelled
            time.sleep(0.1)
        time.sleep(0.2)
        print("done")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr
    assert r.stderr.count("waiting_in_a_collective") == 1, r.stderr


def test_sigusr1_prints_the_stack_and_the_run_goes_on():
    r = _run("""
        import os, signal, time
        from mcore_rl.distributed.watchdog import install_stack_dump_signal

        install_stack_dump_signal()

        def busy_somewhere():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)

        busy_somewhere()
        print("still running")
    """)
    assert r.returncode == 0 and "still running" in r.stdout, r.stderr
    assert "busy_somewhere" in r.stderr, r.stderr
