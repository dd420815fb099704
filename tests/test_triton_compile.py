"""Every Triton kernel variant that matters compiles for sm_90 and sm_80 without a GPU.

The compile runs in a subprocess without TRITON_INTERPRET: the interpreter tests of this suite set it
for the whole pytest process, and interpreted kernels cannot be compiled.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

# no import of triton in this process: the interpreter tests set TRITON_INTERPRET for the process,
# which triton reads once, at its own import
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# (module, kernel, logits dtype, constexprs): the switches each op launches with most often, plus the
# ones that change the code the most (entropy gradient, per-row temperature, KL, dual clip, CISPO, SAPO).
_PPO_ALL = dict(POLICY_LOSS=0, HAS_DELTA=True, HAS_DUAL_CLIP=True, HAS_LOG_RATIO_CLAMP=True, HAS_OLD=True,
                HAS_IS=True, HAS_KL=True, KL_ESTIMATOR=3, HAS_KL_CLAMP=True, HAS_ENTROPY_BONUS=True,
                PER_ROW_TAU=False, WRITE_GRAD=True)
_CISPO = dict(_PPO_ALL, POLICY_LOSS=1, HAS_DELTA=False, HAS_DUAL_CLIP=False, KL_ESTIMATOR=2, PER_ROW_TAU=True)
_SAPO = dict(_PPO_ALL, POLICY_LOSS=2, HAS_DUAL_CLIP=False, HAS_KL=False, HAS_ENTROPY_BONUS=False, HAS_OLD=False)
VARIANTS = [
    ("token_logprobs", "_token_logprobs_fwd_kernel", "bf16", dict(PER_ROW_TAU=False, SEQ_SUM=True, BLOCK_V=4096)),
    ("token_logprobs", "_token_logprobs_bwd_kernel", "bf16", dict(PER_ROW_TAU=True, HAS_ENTROPY_GRAD=True,
                                                                  BLOCK_V=4096)),
    ("policy_loss", "_policy_loss_row_kernel", "bf16", dict(_PPO_ALL, BLOCK_V=4096)),
    ("policy_loss", "_policy_loss_row_kernel", "fp32", dict(_CISPO, BLOCK_V=2048)),
    ("policy_loss", "_policy_loss_split_kernel", "bf16", dict(_PPO_ALL, BLOCK_V=8192, BLOCKS_POW2=32)),
    ("policy_loss", "_policy_loss_split_kernel", "fp16", dict(_SAPO, BLOCK_V=8192, BLOCKS_POW2=64)),
    ("policy_loss", "_rescale_grad_kernel", "bf16", dict(BLOCK_V=4096)),
    ("vocab_shard", "_vocab_shard_partials_kernel", "bf16", dict(PER_ROW_TAU=True, BLOCK_V=4096)),
    ("vocab_shard", "_vocab_shard_grad_kernel", "bf16", dict(PER_ROW_TAU=False, HAS_ENTROPY_GRAD=True,
                                                             BLOCK_V=4096)),
]

_SCRIPT = textwrap.dedent(r"""
    import importlib, json, sys, time
    import triton
    from triton.backends.compiler import GPUTarget
    variants, archs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    FLOATS = {"tau", "grad_scale", "clip_low", "clip_high", "delta", "dual_clip", "cispo_cap", "sapo_temp_pos",
              "sapo_temp_neg", "log_ratio_clamp", "beta", "kl_clamp", "entropy_coef"}
    POINTERS = {"logits_ptr": None, "grad_ptr": None, "targets_ptr": "i32", "keep_ptr": "i8", "arrivals_ptr": "i32"}

    def signature(kernel, dtype, constexprs):
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (POINTERS.get(name, "fp32") or dtype)
            elif name in FLOATS:
                sig[name] = "fp32"
            else:  # shapes and strides; strides of big tensors exceed int32
                sig[name] = "i64" if name.startswith(("stride", "grad_stride")) else "i32"
        return sig

    report = []
    for module, name, dtype, constexprs in variants:
        kernel = getattr(importlib.import_module("lens_kernels.backends.triton." + module), name)
        src = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs),
                                        constexprs=constexprs)
        for arch in archs:
            start = time.time()
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": 8})
            report.append([name, dtype, arch, len(compiled.asm["cubin"]), round(time.time() - start, 2)])
    print(json.dumps(report))
""")


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_for_gpu_targets(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(VARIANTS), json.dumps([arch])],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == len(VARIANTS)
    for name, dtype, got_arch, cubin_bytes, _ in report:
        assert got_arch == arch and cubin_bytes > 0, (name, dtype)
