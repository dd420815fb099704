"""Every kernel of the Triton hidden path compiles for sm_90 and sm_80 without a GPU.

The compile runs in a subprocess without TRITON_INTERPRET (set for the interpreter tests of this
process, and interpreted kernels cannot be compiled).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_DOT = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
# (module, kernel, input dtype, constexprs): the launch switches that change the code the most
VARIANTS = [
    ("linear_token_logprobs", "_linear_logprobs_fwd_kernel", "bf16",
     dict(_DOT, HAS_BIAS=False, PER_ROW_TAU=False, SEQ_SUM=True, DOT_PRECISION="tf32")),
    ("linear_token_logprobs", "_linear_logprobs_fwd_kernel", "fp32",
     dict(_DOT, HAS_BIAS=True, PER_ROW_TAU=True, SEQ_SUM=False, DOT_PRECISION="ieee")),
    ("linear_token_logprobs", "_linear_logprobs_bwd_kernel", "bf16",
     dict(_DOT, HAS_BIAS=True, PER_ROW_TAU=True, HAS_ENTROPY_GRAD=True, WANT_DX=True, WANT_DW=True, WANT_DB=True,
          DOT_PRECISION="tf32")),
    ("linear_token_logprobs", "_linear_logprobs_bwd_kernel", "fp16",
     dict(_DOT, HAS_BIAS=False, PER_ROW_TAU=False, HAS_ENTROPY_GRAD=False, WANT_DX=True, WANT_DW=False,
          WANT_DB=False, DOT_PRECISION="tf32")),
    ("policy_loss_from_hidden", "_chunk_row_stats_kernel", "bf16", dict(PER_ROW_TAU=True, BLOCK_V=4096)),
    ("policy_loss_from_hidden", "_chunk_row_grad_kernel", "bf16",
     dict(PER_ROW_TAU=False, HAS_ENTROPY_GRAD=True, BLOCK_V=4096)),
]

_SCRIPT = textwrap.dedent(r"""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    variants, arch = json.loads(sys.argv[1]), int(sys.argv[2])
    # pointers in the input dtype; the rest of the pointers are fp32 outputs/statistics
    INPUT = {"hidden_ptr", "weight_ptr", "bias_ptr", "logits_ptr"}
    POINTERS = {"targets_ptr": "i64", "keep_ptr": "i8"}
    INTS = {"N", "V", "H", "rows_per_seq", "v_start", "v_stop"}
    report = []
    for module, name, dtype, constexprs in variants:
        kernel = getattr(importlib.import_module("lens_kernels.backends.triton." + module), name)
        sig = {}
        for arg in kernel.arg_names:
            if arg in constexprs:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = "*" + (dtype if arg in INPUT else POINTERS.get(arg, "fp32"))
            elif arg.startswith("stride"):
                sig[arg] = "i64"  # strides of big tensors exceed int32
            else:
                sig[arg] = "i32" if arg in INTS else "fp32"
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, "num_stages": 3})
        report.append([name, dtype, len(compiled.asm["cubin"])])
    print(json.dumps(report))
""")


@pytest.mark.parametrize("arch", [90, 80])
def test_hidden_kernels_compile_for_gpu_targets(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(VARIANTS), str(arch)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(name, dtype) for name, dtype, _ in report] == [(v[1], v[2]) for v in VARIANTS]
    assert all(cubin_bytes > 0 for _, _, cubin_bytes in report)
