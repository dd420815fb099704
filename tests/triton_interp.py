"""Import this before anything that imports triton kernels: it makes the tests of the triton backend
run on CPU tensors under the Triton interpreter when there is no GPU, and on the GPU otherwise.

TRITON_INTERPRET must be set before triton is imported. If the backend's modules were imported
earlier (without triton itself), they are reloaded so that the kernels are interpreted; if triton was
imported earlier, this raises and says to set the variable in the environment.
"""
import importlib
import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:  # triton reads the setting once, at its import: too late to switch
        raise RuntimeError("triton was imported before the triton backend tests could set TRITON_INTERPRET=1; "
                           "run the tests with TRITON_INTERPRET=1 in the environment")
    for name in ("_common", "token_logprobs", "policy_loss", "vocab_shard", "linear_token_logprobs",
                 "policy_loss_from_hidden", "__init__"):
        module = sys.modules.get("lens_kernels.backends.triton" + ("" if name == "__init__" else "." + name))
        if module is not None:
            importlib.reload(module)

import lens_kernels.backends.triton as triton_backend  # noqa: E402

assert DEVICE in triton_backend.DEVICES, "the triton backend cannot run on this machine's tensors"


def assert_close_scaled(got, want, rel, name=""):
    """max |got - want| <= rel * max(1e-30, max |want|), everything finite (NaN never passes)."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the result"
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-30)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"
