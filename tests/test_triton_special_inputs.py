"""Special inputs in every Triton kernel family, as docs/inputs.md decides them:
-inf logits (also a whole leading block of -inf), a kept target outside [0, V), NaN under the mask,
mask values as 0/1 (kept = mask != 0), empty work, and the autograd version bump of in-place writes.

The backend functions are called directly (not through ``lens_kernels``): the public boundary checks
target ranges on CPU tensors and would raise before a kernel runs, while on a GPU without
``LENS_KERNELS_CHECK=1`` the kernels themselves see those targets.

Expected values are float64. Where -inf is involved they come either from a small guarded local
formula (``_stats64``: 0 log 0 = 0) or from the float64 reference on logits where each -inf is
replaced by a finite -1e4: exp(-1e4 - lse) underflows to exactly 0 in float64, so the probability,
the entropy term and the gradient of such an entry are exactly those of -inf (written this way
because the reference's own -inf handling is being fixed in parallel).
"""
from triton_interp import DEVICE, assert_close_scaled  # noqa: I001  (sets TRITON_INTERPRET first)

import importlib

import pytest
import torch

from lens_kernels import LossConfig, reference
import backend_calls as calls  # noqa: E402

pl = importlib.import_module("lens_kernels.backends.triton.policy_loss")
tlp = importlib.import_module("lens_kernels.backends.triton.token_logprobs")
lin = importlib.import_module("lens_kernels.backends.triton.linear_token_logprobs")
plh = importlib.import_module("lens_kernels.backends.triton.policy_loss_from_hidden")
vs = importlib.import_module("lens_kernels.backends.triton.vocab_shard")

NEG_INF = float("-inf")
FINITE_NEG = -1e4  # stands in for -inf in float64 expectations: exp(-1e4 - lse) == 0.0 exactly
REL32 = 2e-5  # fp32 kernels against float64: measured ~1e-6 relative, with margin


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _stats64(z, targets):
    """float64 (logp, entropy, p, logp_all) of rows z [N, V] that may hold -inf; 0 log 0 = 0."""
    z = z.double()
    lse = torch.logsumexp(z, -1, keepdim=True)
    logp_all = z - lse
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    logp = logp_all.gather(-1, targets.reshape(-1, 1).long())[:, 0]
    return logp, entropy, p, logp_all


def _grad64(z, targets, g_l, g_h):
    """dL/dz of L = sum g_l log p_t + g_h H for rows with -inf entries (p == 0 entries get exactly 0)."""
    _, entropy, p, logp_all = _stats64(z, targets)
    onehot = torch.zeros_like(p).scatter_(-1, targets.reshape(-1, 1).long(), 1.0)
    ent_term = torch.where(p > 0, p * (logp_all + entropy[:, None]), torch.zeros_like(p))
    return g_l[:, None] * (onehot - p) - g_h[:, None] * ent_term


def _inf_logits(N, V, seed):
    """fp32 [N, V] logits with -inf entries of every kind: scattered, a whole leading 4096-lane block
    (the first block of a row sweep), and all but a few lanes."""
    g = _gen(seed)
    z = torch.randn(N, V, generator=g) * 2.0
    z[torch.rand(N, V, generator=g) < 0.3] = NEG_INF
    z[1, :4096] = NEG_INF
    z[2, :-3] = NEG_INF
    targets = torch.randint(0, V, (N,), generator=g)
    finite = torch.isfinite(z)
    for r in range(N):  # targets on finite logits here; a -inf target has its own test
        if not finite[r, targets[r]]:
            targets[r] = finite[r].nonzero()[0, 0]
    return z, targets


# ---------------------------------------------------------------------------------------------
# -inf logits
# ---------------------------------------------------------------------------------------------
def test_token_logprobs_with_inf_logits_exact():
    N, V = 4, 4100
    z, targets = _inf_logits(N, V, seed=201)
    targets[3] = int((z[3] == NEG_INF).nonzero()[0, 0])  # a -inf target: log-prob -inf
    x = z.clone().requires_grad_(True)
    logp, entropy = calls.token_logprobs("triton", x, targets, None, 1.0, True)
    g = _gen(202)
    g_l, g_h = torch.randn(N, generator=g), torch.randn(N, generator=g)
    (logp * g_l).sum().add((entropy * g_h).sum()).backward()
    want_logp, want_entropy, _, _ = _stats64(z, targets)
    assert logp[3] == NEG_INF
    assert_close_scaled(logp[:3], want_logp[:3], REL32, "logp")
    assert_close_scaled(entropy, want_entropy, REL32, "entropy")
    want_grad = _grad64(z, targets, g_l.double(), g_h.double())
    assert_close_scaled(x.grad, want_grad, REL32, "dL/dz")
    # a -inf logit other than the target gets exactly 0 (the -inf target's own d log p / dz = 1 - p = 1)
    banned = (z == NEG_INF).scatter(-1, targets[:, None], False)
    assert (x.grad[banned] == 0).all(), "a -inf logit gets a gradient of exactly 0"


def test_policy_loss_with_inf_logits_and_entropy_bonus_exact():
    B, T, V = 2, 3, 4100
    z, targets = _inf_logits(B * T, V, seed=203)
    z, targets = z.view(B, T, V), targets.view(B, T)
    targets[1, 2] = int((z[1, 2] == NEG_INF).nonzero()[0, 0])  # a -inf target: ratio 0
    mask = torch.ones(B, T, dtype=torch.bool)
    g = _gen(204)
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 3
    cfg = LossConfig(entropy_coef=0.01, epsilon_high=0.28)
    x = z.clone().requires_grad_(True)
    loss, metrics = calls.policy_loss_from_logits("triton", x, targets, mask, adv, old_logps=old, config=cfg)
    loss.backward()
    z64 = torch.where(z == NEG_INF, torch.full_like(z, FINITE_NEG), z).double().requires_grad_(True)
    want_loss, want_metrics = reference.policy_loss_from_logits(z64, targets, mask, adv, old_logps=old, config=cfg)
    want_loss.backward()
    assert_close_scaled(loss, want_loss, REL32, "loss")
    assert_close_scaled(metrics["entropy"], want_metrics["entropy"], REL32, "entropy metric")
    assert metrics["ratio_min"] == 0.0, "the -inf target's ratio is 0"
    assert_close_scaled(x.grad, z64.grad, REL32, "dL/dz")
    assert (x.grad[z == NEG_INF] == 0).all()


def test_hidden_path_with_minus_inf_bias_exact():
    """A -inf bias (banned tokens) over the first vocabulary tiles: the lean kernels (forward and the
    recompute backward) give exact log-probs, entropy and gradients."""
    N, V, H = 5, 80, 16
    g = _gen(205)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g)
    bias[:40] = NEG_INF  # the CPU tile is 32 lanes: a whole first tile of -inf
    bias[50:53] = NEG_INF
    targets = torch.randint(40, V, (N,), generator=g)
    targets[targets == 51] = 60
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = calls.linear_token_logprobs("triton", h, w, targets, bias=bias, return_entropy=True)
    g_l, g_h = torch.randn(N, generator=g), torch.randn(N, generator=g)
    ((logp * g_l).sum() + (entropy * g_h).sum()).backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    b64 = torch.where(bias == NEG_INF, torch.full_like(bias, FINITE_NEG), bias).double()
    want_logp, want_entropy, _, _ = _stats64(h64 @ w64.T + b64, targets)
    ((want_logp * g_l.double()).sum() + (want_entropy * g_h.double()).sum()).backward()
    assert_close_scaled(logp, want_logp, REL32, "logp")
    assert_close_scaled(entropy, want_entropy, REL32, "entropy")
    assert_close_scaled(h.grad, h64.grad, REL32, "dX")
    assert_close_scaled(w.grad, w64.grad, REL32, "dW")
    assert (w.grad[bias == NEG_INF] == 0).all(), "lm_head rows of banned tokens get exactly 0"


def test_fast_chunk_kernels_with_inf_logits_exact():
    """The fast mode's row kernels: a row whose first 4096-lane block is all -inf, scattered -inf."""
    N, V = 4, 4100
    z, targets = _inf_logits(N, V, seed=206)
    g = _gen(207)
    g_l, g_h = torch.randn(N, generator=g), torch.randn(N, generator=g)
    seen = {}

    def coef_fn(logp, entropy):
        seen["logp"], seen["entropy"] = logp.clone(), entropy.clone()
        return g_l, g_h

    dz, _, _ = plh.triton_chunk_step(z.clone(), targets, 1.0, coef_fn)
    want_logp, want_entropy, _, _ = _stats64(z, targets)
    assert_close_scaled(seen["logp"], want_logp, REL32, "logp")
    assert_close_scaled(seen["entropy"], want_entropy, REL32, "entropy")
    assert_close_scaled(dz, _grad64(z, targets, g_l.double(), g_h.double()), REL32, "dL/dz")


def test_vocab_shard_with_inf_logits():
    N, V = 4, 4100
    z, targets = _inf_logits(N, V, seed=208)
    m_i, l_i, ey_i, shifted = vs.vocab_shard_partials(z, targets)
    assert torch.isfinite(m_i).all() and torch.isfinite(l_i).all() and torch.isfinite(ey_i).all()
    lse = m_i + l_i.log()
    want_logp, want_entropy, _, _ = _stats64(z, targets)
    assert_close_scaled(shifted + m_i - lse, want_logp, REL32, "logp from the shard partials")
    g = _gen(209)
    g_l, g_h = torch.randn(N, generator=g), torch.randn(N, generator=g)
    grad = vs.vocab_shard_grad(z, targets, 1.0, want_logp.new_tensor(lse).float(), want_entropy.float(), g_l, g_h)
    assert_close_scaled(grad, _grad64(z, targets, g_l.double(), g_h.double()), REL32, "dL/dz")
    assert (grad[z == NEG_INF] == 0).all()


# ---------------------------------------------------------------------------------------------
# A kept target outside [0, V): NaN log-prob and NaN gradient row, never a read out of bounds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-100, 4100, -1])
def test_token_logprobs_bad_kept_target_is_nan(bad):
    N, V = 3, 4100
    z = torch.randn(N, V, generator=_gen(210))
    targets = torch.tensor([5, bad, 7])
    x = z.clone().requires_grad_(True)
    logp, entropy = calls.token_logprobs("triton", x, targets, None, 1.0, True)
    logp.sum().backward()  # a finite upstream gradient
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()
    assert torch.isfinite(entropy).all()  # the entropy does not involve the target
    assert torch.isnan(x.grad[1]).all(), "a kept bad target's gradient row is NaN"
    assert torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(log_ratio_clamp=0.2), LossConfig(policy_loss="cispo")],
                         ids=["ppo", "log_ratio_clamp", "cispo"])
def test_policy_loss_bad_kept_target_is_nan(cfg):
    """The clamps (tl.minimum / tl.maximum) drop NaN: the kernel must poison loss and gradient itself."""
    B, T, V = 2, 3, 50
    z = torch.randn(B, T, V, generator=_gen(211))
    targets = torch.randint(0, V, (B, T), generator=_gen(212))
    targets[0, 1] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    x = z.clone().requires_grad_(True)
    loss, _ = calls.policy_loss_from_logits("triton", x, targets, mask, torch.tensor([1.0, -1.0]), old_logps=-torch.ones(B, T),
                                         config=cfg)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad[0, 1]).all()
    rows = torch.ones(B, T, dtype=torch.bool)
    rows[0, 1] = False
    assert torch.isfinite(x.grad[rows]).all()


def test_hidden_paths_bad_kept_target_is_nan():
    N, V, H = 4, 40, 16
    g = _gen(213)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.tensor([1, -100, V, 3])
    h = hidden.clone().requires_grad_(True)
    logp, _ = calls.linear_token_logprobs("triton", h, weight, targets)
    logp.sum().backward()
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()
    assert torch.isnan(h.grad[1:3]).all() and torch.isfinite(h.grad[[0, 3]]).all()
    z = hidden @ weight.T
    seen = {}

    def coef_fn(logp, entropy):
        seen["logp"] = logp.clone()
        return torch.ones(N), None

    dz, _, _ = plh.triton_chunk_step(z.clone(), targets, 1.0, coef_fn)
    assert torch.isnan(seen["logp"][1:3]).all() and torch.isfinite(seen["logp"][[0, 3]]).all()
    assert torch.isnan(dz[1:3]).all() and torch.isfinite(dz[[0, 3]]).all()


# ---------------------------------------------------------------------------------------------
# NaN or garbage under the mask; mask values
# ---------------------------------------------------------------------------------------------
def test_masked_positions_influence_nothing():
    B, T, V = 2, 4, 60
    g = _gen(214)
    z = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    adv = torch.randn(B, T, generator=g)
    old = -torch.rand(B, T, generator=g)
    cfg = LossConfig(entropy_coef=0.01, beta=0.05)
    poisoned = [t.clone() for t in (z, targets, adv, old)]
    poisoned[0][~mask] = float("nan")
    poisoned[0][0, 2, 3] = float("inf")
    poisoned[1][~mask] = -100
    poisoned[2][~mask] = float("nan")
    poisoned[3][~mask] = float("nan")
    results = []
    for zz, tt, aa, oo in ((z, targets, adv, old), poisoned):
        x = zz.clone().requires_grad_(True)
        loss, metrics = calls.policy_loss_from_logits("triton", x, tt, mask, aa, old_logps=oo, ref_logps=old, config=cfg)
        loss.backward()
        y = zz.clone().requires_grad_(True)
        logp, entropy = calls.token_logprobs("triton", y, tt, mask, 1.0, True)
        (logp.sum() + entropy.sum()).backward()
        results.append((loss, torch.stack(list(metrics.values())), x.grad, logp, entropy, y.grad))
    for clean, dirty, name in zip(results[0], results[1], ("loss", "metrics", "grad", "logp", "entropy", "tlp grad")):
        assert torch.equal(clean, dirty), f"{name}: a masked position influenced the result"
    assert (results[1][2][~mask] == 0).all() and (results[1][5][~mask] == 0).all()


def test_hidden_masked_nan_rows_influence_nothing():
    """NaN hidden states and NaN upstream gradients at masked tokens: dW, dX and the outputs are those
    of the clean input (the lean backward recomputes whole row blocks, masked rows included)."""
    N, V, H = 6, 40, 16
    g = _gen(215)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    dirty = hidden.clone()
    dirty[~mask] = float("nan")
    results = []
    for hh in (hidden, dirty):
        h, w = hh.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, entropy = calls.linear_token_logprobs("triton", h, w, targets, mask=mask, return_entropy=True)
        upstream = torch.where(mask, torch.ones(N), torch.full((N,), float("nan")))
        ((logp * upstream).nansum() + entropy.sum()).backward()
        results.append((logp, entropy, h.grad[mask], w.grad))
    for clean, got, name in zip(results[0], results[1], ("logp", "entropy", "dX", "dW")):
        assert torch.equal(clean, got), f"{name}: a masked NaN row influenced the result"


def test_float_mask_of_zeros_and_ones_means_keep():
    """kept = mask != 0 in every kernel and in the aggregation weights (never a weight)."""
    B, T, V = 2, 3, 30
    g = _gen(216)
    z = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.randn(B, generator=g)
    out = [calls.policy_loss_from_logits("triton", z, targets, m, adv)[0] for m in (mask, mask.float(), mask.to(torch.int64))]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    lp = [calls.token_logprobs("triton", z, targets, m)[0] for m in (mask, mask.float())]
    assert torch.equal(lp[0], lp[1])


# ---------------------------------------------------------------------------------------------
# Empty work
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)], ids=["B0", "T0"])
def test_empty_work_gives_zero_loss_and_zero_size_gradients(shape):
    B, T = shape
    V = 17
    z = torch.randn(B, T, V, requires_grad=True)
    targets = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, metrics = calls.policy_loss_from_logits("triton", z, targets, mask, torch.zeros(B), config=LossConfig(entropy_coef=0.1))
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == z.shape
    assert metrics["ratio_min"] == 1.0 and metrics["ratio_max"] == 1.0
    logp, entropy = calls.token_logprobs("triton", z, targets, mask, 1.0, True)
    assert logp.shape == (B, T) and entropy.shape == (B, T)
    h = torch.randn(B, T, 8, requires_grad=True)
    w = torch.randn(V, 8, requires_grad=True)
    lp, _ = calls.linear_token_logprobs("triton", h, w, targets, mask=mask)
    lp.sum().backward()
    assert lp.shape == (B, T) and h.grad.shape == h.shape and (w.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# In place: every write bumps the buffer's autograd version
# ---------------------------------------------------------------------------------------------
def test_inplace_policy_loss_over_a_saved_buffer_raises():
    B, T, V = 2, 3, 20
    x = torch.randn(B, T, V, generator=_gen(217), requires_grad=True)
    logits = torch.tanh(x)  # tanh saved its output for its backward: the buffer written in place
    targets = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, _ = calls.policy_loss_from_logits("triton", logits, targets, mask, torch.ones(B), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_token_logprobs_backward_over_a_saved_buffer_raises():
    B, T, V = 2, 3, 20
    x = torch.randn(B, T, V, generator=_gen(218), requires_grad=True)
    logits = torch.tanh(x)
    logp, _ = calls.token_logprobs("triton", logits, torch.zeros(B, T, dtype=torch.long), None, 1.0, False, True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_inplace_writes_bump_the_version():
    B, T, V = 2, 3, 20
    z = torch.randn(B, T, V, generator=_gen(219))
    targets = torch.zeros(B, T, dtype=torch.long)
    before = z.clone()
    vs.vocab_shard_grad(z, targets, 1.0, torch.zeros(B * T), torch.zeros(B * T), torch.ones(B * T), inplace=True)
    assert not torch.equal(z, before), "the launcher writes the gradient into the buffer (the op records it)"
    leaf = torch.randn(B, T, V, generator=_gen(220)).requires_grad_(True)
    version = leaf._version
    loss, _ = calls.policy_loss_from_logits("triton", leaf, targets, torch.ones(B, T, dtype=torch.bool), torch.ones(B),
                                         inplace=True)
    assert leaf._version > version
    loss.backward()  # its own saved buffer is saved after the bump: backward still works
    assert DEVICE == "cpu" or leaf.grad is not None
