"""Static check of every Triton kernel as a real launch compiles it, for sm_90 and sm_80, without a GPU.

The launchers themselves run (on CPU tensors of the real shapes, in a subprocess without
TRITON_INTERPRET) with each kernel's ``run`` replaced by a recorder, so that what is compiled has
exactly the launch's constexprs, num_warps / num_stages and the JIT's specialization of every
argument (16-divisibility of pointers and integers, integers equal to 1 as constants), built with
triton's own binder and ``_pack_args`` as ``JITFunction.run`` does. Each distinct specialization is
compiled once per architecture (V = 151936 and 128256 specialize alike; 50257 does not).

The hidden path is launched as its callers launch it: each feature set (plain; a bias, with its
gradient; a bias with per-row temperatures) at row counts where the launcher's own
split heuristic (``vocab_splits_for``, on an H100's and an A100's SM count) picks one slice, a few and
the most, so the merge is compiled at the split counts it really gets (148 at V = 151936, 256 with the
fp32 "ieee" tiles).

From each compiled artifact the test asserts the design's promises, each failure naming the promise:

- registers and spills (ptxas -v, as triton runs it): no spill in any kernel (fp32 hidden-path dots
  included: their exact "ieee" path takes small tiles and a 128-register cap for that); the
  one-program-per-row kernels within ``ROW_REG_BUDGET`` (4 programs of 8 warps per SM); the split
  variant within ``SPLIT_REG_BUDGET`` registers (the cap its launch passes to ptxas, and what its
  residency check assumes before a launch reports the real count); the hidden-path dot kernels within
  255 registers for bf16, fp16 and fp32 (both the TF32 and the exact "ieee" operand path, each chosen
  through torch's fp32 matmul setting as a user chooses it), the tensor-core lean forward at sm_90
  within ``FWD_SM90_REG_BUDGET`` of the running Triton version (ptxas differs by version; the
  launcher's split heuristic reads the compiled kernel's count instead of assuming it), and the
  split's merge within ``REG_BUDGET``;
- the merge of the split lean forward in one pass: one loop over bounded chunks of slices;
- 128-bit global loads (and stores where a gradient row is written) at every V, 50257 included: the
  sweeps are peeled at each row's first 16-byte boundary (``_common`` module doc);
- the number of loops that read the row: forward 1, ``row`` variant 2, backward 1, ``split`` no loop
  and one block load;
- no bar.sync inside a loop over the vocabulary: the row statistics are kept per lane and merged
  once after the sweep (the split variant's only loop is its spin-wait, which reads no row);
- int64 offsets: no int32 multiply of a kernel argument (a stride or a size) anywhere;
- shared memory within the architecture's limit.

Runs under the Triton versions in ``CHECKED_TRITON`` (any failure fails; another version skips with the
reason): CI's own, and the GPU image's through ``bash .ci/triton_compile_check.sh 3.6.0``. Time on a
shared 2-core machine: see benchmarks/NOTES.md.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCABS = (151936, 128256, 50257)
HIDDEN = (2048, 4096)
DTYPES = ("bfloat16", "float16", "float32")
ARCHS = (90, 80)
SMEM_LIMIT = {90: 232448, 80: 166912}  # opt-in shared memory per block (bytes)
# == policy_loss.split_reg_budget (checked below): 2 programs per SM for 16-bit rows (any V), 1 for fp32
SPLIT_REG_BUDGET = {"bfloat16": 128, "float16": 128, "float32": 255}
# one-program-per-row kernels at 8 warps: <= 64 registers keeps 4 programs (32 warps) per SM
ROW_REG_BUDGET = 64
# loops whose body loads a block of a logits row, per row kernel ("split": none, one block load)
ROW_LOOPS = {
    "_token_logprobs_fwd_kernel": 1, "_token_logprobs_bwd_kernel": 1, "_policy_loss_row_kernel": 2,
    "_policy_loss_split_kernel": 0, "_rescale_grad_kernel": 1, "_vocab_shard_partials_kernel": 1,
    "_vocab_shard_grad_kernel": 1, "_chunk_row_stats_kernel": 1, "_chunk_row_grad_kernel": 1,
}
# kernels that write a gradient row (128-bit stores promised)
GRAD_WRITERS = {"_token_logprobs_bwd_kernel", "_policy_loss_row_kernel", "_policy_loss_split_kernel",
                "_rescale_grad_kernel", "_vocab_shard_grad_kernel", "_chunk_row_grad_kernel"}
DOT_KERNELS = {"_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"}
MERGE_KERNEL = "_linear_logprobs_merge_kernel"
# registers: the dot kernels within the hardware's 255 and without a spill (fp32 included: its "ieee"
# path takes small tiles for that); the merge of the split forward is a handful of loads and sums
REG_BUDGET = {MERGE_KERNEL: 64}
# The hidden path as launched: each feature set, at row counts where the launcher's split heuristic picks
# 1 slice (65536 rows), a few (4096) and the most (64: 148 slices at V = 151936, 256 for fp32 "ieee"),
# on an H100's and an A100's SM count
LEAN_FEATURES = ("plain", "bias", "tau")  # tau: a bias and a temperature per row
LEAN_ROWS = (64, 4096, 65536)
SM_COUNTS = (132, 108)
# The lean forward's registers at sm_90 with aligned rows (not "ieee"), per Triton version and feature set:
# ptxas differs by version, so the figures do too. The split heuristic does not rely on them (it reads
# the compiled kernel's count at the first launch); they catch a regression. Measured over dtypes and
# split / unsplit, then the budget (a few registers of margin): 3.9 plain 127-128 (2 programs of 256
# threads per SM: the budget stays at 128), bias 128-152, tau 128-168; 3.6 plain 152-160, bias
# 150-156, tau 150-156.
FWD_SM90_REG_BUDGET = {
    "3.9": {"plain": 128, "bias": 160, "tau": 176},
    "3.6": {"plain": 168, "bias": 168, "tau": 168},
}
# the merge's one pass: one loop over chunks of slices (4 block loads of partials in it), and one block
# load each of keep and targets outside it
MERGE_BLOCK_LOADS = 2
# Triton versions whose JIT internals this check drives (3.9: the machine's and CI's; 3.6: the GPU
# image's, `bash .ci/triton_compile_check.sh 3.6.0`): any failure there fails. Others skip.
CHECKED_TRITON = ("3.9", "3.6")


def _triton_minor(version):
    return ".".join(version.split(".")[:2])


# ---------------------------------------------------------------------------------------------
# Subprocess side: run the launchers, record their launches, compile each distinct one
# ---------------------------------------------------------------------------------------------
class _fp32_matmul:
    """Sets torch's fp32 matmul precision ("ieee" / "tf32") for the block, restoring it after (no-op for None)."""

    def __init__(self, setting):
        self.setting = setting

    def __enter__(self):
        import torch
        matmul = torch.backends.cuda.matmul
        self.saved = getattr(matmul, "fp32_precision", None)
        if self.setting is not None:
            if self.saved is None:  # torch < 2.9: the legacy flag
                self.saved = matmul.allow_tf32
                matmul.allow_tf32 = self.setting == "tf32"
            else:
                matmul.fp32_precision = self.setting

    def __exit__(self, *exc):
        import torch
        matmul = torch.backends.cuda.matmul
        if self.setting is not None:
            if isinstance(self.saved, bool):
                matmul.allow_tf32 = self.saved
            else:
                matmul.fp32_precision = self.saved


def _record_launches():
    """[(kernel, args, kwargs, tags)] of every launch the launchers make at the real shapes."""
    import torch
    import triton  # noqa: F401

    from lens_kernels import LossConfig
    from lens_kernels.loss import policy_loss_from_logits_op

    # the package re-exports functions under the modules' names: fetch the modules themselves
    lin, pl, plh, tlp, vs, common = (importlib.import_module("lens_kernels.backends.triton." + name) for name in (
        "linear_token_logprobs", "policy_loss", "policy_loss_from_hidden", "token_logprobs", "vocab_shard",
        "_common"))

    kernels = [tlp._token_logprobs_fwd_kernel, tlp._token_logprobs_bwd_kernel, pl._policy_loss_row_kernel,
               pl._policy_loss_split_kernel, pl._rescale_grad_kernel, vs._vocab_shard_partials_kernel,
               vs._vocab_shard_grad_kernel, plh._chunk_row_stats_kernel, plh._chunk_row_grad_kernel,
               lin._linear_logprobs_fwd_kernel, lin._linear_logprobs_merge_kernel, lin._linear_logprobs_bwd_kernel]
    launches, tags = [], {}

    class Stop(Exception):
        pass

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launch_tags = dict(tags)
            if "SPLIT" in kwargs:  # the lean forward: unsplit, or one vocabulary slice of a split
                launch_tags["variant"] = (tags["variant"] + (" split" if kwargs["SPLIT"] else " unsplit")).strip()
                launch_tags["splits"] = grid[1]
            if kernel is lin._linear_logprobs_merge_kernel:
                launch_tags["splits"] = args[9]  # N, V, splits: the split count the heuristic picked
            launches.append((kernel, args, kwargs, launch_tags))
            if kernel is lin._linear_logprobs_bwd_kernel:
                raise Stop  # one vocabulary slab is the whole story; the rest would touch GBs of dW
            return None
        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)
    # the hidden path's GPU tiles, not the interpreter's (chosen by device type); a smaller dW slab
    # (only the grid and the runtime v_stop change, with the same specialization) spares zeroing 256 MiB
    cpu_tiles, cpu_bwd_tiles = lin.tile_config, lin.backward_tile_config
    lin.tile_config = lambda device, dtype, precision: cpu_tiles(torch.device("cuda"), dtype, precision)
    lin.backward_tile_config = lambda device, dtype, precision: cpu_bwd_tiles(torch.device("cuda"), dtype, precision)
    lin.DW_SLAB_ROWS = 256
    # the split count as the launcher picks it on a GPU (the SM count is set per case below)
    splits_for = lin.vocab_splits_for
    lin.vocab_splits_for = lambda n, vocab, device, block_n, block_v: splits_for(
        n, vocab, torch.device("cuda", 0), block_n, block_v)

    g = torch.Generator().manual_seed(0)
    B, T = 1, 16
    full = LossConfig(epsilon_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0, beta=0.001, kl_clamp=10.0,
                      entropy_coef=0.001)
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for V in VOCABS:
            tags.update(dtype=dtype_name, V=V, H=0, variant="", features="", splits=0)
            base = torch.empty(B, T + 1, V, dtype=dtype)
            view = base[:, :-1]  # the usual strided slice
            targets = torch.randint(0, V, (B, T), generator=g)
            mask = torch.ones(B, T, dtype=torch.bool)
            adv = torch.randn(B, generator=g)
            old = -torch.rand(B, T, generator=g)
            logp, entropy, stats, row_inputs = tlp.token_logprobs_forward(view, targets, mask, 1.0)
            grad = common.empty_grad_like(view)  # as the autograd Functions allocate it
            tlp.token_logprobs_backward(view, grad, row_inputs, stats, entropy, logp, entropy)
            # every switch on (the most code), and the default config (the most common launch; bf16 only:
            # it differs from the full one in constexprs, not in how a dtype is loaded)
            for cfg in (full, LossConfig()) if dtype_name == "bfloat16" else (full,):
                for variant in ("row", "split"):
                    pl.fused_policy_loss_forward(view, grad, targets, mask, adv, old, old, None, 1.0, cfg,
                                                 None, None, 1.0, variant=variant)
            z = base.clone().requires_grad_(True)
            loss, _ = policy_loss_from_logits_op(z[:, :-1], targets, mask, adv, old, None, None, 1.0, LossConfig(),
                                                 None, None, 1.0, True, "triton")
            loss.backward(torch.tensor(0.5))  # a grad_output != grad_scale: the rescale kernel
            n = B * T
            vs.vocab_shard_partials(view, targets)
            vs.vocab_shard_grad(view, targets, 1.0, logp, entropy, logp, entropy, logp)
            chunk = torch.empty(n, V, dtype=dtype)
            plh.triton_chunk_step(chunk, targets.reshape(n), 1.0, lambda lp, ent: (lp, ent))
            for H in HIDDEN:
                for setting in ("ieee", "tf32") if dtype_name == "float32" else (None,):
                    with _fp32_matmul(setting):
                        _record_lean_launches(lin, dtype, V, H, setting, tags, g, Stop)
            tags.update(variant="", features="", splits=0)
    return launches, [[name, pl.split_reg_budget(getattr(torch, name))] for name in DTYPES]


def _record_lean_launches(lin, dtype, V, H, setting, tags, g, Stop):
    """The hidden path as its callers launch it: every feature set (plain; a bias, with its gradient;
    a bias with per-row temperatures), at row counts where the launcher's own
    heuristic (``vocab_splits_for`` on each SM count of SM_COUNTS) picks one slice, a few, and the most
    (which sizes the merge), and the backward once per feature set (it does not depend on N)."""
    import torch

    precision = lin.dot_precision(dtype)
    for features in LEAN_FEATURES if V == VOCABS[0] else LEAN_FEATURES[:1]:
        bias = torch.empty(V, dtype=dtype) if features != "plain" else None
        for sms in SM_COUNTS:
            lin._sm_count = lambda index, sms=sms: sms
            for n in LEAN_ROWS:
                hidden = torch.empty(n, H, dtype=dtype)
                weight = torch.empty(V, H, dtype=dtype)
                targets = torch.randint(0, V, (n,), generator=g)
                keep = torch.ones(n, dtype=torch.int8)
                tags.update(H=H, variant=precision if setting else "", features=features)
                if features == "tau":  # a [B, T] temperature tensor (the backward is the same kernel)
                    tau_rows = torch.ones(n, dtype=torch.float32)
                    lin.linear_logprobs_forward(hidden, weight, bias, targets, keep, 1.0, tau_rows)
                    continue
                lp, ent, m_i, log_l = lin.linear_logprobs_forward(hidden, weight, bias, targets, keep, 1.0, None)
                if n == LEAN_ROWS[0] and sms == SM_COUNTS[0]:
                    try:
                        lin.linear_logprobs_backward(hidden, weight, bias, targets, 1.0, None, m_i, log_l, ent, lp,
                                                     ent, True, True, bias is not None, precision)
                    except Stop:
                        pass


def _bind(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` builds them."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


_LOAD_V4 = re.compile(r"\bld\.global(\.[\w:]+)*\.v4\.(b32|f32|u32)")
_STORE_V4 = re.compile(r"\bst\.global(\.[\w:]+)*\.v4\.(b32|f32|u32)")


def _row_loops(ttir):
    """(loops of the kernel whose body loads a block (tensor) of values, tensor loads outside loops)."""
    lines = ttir.splitlines()
    loops, block_loads = 0, 0
    in_loop_until = []
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        while in_loop_until and indent <= in_loop_until[-1] and line.strip().startswith("}"):
            in_loop_until.pop()
            break
        if re.search(r"\bscf\.for\b", line):
            body = []
            for later in lines[i + 1:]:
                later_indent = len(later) - len(later.lstrip())
                if later_indent <= indent and later.strip().startswith("}"):
                    break
                body.append(later)
            if any(re.search(r"tt\.load .*: tensor<", b) for b in body):
                loops += 1
            in_loop_until.append(indent)
        elif not in_loop_until and re.search(r"tt\.load .*: tensor<", line):
            block_loads += 1
    return loops, block_loads


def _ptx_loops(ptx):
    """[(bar.sync count, ex2 count, lines, reads or writes a row)] of each PTX loop: the span from a
    label to the last branch back to it (a loop's back edge; Triton emits structured loops, so spans
    nest or are disjoint). A loop touches a row when it holds a plain global load or store (the
    split variant's spin-wait holds only an acquire load)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [re.match(r"\s*(\$L__\w+):", line)] if m}
    back_edges = {}
    for j, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), j) < j:
            back_edges[m.group(1)] = j
    loops = []
    for label, end in back_edges.items():
        body = lines[labels[label]:end + 1]
        loops.append((sum(bool(re.search(r"\b(bar|barrier)\.sync\b", b)) for b in body),
                      sum("ex2.approx" in b for b in body), len(body),
                      any(re.search(r"\b(ld|st)\.global\b", b) and not re.search(r"acquire|release|volatile", b)
                          for b in body)))
    return loops


def _i32_arg_products(ttir):
    """Lines with an int32 multiply that has a kernel argument (through splat/broadcast) as operand."""
    defs, args = {}, set()
    for line in ttir.splitlines():
        if "tt.func" in line:  # arguments are named (%stride_wv: i32) or numbered (%arg3: i32)
            args.update(re.findall(r"(%[\w#]+): ", line))
        m = re.match(r"\s*(%[\w#]+) = (\S+) (.*)", line)
        if m:
            defs[m.group(1)] = (m.group(2), m.group(3))

    def from_arg(name, depth=0):
        if name in args:
            return True
        op = defs.get(name)
        if op is None or depth > 8 or op[0] not in ("tt.splat", "tt.broadcast", "tt.expand_dims"):
            return False
        src = re.match(r"(%[\w#]+)", op[1])
        return bool(src) and from_arg(src.group(1), depth + 1)

    bad = []
    for line in ttir.splitlines():
        m = re.match(r"\s*%[\w#]+ = arith\.muli (%[\w#]+), (%[\w#]+).*: (.*)", line)
        if m and re.search(r"(^|[x\s])i32\b", m.group(3)) and (from_arg(m.group(1)) or from_arg(m.group(2))):
            bad.append(line.strip()[:160])
    return bad


def _ptxas_figures(log):
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return (max(regs) if regs else -1), (max(spills) if spills else -1)


def _compile_worker(jobs):
    """Compiles [(module, kernel name, tags, arch, signature, constexprs, attrs, options)]; report rows."""
    import contextlib
    import importlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # triton runs ptxas -v; its log is printed, and captured here
    rows = []
    for module, name, tags, arch, signature, constexprs, attrs, options in jobs:
        kernel = getattr(importlib.import_module(module), name)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        regs, spills = _ptxas_figures(log.getvalue())
        ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
        loops, block_loads = _row_loops(ttir)
        ptx_loops = _ptx_loops(ptx)
        rows.append(dict(
            kernel=name, arch=arch, **tags, num_warps=options.num_warps, regs=regs, spills=spills,
            triton=triton.__version__,
            smem=compiled.metadata.shared, v4_loads=len(_LOAD_V4.findall(ptx)), v4_stores=len(_STORE_V4.findall(ptx)),
            row_loops=loops, block_loads=block_loads, i32_arg_products=_i32_arg_products(ttir),
            row_loop_barriers=max((bars for bars, _, _, row in ptx_loops if row), default=0),
            loop_ex2=[ex2 for _, ex2, _, _ in ptx_loops], loop_lines=[n for _, _, n, _ in ptx_loops],
        ))
    return rows


def _main():
    import triton

    try:
        print(json.dumps(_check_all()))
    except Exception as exc:  # noqa: BLE001
        if _triton_minor(triton.__version__) in CHECKED_TRITON:
            raise  # a version this check knows: any failure is a finding
        # another triton: its JIT internals (binder, _pack_args, knobs) may differ; say so and skip
        print(json.dumps(dict(skip=f"triton {triton.__version__}: {type(exc).__name__}: {exc}"[:300])))


def _check_all():
    import multiprocessing

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    launches, split_budget = _record_launches()
    jobs, seen = [], set()
    for arch in ARCHS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for kernel, args, kwargs, tags in launches:
            signature, constexprs, attrs, options = _bind(kernel, args, kwargs, backend)
            key = (arch, kernel.fn.__name__, str(signature), str(sorted(constexprs.items())),
                   str(sorted(attrs.items())), str(options))
            if key not in seen:
                seen.add(key)
                jobs.append((kernel.fn.__module__, kernel.fn.__name__, tags, arch, signature, constexprs, attrs,
                             options))
    # the heavy dot kernels first, dealt alternately to the two workers
    jobs.sort(key=lambda job: (job[1] not in DOT_KERNELS, job[2]["dtype"] != "float32"))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        rows = [row for part in pool.map(_compile_worker, [jobs[0::2], jobs[1::2]]) for row in part]
    import triton

    return dict(rows=rows, launches=len(launches), split_budget=split_budget, triton=triton.__version__)


# ---------------------------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run (and report) for every variant
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip("a triton version this check does not drive: " + report["skip"])
    return report


def _rows(report, kernel=None):
    return [r for r in report["rows"] if kernel is None or r["kernel"] == kernel]


def _where(r):
    extra = [r["variant"]] if r.get("variant") else []
    if r.get("features") not in (None, "", "plain"):
        extra.append(r["features"])
    if r.get("splits"):
        extra.append(f"{r['splits']} slices")
    return f"{r['kernel']} sm_{r['arch']} {r['dtype']} V={r['V']}" + (f" H={r['H']}" if r["H"] else "") + \
        (f" ({', '.join(extra)})" if extra else "") + f" [triton {r['triton']}]"


def test_every_kernel_and_specialization_was_compiled(report):
    names = {r["kernel"] for r in report["rows"]}
    expected = set(ROW_LOOPS) | DOT_KERNELS | {MERGE_KERNEL}
    assert names == expected, f"kernels never launched by a launcher: {expected - names}"
    assert dict(report["split_budget"]) == SPLIT_REG_BUDGET, \
        "policy_loss.split_reg_budget and this check disagree"
    for r in report["rows"]:
        assert r["regs"] > 0 and r["spills"] >= 0, f"{_where(r)}: no ptxas -v figures"
    forward = {(r["dtype"], r["variant"], r["features"]) for r in _rows(report, "_linear_logprobs_fwd_kernel")}
    paths = [(d, "") for d in ("bfloat16", "float16")] + [("float32", p + " ") for p in ("ieee", "tf32")]
    want = {(d, (p + v).strip(), f) for d, p in paths for v in ("split", "unsplit") for f in LEAN_FEATURES}
    assert forward == want, f"lean forward variants never compiled: {want - forward}"
    backward = {(r["dtype"], r["variant"], r["features"]) for r in _rows(report, "_linear_logprobs_bwd_kernel")}
    want = {(d, p.strip(), f) for d, p in paths for f in ("plain", "bias")}
    assert backward == want, f"lean backward variants never compiled: {want - backward}"
    # the merge at the split counts the heuristic picks for a single row block (148 slices at V = 151936,
    # 256 for fp32 "ieee" tiles) and for a few
    splits = {r["splits"] for r in _rows(report, MERGE_KERNEL)}
    assert {148, 256} <= splits and min(splits) < 16, f"merge compiled at {sorted(splits)} slices only"


ALL_KERNELS = sorted(ROW_LOOPS) + sorted(DOT_KERNELS) + [MERGE_KERNEL]


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_registers_and_spills_within_budget(report, kernel):
    fwd_budget = FWD_SM90_REG_BUDGET.get(_triton_minor(report["triton"]))
    for r in _rows(report, kernel):
        budget = REG_BUDGET.get(kernel, 255)
        assert r["regs"] <= budget, f"promise broken: {kernel} within {budget} registers; {_where(r)} uses {r['regs']}"
        if kernel == "_linear_logprobs_fwd_kernel" and r["arch"] == 90 and r["V"] % 8 == 0 and \
                "ieee" not in r["variant"] and fwd_budget is not None:
            assert r["regs"] <= fwd_budget[r["features"]], \
                f"regression: lean forward ({r['features']}) within {fwd_budget[r['features']]} registers under " \
                f"this triton; {_where(r)} uses {r['regs']}"
        if kernel == "_policy_loss_split_kernel":
            budget = SPLIT_REG_BUDGET[r["dtype"]]
            assert r["regs"] <= budget, \
                f"promise broken: split variant within {budget} registers (its residency check), " \
                f"{_where(r)} uses {r['regs']}"
        elif kernel in ROW_LOOPS:
            assert r["regs"] <= ROW_REG_BUDGET, \
                f"promise broken: a row kernel within {ROW_REG_BUDGET} registers (4 programs per SM), " \
                f"{_where(r)} uses {r['regs']}"
        assert r["spills"] == 0, f"promise broken: no spill; {_where(r)} spills " \
                                 f"{r['spills']} bytes ({r['regs']} registers)"


def test_merge_of_the_split_forward_is_one_pass(report):
    for r in _rows(report, MERGE_KERNEL):
        assert r["row_loops"] == 1 and r["block_loads"] == MERGE_BLOCK_LOADS, \
            f"promise broken: the merge reads its partials in one pass (one loop over chunks of slices, " \
            f"{MERGE_BLOCK_LOADS} block loads outside it); {_where(r)} has {r['row_loops']} loop(s) reading " \
            f"partials and {r['block_loads']} block loads outside"


@pytest.mark.parametrize("kernel", sorted(ROW_LOOPS))
def test_128_bit_row_accesses_at_every_vocabulary_size(report, kernel):
    for r in _rows(report, kernel):
        assert r["v4_loads"] > 0, \
            f"promise broken: 128-bit global loads of a row (peeled sweep); {_where(r)} has none"
        if kernel in GRAD_WRITERS:
            assert r["v4_stores"] > 0, f"promise broken: 128-bit stores of the gradient row; {_where(r)} has none"


@pytest.mark.parametrize("kernel", sorted(ROW_LOOPS))
def test_number_of_loops_reading_the_row(report, kernel):
    for r in _rows(report, kernel):
        assert r["row_loops"] == ROW_LOOPS[kernel], \
            f"promise broken: {ROW_LOOPS[kernel]} loop(s) reading the row; {_where(r)} has {r['row_loops']}"
        if kernel == "_policy_loss_split_kernel":
            assert r["block_loads"] >= 1, f"{_where(r)}: the split variant's one block load is missing"


@pytest.mark.parametrize("kernel", sorted(ROW_LOOPS))
def test_no_barrier_inside_a_vocabulary_loop(report, kernel):
    for r in _rows(report, kernel):
        assert r["row_loop_barriers"] == 0, \
            f"promise broken: no bar.sync in a loop over the row (per-lane statistics); {_where(r)} has " \
            f"{r['row_loop_barriers']}"


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_offsets_are_int64(report, kernel):
    for r in _rows(report, kernel):
        assert not r["i32_arg_products"], \
            f"promise broken: int64 offsets; {_where(r)} multiplies a kernel argument in int32: " \
            f"{r['i32_arg_products'][:2]}"


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_shared_memory_within_the_limit(report, kernel):
    for r in _rows(report, kernel):
        assert r["smem"] <= SMEM_LIMIT[r["arch"]], \
            f"promise broken: shared memory within sm_{r['arch']}'s {SMEM_LIMIT[r['arch']]} B; {_where(r)} " \
            f"uses {r['smem']} B"


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _main()
