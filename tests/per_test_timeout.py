"""A time limit per test, on only when LENS_TEST_TIMEOUT (seconds) is set (the GPU device check sets it).

The GPU image has no pytest-timeout, and a whole-run ``timeout`` that cuts pytest loses every report
of the tests that did run. Here each test (setup, call and teardown) gets the limit:

- past it, SIGALRM raises ``TestTimeout`` in the test, which fails with its name and stack and the run
  goes on;
- a hang inside native code (a kernel that never returns, a compile) never comes back to Python to
  take the alarm: LENS_TEST_TIMEOUT_GRACE seconds later (default 10) faulthandler prints every
  thread's stack and ends the process, so that the step's log shows where it hung.

Loaded by tests/conftest.py; outside the main thread or without SIGALRM it does nothing.
"""
import faulthandler
import os
import signal
import sys
import threading

import pytest


class TestTimeout(Exception):
    __test__ = False  # not a test class


def _limit() -> float:
    try:
        return float(os.environ.get("LENS_TEST_TIMEOUT", "0") or 0)
    except ValueError:
        raise pytest.UsageError(f"LENS_TEST_TIMEOUT must be a number of seconds, got "
                                f"{os.environ['LENS_TEST_TIMEOUT']!r}") from None


def _real_stderr(config):
    # pytest's fd capture points fd 2 at a temporary file while a test runs, which a dying process
    # never prints: the stack goes to the stderr pytest saved (its fd capture's own attribute; fd 2
    # where capture is off)
    capman = config.pluginmanager.getplugin("capturemanager")
    fd = getattr(getattr(getattr(capman, "_global_capturing", None), "err", None), "targetfd_save", None)
    return fd if isinstance(fd, int) else sys.stderr.fileno()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _limit()
    if limit <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    grace = float(os.environ.get("LENS_TEST_TIMEOUT_GRACE", "10"))

    def on_alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past its {limit:g} s limit (LENS_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + grace, exit=True, file=_real_stderr(item.config))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
