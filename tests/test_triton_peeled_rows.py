"""Peeled row sweeps against the float64 reference, under the interpreter on CPU.

Every logits sweep splits a row into a head (elements before the row's first 16-byte boundary), an
aligned body of whole vectors, and a tail, and keeps the row statistics per lane. Here rows start at
every residue modulo 8 elements: ``base[:, :-1]`` views of odd V (row t at t * V), over a storage
whose base pointer is itself unaligned (``phase`` elements in). The logits hold -inf in the head,
the body and the tail, an all -inf head, and a whole -inf body tile; targets sit in the head and in
the tail; masked rows hold NaN garbage. Values and gradients (separate and in place) of
token_logprobs, the fused policy loss (``row``, and ``split`` with one block per row, the most the
interpreter can run without its spin-wait deadlocking) and the vocabulary-shard ops are compared
with float64, and nothing outside the rows may be written.
"""
from triton_interp import DEVICE, assert_close_scaled  # noqa: I001  (sets TRITON_INTERPRET first)

import importlib

import pytest
import torch
import triton
import triton.language as tl

from lens_kernels import LossConfig, reference
from lens_kernels.backends.torch import loss_terms
from seeds import stable_seed
import backend_calls as calls  # noqa: E402

common = importlib.import_module("lens_kernels.backends.triton._common")
tlp = importlib.import_module("lens_kernels.backends.triton.token_logprobs")
pl = importlib.import_module("lens_kernels.backends.triton.policy_loss")
vs = importlib.import_module("lens_kernels.backends.triton.vocab_shard")

NEG_INF = float("-inf")
T = 9  # rows t * V for t = 0..8 start at every residue mod 8 when V is odd
VOCABS = (1001, 4097, 8191)  # one block, a block + 1, just under the split block (8192): one split block
PHASES = (0, 3)  # elements between the storage's (aligned) start and the tensor's first element
DTYPES = (torch.float32, torch.bfloat16)
# tolerances as in test_triton_token_logprobs.py (measured there, with margin): values are fp32 from
# the same input values as the reference; dL/dz is rounded to the logits dtype
VALUE_REL = 2e-5
GRAD_REL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
SENTINEL = 7.0  # what the storage holds before and after the tensor


def _rows(V, dtype, phase, seed):
    """(storage, logits [2, T, V] view, targets, mask): rows of every 16-byte phase, special values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, T + 1, V, generator=g) * 3.0
    z[torch.rand(z.shape, generator=g) < 0.05] = NEG_INF  # scattered over head, body and tail
    z[0, 1, :8] = NEG_INF  # an all -inf head whatever the row's phase (the head is < 8 elements)
    z[0, 2, -8:] = NEG_INF  # an all -inf tail
    z[1, 3, 8:4104] = NEG_INF  # a whole body tile (4096 values) of -inf
    z[1, 4, 1:], z[1, 4, 0] = NEG_INF, 1.5  # one finite value, in the head
    z[1, 5, :-1], z[1, 5, -1] = NEG_INF, -0.5  # one finite value, in the tail
    targets = torch.randint(0, V, (2, T), generator=g)
    targets[0, :4] = torch.tensor([0, 3, V - 1, V - 5])  # heads and tails
    targets[1, 4], targets[1, 5] = 0, V - 1
    targets[0, 1] = 8  # the all -inf head's row: a finite target
    targets[0, 2] = V - 9
    rows = z[:, :-1]
    for b in range(2):  # targets on finite logits (a -inf target has its own test in test_triton_special_inputs)
        for t in range(T):
            if rows[b, t, targets[b, t]] == NEG_INF:
                targets[b, t] = int(torch.isfinite(rows[b, t]).nonzero()[0, 0])
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, 5] = mask[1, 7] = False
    z[0, 5] = z[1, 7] = float("nan")  # garbage under the mask
    storage = torch.full((phase + z.numel() + 8,), SENTINEL, dtype=dtype, device=DEVICE)
    base = storage[phase:phase + z.numel()].view(z.shape)
    base.copy_(z)
    logits = base[:, :-1]
    es = logits.element_size()
    phases = {(logits[b, t].data_ptr() // es) % (16 // es) for b in range(2) for t in range(T)}
    assert phases == set(range(16 // es)), f"the rows do not start at every phase: {sorted(phases)}"
    return storage, logits, targets.to(DEVICE), mask.to(DEVICE)


def _outside(storage, logits):
    """The storage elements that are not part of any row of ``logits`` (a 3-D view of ``storage``): the
    sentinels around the tensor and the row that ``[:, :-1]`` drops."""
    arange = lambda n: torch.arange(n, device=storage.device)  # noqa: E731
    index = (logits.storage_offset() + arange(logits.shape[0])[:, None, None] * logits.stride(0)
             + arange(logits.shape[1])[None, :, None] * logits.stride(1) + arange(logits.shape[2])[None, None, :])
    inside = torch.zeros(storage.numel(), dtype=torch.bool, device=storage.device)
    inside[index.reshape(-1)] = True
    return storage[~inside]


@triton.jit
def _peel_kernel(x_ptr, out_ptr, edge_ptr, stride, V, EDGE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head, body_len, edge, edge_mask = common.row_peel(x_ptr + row * stride, V, EDGE)
    tl.store(out_ptr + 2 * row, head)
    tl.store(out_ptr + 2 * row + 1, body_len)
    tl.store(edge_ptr + row * EDGE + tl.arange(0, EDGE), tl.where(edge_mask, edge, -1))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.int8), ids=str)
@pytest.mark.parametrize("V", (1, 3, 13, 1001))
def test_row_peel_splits_each_row_at_its_first_16_byte_boundary(V, dtype):
    """The head ends on a 16-byte boundary (or at V), the body is whole vectors, and head, body and
    tail cover the row exactly once, for rows of every phase (an odd row stride, base 1 element in)."""
    rows, vec = 17, 16 // torch.empty(0, dtype=dtype).element_size()
    stride = V | 1
    storage = torch.zeros(1 + rows * stride, dtype=dtype, device=DEVICE)
    x = storage[1:].as_strided((rows, V), (stride, 1))
    edge_lanes = 2 * vec
    out = torch.zeros(rows, 2, dtype=torch.int32, device=DEVICE)
    edges = torch.zeros(rows, edge_lanes, dtype=torch.int32, device=DEVICE)
    _peel_kernel[(rows,)](x, out, edges, stride, V, EDGE=edge_lanes)
    es = x.element_size()
    for r in range(rows):
        head, body_len = out[r].tolist()
        start = x[r].data_ptr()
        assert 0 <= head < vec and (head == V or (start + head * es) % 16 == 0), (r, head)
        assert body_len % vec == 0 and 0 <= V - head - body_len < vec, (r, head, body_len)
        covered = sorted(edges[r][edges[r] >= 0].tolist() + list(range(head, head + body_len)))
        assert covered == list(range(V)), f"row {r}: head {head}, body {body_len}, edge {edges[r].tolist()}"
    assert len({x[r].data_ptr() % 16 for r in range(rows)}) == vec, "rows of every phase"


def _reference(logits, targets, mask, g_logp, g_entropy):
    z = logits.detach().double().requires_grad_(True)
    logp, entropy = reference.token_logprobs(z, targets, 1.0, mask)
    ((logp * g_logp.double()).sum() + (entropy * g_entropy.double()).sum()).backward()
    return logp, entropy, z.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("inplace", [False, True], ids=["separate", "inplace"])
def test_token_logprobs_on_rows_of_every_phase(V, phase, dtype, inplace):
    seed = stable_seed("peeled-token", V, phase, str(dtype), inplace)
    storage, logits, targets, mask = _rows(V, dtype, phase, seed)
    outside = _outside(storage, logits).clone()
    g = torch.Generator().manual_seed(seed + 1)
    g_logp, g_entropy = torch.randn(2, T, generator=g).to(DEVICE), torch.randn(2, T, generator=g).to(DEVICE)
    want_logp, want_entropy, want_grad = _reference(logits, targets, mask, g_logp, g_entropy)

    x = logits.detach().requires_grad_(True)  # shares the storage: in place writes the rows themselves
    logp, entropy = calls.token_logprobs("triton", x, targets, mask, 1.0, True, inplace)
    assert_close_scaled(logp, want_logp, VALUE_REL / 10, "logp")
    assert_close_scaled(entropy, want_entropy, VALUE_REL, "entropy")
    ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
    got = logits if inplace else x.grad  # in place, the logits rows hold the gradient
    assert_close_scaled(got, want_grad, GRAD_REL[dtype], "dL/dz")
    assert (got[~mask] == 0).all(), "a masked row (NaN garbage) gets an exact-zero gradient"
    assert (got[want_grad == 0] == 0).all(), "a -inf logit gets a gradient of exactly 0"
    assert torch.equal(_outside(storage, logits), outside), "an element outside the rows was written"


@pytest.mark.parametrize("V", (13, 1001, 4097))
def test_a_nan_or_inf_anywhere_in_a_kept_row_makes_it_nan(V):
    """In the head, the body or the tail of rows of every phase: the lane that meets it (the edge tile
    seeds lanes, the body folds into them) carries NaN into the merge, as the block-wide update did."""
    storage, logits, targets, mask = _rows(V, torch.float32, 3, stable_seed("peeled-nan", V))
    mask = torch.ones_like(mask)
    logits[:, :, :] = torch.randn(logits.shape, generator=torch.Generator().manual_seed(V)).to(DEVICE)
    bad = {}
    vec = 16 // logits.element_size()
    for t in range(T):  # row (0, t): a NaN in its head, its body or its tail, by turns
        head = (-(logits[0, t].data_ptr() // logits.element_size())) % vec
        body = (V - head) // vec * vec
        part = ("head", "body", "tail")[t % 3]
        if part == "head" and head == 0 or part == "tail" and head + body == V:
            part = "body"
        bad[(0, t)] = part
        logits[0, t, {"head": head - 1, "body": head + body // 2, "tail": V - 1}[part]] = float("nan")
    assert set(bad.values()) == {"head", "body", "tail"}
    logits[1, 0, 0] = float("inf")
    logits[1, 1, V - 1] = float("inf")
    logp, entropy = calls.token_logprobs("triton", logits, targets, mask, 1.0, True)
    want_logp, want_entropy = reference.token_logprobs(logits, targets, 1.0, mask)
    for row in [(0, t) for t in range(T)] + [(1, 0), (1, 1)]:
        where = bad.get(row, "edge")
        assert torch.isnan(logp[row]) and torch.isnan(entropy[row]), f"row {row} (bad value in its {where})"
        assert torch.isnan(want_logp[row]) and torch.isnan(want_entropy[row])
    finite = torch.ones_like(mask)
    finite[0] = False
    finite[1, :2] = False
    assert_close_scaled(logp[finite], want_logp[finite], VALUE_REL / 10, "logp of the other rows")
    assert_close_scaled(entropy[finite], want_entropy[finite], VALUE_REL, "entropy of the other rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("variant,inplace", [("row", False), ("row", True), ("split", False), ("split", True)])
def test_policy_loss_on_rows_of_every_phase(V, phase, dtype, variant, inplace):
    seed = stable_seed("peeled-loss", V, phase, str(dtype), variant, inplace)
    storage, logits, targets, mask = _rows(V, dtype, phase, seed)
    outside = _outside(storage, logits).clone()
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(2, generator=g).to(DEVICE)
    old = (-torch.rand(2, T, generator=g) * 3).to(DEVICE)
    cfg = LossConfig(entropy_coef=0.01, epsilon_high=0.28, beta=0.01)
    z64 = logits.detach().double().requires_grad_(True)
    want_loss, want_metrics = reference.policy_loss_from_logits(z64, targets, mask, adv, old_logps=old,
                                                                ref_logps=old, config=cfg)
    want_loss.backward()

    grad = logits if inplace else common.empty_grad_like(logits)
    outputs = pl.fused_policy_loss_forward(logits, grad, targets, mask, adv, old, old, None, 1.0, cfg,
                                           None, None, 1.0, variant=variant)
    # the loss and metrics from the kernel's per-row log-probs and entropy, as the op takes them
    loss, metrics, _, _ = loss_terms(outputs[5].view(mask.shape), outputs[4].view(mask.shape), adv, mask, old, old,
                                     None, cfg, None, None)
    assert_close_scaled(loss, want_loss, VALUE_REL, "loss")
    assert_close_scaled(metrics[2], want_metrics["entropy"], VALUE_REL, "entropy metric")
    assert_close_scaled(grad, z64.grad, GRAD_REL[dtype], "dL/dz")
    assert (grad[~mask] == 0).all(), "a masked row (NaN garbage) gets an exact-zero gradient"
    assert torch.equal(_outside(storage, logits), outside), "an element outside the rows was written"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("V", (1001, 4097))
def test_vocab_shard_ops_on_rows_of_every_phase(V, phase, dtype):
    seed = stable_seed("peeled-shard", V, phase, str(dtype))
    storage, logits, targets, mask = _rows(V, dtype, phase, seed)
    keep = mask.reshape(-1)
    z = logits.double().reshape(-1, V)[keep]  # the shard ops have no mask: kept rows only
    shard, t = logits.reshape(-1, V)[keep], targets.reshape(-1)[keep]
    m_i, l_i, ey_i, target_shifted = vs.vocab_shard_partials(shard, t)
    m = z.max(-1).values
    e = torch.exp(z - m[:, None])
    assert torch.equal(m_i.double(), m), "the row max is exact"
    assert_close_scaled(l_i, e.sum(-1), VALUE_REL, "l_i")
    assert_close_scaled(ey_i, torch.where(e > 0, e * (z - m[:, None]), 0.0).sum(-1), VALUE_REL, "ey_i")
    assert_close_scaled(target_shifted, z.gather(-1, t[:, None].long())[:, 0] - m, VALUE_REL, "target_shifted")

    g = torch.Generator().manual_seed(seed + 1)
    g_logp, g_entropy = torch.randn(len(t), generator=g).to(DEVICE), torch.randn(len(t), generator=g).to(DEVICE)
    z64 = z.clone().requires_grad_(True)
    logp, entropy = reference.token_logprobs(z64, t)
    ((logp * g_logp.double()).sum() + (entropy * g_entropy.double()).sum()).backward()
    lse = torch.logsumexp(z, -1).float()
    grad = vs.vocab_shard_grad(shard, t, 1.0, lse, entropy.detach().float(), g_logp, g_entropy)
    assert_close_scaled(grad, z64.grad, GRAD_REL[dtype], "dL/dz of the shard")
    # in place, over the kept rows at their original phases
    inplace = common.empty_grad_like(shard).copy_(shard)
    assert common.same_row_phase(shard, inplace)
    vs.vocab_shard_grad(inplace, t, 1.0, lse, entropy.detach().float(), g_logp, g_entropy, inplace=True)
    assert_close_scaled(inplace, z64.grad, GRAD_REL[dtype], "in-place dL/dz of the shard")



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (1001, 4097))
def test_fast_hidden_chunk_kernels_on_rows_of_every_phase(V, dtype):
    """The fast hidden path's row kernels (``policy_loss_from_hidden``'s chunk step: statistics, then
    dL/dz over the chunk in place) on a contiguous [rows, odd V] chunk, whose rows start at every
    phase: the same peeled sweeps. Masked rows (NaN garbage, upstream gradient 0) become exact zeros."""
    plh = importlib.import_module("lens_kernels.backends.triton.policy_loss_from_hidden")
    seed = stable_seed("peeled-fast-chunk", V, str(dtype))
    _, logits, targets, mask = _rows(V, dtype, 0, seed)
    chunk = logits.reshape(-1, V).contiguous()  # rows at r * V: every phase for odd V
    t, keep = targets.reshape(-1), mask.reshape(-1)
    g = torch.Generator().manual_seed(seed + 1)
    g_logp = torch.where(keep, torch.randn(len(t), generator=g), 0.0).to(DEVICE)
    g_entropy = torch.where(keep, torch.randn(len(t), generator=g), 0.0).to(DEVICE)
    seen = {}

    def coef_fn(logp, entropy):
        seen["logp"], seen["entropy"] = logp.clone(), entropy.clone()
        return g_logp, g_entropy

    want_logp, want_entropy, want_grad = _reference(chunk, t, keep, g_logp, g_entropy)
    dz, _, _ = plh.triton_chunk_step(chunk.clone(), t, 1.0, coef_fn)
    assert_close_scaled(seen["logp"][keep], want_logp[keep], VALUE_REL / 10, "logp")
    assert_close_scaled(seen["entropy"][keep], want_entropy[keep], VALUE_REL, "entropy")
    assert_close_scaled(dz, want_grad, GRAD_REL[dtype], "dL/dz")
    assert (dz[~keep] == 0).all(), "a masked row (NaN garbage) gets an exact-zero gradient"
    assert (dz[want_grad == 0] == 0).all(), "a -inf logit gets a gradient of exactly 0"

def test_grad_buffers_keep_the_row_phase():
    """``empty_grad_like`` pads each leading stride by less than 16 bytes so that every gradient row
    starts at its logits row's phase; contiguous logits get a contiguous buffer."""
    for dtype, phase, V in ((torch.bfloat16, 3, 1001), (torch.float32, 1, 6283), (torch.float16, 0, 64)):
        storage = torch.empty(phase + 2 * 5 * V, dtype=dtype, device=DEVICE)
        base = storage[phase:].view(2, 5, V)
        for x in (base, base[:, :-1], base[:, 1:], base.reshape(10, V)[1:], base.reshape(10, V)[::3]):
            grad = common.empty_grad_like(x)
            assert grad.shape == x.shape and grad.dtype == x.dtype
            assert common.same_row_phase(x, grad), (dtype, phase, V, x.stride())
            es = x.element_size()
            assert {(x[i].data_ptr() - grad[i].data_ptr()) % 16 for i in range(x.shape[0])} == {0}
            for d in range(x.dim() - 1):
                dense = x.shape[d + 1] * grad.stride(d + 1)
                assert 0 <= grad.stride(d) - dense < 16 // es, f"row padding of {grad.stride(d) - dense} elements"
    contiguous = torch.empty(3, 4, 1000, dtype=torch.bfloat16, device=DEVICE)
    assert common.empty_grad_like(contiguous).stride() == contiguous.stride()
    odd = torch.empty(3, 4, 1001, dtype=torch.bfloat16, device=DEVICE)
    assert not common.same_row_phase(odd[:, :-1], odd[:, :-1].contiguous())  # rows b * 4004 vs b * 3003


def test_a_pointer_not_aligned_to_its_element_size_is_refused():
    raw = bytearray(2 * 64 + 1)
    try:
        x = torch.frombuffer(raw, dtype=torch.bfloat16, count=64, offset=1)
    except (ValueError, RuntimeError):
        pytest.skip("this torch cannot make a bf16 tensor at an odd address")
    assert x.data_ptr() % 2 == 1
    with pytest.raises(ValueError, match="logits: data pointer"):
        calls.token_logprobs("triton", x.view(2, 32), torch.zeros(2, dtype=torch.long))
