"""The triton backend's fused policy loss from logits (2-pass token-level kernel, 3-pass GSPO path)
against the float64 reference: loss, every metric and dL/dz, for every loss option, under the Triton
interpreter on CPU (or natively on a GPU)."""
from triton_interp import DEVICE, assert_close_scaled  # noqa: I001  (sets TRITON_INTERPRET first)

import importlib
import warnings

import pytest
import torch

import lens_kernels as lk
from lens_kernels import LossConfig, reference
from lens_kernels import loss as loss_module
import backend_calls as calls  # noqa: E402

# the package re-exports the function under the module's name: fetch the module itself
pl = importlib.import_module("lens_kernels.backends.triton.policy_loss")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_REL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
VALUE_REL = 2e-5  # loss and metrics are fp32 sums of fp32 values from the same inputs

CONFIGS = {
    "ppo": LossConfig(),
    "ppo_asym_dual_delta": LossConfig(epsilon_low=0.2, epsilon_high=0.28, dual_clip=3.0, delta=1.6),
    "ppo_log_ratio_clamp": LossConfig(log_ratio_clamp=0.25),
    "cispo": LossConfig(policy_loss="cispo", cispo_ratio_cap=1.1),
    "sapo": LossConfig(policy_loss="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    "kl_k1": LossConfig(beta=0.1, kl_estimator="k1"),
    "kl_k2_clamp": LossConfig(beta=0.2, kl_estimator="k2", kl_clamp=0.05),
    "kl_k3_clamp": LossConfig(beta=0.05, kl_estimator="k3", kl_clamp=0.1),
    "entropy_bonus": LossConfig(entropy_coef=0.01),
    "entropy_token_mean_on_seq_mean": LossConfig(entropy_coef=0.02, entropy_agg_mode="token-mean",
                                                 loss_agg_mode="seq-mean-token-mean"),
    "seq_mean_token_mean": LossConfig(loss_agg_mode="seq-mean-token-mean"),
    "seq_mean_token_sum": LossConfig(loss_agg_mode="seq-mean-token-sum", dp_size=4.0),
    "dr_grpo": LossConfig(loss_agg_mode="seq-mean-token-sum-norm", loss_norm_length=16.0),
    "token_sum": LossConfig(loss_agg_mode="token-sum", beta=0.01),
    "verl_like": LossConfig(epsilon_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0, beta=0.001, kl_clamp=10.0,
                            entropy_coef=0.001),
    "gspo_sequence": LossConfig(ratio_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
    "gspo_sequence_token": LossConfig(ratio_level="sequence_token", beta=0.05, entropy_coef=0.01),
}
# (advantages per token, IS weights, old_logps, per-row temperature, global normalizers), cycled over configs
EXTRAS = [
    dict(),
    dict(adv_per_token=True, is_weights="token"),
    dict(is_weights="seq", per_row_temperature=True),
    dict(on_policy=True),
    dict(global_norm=True, adv_per_token=True),
]
VOCABS = [37, 1000, 4099]


def _inputs(B, T, V, dtype, seed, pad=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(B, T + pad, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False  # a fully masked sequence
    targets = torch.where(mask, targets, torch.full_like(targets, -100))
    l_true, _ = reference.token_logprobs(base[:, :T], targets, 1.0, mask)
    # old / ref log-probs near the current ones: ratios on both sides of the clip range
    old = (l_true + 0.3 * torch.randn(B, T, generator=g)).float()
    ref = (l_true + 0.3 * torch.randn(B, T, generator=g)).float()
    return [x.to(DEVICE) for x in (base, targets, mask, old, ref)] + [g]


def _call_kwargs(cfg, extras, B, T, g, old, ref):
    kw = dict(config=cfg, old_logps=None if extras.get("on_policy") else old,
              ref_logps=ref if cfg.beta != 0.0 else None)
    adv = torch.randn(B, T, generator=g) if extras.get("adv_per_token") else torch.randn(B, generator=g)
    kw["advantages"] = adv.to(DEVICE)
    if extras.get("is_weights") == "token":
        kw["is_weights"] = (torch.rand(B, T, generator=g) + 0.5).to(DEVICE)
    elif extras.get("is_weights") == "seq":
        kw["is_weights"] = (torch.rand(B, generator=g) + 0.5).to(DEVICE)
    kw["temperature"] = (torch.rand(B, T, generator=g) + 0.5).to(DEVICE) if extras.get("per_row_temperature") \
        else 0.9
    if extras.get("global_norm"):
        kw["num_tokens"] = torch.tensor(37.0).to(DEVICE)
        kw["num_sequences"] = 6
    return kw


def _reference(view, targets, mask, kw):
    z = view.detach().double().requires_grad_(True)
    kw = dict(kw)
    adv = kw.pop("advantages")
    tau = kw.pop("temperature")
    tau = tau.double() if torch.is_tensor(tau) else tau
    loss, metrics = reference.policy_loss_from_logits(z, targets, mask, adv, temperature=tau, **kw)
    loss.backward()
    return loss, metrics, z.grad


CASES = [(name, dtype) for name in CONFIGS for dtype in DTYPES]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_loss_metrics_and_grad_match_reference(name, dtype):
    cfg = CONFIGS[name]
    index = list(CONFIGS).index(name)
    extras = EXTRAS[index % len(EXTRAS)]
    V = VOCABS[(index + DTYPES.index(dtype)) % len(VOCABS)]
    B, T = 3, 5
    base, targets, mask, old, ref, g = _inputs(B, T, V, dtype, seed=100 + index)
    kw = _call_kwargs(cfg, extras, B, T, g, old, ref)
    base.requires_grad_(True)
    view = base[:, :-1]  # the usual strided slice, never copied
    loss, metrics = lk.policy_loss_from_logits(view, targets, mask, backend="triton", **kw)
    loss.backward()
    ref_loss, ref_metrics, ref_grad = _reference(base[:, :-1], targets, mask, kw)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_scaled(loss, ref_loss, VALUE_REL, "loss")
    for key, want in ref_metrics.items():
        got = metrics[key]
        assert got.dim() == 0, key
        assert abs(got.item() - want.item()) <= VALUE_REL * max(1.0, abs(want.item())), (key, got, want)
    assert_close_scaled(base.grad[:, :-1], ref_grad, GRAD_REL[dtype], "dL/dz")
    assert (base.grad[:, :-1][~mask] == 0).all(), "masked rows must get an exact-zero gradient"
    assert (base.grad[:, -1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["ppo_asym_dual_delta", "entropy_bonus", "gspo_sequence_token"])
def test_inplace_writes_the_gradient_into_the_logits_view(dtype, name):
    cfg = CONFIGS[name]
    B, T, V = 3, 4, 1001
    base, targets, mask, old, ref, g = _inputs(B, T, V, dtype, seed=7)
    kw = _call_kwargs(cfg, EXTRAS[0], B, T, g, old, ref)
    last_column = base[:, -1].clone()
    ref_loss, _, ref_grad = _reference(base[:, :-1], targets, mask, kw)
    base.requires_grad_(True)
    loss, _ = lk.policy_loss_from_logits(base[:, :-1], targets, mask, inplace=True, backend="triton", **kw)
    loss.backward()
    assert_close_scaled(loss, ref_loss, VALUE_REL, "loss")
    assert_close_scaled(base.detach()[:, :-1], ref_grad, GRAD_REL[dtype], "in-place dL/dz")
    assert (base.detach()[:, :-1][~mask] == 0).all()
    assert torch.equal(base.detach()[:, -1], last_column), "inplace must not touch memory outside the view"
    assert_close_scaled(base.grad[:, :-1], ref_grad, GRAD_REL[dtype], "returned dL/dz")


def _scaled_grad_run(grad_scale, upstream, dtype=torch.float32):
    B, T, V = 2, 4, 333
    base, targets, mask, old, ref, g = _inputs(B, T, V, dtype, seed=21, pad=0)
    kw = _call_kwargs(CONFIGS["ppo"], EXTRAS[0], B, T, g, old, ref)
    _, _, ref_grad = _reference(base, targets, mask, kw)
    z = base.clone().requires_grad_(True)
    loss, _ = lk.policy_loss_from_logits(z, targets, mask, grad_scale=grad_scale, backend="triton", **kw)
    (loss * upstream).backward()
    return z.grad, ref_grad * upstream


def test_declared_grad_scale_matches_upstream_without_warning(monkeypatch):
    monkeypatch.setattr(loss_module, "GRAD_SCALE_WATCH", loss_module._GradScaleWatch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = _scaled_grad_run(grad_scale=0.25, upstream=0.25)
    assert_close_scaled(got, want, GRAD_REL[torch.float32], "dL/dz at the declared scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_scale_mismatch_is_rescaled_and_warned_once(monkeypatch, dtype):
    monkeypatch.setattr(loss_module, "GRAD_SCALE_WATCH", loss_module._GradScaleWatch())
    with pytest.warns(RuntimeWarning, match="grad_scale"):
        got, want = _scaled_grad_run(grad_scale=1.0, upstream=3.0, dtype=dtype)
    assert_close_scaled(got, want, GRAD_REL[dtype], "rescaled dL/dz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        got, want = _scaled_grad_run(grad_scale=0.5, upstream=-2.0, dtype=dtype)
    assert_close_scaled(got, want, GRAD_REL[dtype], "rescaled dL/dz (negative upstream)")


def test_second_backward_is_refused():
    B, T, V = 2, 3, 50
    base, targets, mask, old, ref, g = _inputs(B, T, V, torch.float32, seed=3, pad=0)
    z = base.clone().requires_grad_(True)
    loss, _ = lk.policy_loss_from_logits(z, targets, mask, torch.randn(B).to(DEVICE), old_logps=old,
                                         backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_no_grad_forward_leaves_logits_alone_even_inplace():
    B, T, V = 2, 3, 77
    base, targets, mask, old, ref, g = _inputs(B, T, V, torch.float32, seed=4, pad=0)
    kept = base.clone()
    adv = torch.randn(B).to(DEVICE)
    loss, metrics = lk.policy_loss_from_logits(base, targets, mask, adv, old_logps=old, inplace=True,
                                               backend="triton")
    assert torch.equal(base, kept)
    ref_loss, ref_metrics, _ = _reference(kept, targets, mask, dict(advantages=adv, old_logps=old, temperature=1.0))
    assert_close_scaled(loss, ref_loss, VALUE_REL, "loss")


def test_fused_kernel_overwrites_poisoned_gradient_buffer():
    B, T, V = 2, 3, 517
    base, targets, mask, old, ref, g = _inputs(B, T, V, torch.bfloat16, seed=9, pad=0)
    grad = torch.full_like(base, float("nan"))
    cfg = CONFIGS["verl_like"]
    outputs = pl.fused_policy_loss_forward(base, grad, targets, mask, torch.randn(B).to(DEVICE), old, ref, None,
                                           1.0, cfg, None, None, 1.0)
    assert torch.isfinite(grad).all() and torch.isfinite(outputs).all()
    assert (grad[~mask] == 0).all()
    loss_part, _, _, _, entropy, logp = outputs.unbind(0)
    assert (logp <= 0).all() and (loss_part[~mask.reshape(-1)] == 0).all()


def test_huge_logits_policy_loss():
    B, T, V = 2, 3, 257
    g = torch.Generator().manual_seed(17)
    base = ((torch.rand(B, T, V, generator=g) * 2 - 1) * 1e4).to(DEVICE)
    targets = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool).to(DEVICE)
    kw = dict(advantages=torch.randn(B).to(DEVICE), temperature=1.0,
              config=LossConfig(entropy_coef=0.01))
    ref_loss, _, ref_grad = _reference(base, targets, mask, kw)
    z = base.clone().requires_grad_(True)
    loss, metrics = lk.policy_loss_from_logits(z, targets, mask, backend="triton", **kw)
    loss.backward()
    assert_close_scaled(loss, ref_loss, 1e-4, "loss")
    assert_close_scaled(z.grad, ref_grad, 1e-4, "dL/dz")


class _Props:
    """torch.cuda.get_device_properties of an H200-like device, with a settable SM count."""

    def __init__(self, sms):
        self.multi_processor_count = sms
        self.regs_per_multiprocessor = 65536
        self.max_threads_per_multi_processor = 2048


def _fake_device(monkeypatch, sms):
    monkeypatch.setattr(pl.torch.cuda, "get_device_properties", lambda device: _Props(sms))
    monkeypatch.setattr(pl.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(pl, "_SPLIT_REGS", {})


def test_variant_choice_is_data_driven(monkeypatch):
    cuda = torch.device("cuda", 0)
    _fake_device(monkeypatch, sms=132)
    monkeypatch.setattr(pl, "INTERPRETING", False)
    monkeypatch.delenv("LENS_KERNELS_TRITON_VARIANT", raising=False)
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    assert pl.choose_variant(16384, 151936, cuda) == "row"  # split is opt-in until measured on a GPU
    monkeypatch.setenv("LENS_KERNELS_TRITON_VARIANT", "split")
    assert pl.choose_variant(16384, 151936, cuda) == "split"
    assert pl.choose_variant(16384, 262144, cuda) == "split"
    assert pl.choose_variant(16384, 1000, cuda) == "row"  # one block: nothing to cooperate on
    assert pl.choose_variant(2 ** 30, 151936, cuda) == "row"  # the split grid would pass 2^31
    assert pl.choose_variant(16384, 151936, torch.device("cpu")) == "row"
    monkeypatch.setenv("LENS_KERNELS_TRITON_VARIANT", "row")
    assert pl.choose_variant(16384, 151936, cuda) == "row"
    monkeypatch.setenv("LENS_KERNELS_TRITON_VARIANT", "split")
    monkeypatch.setattr(pl, "INTERPRETING", True)  # programs run one by one: a spin-wait would deadlock
    assert pl.choose_variant(16384, 151936, cuda) == "row"


def test_split_variant_falls_back_when_a_row_does_not_fit(monkeypatch):
    """The split kernel's spin-wait needs every block of a row resident: 19 blocks at V = 151936."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pl, "INTERPRETING", False)
    monkeypatch.setenv("LENS_KERNELS_TRITON_VARIANT", "split")
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    # 128 registers x 256 threads: 2 programs per SM (65536 registers)
    _fake_device(monkeypatch, sms=132)
    assert pl.resident_programs(cuda, 128, 8) == 264
    assert pl.resident_programs(cuda, 129, 8) == 132  # 129 rounds up to 136 per thread: 1 per SM
    assert pl.resident_programs(cuda, 32, 8) == 8 * 132  # thread limit: 2048 / 256 per SM
    _fake_device(monkeypatch, sms=10)  # a small MIG slice / green context: 20 resident, 19 needed > 10
    assert pl.choose_variant(16384, 151936, cuda) == "row"
    _fake_device(monkeypatch, sms=19)  # 38 resident: 19 blocks fit in half
    assert pl.choose_variant(16384, 151936, cuda) == "split"
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "25")  # MPS: a quarter of the SMs
    assert pl.choose_variant(16384, 151936, cuda) == "row"
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    pl._SPLIT_REGS[(0, torch.bfloat16)] = 200  # a launch reported 200 registers: 1 program per SM
    assert pl.choose_variant(16384, 151936, cuda, torch.bfloat16) == "row"
    assert pl.choose_variant(16384, 151936, cuda, torch.float16) == "split"
    # the budget before any launch: 16-bit rows (peeled, any V) hold 2 programs per SM, fp32 rows 1
    assert pl.split_reg_budget(torch.bfloat16) == 128 and pl.split_reg_budget(torch.float16) == 128
    assert pl.split_reg_budget(torch.float32) == 255
    _fake_device(monkeypatch, sms=30)  # 60 resident bf16 programs, 30 fp32: 19 blocks fit in half of 60 only
    assert pl.choose_variant(16384, 151936, cuda, torch.bfloat16) == "split"
    assert pl.choose_variant(16384, 151936, cuda, torch.float32) == "row"


def test_bad_inputs_raise_clear_errors():
    B, T, V = 2, 3, 40
    base, targets, mask, old, ref, g = _inputs(B, T, V, torch.float32, seed=1, pad=0)
    adv = torch.randn(B).to(DEVICE)
    with pytest.raises(ValueError, match="stride 1 along the vocabulary"):
        lk.policy_loss_from_logits(base.transpose(1, 2).contiguous().transpose(1, 2), targets, mask, adv,
                                   backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        lk.policy_loss_from_logits(base.double(), targets, mask, adv, backend="triton")
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        calls.policy_loss_from_logits("triton", base.double(), targets, mask, adv)
    with pytest.raises(ValueError, match="ref_logps"):
        lk.policy_loss_from_logits(base, targets, mask, adv, config=LossConfig(beta=0.1), backend="triton")
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        lk.policy_loss_from_logits(base[0], targets[0], mask[0], adv, backend="triton")
    with pytest.raises(ValueError, match="grad_scale"):
        lk.policy_loss_from_logits(base, targets, mask, adv, grad_scale=0.0, backend="triton")
    with pytest.raises(ValueError, match="advantages"):
        lk.policy_loss_from_logits(base, targets, mask, adv[:1], backend="triton")
