"""tests/per_test_timeout.py: a test past LENS_TEST_TIMEOUT fails by name and the run goes on; a hang
that never returns to Python ends the process with every thread's stack; unset, nothing is limited."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _run(tmp_path, body, **env_extra):
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from per_test_timeout import pytest_runtest_protocol  # noqa: F401\n")
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_TEST_TIMEOUT")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


SLOW_THEN_FAST = """
    import time

    def test_slow():
        time.sleep(3)

    def test_fast():
        pass
"""


def test_a_slow_test_fails_by_name_and_the_run_goes_on(tmp_path):
    proc = _run(tmp_path, SLOW_THEN_FAST, LENS_TEST_TIMEOUT="0.5")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "1 failed, 1 passed" in out and "test_slow ran past its 0.5 s limit" in out, out


def test_no_limit_when_unset(tmp_path):
    proc = _run(tmp_path, SLOW_THEN_FAST)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout + proc.stderr


def test_a_hang_outside_python_ends_the_process_with_its_stack(tmp_path):
    # SIGALRM blocked: the alarm never reaches Python, as in a kernel or compile that never returns
    body = """
        import signal, time

        def test_hang():
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            time.sleep(30)
    """
    proc = _run(tmp_path, body, LENS_TEST_TIMEOUT="0.5", LENS_TEST_TIMEOUT_GRACE="0.5")
    assert proc.returncode != 0
    assert "Timeout (0:00:01)!" in proc.stderr and "test_hang" in proc.stderr, proc.stderr[-2000:]
