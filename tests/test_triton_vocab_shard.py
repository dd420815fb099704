"""The triton backend's vocabulary-shard ops (``vocab_shard_partials``, ``vocab_shard_grad``) against the
torch backend's and, shards put together, against the float64 reference; under the Triton interpreter
on CPU (or natively on a GPU). The 2-rank gloo run of the same ops is in ``test_distributed.py``."""
from triton_interp import DEVICE, assert_close_scaled  # noqa: I001  (sets TRITON_INTERPRET first)

import pytest
import torch

from lens_kernels import backends, reference
from lens_kernels.backends import torch as torch_backend
from lens_kernels.backends import triton as triton_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Partials are fp32 from the same input values. m_i and the target logit differ by a rounding of
# z / tau (multiplied by 1 / tau here); l_i and ey_i are sums over up to 4000 terms in another order.
PARTIAL_REL = {"m_i": 2e-6, "target_shifted": 2e-6, "l_i": 2e-5, "ey_i": 2e-5}
# dL/dz is stored in the logits dtype: one rounding of it sets the tolerance
GRAD_REL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
# vocabulary splits that do not divide evenly; (V, shard starts)
SPLITS = [(37, (0, 13)), (53, (0, 7, 30)), (4099, (0, 4000))]


def _shards(V, starts):
    return list(zip(starts, starts[1:] + (V,)))


def _inputs(B, T, V, dtype, seed, temp_kind):
    """Logits [B, T + 1, V] (used as the strided view [:, :-1]), global targets, mask, temperature."""
    g = torch.Generator().manual_seed(seed)
    logits_full = (torch.randn(B, T + 1, V, generator=g) * 3).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE)
    mask[0, :2] = False
    temperature = {"one": 1.0, "scalar": 0.7,
                   "per_row": (torch.rand(B, T, generator=g) + 0.5).to(DEVICE),
                   "per_seq": (torch.rand(B, 1, generator=g) + 0.5).to(DEVICE)}[temp_kind]
    return logits_full, targets, mask, temperature


def _local_targets(targets, v0, v1, seed):
    """Shard-local ids and ownership; rows whose target another shard holds get a random id in range."""
    local = targets - v0
    owns = (local >= 0) & (local < v1 - v0)
    g = torch.Generator().manual_seed(seed)
    stray = torch.randint(0, v1 - v0, targets.shape, generator=g).to(targets.device)
    return torch.where(owns, local, stray), owns


def _combine(partials, owns):
    """(logp, entropy) of whole rows from the shards' (m_i, l_i, ey_i, target_shifted), in float64:
    the arithmetic of ``distributed.combine_vocab_partials`` without the collectives."""
    m = torch.stack([p[0].double() for p in partials])
    l_i = torch.stack([p[1].double() for p in partials])
    ey = torch.stack([p[2].double() for p in partials])
    target = torch.stack([p[3].double() for p in partials])
    m_max = m.max(0).values
    shift = m - m_max
    scale = torch.exp(shift)
    l_sum = (l_i * scale).sum(0)
    ey_sum = ((ey + shift * l_i) * scale).sum(0)
    owner = torch.stack([o.reshape(-1) for o in owns])
    target_sum = torch.where(owner, target + shift, torch.zeros_like(target)).sum(0)
    log_l = torch.log(l_sum)
    return target_sum - log_l, log_l - ey_sum / l_sum


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,starts", SPLITS, ids=lambda x: str(x))
@pytest.mark.parametrize("temp_kind", ["one", "per_row", "per_seq"])
def test_partials_match_torch_and_combine_to_reference(dtype, V, starts, temp_kind):
    B, T = 2, 3
    logits_full, targets, _, temperature = _inputs(B, T, V, dtype, V + len(temp_kind), temp_kind)
    logits = logits_full[:, :-1]  # strided rows
    parts, owns = [], []
    for i, (v0, v1) in enumerate(_shards(V, starts)):
        local, own = _local_targets(targets, v0, v1, seed=i)
        got = triton_backend.vocab_shard_partials(logits[..., v0:v1], local, temperature)
        want = torch_backend.vocab_shard_partials(logits[..., v0:v1], local, temperature)
        for name, g, w in zip(("m_i", "l_i", "ey_i", "target_shifted"), got, want):
            assert g.dtype == torch.float32 and g.shape == (B * T,), name
            assert_close_scaled(g, w, PARTIAL_REL[name], f"shard [{v0}, {v1}) {name}")
        assert (got[3] <= 0).all(), "y[target] - max y is never positive"
        parts.append(got)
        owns.append(own)
    logp, entropy = _combine(parts, owns)
    tau = temperature.double() if torch.is_tensor(temperature) else temperature
    ref_logp, ref_entropy = reference.token_logprobs(logits.double(), targets, tau)
    assert_close_scaled(logp.view(B, T), ref_logp, 1e-5, "combined logp")
    assert_close_scaled(entropy.view(B, T), ref_entropy, 1e-5, "combined entropy")


def _reference_grad(logits, targets, mask, temperature, g_logp, g_entropy):
    """(lse, entropy, dL/dz) of the whole rows in float64, dL/dz of sum(g_l logp + g_H H) over kept rows."""
    z = logits.detach().double().requires_grad_(True)
    tau = temperature.double() if torch.is_tensor(temperature) else temperature
    logp, entropy = reference.token_logprobs(z, targets.clamp(min=0), tau, mask)
    loss = (logp * g_logp.double()).sum() + (0 if g_entropy is None else (entropy * g_entropy.double()).sum())
    loss.backward()
    lse = torch.logsumexp(z.detach() / (tau.unsqueeze(-1) if torch.is_tensor(tau) else tau), -1)
    return lse, entropy.detach(), z.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,starts", SPLITS, ids=lambda x: str(x))
@pytest.mark.parametrize("temp_kind,entropy_grad,inplace", [
    ("one", True, False),
    ("scalar", False, True),
    ("per_row", True, True),
    ("per_seq", False, False),
])
def test_grad_matches_torch_and_tiles_the_reference(dtype, V, starts, temp_kind, entropy_grad, inplace):
    B, T = 2, 3
    logits_full, targets, mask, temperature = _inputs(B, T, V, dtype, 2 * V + len(temp_kind), temp_kind)
    g = torch.Generator().manual_seed(V)
    keep = mask.reshape(-1)
    g_logp = torch.randn(B * T, generator=g).to(DEVICE) * keep
    g_entropy = torch.randn(B * T, generator=g).to(DEVICE) * keep if entropy_grad else None
    lse, entropy, ref_grad = _reference_grad(logits_full[:, :-1], targets, mask, temperature,
                                             g_logp.view(B, T), None if g_entropy is None else g_entropy.view(B, T))
    lse, entropy = lse.float().reshape(-1), entropy.float().reshape(-1)
    grads = []
    for i, (v0, v1) in enumerate(_shards(V, starts)):
        local, owns = _local_targets(targets, v0, v1, seed=10 + i)
        g_target = torch.where(owns.reshape(-1), g_logp, torch.zeros_like(g_logp))
        shard_full = logits_full[..., v0:v1].clone()
        want = torch_backend.vocab_shard_grad(shard_full[:, :-1], local, temperature, lse, entropy, g_logp, g_entropy,
                                          g_target)
        # masked rows have zero coefficients: the kernel must write zeros without reading them
        shard_full[:, :-1][~mask] = float("nan")
        got = triton_backend.vocab_shard_grad(shard_full[:, :-1], local, temperature, lse, entropy, g_logp,
                                              g_entropy, g_target, inplace=inplace)
        assert got.dtype == dtype and got.shape == (B, T, v1 - v0)
        if inplace:
            assert got.data_ptr() == shard_full.data_ptr(), "inplace must write into the logits"
            assert torch.equal(shard_full[:, -1], logits_full[:, -1, v0:v1]), "the row outside the view changed"
        assert (got[~mask] == 0).all(), "masked rows must get an exact-zero gradient"
        assert_close_scaled(got[mask], want[mask], GRAD_REL[dtype], f"shard [{v0}, {v1}) dL/dz vs torch")
        grads.append(got)
    assert_close_scaled(torch.cat(grads, -1), ref_grad, GRAD_REL[dtype], "shards' dL/dz vs reference")


def test_default_g_target_is_g_logp_and_zero_g_target_drops_the_one_hot():
    V, B, T = 29, 2, 2
    logits = torch.randn(B, T, V).to(DEVICE) * 2
    targets = torch.randint(0, V, (B, T)).to(DEVICE)
    lse = torch.logsumexp(logits, -1).reshape(-1)
    entropy = torch.rand(B * T).to(DEVICE)
    g_logp = torch.randn(B * T).to(DEVICE)
    default = triton_backend.vocab_shard_grad(logits, targets, 1.0, lse, entropy, g_logp)
    explicit = triton_backend.vocab_shard_grad(logits, targets, 1.0, lse, entropy, g_logp, None, g_logp)
    assert torch.equal(default, explicit)
    no_target = triton_backend.vocab_shard_grad(logits, targets, 1.0, lse, entropy, g_logp, None,
                                                torch.zeros_like(g_logp))
    one_hot = torch.nn.functional.one_hot(targets, V).float() * g_logp.view(B, T, 1)
    assert_close_scaled(default - no_target, one_hot, 1e-6, "the one-hot term")


def test_dispatch_and_dtype_errors():
    x = torch.randn(2, 5).to(DEVICE)
    for op in ("vocab_shard_partials", "vocab_shard_grad"):
        assert backends.backend_for(op, x, "triton") == "triton"
    with pytest.raises(TypeError, match="float64"):
        triton_backend.vocab_shard_partials(x.double(), torch.zeros(2, dtype=torch.long, device=DEVICE))
