"""Benchmark cases: shapes, the byte or FLOP model of each path, and the inputs every provider shares.

A case is one op at one shape. Each path below states the work it is measured against, so that a
time turns into TB/s or TFLOP/s and a fraction of the floor measured in the same run:

- ``logits`` (``policy_loss_from_logits``, forward + backward): memory bound, bytes.
- ``logits-fwd`` (``token_logprobs`` with entropy, forward only): memory bound, bytes.
- ``hidden`` (``policy_loss_from_hidden``, forward + backward): compute bound, FLOPs.
- ``hidden-fwd`` (``linear_token_logprobs``, forward only): compute bound, FLOPs.
- ``advantages`` (``group_advantages``, LENS): memory bound, bytes.
- ``lens-step`` (``lens_policy_loss_from_logits``, on-policy LENS, forward + backward): memory bound,
  bytes; the whole step from logits and rewards to the loss, advantages computed inside.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Tuple

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

    def work(self) -> Tuple[float, str]:
        """(amount, unit): the bytes or FLOPs this case must move or compute at the least."""
        return WORK_MODELS[self.path](self)

    def as_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d.update(N=self.N, name=self.name)
        return d


# -------------------------------------------------------------------------------------------------
# Work models. Per-token side inputs: targets int64 (8 B), mask bool (1 B), old log-probs fp32 (4 B),
# advantages per sequence (negligible); outputs: log-prob and entropy fp32 (4 B each).
# -------------------------------------------------------------------------------------------------
def _logits_fwd_bwd_bytes(case: Case) -> Tuple[float, str]:
    # The 2-pass floor of the fused loss head: read the logits once, write dL/dlogits once
    # (2 * N * V * s bytes), plus the per-token inputs. A 3-pass design (forward read, backward
    # read, backward write) is 1.5x this, so it shows at most 67% of the floor here.
    s = torch.finfo(case.torch_dtype).bits // 8
    return 2.0 * case.N * case.V * s + case.N * (8 + 1 + 4), "bytes"


def _logits_fwd_bytes(case: Case) -> Tuple[float, str]:
    # Forward only: one read of the logits, the per-token inputs, and log-prob + entropy written.
    s = torch.finfo(case.torch_dtype).bits // 8
    return 1.0 * case.N * case.V * s + case.N * (8 + 1 + 4 + 4), "bytes"


def _hidden_fwd_bwd_flops(case: Case) -> Tuple[float, str]:
    # Three GEMMs of 2 * N * H * V each: logits = X W^T (forward), dX = dZ W, dW = dZ^T X. A design
    # that recomputes the logits in backward (CCE, verl) does four, so it tops out at 75% here.
    # The softmax work (O(N * V)) is small against them for H >= 1024 and is not counted.
    return 3.0 * 2.0 * case.N * case.H * case.V, "flops"


def _hidden_fwd_flops(case: Case) -> Tuple[float, str]:
    # One GEMM: logits = X W^T, 2 * N * H * V.
    return 2.0 * case.N * case.H * case.V, "flops"


def _advantages_bytes(case: Case) -> Tuple[float, str]:
    # LENS reads the old log-probs (fp32) and the mask (bool) of every token once to get the
    # confidence, plus the rewards (fp32), and writes the advantages (fp32): B completions of T tokens.
    return case.B * case.T * (4 + 1) + case.B * (4 + 4), "bytes"


def _lens_step_bytes(case: Case) -> Tuple[float, str]:
    # On-policy, the fused step makes 3 passes over the logits: the forward read (log-probs and
    # entropy), the backward read and the write of dL/dlogits: 3 * N * V * s bytes (14.94 GB at the
    # headline), plus the per-token inputs and the fp32 log-prob and entropy the forward writes. The
    # [B]-sized advantage work (confidences, group statistics) is a few KB: free. For comparison, our
    # bare fused loss with precomputed advantages (the "logits" path) needs 2 passes, 2 * N * V * s
    # (9.96 GB): a bare-loss row here can show more than 100% of the floor. The user's baseline today
    # (a forward for old log-probs, then Liger's 3-pass loss) makes 4.
    s = torch.finfo(case.torch_dtype).bits // 8
    return 3.0 * case.N * case.V * s + case.N * (8 + 1 + 4 + 4) + case.B * (4 + 4), "bytes"


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


def cpu_cases(quick: bool) -> List[Case]:
    """Small shapes that run in seconds on a 2-core CPU: the same paths, an odd V, fp32 and bf16."""
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
    cases += advantage_cases((4096,), T=64)
    return cases


# -------------------------------------------------------------------------------------------------
# Inputs. Every provider of a case gets the same tensors; none writes them (no provider runs inplace).
# -------------------------------------------------------------------------------------------------
def make_inputs(case: Case, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Fresh random inputs of ``case`` on ``device``: realistic values, never zeros.

    Logits paths get a [B, T + 1, V] buffer (``logits``) whose ``[:, :-1]`` view is the loss input,
    as in a causal LM; Liger takes the whole buffer. Old log-probs are the current ones plus a little
    noise, so that ratios sit near 1 and a few tokens clip, as in a real step. Rows have random
    lengths (right padding) and one row is fully masked. The LENS step gets binary ``rewards`` with
    a negative and a mixed group, and no old log-probs (on-policy).
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T = case.B, case.T
    if case.path == "advantages":
        rewards = (torch.rand(B, generator=gen) < 0.4).float()
        old_logps = -torch.rand(B, T, generator=gen) * 1.5
        lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        return {k: v.to(device) for k, v in dict(rewards=rewards, old_logps=old_logps, mask=mask).items()}

    out = {"rewards": step_rewards(case, gen).to(device)} if case.path == "lens-step" else {}
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=gen)
    if B > 1:
        lengths[-1] = 0  # a fully masked row contributes 0, never NaN
    mask = torch.arange(T)[None, :] < lengths[:, None]
    advantages = torch.randn(B, generator=gen)
    dtype = case.torch_dtype
    targets = torch.randint(0, case.V, (B, T), generator=gen)
    out.update({k: v.to(device) for k, v in dict(mask=mask, advantages=advantages, targets=targets).items()})
    if case.path == "lens-step":  # the step computes its own advantages
        del out["advantages"]
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)  # big tensors are drawn on the device
    if case.from_logits:
        # One sequence at a time: the headline buffer is 5 GB in bf16.
        logits = torch.empty(B, T + 1, case.V, dtype=dtype, device=device)
        for b in range(B):
            logits[b].normal_(0.0, 2.0, generator=dev_gen)
        out["logits"] = logits
        view = logits[:, :-1]
    else:
        out["hidden"] = torch.randn(B, T, case.H, generator=dev_gen, device=device, dtype=dtype)
        out["weight"] = torch.randn(case.V, case.H, generator=dev_gen, device=device, dtype=dtype)
        out["weight"].mul_(case.H ** -0.5 * 2.0)
        view = None
    if case.path in ("logits", "hidden"):  # the LENS step is on-policy: no old log-probs
        with torch.no_grad():
            if view is not None:
                current, _ = token_logprobs(view, out["targets"], temperature=case.temperature, mask=out["mask"])
            else:
                current, _ = linear_token_logprobs(out["hidden"], out["weight"], out["targets"],
                                                   temperature=case.temperature, mask=out["mask"])
        noise = torch.randn(B, T, generator=gen).to(device) * 0.05
        out["old_logps"] = torch.clamp(current + noise, max=0.0).float()
    return out


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
