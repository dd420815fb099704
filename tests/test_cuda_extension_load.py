"""The CUDA extension lens_kernels._C loads beside the package's own ops, in either order.

The package defines its public ops once, in the ``lens_kernels::`` namespace (Python custom ops);
the extension registers its kernels in ``lens_kernels_cuda::`` and never defines a name in
``lens_kernels::`` (csrc/README.md). A schema defined twice aborts the process at load time, so each
order runs in a fresh subprocess:

- ``torch.ops.load_library(_C)`` first, then ``import lens_kernels``;
- ``import lens_kernels`` first (which imports _C), then ``torch.ops.load_library(_C)``;

and in both the ``lens_kernels::`` ops are exactly those of an import without the extension, and the
``lens_kernels_cuda::`` ops are exactly those csrc/bindings.cpp defines.

Needs a built extension (an installed platform wheel, or ``LENS_KERNELS_BUILD_CUDA=1 python setup.py
build_ext --inplace``); skipped without one, unless LENS_REQUIRE_CUDA_EXT=1 (the CI wheel job) turns the
skip into a failure.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINDINGS = ROOT / "csrc" / "bindings.cpp"

# The extension's ops: compared with csrc/bindings.cpp where the sources are (test below), and with
# what the built extension registers where it is.
CUDA_OPS = frozenset({
    "token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_", "fused_policy_loss", "fused_policy_loss_",
    "rescale_grad_", "fused_loss_path", "fused_loss_plan", "fused_loss_last_launch", "set_debug_flags",
})


def _built_extension():
    spec = importlib.util.find_spec("lens_kernels._C")
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def _require_extension():
    path = _built_extension()
    if path is None:
        reason = ("no built lens_kernels._C here (install the platform wheel, or LENS_KERNELS_BUILD_CUDA=1 python "
                  "setup.py build_ext --inplace with a CUDA torch and a CUDA toolkit)")
        if os.environ.get("LENS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(reason + ", but LENS_REQUIRE_CUDA_EXT=1")
        pytest.skip(reason)
    return path


_PROBE = r"""
import json, sys
import torch

order, path = sys.argv[1], sys.argv[2]
if order == "without_extension":
    sys.modules["lens_kernels._C"] = None  # the import in backends/cuda.py fails as on a pure install
    import lens_kernels as lk
    assert not lk.HAS_CUDA_EXT
elif order == "library_first":
    torch.ops.load_library(path)
    import lens_kernels as lk
elif order == "package_first":
    import lens_kernels as lk
    torch.ops.load_library(path)
else:
    raise SystemExit("unknown order " + order)
names = torch._C._dispatch_get_all_op_names()
by_ns = {ns: sorted({n.split("::", 1)[1].split(".")[0] for n in names if n.startswith(ns + "::")})
         for ns in ("lens_kernels", "lens_kernels_cuda")}
if order != "without_extension":
    from lens_kernels.backends import cuda
    by_ns["has_cuda_ext"] = bool(lk.HAS_CUDA_EXT and cuda.unavailable_reason() is None)
    # an op of each namespace resolves through torch.ops
    by_ns["schema"] = str(torch.ops.lens_kernels_cuda.token_logprobs_fwd.default._schema)
print("PROBE " + json.dumps(by_ns))
"""


def _probe(order, path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _PROBE, order, path], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, (f"{order}: rc {proc.returncode} (-6 is the abort of a duplicate registration)\n"
                                  + proc.stdout[-2000:] + proc.stderr[-4000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stdout[-2000:]
    return json.loads(line[-1][len("PROBE "):])


@pytest.mark.skipif(not BINDINGS.exists(), reason="run from outside the source tree: csrc/ is not here")
def test_extension_ops_are_those_bindings_define():
    text = BINDINGS.read_text()
    assert re.findall(r"TORCH_LIBRARY\((\w+),", text) == ["lens_kernels_cuda"]
    assert set(re.findall(r"TORCH_LIBRARY_IMPL\((\w+),", text)) == {"lens_kernels_cuda"}
    defined = set(re.findall(r'm\.def\("(\w+)\(', text))
    assert defined == CUDA_OPS


@pytest.fixture(scope="module")
def without_extension():
    path = _require_extension()
    baseline = _probe("without_extension", path)
    assert baseline["lens_kernels"], "the package defines no lens_kernels:: op: nothing to collide with"
    assert baseline["lens_kernels_cuda"] == []
    return path, baseline


@pytest.mark.parametrize("order", ["library_first", "package_first"])
def test_extension_and_package_load_in_either_order(order, without_extension):
    path, baseline = without_extension
    got = _probe(order, path)
    assert got["has_cuda_ext"]
    assert got["lens_kernels"] == baseline["lens_kernels"], "the extension changed the package's own ops"
    assert set(got["lens_kernels_cuda"]) == CUDA_OPS
    assert got["schema"].startswith("lens_kernels_cuda::token_logprobs_fwd(")
