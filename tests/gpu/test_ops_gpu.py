"""The ops' single definitions on a GPU (skipped without CUDA; run by the device script).

- A compiled model runs our kernels: under torch.compile the log-prob ops stay opaque custom ops
  whose CUDA implementation is the chosen backend's launcher, so the Triton kernels run (counted
  here at the launchers), and the compiled loss and gradient equal eager's.
- Tensors on another GPU than the current one (``device_map="auto"`` puts lm_head on the last GPU):
  every op launches on the tensors' device (two GPUs needed).
"""
import importlib

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import lens_kernels as lk  # noqa: E402
from lens_kernels import backends  # noqa: E402


def _batch(device, B=2, T=48, V=1003, H=64, seed=7):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(B, T + 1, V, generator=g).to(device)
    hidden = torch.randn(B, T, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    adv = torch.randn(B, generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 4).to(device)
    return logits, hidden, weight, targets, mask, adv, old


def _count_launches(monkeypatch, op, backend, what):
    launchers = backends.launchers(op, backend)
    real = getattr(launchers, what)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(launchers, what, counted)
    return calls


def test_compiled_loss_runs_the_triton_kernels(monkeypatch):
    torch._dynamo.reset()
    logits, _, _, targets, mask, adv, old = _batch("cuda")
    fwd = _count_launches(monkeypatch, "token_logprobs", "triton", "forward")
    bwd = _count_launches(monkeypatch, "token_logprobs", "triton", "backward")

    def loss_fn(z):
        loss, _ = lk.policy_loss_from_logits(z[:, :-1], targets, mask, adv, old_logps=old)
        return loss

    z_eager = logits.clone().requires_grad_(True)
    loss_eager = loss_fn(z_eager)
    loss_eager.backward()
    z = logits.clone().requires_grad_(True)
    loss = torch.compile(loss_fn, fullgraph=True)(z)
    loss.backward()
    assert fwd and bwd, "the compiled graph did not call the Triton log-prob kernels"
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad, z_eager.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_launch_on_the_tensors_device():
    cpu = _batch("cpu")
    gpu = _batch("cuda:1")
    torch.cuda.set_device(0)
    logits, hidden, weight, targets, mask, adv, old = gpu
    want_logits, want_hidden, want_weight = (x.double() for x in cpu[:3])
    for name, run, want in (
        ("token_logprobs", lambda z: lk.token_logprobs(z[:, :-1], targets, mask=mask)[0].sum(),
         lambda z: lk.token_logprobs(z[:, :-1], cpu[3], mask=cpu[4], backend="torch")[0].sum()),
        ("policy_loss_from_logits", lambda z: lk.policy_loss_from_logits(z[:, :-1], targets, mask, adv,
                                                                          old_logps=old)[0],
         lambda z: lk.policy_loss_from_logits(z[:, :-1], cpu[3], cpu[4], cpu[5].double(), old_logps=cpu[6].double(),
                                              backend="torch")[0]),
    ):
        z = logits.clone().requires_grad_(True)
        got = run(z)
        got.backward()
        assert z.grad.device == torch.device("cuda:1") and torch.cuda.current_device() == 0, name
        z64 = want_logits.clone().requires_grad_(True)
        expected = want(z64)
        expected.backward()
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(z.grad.double().cpu(), z64.grad, rtol=1e-4, atol=1e-6, msg=name)
    h = hidden.clone().requires_grad_(True)
    lp, _ = lk.linear_token_logprobs(h, weight, targets, mask=mask)
    lp.sum().backward()
    h64 = want_hidden.clone().requires_grad_(True)
    lp64, _ = lk.linear_token_logprobs(h64, want_weight, cpu[3], mask=cpu[4])
    lp64.sum().backward()
    torch.testing.assert_close(lp.double().cpu(), lp64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, rtol=1e-3, atol=1e-4)


def test_module_layout():
    """Each op's launchers are found by its name in every backend module that serves it."""
    for backend in ("torch", "triton"):
        module = importlib.import_module(f"lens_kernels.backends.{backend}")
        for op in ("token_logprobs", "linear_token_logprobs", "policy_loss_from_logits", "policy_loss_from_hidden"):
            assert hasattr(getattr(module, op), "forward"), (backend, op)
