"""Higher-order autograd and gradients with respect to views, on every entry point that runs here.

- ``lk.policy_loss`` on log-probs from ``torch.log_softmax``: a Hessian-vector product through it
  (``create_graph=True``) equals the float64 reference's, for each loss type.
- Every op whose backward is a kernel (token_logprobs, linear_token_logprobs, the fused losses, the
  LENS step) refuses ``create_graph=True`` with an error naming it, on the torch and Triton backends.
- ``torch.autograd.grad(loss, view)`` for ``view = base[:, :-1]`` of a non-leaf base.
"""
from triton_interp import DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

import pytest
import torch

import lens_kernels as lk
from lens_kernels import reference
from seeds import stable_seed

B, T, V, H = 3, 5, 37, 16
LOSS_CONFIGS = {
    "ppo": lk.LossConfig(epsilon_high=0.28),
    "dual_clip_delta": lk.LossConfig(dual_clip=3.0, delta=2.0),
    "cispo": lk.LossConfig(policy_loss="cispo"),
    "sapo": lk.LossConfig(policy_loss="sapo"),
    "gspo": lk.LossConfig(ratio_level="sequence", loss_agg_mode="seq-mean-token-mean"),
    "gspo_token": lk.LossConfig(ratio_level="sequence_token"),
    "k3_entropy": lk.LossConfig(beta=0.05, kl_clamp=10.0, entropy_coef=0.01),
}


def _batch(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = reference.token_logprobs(logits[:, :-1].double(), targets)[0] + 0.3 * torch.randn(B, T, generator=g,
                                                                                              dtype=torch.float64)
    ref = old - 0.2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    return logits, targets, mask, adv, old, ref


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_hessian_vector_product_through_policy_loss_is_exact(name):
    cfg = LOSS_CONFIGS[name]
    logits, targets, mask, adv, old, ref = _batch(stable_seed("hvp", name))
    direction = torch.randn(logits[:, :-1].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def hvp(loss_fn):
        z = logits[:, :-1].clone().requires_grad_(True)
        logp_all = torch.log_softmax(z, -1)
        logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        loss = loss_fn(logps, entropy)
        (g,) = torch.autograd.grad(loss, z, create_graph=True)
        (hv,) = torch.autograd.grad((g * direction).sum(), z)
        return g.detach(), hv

    kw = dict(old_logps=old, ref_logps=ref, config=cfg)
    got_g, got_hv = hvp(lambda lp, h: lk.policy_loss(lp, adv, mask, entropy=h, **kw)[0])
    want_g, want_hv = hvp(lambda lp, h: reference.policy_loss(lp, adv, mask, entropy=h, **kw)[0])
    torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_hv, want_hv, rtol=1e-10, atol=1e-13)
    assert got_hv.abs().max() > 0, "a zero Hessian-vector product would pass for any formula"


def _kernel_entry_points(backend):
    logits, targets, mask, adv, old, _ = _batch(11, torch.float32)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    rewards = torch.tensor([1.0, 0.0, 0.0])
    old = old.float()
    to = (lambda x: x.to(DEVICE)) if backend == "triton" else (lambda x: x)
    logits, targets, mask, adv, old, hidden, weight, rewards = map(to, (logits, targets, mask, adv, old, hidden,
                                                                         weight, rewards))
    z = lambda: logits.clone().requires_grad_(True)  # noqa: E731
    h = lambda: hidden.clone().requires_grad_(True)  # noqa: E731
    return {
        "token_logprobs": lambda: lk.token_logprobs(z()[:, :-1], targets, mask=mask, backend=backend)[0].sum(),
        "linear_token_logprobs": lambda: lk.linear_token_logprobs(h(), weight, targets, mask=mask,
                                                                  backend=backend)[0].sum(),
        "policy_loss_from_logits": lambda: lk.policy_loss_from_logits(z()[:, :-1], targets, mask, adv, old_logps=old,
                                                                      backend=backend)[0],
        "policy_loss_from_hidden": lambda: lk.policy_loss_from_hidden(h(), weight, targets, mask, adv, old_logps=old,
                                                                      backend=backend)[0],
        "policy_loss_from_hidden_lean": lambda: lk.policy_loss_from_hidden(h(), weight, targets, mask, adv,
                                                                           mode="lean", backend=backend)[0],
        "lens_policy_loss_from_logits": lambda: lk.lens_policy_loss_from_logits(z()[:, :-1], targets, mask, rewards,
                                                                                group_size=3, backend=backend)[0],
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", list(_kernel_entry_points("torch")))
def test_create_graph_through_a_kernel_backward_is_refused(backend, entry):
    loss = _kernel_entry_points(backend)[entry]()
    inputs = [t for t in _leaves(loss)]
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, inputs, create_graph=True)
    # without create_graph the same graph still differentiates once
    loss = _kernel_entry_points(backend)[entry]()
    grads = torch.autograd.grad(loss, [t for t in _leaves(loss)])
    assert all(torch.isfinite(g).all() for g in grads)


def _leaves(loss):
    """The leaf tensors that require grad behind ``loss``."""
    seen, stack, leaves = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["policy_loss_from_logits", "token_logprobs"])
def test_gradient_with_respect_to_a_view_of_a_non_leaf(backend, op):
    logits, targets, mask, adv, old, _ = _batch(21, torch.float32)
    device = DEVICE if backend == "triton" else "cpu"
    logits, targets, mask, adv, old = (x.to(device) for x in (logits, targets, mask, adv, old.float()))

    def run(z):
        if op == "token_logprobs":
            return lk.token_logprobs(z, targets, mask=mask, backend=backend)[0].sum()
        return lk.policy_loss_from_logits(z, targets, mask, adv, old_logps=old, backend=backend)[0]

    leaf = logits.clone().requires_grad_(True)
    base = leaf * 1.0
    view = base[:, :-1]
    (d_view,) = torch.autograd.grad(run(view), view)
    own = logits[:, :-1].clone().requires_grad_(True)
    run(own).backward()
    # a contiguous copy's rows sit at other 16-byte phases: Triton's peeled sweeps sum in another order
    rtol = 0 if backend == "torch" else 2e-6
    torch.testing.assert_close(d_view, own.grad, rtol=rtol, atol=0)
