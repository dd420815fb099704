"""Benchmark cases: shapes, the byte or FLOP model of each path, and the inputs every provider shares.

A case is one op at one shape. Each path below states the work it is measured against, so that a
time turns into TB/s or TFLOP/s and a fraction of the floor measured in the same run:

- ``logits`` (``policy_loss_from_logits``, forward + backward): memory bound, bytes.
- ``logits-fwd`` (``token_logprobs``, log-probs only, forward only: a rollout's old-log-prob pass): memory
  bound, bytes.
- ``hidden`` (``policy_loss_from_hidden``, forward + backward): compute bound, FLOPs.
- ``hidden-fwd`` (``linear_token_logprobs``, forward only): compute bound, FLOPs.
- ``advantages`` (``group_advantages``, LENS): memory bound, bytes.
- ``lens-step`` (``lens_policy_loss_from_logits``, on-policy LENS, forward + backward): memory bound,
  bytes; the whole step from logits and rewards to the loss, advantages computed inside.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .. import linear_token_logprobs, token_logprobs

PATHS = ("logits", "logits-fwd", "hidden", "hidden-fwd", "advantages", "lens-step")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The headline of the spec: 16 completions of 1024 tokens, Qwen2.5's vocabulary, a 2048-wide model.
HEADLINE = dict(B=16, T=1024, V=151936, H=2048, dtype="bfloat16")
# Llama-3's vocabulary, and an odd one (GPT-2's) that is no multiple of any block size.
GRID_VOCABS = (151936, 128256, 50257)
ODD_VOCAB = 50257
# The one-call LENS step at the headline: 16 x 1024 tokens, V = 151936, bf16. Groups of 8, not
# the 16: at B = 16 a single group of 16 could not hold both a negative and a mixed group, and
# the group size only changes the [B]-sized advantage work, not the passes over the logits.
LENS_STEP_HEADLINE = dict(B=16, T=1024, V=151936, dtype="bfloat16", group_size=8)


@dataclass(frozen=True)
class Case:
    """One op at one shape. N = B * T tokens (or B completions of T tokens for ``advantages``)."""

    path: str
    B: int
    T: int
    V: int = 0
    H: int = 0
    dtype: str = "bfloat16"
    temperature: float = 0.9
    group_size: int = 8

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {list(PATHS)}, got {self.path!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def name(self) -> str:
        if self.path == "advantages":
            return f"advantages lens N={self.B} G={self.group_size} T={self.T}"
        if self.path == "lens-step":
            return f"lens-step N={self.N} ({self.B}x{self.T}) V={self.V} G={self.group_size} {self.dtype}"
        shape = f"N={self.N} ({self.B}x{self.T}) V={self.V}"
        if self.path.startswith("hidden"):
            shape += f" H={self.H}"
        return f"{self.path} {shape} {self.dtype}"

    @property
    def from_logits(self) -> bool:
        return self.path in ("logits", "logits-fwd", "lens-step")

    @property
    def fwd_bwd(self) -> bool:
        return self.path in ("logits", "hidden", "lens-step")

    def work(self, kept_fraction: float = 1.0) -> Tuple[float, str]:
        """(amount, unit): the bytes or FLOPs this case must move or compute at the least, when a
        fraction ``kept_fraction`` of its tokens is kept (the rest masked, and skipped by every kernel)."""
        if not 0.0 <= kept_fraction <= 1.0:
            raise ValueError(f"kept_fraction must be in [0, 1], got {kept_fraction!r}")
        return WORK_MODELS[self.path](self, kept_fraction)

    def as_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d.update(N=self.N, name=self.name)
        return d


# -------------------------------------------------------------------------------------------------
# Work models: the least a kernel must move or compute. Every kernel (ours, Liger, CCE) skips the
# masked rows, so the reads of the logits and the FLOPs count the kept fraction k of the tokens; the
# gradient is written for every row (masked rows get zero rows), so writes count all N rows. Per-token
# side inputs: targets int64 (8 B), mask bool (1 B), old log-probs fp32 (4 B), advantages per sequence
# (negligible); outputs: log-prob and entropy fp32 (4 B each).
# -------------------------------------------------------------------------------------------------
def _logits_fwd_bwd_bytes(case: Case, k: float) -> Tuple[float, str]:
    # The 2-pass floor of the fused loss head: read the kept rows once, write dL/dlogits once:
    # (k + 1) * N * V * s bytes, plus the per-token inputs. A 3-pass design (forward read, backward
    # read, backward write) moves (2k + 1) * N * V * s: at k = 0.70 that is 1.41x the 2-pass floor,
    # the best ratio a 2-pass kernel can reach over a 3-pass one (not 1.5x, the unmasked figure).
    s = torch.finfo(case.torch_dtype).bits // 8
    return (k + 1.0) * case.N * case.V * s + case.N * (8 + 1 + 4), "bytes"


def _logits_fwd_bytes(case: Case, k: float) -> Tuple[float, str]:
    # Forward only: one read of the kept rows, the per-token inputs, and log-prob + entropy written.
    s = torch.finfo(case.torch_dtype).bits // 8
    return k * case.N * case.V * s + case.N * (8 + 1 + 4 + 4), "bytes"


def _hidden_fwd_bwd_flops(case: Case, k: float) -> Tuple[float, str]:
    # Three GEMMs of 2 * kN * H * V each over the kept tokens: logits = X W^T (forward), dX = dZ W,
    # dW = dZ^T X. A design that recomputes the logits in backward (CCE, verl) does four, so it tops
    # out at 75% here; one that multiplies the masked rows too (our fast mode, dense cuBLAS) does 1/k
    # of the work. The softmax work (O(N * V)) is small against them for H >= 1024 and is not counted.
    return 3.0 * 2.0 * k * case.N * case.H * case.V, "flops"


def _hidden_fwd_flops(case: Case, k: float) -> Tuple[float, str]:
    # One GEMM over the kept tokens: logits = X W^T, 2 * kN * H * V.
    return 2.0 * k * case.N * case.H * case.V, "flops"


def _advantages_bytes(case: Case, k: float) -> Tuple[float, str]:
    # LENS reads the old log-probs (fp32) and the mask (bool) of every token once to get the
    # confidence, plus the rewards (fp32), and writes the advantages (fp32): B completions of T tokens.
    return case.B * case.T * (4 + 1) + case.B * (4 + 4), "bytes"


def _lens_step_bytes(case: Case, k: float) -> Tuple[float, str]:
    # On-policy, the fused step makes 3 passes over the logits: the forward read (log-probs and
    # entropy) and the backward read of the kept rows, and the write of dL/dlogits for every row:
    # (2k + 1) * N * V * s bytes (11.98 GB at the headline's k = 0.703), plus the per-token inputs and
    # the fp32 log-prob and entropy the forward writes. The [B]-sized advantage work is a few KB: free.
    # Our bare fused loss with precomputed advantages needs 2 passes, (k + 1) * N * V * s: a bare-loss
    # row here can show more than 100% of the floor. The user's baseline today (a forward for old
    # log-probs, then Liger's 3-pass loss) moves (3k + 1) * N * V * s: 1.29x this floor at k = 0.703.
    s = torch.finfo(case.torch_dtype).bits // 8
    return (2.0 * k + 1.0) * case.N * case.V * s + case.N * (8 + 1 + 4 + 4) + case.B * (4 + 4), "bytes"


WORK_MODELS = {
    "logits": _logits_fwd_bwd_bytes,
    "logits-fwd": _logits_fwd_bytes,
    "hidden": _hidden_fwd_bwd_flops,
    "hidden-fwd": _hidden_fwd_flops,
    "advantages": _advantages_bytes,
    "lens-step": _lens_step_bytes,
}


# -------------------------------------------------------------------------------------------------
# Case lists
# -------------------------------------------------------------------------------------------------
def headline_cases() -> List[Case]:
    """The headline shape on the four loss-head paths, and LENS advantages at 4096 and 65536."""
    cases = [Case(path, **HEADLINE) for path in ("logits", "logits-fwd", "hidden", "hidden-fwd")]
    return cases + advantage_cases() + [Case("lens-step", **LENS_STEP_HEADLINE)]


def advantage_cases(completions=(4096, 65536), T: int = 1024) -> List[Case]:
    return [Case("advantages", B=n, T=T, dtype="float32") for n in completions]


def grid_cases(quick: bool) -> List[Case]:
    """A shape grid over N, V (including an odd V) and H, bf16; ``quick`` keeps a few points."""
    B, T, H = HEADLINE["B"], HEADLINE["T"], HEADLINE["H"]
    if quick:
        token_counts, vocabs, widths = (4096, 16384), (151936, ODD_VOCAB), (H,)
    else:
        token_counts, vocabs, widths = (4096, 16384, 32768), GRID_VOCABS, (2048, 4096)
    cases = []
    for path in ("logits", "hidden"):
        for n in token_counts:
            for v in vocabs:
                for h in (widths if path == "hidden" else (0,)):
                    if (n, v, h or H) == (B * T, HEADLINE["V"], H):
                        continue  # the headline case already covers it
                    cases.append(Case(path, B=n // T, T=T, V=v, H=h))
    return cases


# The CPU shapes of the torch backend's issue (B x T x V, fp32, fwd + bwd from logits): where the
# portable path must be at least as fast as eager TRL-style code at a fraction of its memory.
CPU_GRID_SHAPES = ((8, 256, 32000), (4, 512, 151936))


def cpu_cases(quick: bool, real_vocabs: bool = True) -> List[Case]:
    """Small shapes that run in seconds on a 2-core CPU: the same paths, an odd V, fp32 and bf16;
    without ``quick``, also (``real_vocabs``) the logits loss at the real vocabularies of
    ``CPU_GRID_SHAPES``, which take minutes."""
    vocabs = (2003,) if quick else (2003, 8192)
    cases = []
    for v in vocabs:
        cases += [
            Case("logits", B=4, T=64, V=v, dtype="float32"),
            Case("logits-fwd", B=4, T=64, V=v, dtype="float32"),
            Case("hidden", B=4, T=32, V=v, H=64, dtype="float32"),
            Case("hidden-fwd", B=4, T=32, V=v, H=64, dtype="float32"),
        ]
    cases.append(Case("lens-step", B=4, T=32, V=2003, dtype="float32", group_size=2))
    if not quick:
        cases.append(Case("logits", B=4, T=64, V=2003, dtype="bfloat16"))
        cases.append(Case("lens-step", B=4, T=32, V=2003, dtype="bfloat16", group_size=2))
        if real_vocabs:
            cases += [Case("logits", B=b, T=t, V=v, dtype="float32") for b, t, v in CPU_GRID_SHAPES]
    cases += advantage_cases((4096,), T=64)
    return cases


def parse_shape(text: str) -> Dict[str, int]:
    """``BxTxV`` or ``BxTxVxH`` (``--shape``) as a dict of positive ints."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) not in (3, 4) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape must be BxTxV or BxTxVxH with positive integers, got {text!r}")
    return dict(zip("BTVH", (int(p) for p in parts)))


def user_cases(shape: Dict[str, int], dtype: str, paths) -> List[Case]:
    """The cases of a user's shape: every path in ``paths`` it has the sizes for (hidden paths need H;
    the LENS step needs B to hold two groups of 2 at least)."""
    cases = []
    # Groups of 8 where B holds two of them, else of 4 or 2 (the LENS step needs two groups at least).
    G = next((g for g in (8, 4, 2) if shape["B"] % g == 0 and shape["B"] >= 2 * g), None)
    for path in paths:
        if path.startswith("hidden") and "H" not in shape:
            continue
        if path == "advantages":
            if G is not None:
                cases.append(Case("advantages", B=shape["B"], T=shape["T"], dtype="float32", group_size=G))
        elif path == "lens-step":
            if G is not None:
                cases.append(Case(path, B=shape["B"], T=shape["T"], V=shape["V"], dtype=dtype, group_size=G))
        else:
            cases.append(Case(path, B=shape["B"], T=shape["T"], V=shape["V"], H=shape.get("H", 0), dtype=dtype))
    return cases


def with_dtype(cases: List[Case], dtype: Optional[str]) -> List[Case]:
    """``cases`` in ``dtype`` (``--dtype``); LENS advantages stay fp32 (they take no logits)."""
    if dtype is None:
        return cases
    return [c if c.path == "advantages" else dataclasses.replace(c, dtype=dtype) for c in cases]


# -------------------------------------------------------------------------------------------------
# Inputs. Every provider of a case gets the same tensors; none writes them (no provider runs inplace).
# -------------------------------------------------------------------------------------------------
CLIP_EPS = 0.2
# Old log-probs put this fraction of the kept tokens past 1 + eps, and as many below 1 - eps (where a
# token's probability allows it), so that the clip decides the gradient of about 8% of the tokens in
# both directions, with both signs of the advantage. The ratios past the bounds start just past them
# (1.205 and 0.795), so that a loss clipped at another eps (eps_high = 0.28) differs too.
PAST_CLIP_FRACTION = 0.04
RATIO_ABOVE = (1.0 + CLIP_EPS + 0.005, 1.6)
RATIO_BELOW = (0.5, 1.0 - CLIP_EPS - 0.005)
# The other tokens: log-ratio noise N(0, 0.03^2), 6 standard deviations inside the clip bounds.
RATIO_NOISE = 0.03
# The hidden path's logits are a GEMM's output, which bf16/fp16 implementations round to the input
# dtype (cuBLAS, eager torch, our fast mode; not CCE or our lean kernels): a log-prob moves by up to
# ~0.07 (half a bf16 step at |logit| ~ 20). Its ratios past the bounds keep 8% clear of them (and the
# noise 9 standard deviations), so that no implementation's rounding flips a token's clip.
RATIO_ABOVE_HIDDEN = (1.0 + CLIP_EPS + 0.1, 1.6)
RATIO_BELOW_HIDDEN = (0.5, 1.0 - CLIP_EPS - 0.08)
RATIO_NOISE_HIDDEN = 0.02
# Logits like a trained policy's: a spike at the sampled token over N(0, 2^2) logits, of a height that
# gives a median top-1 probability near 0.9 (spike - log-sum-exp of the rest ~ U(-1, 5)); 15% of the
# targets are other tokens (sampling explores), with a low probability.
LOGIT_STD = 2.0
SPIKE_MARGIN = (-1.0, 5.0)
EXPLORE_FRACTION = 0.15


def _spike_height(V: int, n: int, gen: torch.Generator) -> torch.Tensor:
    # log-sum-exp of V logits N(0, s^2) is about log V + s^2 / 2.
    lse_rest = math.log(V) + LOGIT_STD ** 2 / 2
    lo, hi = SPIKE_MARGIN
    return lse_rest + lo + (hi - lo) * torch.rand(n, generator=gen)


def make_inputs(case: Case, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Fresh random inputs of ``case`` on ``device``: realistic values, never zeros.

    Logits paths get a [B, T + 1, V] buffer (``logits``) as a causal LM returns it, and
    ``logits_kept``, a leaf that aliases its ``[:, :-1]`` view: the [B, T, V] logits a user gets by
    applying the lm_head to ``hidden[:, :-1]`` (or with ``logits_to_keep``), which ours and the
    TRL-style providers take. Liger takes the whole buffer, as its API asks. Logits (and the hidden
    path's X W^T) are peaked like a trained policy's. Old log-probs put about 4% of the kept tokens
    above 1 + eps and 4% below 1 - eps (see ``PAST_CLIP_FRACTION``), the rest near ratio 1; the
    per-sequence advantages alternate in sign. Rows have random lengths (right padding) and one row is
    fully masked (about 30% of the tokens are masked at B = 16). The LENS step gets binary ``rewards``
    with a negative and a mixed group, and no old log-probs (on-policy). ``inputs["stats"]`` holds
    plain numbers about them (kept fraction, tokens past the clip bounds, median top-1 probability).
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T = case.B, case.T
    if case.path == "advantages":
        rewards = (torch.rand(B, generator=gen) < 0.4).float()
        old_logps = -torch.rand(B, T, generator=gen) * 1.5
        lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        out = {k: v.to(device) for k, v in dict(rewards=rewards, old_logps=old_logps, mask=mask).items()}
        out["stats"] = dict(kept_fraction=float(mask.float().mean()))
        return out

    out = {"rewards": step_rewards(case, gen).to(device)} if case.path == "lens-step" else {}
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=gen)
    if B > 1:
        lengths[-1] = 0  # a fully masked row contributes 0, never NaN
    mask = torch.arange(T)[None, :] < lengths[:, None]
    # Both signs, |A| >= 0.1: a token's gradient row is zero only where the clip makes it so.
    signs = torch.tensor([1.0, -1.0]).repeat((B + 1) // 2)[:B]
    advantages = (torch.randn(B, generator=gen).abs() + 0.1) * signs
    # The sampled tokens: the policy's top token, or (exploring) another one.
    top = torch.randint(0, case.V, (B, T + 1), generator=gen)
    explore = torch.rand(B, T, generator=gen) < EXPLORE_FRACTION
    targets = torch.where(explore, torch.randint(0, case.V, (B, T), generator=gen), top[:, :-1])
    spikes = _spike_height(case.V, B * (T + 1), gen).view(B, T + 1)
    dtype = case.torch_dtype
    out.update({k: v.to(device) for k, v in dict(mask=mask, advantages=advantages, targets=targets).items()})
    if case.path == "lens-step":  # the step computes its own advantages
        del out["advantages"]
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)  # big tensors are drawn on the device
    if case.from_logits:
        # One sequence at a time: the headline buffer is 5 GB in bf16.
        logits = torch.empty(B, T + 1, case.V, dtype=dtype, device=device)
        top_d, spikes_d = top.to(device), spikes.to(device)
        for b in range(B):
            logits[b].normal_(0.0, LOGIT_STD, generator=dev_gen)
            logits[b].scatter_(-1, top_d[b, :, None], spikes_d[b, :, None].to(dtype))
        out["logits"] = logits
        out["logits_kept"] = logits[:, :-1].detach()  # a leaf of its own that aliases the view
        top1 = _median_top1(logits[0, :T].float(), case.temperature)
    else:
        hidden = torch.randn(B, T, case.H, generator=dev_gen, device=device, dtype=torch.float32)
        weight = torch.randn(case.V, case.H, generator=dev_gen, device=device, dtype=torch.float32)
        weight.mul_(case.H ** -0.5 * LOGIT_STD)
        # X W^T gets the spike at the top token: x += spike * w_top / |w_top|^2.
        w_top = weight[top[:, :-1].reshape(-1).to(device)].view(B, T, case.H)
        hidden += (spikes[:, :-1].to(device) / w_top.pow(2).sum(-1)).unsqueeze(-1) * w_top
        out["hidden"], out["weight"] = hidden.to(dtype), weight.to(dtype)
        top1 = _median_top1(out["hidden"][0].float() @ out["weight"].float().T, case.temperature)
    stats = dict(kept_fraction=float(mask.float().mean()), median_top1_prob=top1)
    if case.path in ("logits", "hidden"):  # the LENS step is on-policy: no old log-probs
        with torch.no_grad():
            if case.from_logits:
                current, _ = token_logprobs(out["logits_kept"], out["targets"], temperature=case.temperature,
                                            mask=out["mask"])
            else:
                current, _ = linear_token_logprobs(out["hidden"], out["weight"], out["targets"],
                                                   temperature=case.temperature, mask=out["mask"])
        bands = {} if case.from_logits else dict(above=RATIO_ABOVE_HIDDEN, below=RATIO_BELOW_HIDDEN,
                                                 noise=RATIO_NOISE_HIDDEN)
        old_logps, past = clipped_old_logps(current.double().cpu(), mask, gen, **bands)
        out["old_logps"] = old_logps.float().to(device)
        stats.update(past)
    out["stats"] = stats
    return out


def clipped_old_logps(current: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, above=RATIO_ABOVE,
                      below=RATIO_BELOW, noise=RATIO_NOISE):
    """Old log-probs for ``current`` (float64, CPU): about ``PAST_CLIP_FRACTION`` of the kept tokens
    with a ratio in ``above``, as many in ``below`` among the tokens whose probability allows it (an
    old log-prob stays <= 0), the others at a log-ratio N(0, noise^2). Returns them and the fractions."""
    shape = current.shape
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    lo_a, hi_a = above
    lo_b, hi_b = below
    noise_std = noise
    r_above = lo_a + (hi_a - lo_a) * torch.rand(shape, generator=gen, dtype=torch.float64)
    r_below = lo_b + (hi_b - lo_b) * torch.rand(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64) * noise_std
    above = mask & (u < PAST_CLIP_FRACTION)
    eligible = mask & ~above & (current <= torch.log(r_below))  # old = current - log r <= 0
    kept = int(mask.sum())
    share = min(1.0, PAST_CLIP_FRACTION * kept / max(1, int(eligible.sum())))
    below = eligible & (torch.rand(shape, generator=gen, dtype=torch.float64) < share)
    log_ratio = torch.where(above, r_above.log(), torch.where(below, r_below.log(), noise))
    old = current - log_ratio
    plain = ~(above | below)
    old = torch.where(plain, old.clamp(max=0.0), old)
    n = max(1, kept)
    return old, dict(past_clip_above=float(above.sum()) / n, past_clip_below=float(below.sum()) / n)


def _median_top1(logits: torch.Tensor, temperature: float) -> float:
    """The median top-1 probability of a [T, V] slice: how peaked the logits are."""
    return float(torch.softmax(logits / temperature, dim=-1).amax(-1).median())


def step_rewards(case: Case, gen: torch.Generator) -> torch.Tensor:
    """Binary rewards of the LENS step: group 0 negative (all wrong: LENS rescues it), group 1 mixed
    (one right, one wrong at least), the rest drawn at p = 0.4 (all-correct groups may appear)."""
    G = case.group_size
    if case.B < 2 * G or case.B % G:
        raise ValueError(f"lens-step needs whole groups and at least two of them: B={case.B}, G={G}")
    rewards = (torch.rand(case.B, generator=gen) < 0.4).float()
    rewards[:G] = 0.0
    rewards[G] = 1.0
    rewards[G + 1] = 0.0
    return rewards
