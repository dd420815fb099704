"""Special and bad inputs (docs/inputs.md, issue: no silent wrong answer).

Every case ends in one of two ways: a clear ValueError/TypeError whose message names the argument,
or a result equal to the float64 reference (values AND gradients, NaN and +-inf where the reference
has them). Every public op, on every backend that runs here: ``torch``, and ``triton`` under the
interpreter (natively on a GPU). Inputs are fresh random values from fixed seeds, never zeros.
"""
import triton_interp  # noqa: F401, I001  (sets TRITON_INTERPRET before triton is imported)

import math

import pytest
import torch

import lens_kernels as lk
from lens_kernels import _validation
from lens_kernels import reference as ref
from seeds import stable_seed

DEVICE = triton_interp.DEVICE
BACKENDS = ["torch", "triton"]
B, T, V, H, G = 4, 3, 37, 8, 2  # B != T; B = 2 groups of G
REL = 3e-5  # fp32 kernels against the float64 reference, relative to the tensor's largest |value|
INF, NAN = math.inf, math.nan
LOGIT_OPS = ["token_logprobs", "policy_loss_from_logits", "lens_policy_loss_from_logits"]
HIDDEN_OPS = ["linear_token_logprobs", "policy_loss_from_hidden", "lens_policy_loss_from_hidden"]
BACKEND_OPS = LOGIT_OPS + HIDDEN_OPS
LOSS_OPS = ["policy_loss_from_logits", "policy_loss_from_hidden", "lens_policy_loss_from_logits",
            "lens_policy_loss_from_hidden"]
CFG = lk.LossConfig(entropy_coef=0.01, epsilon_high=0.28)  # the entropy bonus: 0 * -inf would show


@pytest.fixture(autouse=True)
def _values_checked(monkeypatch):
    """The error cases expect value checks: always on for CPU tensors; on a GPU they need the flag
    (tests/gpu/test_special_inputs_gpu.py covers the unchecked GPU path)."""
    monkeypatch.setenv("LENS_KERNELS_CHECK", "1")


# ------------------------------------------------------------------------------------------ inputs
def make_inputs(seed, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    if b > 1 and t > 0:
        mask[1, 0] = False
        mask[0, 0] = True
    return dict(
        logits=torch.randn(b, t, V, generator=g) * 2,
        hidden=torch.randn(b, t, H, generator=g),
        weight=torch.randn(V, H, generator=g) / 2,
        bias=torch.randn(V, generator=g) / 4,
        targets=torch.randint(0, V, (b, t), generator=g),
        mask=mask,
        advantages=torch.randn(b, generator=g),
        old_logps=-torch.rand(b, t, generator=g) * 4 - 1,
        ref_logps=-torch.rand(b, t, generator=g) * 4 - 1,
        is_weights=torch.rand(b, t, generator=g) + 0.5,
        rewards=torch.tensor([0.0, 1.0, 0.0, 0.0] * (b // 4) + [0.0] * (b % 4)),
    )


def _leaves(op, kw):
    names = ("logits",) if op in LOGIT_OPS or op == "policy_loss" else ("hidden", "weight", "bias")
    if op == "policy_loss":
        names = ("logps", "entropy")
    return [n for n in names if kw.get(n) is not None]


def run_ours(op, kw, backend, **extra):
    """Runs the public op on the backend; returns (outputs, {leaf: grad})."""
    kw = {k: v for k, v in kw.items()}
    strided = extra.pop("strided", False)
    inplace = extra.get("inplace", False)
    leaves, views = {}, {}
    for name in _leaves(op, kw):
        if strided and name == "logits":  # a view with stride 1 on V only, as logits[:, :-1] of a wider buffer
            b, t, v = kw[name].shape
            leaf = torch.randn(b, t + 1, v + 3, generator=torch.Generator().manual_seed(11)).to(DEVICE)
            leaf[:, :t, :v] = kw[name].to(DEVICE)
            leaves[name] = leaf.requires_grad_()
            kw[name] = views[name] = leaf[:, :t, :v]
            assert not kw[name].is_contiguous()
        else:
            leaves[name] = kw[name].detach().clone().to(DEVICE).requires_grad_()
            kw[name] = leaves[name] * 1.0 if inplace else leaves[name]  # in place never writes into a leaf
    dev = lambda t: t.to(DEVICE) if torch.is_tensor(t) else t  # noqa: E731
    kw = {k: dev(v) for k, v in kw.items()}
    outs = _call(lk, op, kw, backend, **extra)
    _backward(outs, leaves)
    grads = {}
    for n, t in leaves.items():
        grads[n] = t.grad
        if n in views and t.grad is not None:
            b, tt, v = views[n].shape
            rest = t.grad.clone()
            rest[:, :tt, :v] = 0
            assert torch.all(rest == 0), "gradient written outside the view"
            grads[n] = t.grad[:, :tt, :v]
    return outs, grads


def run_ref(op, kw, **extra):
    kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    leaves = {}
    for name in _leaves(op, kw):
        leaves[name] = kw[name].detach().clone().requires_grad_()
        kw[name] = leaves[name]
    outs = _call(None, op, kw, None, **extra)
    _backward(outs, leaves)
    return outs, {n: t.grad for n, t in leaves.items()}


def _backward(outs, leaves):
    if not leaves:
        return
    first = outs[0]
    if first.dim() == 0:
        total = first
    else:  # token ops: a fixed random weighting of log-probs and entropy (finite entries only)
        lp, h = outs
        g = torch.Generator().manual_seed(7)
        w = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device, lp.dtype) if lp.numel() else lp
        total = torch.where(torch.isfinite(lp), lp * w, torch.zeros_like(lp)).sum() + (h * w.flip(-1)).nansum()
    if total.requires_grad:
        total.backward()


def _call(lib, op, kw, backend, **extra):
    """The same call on the library (lib) or on the reference (lib None)."""
    cfg = extra.pop("config", CFG)
    bk = {} if lib is None else dict(backend=backend)
    temperature = extra.pop("temperature", 1.0)
    mask = kw["mask"]
    if op == "token_logprobs":
        if lib is None:
            return ref.token_logprobs(kw["logits"], kw["targets"], temperature, mask)
        return lk.token_logprobs(kw["logits"], kw["targets"], mask=mask, temperature=temperature,
                                 return_entropy=True, **bk, **extra)
    if op == "linear_token_logprobs":
        if lib is None:
            return ref.linear_token_logprobs(kw["hidden"], kw["weight"], kw["targets"], kw.get("bias"), temperature,
                                             mask)
        return lk.linear_token_logprobs(kw["hidden"], kw["weight"], kw["targets"], bias=kw.get("bias"), mask=mask,
                                        temperature=temperature, return_entropy=True, **bk, **extra)
    loss_kw = dict(old_logps=kw.get("old_logps"), ref_logps=kw.get("ref_logps") if cfg.beta else None,
                   is_weights=kw.get("is_weights"), config=cfg, **{k: extra.pop(k) for k in
                                                                    ("num_tokens", "num_sequences") if k in extra})
    if op == "policy_loss":
        fn = ref.policy_loss if lib is None else lk.policy_loss
        return fn(kw["logps"], kw["advantages"], mask, entropy=kw["entropy"], **loss_kw)
    if op == "policy_loss_from_logits":
        fn = ref.policy_loss_from_logits if lib is None else lk.policy_loss_from_logits
        return fn(kw["logits"], kw["targets"], mask, kw["advantages"], temperature=temperature, **loss_kw, **bk,
                  **extra)
    if op == "policy_loss_from_hidden":
        if lib is None:
            return ref.policy_loss_from_hidden(kw["hidden"], kw["weight"], kw["targets"], mask, kw["advantages"],
                                               bias=kw.get("bias"), temperature=temperature, **loss_kw)
        return lk.policy_loss_from_hidden(kw["hidden"], kw["weight"], kw["targets"], mask, kw["advantages"],
                                          bias=kw.get("bias"), temperature=temperature, **loss_kw, **bk, **extra)
    if op.startswith("lens_"):
        loss_kw.pop("old_logps")  # on-policy: the fused path
        if lib is None:
            if op.endswith("hidden"):  # masked rows of hidden are never read (as ref.linear_token_logprobs)
                h = torch.where(mask.bool()[..., None], kw["hidden"], torch.zeros((), dtype=kw["hidden"].dtype))
                z = h @ kw["weight"].T + (kw["bias"] if kw.get("bias") is not None else 0)
            else:
                z = kw["logits"]
            conf = ref.token_logprobs(z.detach(), kw["targets"], temperature, mask)[0]
            adv = ref.group_advantages(kw["rewards"], group_size=G, estimator="lens", old_logps=conf, mask=mask)
            loss, metrics = ref.policy_loss_from_logits(z, kw["targets"], mask, adv, temperature=temperature,
                                                        **loss_kw)
            metrics["advantages"] = adv
            return loss, metrics
        if op.endswith("hidden"):
            return lk.lens_policy_loss_from_hidden(kw["hidden"], kw["weight"], kw["targets"], mask, kw["rewards"],
                                                   bias=kw.get("bias"), group_size=G, temperature=temperature,
                                                   **loss_kw, **bk, **extra)
        return lk.lens_policy_loss_from_logits(kw["logits"], kw["targets"], mask, kw["rewards"], group_size=G,
                                               temperature=temperature, **loss_kw, **bk, **extra)
    raise AssertionError(op)


def assert_same(got, want, name, rel=REL):
    """Equal to the reference: the same shape, NaN and +-inf exactly where the reference has them,
    finite values within rel x the largest finite |reference value|."""
    assert got is not None, f"{name}: missing"
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), \
        f"{name}: NaN at {torch.isnan(got).nonzero().tolist()}, reference at {torch.isnan(want).nonzero().tolist()}"
    inf_got, inf_want = torch.where(torch.isinf(got), got, 0.0), torch.where(torch.isinf(want), want, 0.0)
    assert torch.equal(inf_got, inf_want), f"{name}: infinities differ: {got} vs {want}"
    fin = torch.isfinite(want)
    if fin.any():
        scale = max(want[fin].abs().max().item(), 1e-6)
        err = (got[fin] - want[fin]).abs().max().item()
        assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"


def check_against_reference(op, kw, backend, metrics=("entropy", "ratio_mean", "clip_frac", "advantages"),
                            **extra):
    seed_note = f"(op={op}, backend={backend})"
    outs, grads = run_ours(op, kw, backend, **dict(extra))
    extra = {k: v for k, v in extra.items() if k not in ("strided", "inplace")}
    want, want_grads = run_ref(op, kw, **extra)
    if op in ("token_logprobs", "linear_token_logprobs"):
        assert_same(outs[0], want[0], f"logps {seed_note}")
        assert_same(outs[1], want[1], f"entropy {seed_note}")
    else:
        assert_same(outs[0], want[0], f"loss {seed_note}")
        for m in metrics:
            if m in want[1]:
                assert_same(outs[1][m], want[1][m], f"metric {m} {seed_note}")
    for name, g in want_grads.items():
        if g is None:
            continue
        assert_same(grads[name], g, f"d{name} {seed_note}")
    return outs, grads


def ops_for(backend_ops=BACKEND_OPS):
    return [pytest.param(op, b, id=f"{op}-{b}") for op in backend_ops for b in BACKENDS]


# ---------------------------------------------------------------------------------- -inf logits
def _ban(kw, op, cols):
    """-inf logits on ``cols``: in the logits, or (hidden path) through a -inf bias."""
    if op in HIDDEN_OPS:
        kw["bias"] = kw["bias"].clone()
        kw["bias"][cols] = -INF
    else:
        kw["logits"] = kw["logits"].clone()
        kw["logits"][..., cols] = -INF
    allowed = torch.tensor([v for v in range(V) if v not in set(torch.arange(V)[cols].tolist())])
    kw["targets"] = allowed[kw["targets"] % len(allowed)]
    return kw


BANS = {"first": slice(0, 1), "block": slice(0, 16), "strided": slice(5, 37, 2), "all_but_one": slice(1, 37)}


# the interpreted kernels are slow: triton gets the two cases that differ for a kernel (a thread's
# first element, a whole block), torch all four
@pytest.mark.parametrize("op,backend,cols", [
    pytest.param(op, b, BANS[c], id=f"{op}-{b}-{c}") for op in BACKEND_OPS for b in BACKENDS for c in BANS
    if b == "torch" or c in ("first", "block")])
def test_minus_inf_logits(op, backend, cols):
    kw = _ban(make_inputs(stable_seed("ninf", op, str(cols))), op, cols)
    check_against_reference(op, kw, backend)


@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "linear_token_logprobs",
                                                "policy_loss_from_logits", "policy_loss_from_hidden"]))
def test_minus_inf_at_the_target(op, backend):
    kw = make_inputs(stable_seed("ninf_target", op))
    kw["mask"][0, 0] = True
    y = int(kw["targets"][0, 0])
    if op in HIDDEN_OPS:
        kw["bias"][y] = -INF
        kw["targets"] = torch.where(kw["targets"] == y, torch.full_like(kw["targets"], (y + 1) % V), kw["targets"])
        kw["targets"][0, 0] = y
    else:
        kw["logits"][0, 0, y] = -INF
    check_against_reference(op, kw, backend, config=lk.LossConfig(entropy_coef=0.01))


@pytest.mark.parametrize("row", ["all_minus_inf", "nan", "plus_inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_row_without_a_meaning_is_nan(backend, row):
    kw = make_inputs(stable_seed("nan_row", row))
    kw["mask"][0, 1] = True
    kw["logits"][0, 1] = {"all_minus_inf": -INF, "nan": kw["logits"][0, 1], "plus_inf": kw["logits"][0, 1]}[row]
    if row == "nan":
        kw["logits"][0, 1, 3] = NAN
    if row == "plus_inf":
        kw["logits"][0, 1, 3] = INF
    outs, _ = run_ours("token_logprobs", kw, backend)
    want, _ = run_ref("token_logprobs", kw)
    assert_same(outs[0], want[0], "logps")
    assert_same(outs[1], want[1], "entropy")


# ------------------------------------------------------------------------- nothing under the mask
def _poison_logits(kw, op, seed):
    g = torch.Generator().manual_seed(seed)
    keep = kw["mask"]
    junk = torch.tensor([NAN, INF, -INF, 3e38, -3e38])[torch.randint(0, 5, (B, T, V), generator=g)]
    if op in HIDDEN_OPS:
        kw["hidden"] = torch.where(keep[..., None], kw["hidden"], junk[..., :H])
    else:
        kw["logits"] = torch.where(keep[..., None], kw["logits"], junk)
    kw["targets"] = torch.where(keep, kw["targets"], torch.full_like(kw["targets"], -100))
    return kw


@pytest.mark.parametrize("op,backend", ops_for())
def test_nan_and_garbage_under_the_mask(op, backend):
    seed = stable_seed("under_mask", op)
    clean = make_inputs(seed)
    outs_clean, grads_clean = run_ours(op, clean, backend)
    kw = _poison_logits(make_inputs(seed), op, seed)
    outs, grads = check_against_reference(op, kw, backend)
    keep = kw["mask"].to(DEVICE)
    for name, g in grads.items():  # the masked rows change nothing at all
        if name == "logits":
            assert torch.all(g[~keep] == 0)
        if name in ("logits", "hidden"):
            assert torch.equal(g[keep], grads_clean[name][keep]) or torch.allclose(g[keep], grads_clean[name][keep])
    if op in ("token_logprobs", "linear_token_logprobs"):
        assert torch.all(outs[0][~keep] == 0) and torch.all(outs[1][~keep] == 0)


@pytest.mark.parametrize("what", ["advantages", "old_logps", "ref_logps", "is_weights"])
@pytest.mark.parametrize("op,backend", ops_for(["policy_loss_from_logits", "policy_loss_from_hidden"])
                         + [pytest.param("policy_loss", "torch", id="policy_loss")])
def test_nan_loss_inputs_under_the_mask(op, backend, what):
    kw = make_inputs(stable_seed("loss_under_mask", op, what))
    kw["advantages"] = torch.randn(B, T, generator=torch.Generator().manual_seed(3))  # per token
    kw[what] = torch.where(kw["mask"], kw[what], torch.full_like(kw[what], NAN))
    if op == "policy_loss":
        lp, h = ref.token_logprobs(kw["logits"], kw["targets"], mask=kw["mask"])
        kw["logps"], kw["entropy"] = lp.float(), h.float()
    check_against_reference(op, kw, backend, config=CFG.replace(beta=0.05))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_garbage_logps_under_the_mask(level):
    kw = make_inputs(stable_seed("logps_under_mask", level))
    lp, h = ref.token_logprobs(kw["logits"], kw["targets"], mask=kw["mask"])
    kw["logps"] = torch.where(kw["mask"], lp, torch.full_like(lp, NAN)).float()
    kw["entropy"] = torch.where(kw["mask"], h, torch.full_like(h, INF)).float()
    check_against_reference("policy_loss", kw, "torch", config=CFG.replace(ratio_level=level))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lens_confidence_ignores_masked_old_logps(backend):
    kw = make_inputs(stable_seed("lens_old_under_mask"))
    old = torch.where(kw["mask"], kw["old_logps"], torch.full_like(kw["old_logps"], NAN))
    adv, _ = lk.group_advantages(kw["rewards"], group_size=G, estimator="lens", old_logps=old, mask=kw["mask"])
    want = ref.group_advantages(kw["rewards"], group_size=G, estimator="lens", old_logps=old.double(),
                                mask=kw["mask"])
    assert_same(adv, want, "advantages")


# --------------------------------------------------------------------------------- mask values
def _call_with(op, kw, backend, **extra):
    if op == "policy_loss":
        lp, h = ref.token_logprobs(kw["logits"], kw["targets"])
        kw = dict(kw, logps=lp.float(), entropy=h.float())
    if op == "group_advantages":
        return lk.group_advantages(kw["rewards"], group_size=G, estimator="lens", old_logps=kw["old_logps"],
                                   mask=kw["mask"])
    return run_ours(op, kw, backend, **extra)


ALL_OPS = [pytest.param(op, b, id=f"{op}-{b}") for op in BACKEND_OPS for b in BACKENDS] + [
    pytest.param("policy_loss", "torch", id="policy_loss"), pytest.param("group_advantages", "torch",
                                                                         id="group_advantages")]


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
@pytest.mark.parametrize("op,backend", ALL_OPS)
def test_mask_must_be_zero_or_one(op, backend, value):
    kw = make_inputs(stable_seed("mask_value", op))
    mask = kw["mask"].float()
    mask[0, 0] = value
    kw["mask"] = mask
    with pytest.raises(ValueError, match="mask"):
        _call_with(op, kw, backend)


@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "policy_loss_from_logits"]))
def test_float_and_int_01_masks_equal_bool(op, backend):
    kw = make_inputs(stable_seed("mask_dtypes", op))
    for dtype in (torch.float32, torch.uint8):
        check_against_reference(op, dict(kw, mask=kw["mask"].to(dtype)), backend)


# ------------------------------------------------------------------------------------ targets
TARGET_OPS = [pytest.param(op, b, id=f"{op}-{b}") for op in BACKEND_OPS for b in BACKENDS]


@pytest.mark.parametrize("bad", [-100, -1, V, V + 1000])
@pytest.mark.parametrize("op,backend", TARGET_OPS)
def test_kept_target_out_of_range_is_an_error(op, backend, bad):
    kw = make_inputs(stable_seed("bad_target", op, bad))
    kw["targets"][0, 0] = bad
    with pytest.raises(ValueError, match="targets"):
        run_ours(op, kw, backend)


@pytest.fixture
def unchecked(monkeypatch):
    """Values unchecked, as for a GPU tensor without LENS_KERNELS_CHECK=1."""
    monkeypatch.setattr(_validation, "value_checks_enabled", lambda t: False)


@pytest.mark.parametrize("bad", [-100, V])
@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "linear_token_logprobs",
                                                "policy_loss_from_logits", "policy_loss_from_hidden"]))
def test_kept_target_out_of_range_unchecked_is_nan(op, backend, bad, unchecked):
    kw = make_inputs(stable_seed("bad_target_unchecked", op, bad))
    kw["targets"][0, 0] = bad
    outs, _ = run_ours(op, kw, backend)
    if op in ("token_logprobs", "linear_token_logprobs"):
        want, _ = run_ref(op, kw)
        assert_same(outs[0], want[0], "logps")  # NaN at [0, 0] only
        assert torch.isnan(outs[0][0, 0])
    else:
        assert torch.isnan(outs[0]), "a loss built from a bad kept target must be NaN"


@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "policy_loss_from_logits"]))
def test_padding_ids_under_the_mask_are_fine(op, backend):
    kw = make_inputs(stable_seed("padding", op))
    kw["targets"] = torch.where(kw["mask"], kw["targets"], torch.full_like(kw["targets"], -100))
    check_against_reference(op, kw, backend)


# ---------------------------------------------------------------------------------- empty work
EMPTY = [pytest.param(0, T, id="B0"), pytest.param(4, 0, id="T0"), pytest.param(0, 0, id="B0T0")]


@pytest.mark.parametrize("b,t", EMPTY)
@pytest.mark.parametrize("op,backend", ops_for())
def test_empty_work(op, backend, b, t):
    kw = make_inputs(stable_seed("empty", op), b=b, t=t)
    outs, grads = check_against_reference(op, kw, backend)
    if op in LOSS_OPS:
        assert float(outs[0].detach()) == 0.0
        assert all(torch.isfinite(v).all() for v in outs[1].values())
    for name, g in grads.items():
        assert g is None or g.shape == kw[name].shape


@pytest.mark.parametrize("b,t", EMPTY)
def test_empty_policy_loss(b, t):
    kw = make_inputs(stable_seed("empty_pl"), b=b, t=t)
    kw["logps"], kw["entropy"] = -torch.rand(b, t), torch.rand(b, t)
    outs, _ = check_against_reference("policy_loss", kw, "torch")
    assert float(outs[0].detach()) == 0.0


def test_empty_group_advantages():
    adv, metrics = lk.group_advantages(torch.zeros(0), group_size=4)
    assert adv.shape == (0,) and all(torch.isfinite(v).all() for v in metrics.values())
    adv, _ = lk.group_advantages(torch.zeros(0), group_size=4, estimator="lens", old_logps=torch.zeros(0, 3))
    assert adv.shape == (0,)


@pytest.mark.parametrize("op,backend", ops_for(LOSS_OPS))
def test_fully_masked_batch(op, backend):
    kw = make_inputs(stable_seed("all_masked", op))
    kw["mask"] = torch.zeros(B, T, dtype=torch.bool)
    outs, grads = check_against_reference(op, kw, backend)
    assert float(outs[0].detach()) == 0.0
    assert all(g is None or torch.all(g == 0) for n, g in grads.items() if n in ("logits", "hidden"))


# --------------------------------------------------------------------------- strided and aliased
@pytest.mark.parametrize("op,backend", ops_for(LOGIT_OPS))
def test_strided_logits_view(op, backend):
    kw = make_inputs(stable_seed("strided", op))
    check_against_reference(op, kw, backend, strided=True)


@pytest.mark.parametrize("op,backend", ops_for(["policy_loss_from_logits", "policy_loss_from_hidden"]))
def test_aliased_and_expanded_loss_inputs(op, backend):
    """old and reference log-probs the same tensor, advantages and IS weights as stride-0 views."""
    kw = make_inputs(stable_seed("aliased", op))
    kw["ref_logps"] = kw["old_logps"]
    kw["advantages"] = kw["advantages"][:, None].expand(B, T)
    kw["is_weights"] = kw["is_weights"][:1].expand(B, T)
    check_against_reference(op, kw, backend, config=CFG.replace(beta=0.05))


# ---------------------------------------------------------------------------------- in place
def _self_overlapping():
    storage = torch.randn(B * T + V, generator=torch.Generator().manual_seed(12))
    return storage.as_strided((B, T, V), (T, 1, 1))  # rows share entries


@pytest.mark.parametrize("buf", ["expanded", "self_overlapping"])
@pytest.mark.parametrize("op,backend", ops_for(LOGIT_OPS))
def test_inplace_into_an_aliased_buffer_is_an_error(op, backend, buf):
    kw = make_inputs(stable_seed("inplace_alias", op, buf))
    logits = kw["logits"][:1].expand(B, T, V) if buf == "expanded" else _self_overlapping()
    args = (logits.to(DEVICE), kw["targets"].to(DEVICE), kw["mask"].to(DEVICE))
    with pytest.raises(ValueError, match="logits"):
        if op == "token_logprobs":
            lk.token_logprobs(*args[:2], mask=args[2], inplace=True, backend=backend)
        elif op == "policy_loss_from_logits":
            lk.policy_loss_from_logits(*args, kw["advantages"].to(DEVICE), inplace=True, backend=backend)
        else:
            lk.lens_policy_loss_from_logits(*args, kw["rewards"].to(DEVICE), group_size=G, inplace=True,
                                            backend=backend)


@pytest.mark.parametrize("op,backend", ops_for(LOGIT_OPS))
def test_inplace_into_a_buffer_saved_by_another_op(op, backend):
    """logits = tanh(x): tanh saved its output for backward; writing dL/dlogits there must make
    autograd raise, never return a wrong gradient."""
    kw = make_inputs(stable_seed("inplace_saved", op))
    x = kw["logits"].detach().clone().to(DEVICE).requires_grad_()
    logits = torch.tanh(x)
    targets, mask = kw["targets"].to(DEVICE), kw["mask"].to(DEVICE)
    if op == "token_logprobs":
        lp, h = lk.token_logprobs(logits, targets, mask=mask, return_entropy=True, inplace=True,
                                  backend=backend)
        loss = lp.sum() + h.sum()
    elif op == "policy_loss_from_logits":
        loss, _ = lk.policy_loss_from_logits(logits, targets, mask, kw["advantages"].to(DEVICE), inplace=True,
                                             backend=backend, config=CFG)
    else:
        loss, _ = lk.lens_policy_loss_from_logits(logits, targets, mask, kw["rewards"].to(DEVICE), group_size=G,
                                                  inplace=True, backend=backend, config=CFG)
    try:
        loss.backward()
    except RuntimeError as exc:
        assert "inplace" in str(exc) or "in-place" in str(exc), exc
        return
    # no error: then the gradient must be right (an out-of-place fallback)
    y = kw["logits"].double().requires_grad_()
    if op == "token_logprobs":
        lp2, h2 = ref.token_logprobs(torch.tanh(y), kw["targets"], mask=kw["mask"])
        (lp2.sum() + h2.sum()).backward()
    elif op == "policy_loss_from_logits":
        ref.policy_loss_from_logits(torch.tanh(y), kw["targets"], kw["mask"], kw["advantages"],
                                    config=CFG)[0].backward()
    else:
        _call(None, op, dict(kw, logits=torch.tanh(y)), None, config=CFG)[0].backward()
    assert_same(x.grad, y.grad, "dx")


@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "policy_loss_from_logits"]))
def test_inplace_gradient_is_exact(op, backend):
    kw = make_inputs(stable_seed("inplace_ok", op))
    check_against_reference(op, kw, backend, inplace=True)


# ---------------------------------------------------------------------------- scalar arguments
SCALAR_OPS = [pytest.param(op, b, id=f"{op}-{b}") for op in LOSS_OPS for b in BACKENDS] + [
    pytest.param("policy_loss", "torch", id="policy_loss")]


@pytest.mark.parametrize("name", ["num_tokens", "num_sequences"])
@pytest.mark.parametrize("value", [pytest.param(torch.tensor(-5.0), id="t-5"), pytest.param(torch.tensor(0.0), id="t0"),
                                   pytest.param(torch.tensor(NAN), id="tnan"), pytest.param(-5.0, id="-5"),
                                   pytest.param(INF, id="inf"), pytest.param(torch.ones(2), id="t2")])
@pytest.mark.parametrize("op,backend", SCALAR_OPS)
def test_bad_normalizers_are_errors(op, backend, name, value):
    kw = make_inputs(stable_seed("normalizer", op, name))
    with pytest.raises(ValueError, match=name):
        _call_with(op, kw, backend, **{name: value})


@pytest.mark.parametrize("op,backend", ops_for(["policy_loss_from_logits", "policy_loss_from_hidden"]))
def test_tensor_normalizers_equal_the_reference(op, backend):
    kw = make_inputs(stable_seed("normalizer_ok", op))
    check_against_reference(op, kw, backend, num_tokens=torch.tensor(17.0), num_sequences=torch.tensor(3),
                            config=CFG.replace(loss_agg_mode="seq-mean-token-mean"))


@pytest.mark.parametrize("value", [INF, NAN, 0.0, -1.0])
@pytest.mark.parametrize("op,backend", ops_for(LOSS_OPS))
def test_bad_grad_scale_is_an_error(op, backend, value):
    kw = make_inputs(stable_seed("grad_scale", op))
    with pytest.raises(ValueError, match="grad_scale"):
        run_ours(op, kw, backend, grad_scale=value)


@pytest.mark.parametrize("field,value", [("beta", INF), ("beta", NAN), ("entropy_coef", INF),
                                         ("epsilon_low", NAN), ("epsilon_high", INF), ("kl_clamp", INF),
                                         ("log_ratio_clamp", INF), ("loss_norm_length", INF), ("dp_size", INF),
                                         ("cispo_ratio_cap", NAN), ("sapo_temperature_pos", INF),
                                         ("dual_clip", INF), ("delta", INF)])
def test_non_finite_config_values_are_errors(field, value):
    with pytest.raises(ValueError, match=field):
        lk.LossConfig(**{field: value})


@pytest.mark.parametrize("name,value", [("eps", NAN), ("eps", INF), ("lens_alpha", INF), ("lens_alpha", NAN)])
@pytest.mark.parametrize("op", ["group_advantages", "lens_policy_loss_from_logits"])
def test_bad_advantage_numbers_are_errors(op, name, value):
    kw = make_inputs(stable_seed("adv_numbers", name))
    with pytest.raises(ValueError, match=name):
        if op == "group_advantages":
            lk.group_advantages(kw["rewards"], group_size=G, estimator="lens", old_logps=kw["old_logps"],
                                **{name: value})
        else:
            lk.lens_policy_loss_from_logits(kw["logits"], kw["targets"], kw["mask"], kw["rewards"], group_size=G,
                                            advantage_config=lk.AdvantageConfig(**{name: value}))


@pytest.mark.parametrize("n", [B - 1, B + 2])
@pytest.mark.parametrize("op", ["lens_policy_loss_from_logits", "lens_policy_loss_from_hidden"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_lens_step_names_rewards(op, n, on_policy):
    kw = make_inputs(stable_seed("rewards_len", op))
    kw["rewards"] = torch.zeros(n)
    extra = {} if on_policy else {"old_logps": kw["old_logps"]}
    with pytest.raises(ValueError, match="rewards"):
        if op.endswith("logits"):
            lk.lens_policy_loss_from_logits(kw["logits"], kw["targets"], kw["mask"], kw["rewards"], group_size=G,
                                            **extra)
        else:
            lk.lens_policy_loss_from_hidden(kw["hidden"], kw["weight"], kw["targets"], kw["mask"], kw["rewards"],
                                            group_size=G, **extra)


# -------------------------------------------------------------------------------- temperature
BT = 3  # B == T: the ambiguous case


@pytest.mark.parametrize("op,backend,shape", [
    pytest.param(op, b, shape, id=f"{op}-{b}-{shape}")
    for op in ["token_logprobs", "linear_token_logprobs", "policy_loss_from_logits", "policy_loss_from_hidden"]
    for b in BACKENDS for shape in ["B", "B1", "BT", "scalar"] if b == "torch" or shape in ("B", "BT")])
def test_temperature_shapes_when_B_equals_T(op, backend, shape):
    kw = make_inputs(stable_seed("tau", op, shape), b=BT, t=BT)
    g = torch.Generator().manual_seed(13)
    tau = {"B": torch.rand(BT, generator=g) + 0.5, "B1": torch.rand(BT, 1, generator=g) + 0.5,
           "BT": torch.rand(BT, BT, generator=g) + 0.5, "scalar": torch.tensor(0.8)}[shape]
    check_against_reference(op, kw, backend, temperature=tau)
    if shape == "B":  # one per sequence, never along T: the same as the explicit [B, 1]
        assert_same(run_ours(op, kw, backend, temperature=tau)[0][0],
                    run_ref(op, kw, temperature=tau[:, None])[0][0], "per-sequence temperature")


@pytest.mark.parametrize("tau", [pytest.param(torch.ones(T), id="T"), pytest.param(torch.ones(B, T, 1), id="BT1"),
                                 pytest.param(torch.ones(1, T), id="1T"),
                                 pytest.param(torch.tensor([1.0, NAN, 1.0, 1.0]), id="nan"),
                                 pytest.param(torch.tensor([1.0, 0.0, 1.0, 1.0]), id="zero"),
                                 pytest.param(torch.full((B, T), INF), id="inf"),
                                 pytest.param(-1.0, id="neg"), pytest.param(INF, id="float_inf"),
                                 pytest.param(NAN, id="float_nan")])
@pytest.mark.parametrize("op,backend", ops_for(["token_logprobs", "linear_token_logprobs",
                                                "policy_loss_from_logits", "lens_policy_loss_from_hidden"]))
def test_bad_temperature_is_an_error(op, backend, tau):
    kw = make_inputs(stable_seed("bad_tau", op))
    with pytest.raises(ValueError, match="temperature"):
        run_ours(op, kw, backend, temperature=tau)


def test_two_d_temperature_shapes():
    g = torch.Generator().manual_seed(14)
    logits, targets = torch.randn(5, V, generator=g), torch.randint(0, V, (5,), generator=g)
    lp, _ = lk.token_logprobs(logits, targets, temperature=torch.full((5,), 0.7))
    assert_same(lp, ref.token_logprobs(logits, targets, 0.7)[0], "logps")
    with pytest.raises(ValueError, match="temperature"):
        lk.token_logprobs(logits, targets, temperature=torch.ones(5, 1))


# ----------------------------------------------------------------- inputs are never modified
@pytest.mark.parametrize("op,backend", ops_for() + [pytest.param("policy_loss", "torch", id="policy_loss")])
def test_inputs_are_not_modified(op, backend):
    """Forward and backward leave every input as it was (inplace=False)."""
    kw = make_inputs(stable_seed("not_modified", op))
    if op == "policy_loss":
        kw["logps"], kw["entropy"] = -torch.rand(B, T), torch.rand(B, T)
    kw = {k: v.to(DEVICE) for k, v in kw.items()}
    leaves = {n: kw[n].requires_grad_() for n in _leaves(op, kw)}
    copies = {k: v.detach().clone() for k, v in kw.items()}
    outs = _call(lk, op, kw, backend, config=CFG.replace(beta=0.05))
    _backward(outs, leaves)
    for k, v in kw.items():
        assert torch.equal(v.detach(), copies[k]), f"{k} was modified by {op} on {backend}"


def test_value_checks_are_off_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _validation.value_checks_enabled(torch.zeros(1))
    monkeypatch.undo()
    assert _validation.value_checks_enabled(torch.zeros(1))


def test_no_value_check_reads_a_gpu_tensor_without_the_flag(monkeypatch):
    """On a 'cuda' tensor without LENS_KERNELS_CHECK=1 the boundary must not read values (a host sync).
    Simulated on CPU: value_checks_enabled says False, and .item()/bool()/nonzero()/tolist() on any
    tensor raise while the public ops validate their inputs."""
    monkeypatch.setattr(_validation, "value_checks_enabled", lambda t: False)
    import lens_kernels.advantages as adv_mod
    import lens_kernels.lens_policy_loss as lens_mod
    monkeypatch.setattr(adv_mod, "value_checks_enabled", lambda t: False)
    monkeypatch.setattr(lens_mod, "value_checks_enabled", lambda t: False)
    kw = make_inputs(stable_seed("no_sync"))
    calls = []

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name} during validation")
        monkeypatch.setattr(torch.Tensor, name, wrapper)
        return original

    from lens_kernels import loss as loss_mod
    from lens_kernels import logprobs as lp_mod
    tau = torch.rand(B, generator=torch.Generator().manual_seed(15)) + 0.5
    originals = {n: forbid(n) for n in ("item", "__bool__", "nonzero", "tolist")}
    try:
        lp_mod.validate_logits_inputs(kw["logits"], kw["targets"], kw["mask"].float(), tau)
        lp_mod.validate_hidden_inputs(kw["hidden"], kw["weight"], kw["bias"], kw["targets"], kw["mask"], tau)
        loss_mod.validate_loss_inputs((B, T), "cpu", kw["advantages"], kw["mask"].float(), kw["old_logps"],
                                      None, kw["is_weights"], CFG, torch.tensor(5.0), torch.tensor(2))
        loss_mod._check_grad_scale(0.5)
        _validation.check_inplace_buffer("logits", kw["logits"][:, :-1])
        lens_mod._check_rewards(B, kw["rewards"], None)
        adv_mod._validate(kw["rewards"], G, None, "lens", kw["old_logps"], kw["mask"], None, None, 1e-4, 0.25,
                          "mean", "all", "raise")
        adv_mod._check_batch(kw["rewards"], G, "nsr", (kw["rewards"] > 0).float(), "raise")
        adv_mod._check_confidence(kw["old_logps"].sum(-1), kw["rewards"])
    finally:
        for n, f in originals.items():
            monkeypatch.setattr(torch.Tensor, n, f)
    assert not calls
