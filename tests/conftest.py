"""Without a GPU the Triton kernels run under the interpreter. TRITON_INTERPRET must be set before
triton is first imported (triton.language's own @jit helpers are decorated at import), and test
modules import triton while they are collected, so it is set here, before any of them.

A failing test's report shows the seeds it took from ``seeds.stable_seed``."""
import os

import pytest
import torch

# a time limit per test when LENS_TEST_TIMEOUT is set (the GPU device check); a hook, registered by name
from per_test_timeout import pytest_runtest_protocol  # noqa: F401

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup":
        import seeds
        seeds.take_used()  # drop what collection or an earlier test took
    if report.when == "call":
        import seeds
        used = seeds.take_used()
        if report.failed and used:
            report.sections.append(("seeds", "\n".join(f"stable_seed{parts} = {seed}" for parts, seed in used)))
