"""Special inputs on the torch backend (docs/inputs.md), against float64 values
computed here with torch.where-guarded formulas, independently of ``reference.py``.

- -inf logits: exact log-probs, entropy (0 log 0 = 0) and gradients (exactly 0 at a -inf entry);
- NaN or garbage under the mask (logits, hidden states, targets, advantages, old / reference
  log-probs, IS weights, entropy) changes nothing: results are bitwise those of clean inputs, and
  masked gradient rows are exactly 0;
- kept = mask != 0;
- empty work (B = 0 or T = 0): zero loss, zero-size gradients, ratio metrics 1;
- a kept target outside [0, V) that reaches the backend unchecked: NaN log-prob and NaN gradient
  row, no out-of-bounds read, other rows unchanged;
- in place: every write bumps the buffer's autograd version, expanded buffers are refused.

Small ``CHUNK_BYTES`` put chunk boundaries inside sequences, so the chunk loops are exercised.
"""
import importlib

import pytest
import torch

import lens_kernels as lk
from lens_kernels.backends import torch as torch_backend
from lens_kernels.backends.torch import _common
import backend_calls as calls  # noqa: E402

SEED = 1234
V = 37


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_common, "CHUNK_BYTES", 3 * V * 16)  # 3 rows of V in fp64, 2 buffers


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Expected values in float64, guarded with torch.where (0 log 0 = 0, no 0 * inf)
# ---------------------------------------------------------------------------------------------
def expected_rows(z, t, tau=1.0):
    """(logp, entropy, p, log p) of each row of z / tau, z [N, V] float64 (may hold -inf)."""
    y = z.double() / tau
    lse = torch.logsumexp(y, dim=-1, keepdim=True)
    logp_all = y - lse
    p = torch.exp(logp_all)
    safe = torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -(p * safe).sum(-1)
    return logp_all.gather(1, t.unsqueeze(1)).squeeze(1), entropy, p, safe


def expected_grad(z, t, g_l, g_h, tau=1.0):
    """dL/dz for L = sum g_l logp + g_h H: (1/tau)[g_l (onehot - p) - g_h p (log p + H)]."""
    _, entropy, p, safe = expected_rows(z, t, tau)
    onehot = torch.zeros_like(p).scatter_(1, t.unsqueeze(1), 1.0)
    g = g_l.unsqueeze(1) * (onehot - p) - g_h.unsqueeze(1) * p * (safe + entropy.unsqueeze(1))
    return g / tau


def expected_ppo_loss(logp, entropy, old, adv, keep, entropy_coef, eps=0.2):
    """Token-mean PPO-clip loss with an entropy bonus, float64, differentiable in logp and entropy."""
    kf = keep.double()
    rho = torch.exp(torch.where(keep, logp - old, torch.zeros_like(logp)))
    a = adv.unsqueeze(1).expand_as(logp).double()
    f = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
    n = kf.sum().clamp(min=1.0)
    h = torch.where(keep, entropy, torch.zeros_like(entropy))
    return (torch.where(keep, f, torch.zeros_like(f)).sum() - entropy_coef * h.sum()) / n


def banned_logits(B, T, dtype, seed):
    g = gen(seed)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    banned = torch.rand(B, T, V, generator=g) < 0.3
    banned[0, 0, :] = False
    banned[0, 0, 1:] = True  # a row with one allowed token: p = 1, entropy 0
    z = z.masked_fill(banned, float("-inf"))
    targets = torch.randint(0, V, (B, T), generator=g)
    allowed = torch.where(~banned)  # targets on allowed tokens (a banned target is tested apart)
    for b in range(B):
        for s in range(T):
            ok = (~banned[b, s]).nonzero().flatten()
            targets[b, s] = ok[torch.randint(0, len(ok), (1,), generator=g)]
    del allowed
    return z.to(dtype), targets


# ---------------------------------------------------------------------------------------------
# -inf logits
# ---------------------------------------------------------------------------------------------
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_neg_inf_logits_token_logprobs(dtype, tau):
    B, T = 3, 5
    z, t = banned_logits(B, T, dtype, SEED)
    logits = z.clone().requires_grad_()
    logp, ent = lk.token_logprobs(logits, t, temperature=tau, return_entropy=True, backend="torch")
    g = gen(SEED + 1)
    g_l, g_h = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    (logp.double() * g_l + ent.double() * g_h).sum().backward()
    want_l, want_h, _, _ = expected_rows(z.double().view(-1, V), t.view(-1), tau)
    want_g = expected_grad(z.double().view(-1, V), t.view(-1), g_l.view(-1), g_h.view(-1), tau)
    tol = TOL[dtype]
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logp.double().view(-1), want_l, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(ent.double().view(-1), want_h, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(logits.grad.double().view(-1, V), want_g, atol=tol * 10, rtol=tol)
    assert (logits.grad[torch.isinf(z)] == 0).all()  # exactly 0 at every banned entry
    assert ent[0, 0] == 0 and logp[0, 0] == 0  # one allowed token: probability 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_neg_inf_logits_loss_with_entropy_bonus(dtype, ratio_level):
    """The fused (token-level) and 3-pass (GSPO) paths: finite loss and gradient, equal to float64."""
    B, T = 3, 5
    z, t = banned_logits(B, T, dtype, SEED + 2)
    g = gen(SEED + 3)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 0] = True
    adv = torch.randn(B, generator=g).double()  # fp32 values: the op reads advantages in fp32
    want_logp, _, _, _ = expected_rows(z.double().view(-1, V), t.view(-1))
    old = (want_logp.view(B, T) + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    cfg = lk.LossConfig(entropy_coef=0.05, ratio_level=ratio_level)
    logits = z.clone().requires_grad_()
    loss, metrics = lk.policy_loss_from_logits(logits, t, mask, adv.float(), old_logps=old, config=cfg,
                                               backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[torch.isinf(z)] == 0).all()
    if ratio_level == "token":
        zz = z.double().clone().requires_grad_()
        lse = torch.logsumexp(zz, -1, keepdim=True)
        la = zz - lse
        p = torch.exp(la)
        H = -(p * torch.where(p > 0, la, torch.zeros_like(la))).sum(-1)
        lp = la.gather(2, t.unsqueeze(2)).squeeze(2)
        want = expected_ppo_loss(lp, H, old.double(), adv, mask, 0.05)
        want.backward()
        tol = TOL[dtype]
        torch.testing.assert_close(loss.double(), want.detach(), atol=tol * 10, rtol=tol * 10)
        torch.testing.assert_close(logits.grad.double(), zz.grad, atol=tol * 10, rtol=tol * 10)


def test_neg_inf_target_logit_is_neg_inf_logprob():
    z, t = banned_logits(2, 3, torch.float64, SEED + 4)
    t[1, 2] = int(torch.isinf(z[1, 2]).nonzero()[0])  # a kept target on a banned token
    logp, ent = lk.token_logprobs(z, t, return_entropy=True, backend="torch")
    assert logp[1, 2] == float("-inf")
    assert torch.isfinite(ent).all()
    want_l, want_h, _, _ = expected_rows(z.view(-1, V), t.view(-1))
    torch.testing.assert_close(logp.view(-1), want_l)
    torch.testing.assert_close(ent.view(-1), want_h)


def test_hidden_path_with_neg_inf_bias():
    """A -inf bias (a banned token on the hidden path): fast and lean modes give finite, equal results."""
    g = gen(SEED + 5)
    B, T, H = 2, 5, 6
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.zeros(V, dtype=torch.float64)
    bias[:4] = float("-inf")
    targets = torch.randint(4, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cfg = lk.LossConfig(entropy_coef=0.1)
    grads = {}
    for mode in ("fast", "lean"):
        ins = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        loss, _ = lk.policy_loss_from_hidden(ins[0], ins[1], targets, mask, adv, bias=ins[2], config=cfg,
                                             mode=mode, backend="torch")
        loss.backward()
        grads[mode] = [loss.detach()] + [x.grad for x in ins]
        assert all(torch.isfinite(x).all() for x in grads[mode]), mode
        assert (ins[2].grad[:4] == 0).all()
    for a, b in zip(grads["fast"], grads["lean"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# NaN and garbage under the mask
# ---------------------------------------------------------------------------------------------
def poisoned_batch(B=4, T=6, seed=SEED + 10, dtype=torch.float64):
    g = gen(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[1] = False  # a fully masked sequence
    mask[0, 0] = True
    clean = dict(
        logits=torch.randn(B, T, V, generator=g, dtype=torch.float64).to(dtype),
        targets=torch.randint(0, V, (B, T), generator=g),
        advantages=torch.randn(B, generator=g),
        old_logps=-torch.rand(B, T, generator=g) * 3,
        ref_logps=-torch.rand(B, T, generator=g) * 3,
        is_weights=torch.rand(B, T, generator=g) + 0.5,
    )
    dirty = {k: v.clone() for k, v in clean.items()}
    off = ~mask
    dirty["logits"][off] = float("nan")
    dirty["logits"][off.nonzero()[0].tolist()][:3] = float("inf")
    dirty["targets"][off] = -100
    dirty["advantages"][1] = float("nan")  # the fully masked sequence
    for k in ("old_logps", "ref_logps", "is_weights"):
        dirty[k][off] = float("nan")
    return mask, clean, dirty


def run_logits_loss(batch, mask, cfg, inplace=False):
    logits = batch["logits"].clone().requires_grad_()
    x = logits * 1.0 if inplace else logits  # in place needs a non-leaf buffer
    loss, metrics = lk.policy_loss_from_logits(
        x, batch["targets"], mask, batch["advantages"], old_logps=batch["old_logps"],
        ref_logps=batch["ref_logps"] if cfg.beta else None, is_weights=batch["is_weights"], config=cfg,
        inplace=inplace, backend="torch")
    loss.backward()
    return loss.detach(), torch.stack(list(metrics.values())), logits.grad


LOSS_CONFIGS = {
    "ppo_kl_entropy": lk.LossConfig(beta=0.05, entropy_coef=0.01),
    "gspo": lk.LossConfig(ratio_level="sequence", beta=0.05, entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean"),
    "cispo": lk.LossConfig(policy_loss="cispo", kl_estimator="k2", beta=0.1),
    "sapo_dual": lk.LossConfig(policy_loss="sapo", entropy_coef=-0.02),
}


@pytest.mark.parametrize("config", list(LOSS_CONFIGS))
@pytest.mark.parametrize("inplace", [False, True])
def test_nan_under_mask_loss_from_logits(config, inplace):
    mask, clean, dirty = poisoned_batch()
    cfg = LOSS_CONFIGS[config]
    want = run_logits_loss(clean, mask, cfg, inplace)
    got = run_logits_loss(dirty, mask, cfg, inplace)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert (got[2][~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nan_under_mask_token_logprobs(dtype):
    mask, clean, dirty = poisoned_batch(dtype=dtype)
    outs = []
    for batch in (clean, dirty):
        logits = batch["logits"].clone().requires_grad_()
        logp, ent = lk.token_logprobs(logits, batch["targets"], mask=mask, return_entropy=True, backend="torch")
        (logp * 0.7 - ent * 0.3).sum().backward()
        outs.append((logp.detach(), ent.detach(), logits.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert (outs[1][2][~mask] == 0).all() and (outs[1][0][~mask] == 0).all()


def test_nan_under_mask_policy_loss_from_logps():
    mask, clean, dirty = poisoned_batch()
    outs = []
    for batch in (clean, dirty):
        logp = batch["old_logps"].clone().double()
        logp = torch.where(mask, logp + 0.1, torch.full_like(logp, float("nan")) if batch is dirty else logp)
        logp.requires_grad_()
        ent = torch.rand(mask.shape, generator=gen(3), dtype=torch.float64)
        ent = torch.where(mask, ent, torch.full_like(ent, float("nan")) if batch is dirty else ent).requires_grad_()
        loss, metrics = lk.policy_loss(logp, batch["advantages"], mask, old_logps=batch["old_logps"],
                                       ref_logps=batch["ref_logps"], entropy=ent, is_weights=batch["is_weights"],
                                       config=LOSS_CONFIGS["ppo_kl_entropy"])
        loss.backward()
        outs.append((loss.detach(), torch.stack(list(metrics.values())), logp.grad, ent.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_nan_under_mask_hidden(mode):
    mask, clean, dirty = poisoned_batch()
    g = gen(SEED + 20)
    H = 5
    hidden = torch.randn(*mask.shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    outs = []
    for batch in (clean, dirty):
        hid = hidden.clone()
        if batch is dirty:
            hid[~mask] = float("nan")
        ins = [hid.requires_grad_(), weight.clone().requires_grad_()]
        loss, metrics = lk.policy_loss_from_hidden(ins[0], ins[1], batch["targets"], mask, batch["advantages"],
                                                   old_logps=batch["old_logps"], is_weights=batch["is_weights"],
                                                   config=LOSS_CONFIGS["ppo_kl_entropy"].replace(beta=0.0),
                                                   mode=mode, backend="torch")
        loss.backward()
        outs.append((loss.detach(), torch.stack(list(metrics.values())), ins[0].grad, ins[1].grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert (outs[1][2][~mask] == 0).all()


def test_float_mask_is_mask_not_zero():
    """kept = mask != 0: a 0/1 float mask and an int mask mean what the bool mask means."""
    mask, clean, _ = poisoned_batch()
    ref = run_logits_loss(clean, mask, LOSS_CONFIGS["ppo_kl_entropy"])
    for m in (mask.double(), mask.to(torch.int32)):
        got = run_logits_loss(clean, m, LOSS_CONFIGS["ppo_kl_entropy"])
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Empty work
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T", [(0, 5), (3, 0)])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_empty_loss_from_logits(B, T, ratio_level):
    logits = torch.randn(B, T, V, requires_grad=True)
    t = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, metrics = lk.policy_loss_from_logits(logits, t, mask, torch.randn(B), old_logps=torch.zeros(B, T),
                                               config=lk.LossConfig(ratio_level=ratio_level, entropy_coef=0.1),
                                               backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (B, T, V)
    assert metrics["ratio_min"].item() == 1.0 and metrics["ratio_max"].item() == 1.0
    assert metrics["entropy"].item() == 0.0 and metrics["clip_frac"].item() == 0.0


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0)])
@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_empty_loss_from_hidden(B, T, mode):
    hidden = torch.randn(B, T, 4, requires_grad=True)
    weight = torch.randn(V, 4, requires_grad=True)
    t = torch.zeros(B, T, dtype=torch.long)
    loss, metrics = lk.policy_loss_from_hidden(hidden, weight, t, torch.ones(B, T), torch.randn(B), mode=mode,
                                               backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == hidden.shape
    assert weight.grad is None or (weight.grad == 0).all()
    assert metrics["ratio_min"].item() == 1.0


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0)])
def test_empty_token_logprobs_and_policy_loss(B, T):
    logits = torch.randn(B, T, V, requires_grad=True)
    logp, ent = lk.token_logprobs(logits, torch.zeros(B, T, dtype=torch.long), return_entropy=True, backend="torch")
    assert logp.shape == (B, T) and ent.shape == (B, T)
    (logp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape
    lp = torch.zeros(B, T, requires_grad=True)
    loss, metrics = lk.policy_loss(lp, torch.zeros(B), torch.ones(B, T))
    loss.backward()
    assert loss.item() == 0.0 and lp.grad.shape == (B, T) and metrics["ratio_max"].item() == 1.0


def test_all_masked_is_zero_loss():
    mask, clean, _ = poisoned_batch()
    loss, metrics, grad = run_logits_loss(clean, torch.zeros_like(mask), LOSS_CONFIGS["ppo_kl_entropy"])
    assert loss.item() == 0.0 and (grad == 0).all() and metrics[-1].item() == 1.0


# ---------------------------------------------------------------------------------------------
# A kept target outside [0, V) that reaches the backend unchecked (as on a GPU without the check)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [-100, V, 10 ** 6])
def test_bad_target_gives_nan_row_not_oob(bad_id):
    mask, clean, _ = poisoned_batch()
    t = clean["targets"].clone()
    b, s = 0, 0  # kept
    t[b, s] = bad_id
    logits = clean["logits"].clone().requires_grad_()
    logp, ent = calls.token_logprobs("torch", logits, t, mask=mask, return_entropy=True)
    (logp.nan_to_num(0.0).sum() * 0 + logp.sum() + ent.sum()).backward()
    assert torch.isnan(logp[b, s]) and torch.isfinite(ent[b, s])
    assert torch.isnan(logits.grad[b, s]).all()
    other = torch.ones_like(mask)
    other[b, s] = False
    assert torch.isfinite(logp[other]).all() and torch.isfinite(logits.grad[other]).all()
    # the rows that do not hold the bad target equal the clean call
    logits2 = clean["logits"].clone().requires_grad_()
    logp2, ent2 = calls.token_logprobs("torch", logits2, clean["targets"], mask=mask, return_entropy=True)
    (logp2.sum() + ent2.sum()).backward()
    assert torch.equal(logp[other], logp2[other]) and torch.equal(logits.grad[other], logits2.grad[other])

    logits3 = clean["logits"].clone().requires_grad_()
    loss, _ = calls.policy_loss_from_logits("torch", logits3, t, mask, clean["advantages"],
                                                    old_logps=clean["old_logps"])
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(logits3.grad[b, s]).all()
    assert torch.isfinite(logits3.grad[other]).all()


def test_bad_target_hidden_paths_give_nan():
    mask, clean, _ = poisoned_batch()
    t = clean["targets"].clone()
    t[0, 0] = V + 3
    g = gen(7)
    hidden = torch.randn(*mask.shape, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 5, generator=g, dtype=torch.float64)
    logp, _ = calls.linear_token_logprobs("torch", hidden, weight, t, mask=mask)
    assert torch.isnan(logp[0, 0]) and torch.isfinite(logp.flatten()[1:]).all()
    for mode in ("fast", "lean"):
        h = hidden.clone().requires_grad_()
        loss, _ = calls.policy_loss_from_hidden("torch", h, weight, t, mask, clean["advantages"], mode=mode,
                                                        old_logps=clean["old_logps"])
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(h.grad[0, 0]).all(), mode


# ---------------------------------------------------------------------------------------------
# In place: the version bump, and buffers that cannot be written
# ---------------------------------------------------------------------------------------------
def test_inplace_write_bumps_version_so_a_saved_buffer_raises():
    mask, clean, _ = poisoned_batch()
    x = clean["logits"].clone().requires_grad_()
    logits = torch.tanh(x)  # tanh saves its output for backward
    loss, _ = lk.policy_loss_from_logits(logits, clean["targets"], mask, clean["advantages"],
                                         old_logps=clean["old_logps"], inplace=True, backend="torch")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    x = clean["logits"].clone().requires_grad_()
    logits = torch.tanh(x)
    logp, _ = lk.token_logprobs(logits, clean["targets"], mask=mask, inplace=True, backend="torch")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_inplace_matches_out_of_place_when_safe():
    mask, clean, _ = poisoned_batch()
    out = run_logits_loss(clean, mask, LOSS_CONFIGS["ppo_kl_entropy"], inplace=False)
    inp = run_logits_loss(clean, mask, LOSS_CONFIGS["ppo_kl_entropy"], inplace=True)
    for a, b in zip(out, inp):
        assert torch.equal(a, b)


def test_inplace_refuses_expanded_buffer():
    mask, clean, _ = poisoned_batch()
    row = torch.randn(1, 1, V, requires_grad=True)
    logits = row.expand(*mask.shape, V)
    with pytest.raises(ValueError, match="logits"):
        lk.policy_loss_from_logits(logits, clean["targets"], mask, clean["advantages"], inplace=True,
                                   backend="torch")
    with pytest.raises(ValueError, match="logits"):
        lk.token_logprobs(logits, clean["targets"], mask=mask, inplace=True, backend="torch")


def test_module_layout_is_importable():
    """The per-op modules (monkeypatch targets) are reachable by import_module."""
    for name in ("token_logprobs", "linear_token_logprobs", "policy_loss", "policy_loss_from_hidden", "vocab_shard"):
        mod = importlib.import_module(f"lens_kernels.backends.torch.{name}")
        assert mod.__name__.endswith(name)


@pytest.mark.parametrize("rows", [slice(None), slice(0, 3)])
def test_row_slice_view_gradient_reaches_its_base(rows):
    """logits = base[:, :-1] (the usual shift) of a leaf and of a non-leaf base: the gradient reaches
    the base with zero rows past the view, and ``torch.autograd.grad(loss, view)`` gets the view's own
    gradient (the op's input is the view itself, so both questions have their answer)."""
    mask, clean, _ = poisoned_batch()
    B, T = mask.shape
    g = gen(SEED + 30)
    base_vals = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64)
    cfg = LOSS_CONFIGS["ppo_kl_entropy"]
    b_rows = range(B)[rows]
    n = len(b_rows)
    args = (clean["targets"][:n], mask[:n], clean["advantages"][:n])
    kw = dict(old_logps=clean["old_logps"][:n], ref_logps=clean["ref_logps"][:n], config=cfg, backend="torch")
    ref = base_vals[rows, :-1].clone().requires_grad_()  # a leaf of its own: no view involved
    loss_ref, _ = lk.policy_loss_from_logits(ref, *args, **kw)
    loss_ref.backward()
    want = torch.zeros_like(base_vals)
    want[rows, :-1] = ref.grad

    base = base_vals.clone().requires_grad_()
    loss, _ = lk.policy_loss_from_logits(base[rows, :-1], *args, **kw)
    loss.backward()
    assert torch.equal(loss, loss_ref)
    assert torch.equal(base.grad, want)

    leaf = base_vals.clone().requires_grad_()
    non_leaf = leaf * 1.0
    view = non_leaf[rows, :-1]
    loss, _ = lk.policy_loss_from_logits(view, *args, **kw)
    (d_view,) = torch.autograd.grad(loss, view)
    assert torch.equal(d_view, ref.grad)
