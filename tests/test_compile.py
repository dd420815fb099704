"""torch.compile(fullgraph=True) over the public ops: it traces, and the compiled call equals eager.

The torch backend's ops are torch.library custom ops under compile (``lens_kernels::token_logprobs_fwd``
/ ``_bwd`` and ``linear_token_logprobs_fwd`` / ``_bwd``): one opaque node per direction, with fake
implementations for shapes and the backward as their autograd formula. The policy loss and the
advantages are traced as ordinary torch code. ``backend="aot_eager"`` runs dynamo and AOT autograd
(the fake implementations and the backward graph) without code generation, so these tests are fast;
one case compiles with inductor. Value checks that would read tensor values are off while tracing.

Compile-time values stay equal to eager up to the float rounding of the traced loss arithmetic:
tolerances are 1e-12 (fp64 inputs).
"""
import time

import pytest
import torch
import torch._inductor.config

import lens_kernels as lk

SEED = 2024
B, T, V, H = 4, 6, 29, 8
TOL = dict(atol=1e-12, rtol=1e-10)


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    # inductor's on-disk caches key a graph by its ops' schemas, not by their fake implementations:
    # a graph cached by an earlier version of these ops (another layout of their saved statistics)
    # would be replayed here
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch(seed=SEED, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 0] = True
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[~mask] = -100
    d = dict(
        logits=torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 2,
        hidden=torch.randn(B, T, H, generator=g, dtype=torch.float64),
        weight=torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5,
        bias=torch.randn(V, generator=g, dtype=torch.float64) * 0.1,
        targets=targets, mask=mask,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        old_logps=-torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        ref_logps=-torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]),  # groups of 2: one mixed, one negative
    )
    return {k: v.to(device) for k, v in d.items()}


def run(fn, d, leaves, compiled, backend="aot_eager"):
    """(outputs, gradients of ``leaves``) of fn(**inputs), eager or compiled with fullgraph=True."""
    ins = {k: (v.clone().requires_grad_() if k in leaves else v) for k, v in d.items()}
    f = torch.compile(fn, fullgraph=True, backend=backend) if compiled else fn
    out = f(ins)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, [ins[k].grad for k in leaves]


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    flat = lambda o: [x for x in (o if isinstance(o, tuple) else (o,)) if torch.is_tensor(x)]  # noqa: E731
    for x, y in zip(flat(out_a), flat(out_b)):
        torch.testing.assert_close(x, y, **TOL)
    for x, y in zip(grads_a, grads_b):
        assert x is not None and y is not None
        torch.testing.assert_close(x, y, **TOL)


CONFIG = lk.LossConfig(beta=0.04, entropy_coef=0.01, epsilon_high=0.28)


def f_token_logprobs(d):
    logp, ent = lk.token_logprobs(d["logits"][:, :-1], d["targets"], mask=d["mask"], temperature=0.8,
                                  return_entropy=True)
    return (logp * 0.5).sum() + (ent * 0.25).sum(), logp, ent


def f_loss_from_logits(d, ratio_level="token"):
    loss, m = lk.policy_loss_from_logits(d["logits"][:, :-1], d["targets"], d["mask"], d["advantages"],
                                         old_logps=d["old_logps"], ref_logps=d["ref_logps"], temperature=0.9,
                                         config=CONFIG.replace(ratio_level=ratio_level))
    return loss, m["ratio_mean"], m["entropy"], m["kl"]


def f_loss_from_hidden(d):
    loss, m = lk.policy_loss_from_hidden(d["hidden"], d["weight"], d["targets"], d["mask"], d["advantages"],
                                         bias=d["bias"], old_logps=d["old_logps"], ref_logps=d["ref_logps"],
                                         config=CONFIG)
    return loss, m["ratio_mean"], m["entropy"]


def f_group_advantages(d, estimator="lens"):
    adv, m = lk.group_advantages(d["rewards"], group_size=2, estimator=estimator,
                                 old_logps=d["old_logps"] if estimator == "lens" else None, mask=d["mask"])
    # advantages carry no gradient: a differentiable tail through old_logps' neighbour checks the graph
    return (adv.unsqueeze(1) * d["ref_logps"]).sum(), adv, m["frac_negative_groups"]


def f_lens_step(d):
    loss, m = lk.lens_policy_loss_from_logits(d["logits"][:, :-1], d["targets"], d["mask"], d["rewards"],
                                              group_size=2, ref_logps=d["ref_logps"], config=CONFIG)
    return loss, m["advantages"], m["entropy"]


CASES = {
    "token_logprobs": (f_token_logprobs, ("logits",)),
    "policy_loss_from_logits": (f_loss_from_logits, ("logits",)),
    "policy_loss_from_logits_gspo": (lambda d: f_loss_from_logits(d, "sequence"), ("logits",)),
    "policy_loss_from_hidden": (f_loss_from_hidden, ("hidden", "weight", "bias")),
    "group_advantages_lens": (f_group_advantages, ("ref_logps",)),
    "group_advantages_grpo": (lambda d: f_group_advantages(d, "grpo"), ("ref_logps",)),
    "lens_policy_loss_from_logits": (f_lens_step, ("logits",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_compile_matches_eager(case):
    fn, leaves = CASES[case]
    d = batch()
    assert_same(run(fn, d, leaves, compiled=True), run(fn, d, leaves, compiled=False))


@pytest.mark.parametrize("case", ["policy_loss_from_logits", "lens_policy_loss_from_logits",
                                  "policy_loss_from_hidden"])
def test_loss_path_has_no_graph_break(case):
    fn, _ = CASES[case]
    d = batch()
    d = {k: (v.requires_grad_() if k in ("logits", "hidden") else v) for k, v in d.items()}
    explained = torch._dynamo.explain(fn)(d)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_custom_ops_pass_opcheck():
    """Schema, fake implementation and autograd registration of the ops (one definition each, the
    backend a schema argument), on the torch backend's launchers."""
    from lens_kernels.logprobs import linear_token_logprobs_fwd, token_logprobs_fwd
    d = batch()
    logits = d["logits"][:, :-1].clone().requires_grad_()
    torch.library.opcheck(token_logprobs_fwd, (logits, d["targets"], d["mask"], 0.7, None, "torch", False))
    torch.library.opcheck(token_logprobs_fwd,
                          (logits, d["targets"].clamp(min=0), None, 1.0, torch.rand(B, T) + 0.5, "torch", False))
    h, w, b = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    torch.library.opcheck(linear_token_logprobs_fwd, (h, w, b, d["targets"], d["mask"], 0.9, None, "torch", ""))


def test_inductor_compiles_the_loss():
    """One inductor compile of the loss from logits (fp32), timed: it must stay fast enough for CI."""
    d = batch()
    d = {k: (v.float() if v.dtype == torch.float64 else v) for k, v in d.items()}
    start = time.perf_counter()
    compiled = run(f_loss_from_logits, d, ("logits",), compiled=True, backend="inductor")
    elapsed = time.perf_counter() - start
    eager = run(f_loss_from_logits, d, ("logits",), compiled=False)
    (out_c, (g_c,)), (out_e, (g_e,)) = compiled, eager
    torch.testing.assert_close(out_c[0], out_e[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_c, g_e, atol=1e-6, rtol=1e-5)
    print(f"inductor compile + first call: {elapsed:.1f} s")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_compile_matches_eager_gpu(case):
    fn, leaves = CASES[case]
    d = batch(device="cuda")
    assert_same(run(fn, d, leaves, compiled=True), run(fn, d, leaves, compiled=False))
