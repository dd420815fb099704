"""policy_loss_from_logits on CPU never materializes more than one chunk of [rows, V] beyond its inputs.

Measured as the growth of the process's peak resident memory (VmHWM, reset once the inputs exist) over
its resident memory then, in a fresh subprocess, at
[B=4, T=256, V=50000] fp32 (205 MB of logits): an unchunked fp32 log_softmax alone would add 205 MB.
glibc is told to serve every large buffer by mmap, so that a freed buffer leaves the resident set at
once and the peak measures the live bytes, not the allocator's caching.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    import lens_kernels as lk
    from lens_kernels.backends.torch import _common
    _common.CHUNK_BYTES = int(sys.argv[1])

    def status(field):  # bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def reset_peak():
        # the peak resident set (VmHWM) is reset to the current one, which is returned: growth is then
        # measured over the live bytes, not over an earlier, higher peak
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return status("VmRSS"), True
        except OSError:  # no reset: the process's peak so far (growth may then be under-counted)
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False

    def peak():
        return status("VmHWM")

    B, T, V = 4, 256, 50000
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.9
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g)
    # warm up every code path on a small slice, so one-time allocations are not counted
    small = torch.randn(1, 4, V, generator=g, requires_grad=True)
    lk.policy_loss_from_logits(small, targets[:1, :4], mask[:1, :4], adv[:1], old_logps=old[:1, :4])[0].backward()
    weight = torch.randn(B, T, V, generator=g, requires_grad=True)
    logits = weight.view(B, T, V)  # a non-leaf, as a model's logits are: in place may overwrite it
    inplace = sys.argv[2] == "1"
    before, exact = reset_peak()
    loss, metrics = lk.policy_loss_from_logits(logits, targets, mask, adv, old_logps=old, inplace=inplace)
    after_forward = peak()
    loss.backward()
    after_backward = peak()
    print(json.dumps({"forward": after_forward - before, "backward": after_backward - before,
                      "loss": float(loss.detach()), "exact": exact}))
""")


@pytest.mark.parametrize("chunk_mib,inplace", [(8, True), (32, True), (8, False)])
def test_policy_loss_from_logits_memory_is_one_chunk(chunk_mib, inplace):
    """In place: one chunk above the inputs. Out of place, the gradient (an output, computed in
    forward for token-level ratios) is added, and nothing else."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(chunk_mib << 20), "1" if inplace else "0"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    chunk = chunk_mib << 20
    slack = 2 << 20  # [B, T] side tensors, page rounding
    grad = 0 if inplace else 4 * 256 * 50000 * 4  # the fp32 gradient of the [4, 256, 50000] logits
    assert result["forward"] <= grad + chunk + slack, result
    # backward only hands the gradient over (in place, it is the logits buffer itself)
    assert result["backward"] <= grad + chunk + slack, result
    if not inplace and result["exact"]:  # the gradient is really there (the bound is not vacuous)
        assert result["forward"] >= grad, result
    assert result["loss"] == result["loss"]  # not NaN
