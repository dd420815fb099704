"""Tolerances set from the measured error, with the margin stated, relative to the tensor's scale.

A gradient returned in a 16-bit logits dtype is the fp32 gradient rounded once: each element is
within half an ulp of its exact value, 2^-8 of its magnitude for bf16 (7 stored mantissa bits) and
2^-11 for fp16, plus the fp32 computation's own error (measured ~1e-7 of the largest gradient; 1e-6
allowed). A gradient off by 1% fails; the old bound (atol 2e-3, rtol 2e-2) let a x1.10 gradient
through on small entries.
Losses and metrics are fp32 sums of fp32 terms computed from the same (rounded) inputs as the
reference: measured 3e-7 of |loss| in bf16 and fp32; 2e-6 allowed (x7).
"""
import torch

ROUNDING = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
GRAD_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-6, torch.float16: 1e-6}
VALUE_REL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def assert_grad_close(got, want, dtype, name="gradient", ulps=1.0):
    """|got - want| <= ulps ROUNDING[dtype] |want| + GRAD_FLOOR[dtype] max |want|, elementwise.
    ``ulps`` > 1 for kernels that round more than once (say which, and the measured error)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-30)
    bound = ulps * ROUNDING[dtype] * want.abs() + GRAD_FLOOR[dtype] * scale
    excess = ((got - want).abs() - bound).max().item() if want.numel() else -1.0
    assert excess <= 0, f"{name}: error exceeds the {dtype} bound by {excess:.3g} (scale {scale:.3g})"


def assert_value_close(got, want, dtype, name="value"):
    """|got - want| <= VALUE_REL[dtype] max(1, |want|)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= VALUE_REL[dtype] * scale, f"{name}: error {err:.3g} > {VALUE_REL[dtype]:g} x {scale:.3g}"
