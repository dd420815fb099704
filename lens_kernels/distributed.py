"""Past one GPU: data-parallel normalizers, groups that span ranks, vocab-parallel log-probs.

Three collectives, each in one place here; the public ops reach them through keyword arguments.

**Data parallel (DP).** ``policy_loss*(..., process_group=dp_group)``: the token and sequence
normalizers become the counts over the whole DP group (one all-reduce of two integers, no host
sync), and the loss is multiplied by the group size. After the usual DP gradient averaging (DDP,
FSDP, ZeRO divide the summed gradients by the group size) the parameters get exactly the gradient
of the single-process loss over the whole batch. The returned loss is each rank's share times the
group size: its mean over the DP ranks is the global loss.

**Groups across ranks.** ``group_advantages(..., process_group=dp_group)``: each rank passes its
own completions; the group statistics see whole groups. Gathered per completion: reward, correct
flag, group id, and for LENS the sequence sum of old log-probs and the length (two floats, never the
[N, T] log-probs). Every rank computes the advantages of the whole batch (N scalars, cheap) and
returns its own slice, in rank order. The one host read is the ranks' completion counts (shapes),
once per rollout batch, to gather uneven slices.

**Vocab parallel (TP).** Each rank holds columns [v0, v0 + V_s) of the logits (or rows of the
lm_head). The backend computes local partials per row, here combined Megatron-style: an all-reduce
MAX of m_i, then one all-reduce SUM of (l_i, ey_i, target logit, owner count) rescaled to the global
max: 4 floats per token. Gradients are local to the shard: dL/dz_shard needs only the global lse and
entropy (kept from forward), so backward has no collective on the logits path. On the hidden path,
dL/dhidden is summed over the shards (one all-reduce of [N, H], what Megatron's
``copy_to_tensor_model_parallel_region`` does); dW and db stay local.

Contract for a fused backend (CUDA, Triton): to run vocab-parallel it exposes the ops below with
the signatures of ``backends.torch`` and is picked by the usual dispatch, op by op:

- ``vocab_shard_partials(logits, targets, temperature) -> (m_i, l_i, ey_i, target_shifted)``,
  flat [N] fp32: the row max of y = z / tau, l_i = sum exp(y - m_i), ey_i = sum exp(y - m_i)(y - m_i),
  and y[target] - m_i (targets are shard-local ids, in range on every row; the combine ignores the
  target logit of rows whose target another shard holds);
- ``vocab_shard_grad(logits, targets, temperature, lse, entropy, g_logp, g_entropy, g_target,
  inplace) -> dL/dlogits`` = (1/tau)[g_target onehot - g_logp p - g_entropy p (log p + H)], with
  p = exp(y - lse) from the global lse;
- ``linear_vocab_shard_partials`` / ``linear_vocab_shard_grad``: the same from hidden states and
  an lm_head shard, returning (d_hidden of this shard, d_weight, d_bias).

The torch backend provides all four; the triton backend the two logits ops (one read of the shard
forward, one read and one write backward). ``backend="auto"`` skips a backend that lacks an op (so
the hidden-path shard ops run on torch); naming that backend explicitly for the op is an error.

Trainer entry point: ``ParallelLayout`` bundles the DP group, the TP group and this rank's vocab
start, and gives the keyword arguments of the ops (``layout.logprob_kwargs()``,
``layout.loss_kwargs()``, ``layout.advantage_kwargs()``). The verl adapter builds one from verl's
process groups (FSDP: the DP group of the device mesh; Megatron: ``mpu`` data-parallel and
tensor-model-parallel groups).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import backends
from ._validation import refuse_create_graph, value_checks_enabled
from .backends.torch._common import finish_partials, grad_coefficients


# ---------------------------------------------------------------------------------------------
# Boundary checks
# ---------------------------------------------------------------------------------------------
def check_process_group(name: str, group) -> None:
    """A process group of an initialized ``torch.distributed`` (``dist.group.WORLD`` included)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name} was given but torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first (or pass {name}=None)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(ranks)), got {type(group).__name__}")


def check_vocab_start(vocab_start) -> int:
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (the global id of this shard's first column), "
                         f"got {vocab_start!r}")
    return vocab_start


def check_vocab_parallel(group_name: str, group, vocab_start) -> None:
    """Both of (group, vocab_start) or neither."""
    if group is not None:
        check_process_group(group_name, group)
    if (group is None) != (vocab_start is None):
        given, missing = (group_name, "vocab_start") if vocab_start is None else ("vocab_start", group_name)
        raise ValueError(f"vocab-parallel ops need both {group_name} (the tensor-parallel group) and vocab_start "
                         f"(this shard's first global id): {given} was given without {missing}")
    if vocab_start is not None:
        check_vocab_start(vocab_start)


# ---------------------------------------------------------------------------------------------
# Data parallel: global normalizers
# ---------------------------------------------------------------------------------------------
def global_counts(mask: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, sequences): the loss tokens and the rows of ``mask`` [B, T] summed over ``group``,
    as int64 0-d tensors on the mask's device, each at least 1. One all-reduce, no host sync."""
    local_tokens = mask.to(torch.bool).sum()
    rows = torch.full((), mask.shape[0], dtype=local_tokens.dtype, device=mask.device)
    counts = torch.stack((local_tokens, rows))
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    counts = counts.clamp(min=1)
    return counts[0], counts[1]


def data_parallel_normalizers(group, config, mask: torch.Tensor, num_tokens, num_sequences):
    """The (config, num_tokens, num_sequences) of a loss over the DP ``group``: global counts where
    the caller gave none, and dp_size = the group size."""
    check_process_group("process_group", group)
    if config.dp_size != 1.0:
        raise ValueError(f"config.dp_size = {config.dp_size} and process_group are both given; process_group sets "
                         "dp_size to its size: leave config.dp_size at 1.0")
    if num_tokens is None or num_sequences is None:
        tokens, sequences = global_counts(mask, group)
        num_tokens = tokens if num_tokens is None else num_tokens
        num_sequences = sequences if num_sequences is None else num_sequences
    return config.replace(dp_size=float(dist.get_world_size(group))), num_tokens, num_sequences


# ---------------------------------------------------------------------------------------------
# Groups across ranks: gather per-completion scalars, in rank order
# ---------------------------------------------------------------------------------------------
def gather_rows(group, tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], int]:
    """All-gather [n_r, ...] tensors whose n_r differs by rank. Returns the concatenations in rank
    order and this rank's offset in them. Floats travel as float64, integers as int64 (exact)."""
    device = tensors[0].device
    n = tensors[0].shape[0]
    world = dist.get_world_size(group)
    size = torch.full((1,), n, dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    # The one host read: the ranks' completion counts (shapes), once per rollout batch.
    sizes = torch.cat(sizes).tolist()
    n_max = max(sizes)
    offset = sum(sizes[:dist.get_rank(group)])
    is_float = [t.dtype.is_floating_point or t.dtype == torch.bool for t in tensors]
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    for wire, want_float in ((torch.float64, True), (torch.int64, False)):
        members = [i for i, f in enumerate(is_float) if f == want_float]
        if not members:
            continue
        packed = torch.zeros(n_max, len(members), dtype=wire, device=device)
        packed[:n] = torch.stack([tensors[i].to(wire) for i in members], 1)
        parts = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed, group=group)
        whole = torch.cat([part[:s] for part, s in zip(parts, sizes)])
        for column, i in enumerate(members):
            out[i] = whole[:, column].to(tensors[i].dtype)
    return out, offset


# ---------------------------------------------------------------------------------------------
# Vocab parallel
# ---------------------------------------------------------------------------------------------
def combine_vocab_partials(group, m_i, l_i, ey, target_shifted, owns, keep=None):
    """(logp, lse, entropy) of whole rows from the partials of each rank's vocabulary shard.

    m_i, l_i, ey, target_shifted: this shard's partials (see the module docstring); owns: [N] bool,
    whether this shard holds the row's target. Two all-reduces: MAX of m_i, then SUM of four floats
    per row. Rows kept by ``keep`` (all rows if None) must have exactly one owner: checked when value
    checks run (CPU, or LENS_KERNELS_CHECK=1), on all-reduced data, so every rank raises alike.
    """
    m_max = m_i.clone()
    dist.all_reduce(m_max, op=dist.ReduceOp.MAX, group=group)
    shift = m_i - m_max
    rescale = torch.exp(shift)
    zero = torch.zeros((), dtype=m_i.dtype, device=m_i.device)
    packed = torch.stack((
        l_i * rescale,
        (ey + shift * l_i) * rescale,          # sum exp(y - M)(y - M) over the shard
        torch.where(owns, target_shifted + shift, zero),  # y[target] - M, from its owner only
        owns.to(m_i.dtype),
    ), 1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    l_sum, ey_sum, target, owners = packed.unbind(1)
    if value_checks_enabled(owners):
        bad = owners != 1
        if keep is not None:
            bad = bad & keep
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"targets must be global vocabulary ids held by exactly one shard; the target of row {row} "
                f"(flattened) is held by {int(owners[row])} shards: check each rank's vocab_start and that the "
                "shards tile [0, V)")
    return finish_partials(m_max, l_sum, ey_sum, target)


def _shard_targets(targets, mask, vocab_start: int, shard_vocab: int):
    """(shard-local ids, safe to index with; owns; keep or None) as flat [N] tensors."""
    local = targets.reshape(-1).long() - vocab_start
    owns = (local >= 0) & (local < shard_vocab)
    keep = None if mask is None else mask.reshape(-1).to(torch.bool)
    if keep is not None:
        owns = owns & keep
    return torch.where(owns, local, torch.zeros_like(local)), owns, keep


def _combine_and_save(ctx, tp_group, partials, owns, keep, lead, inputs, **attrs):
    """Forward tail shared by the shard functions: combine, zero masked tokens, save for backward."""
    logp, lse, entropy = combine_vocab_partials(tp_group, *partials, owns, keep)
    if keep is not None:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, entropy = torch.where(keep, logp, zero), torch.where(keep, entropy, zero)
    ctx.save_for_backward(*inputs, owns, lse, entropy, keep if keep is not None else torch.empty(0))
    ctx.has_keep = keep is not None
    for name, value in attrs.items():
        setattr(ctx, name, value)
    ctx.set_materialize_grads(False)
    return logp.view(lead), entropy.view(lead)


def _shard_coefficients(ctx, g_logp, g_entropy):
    """(saved inputs, lse, entropy, g_l, g_H, g_target): g_target is g_l on rows whose target this
    shard holds, else 0 (the one-hot term lives in one shard only)."""
    *inputs, owns, lse, entropy, keep = ctx.saved_tensors
    g_l, g_h = grad_coefficients(lse, g_logp, g_entropy, keep if ctx.has_keep else None)
    g_target = torch.where(owns, g_l, torch.zeros_like(g_l))
    return inputs, lse, entropy, g_l, g_h, g_target


class VocabParallelLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, vocab_start, group, inplace_grad, backend):
        local, owns, keep = _shard_targets(targets, mask, vocab_start, logits.shape[-1])
        partials = backends.get("vocab_shard_partials", logits, backend)(logits, local, temperature)
        return _combine_and_save(ctx, group, partials, owns, keep, logits.shape[:-1], (logits, local),
                                 temperature=temperature, inplace_grad=inplace_grad, backend=backend)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        refuse_create_graph("token_logprobs")
        if g_logp is None and g_entropy is None:
            return (None,) * 8
        (logits, local), lse, entropy, g_l, g_h, g_target = _shard_coefficients(ctx, g_logp, g_entropy)
        grad = backends.get("vocab_shard_grad", logits, ctx.backend)(
            logits, local, ctx.temperature, lse, entropy, g_l, g_h, g_target, ctx.inplace_grad)
        if ctx.inplace_grad:
            # the logits buffer now holds the gradient: an op that saved it must raise, not read it
            torch.autograd.graph.increment_version(logits)
            grad = grad.detach()
        return (grad,) + (None,) * 7


class LinearVocabParallelLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature, vocab_start, group, backend):
        local, owns, keep = _shard_targets(targets, mask, vocab_start, weight.shape[0])
        partials = backends.get("linear_vocab_shard_partials", hidden, backend)(
            hidden, weight, bias, local, temperature)
        return _combine_and_save(ctx, group, partials, owns, keep, hidden.shape[:-1], (hidden, weight, bias, local),
                                 temperature=temperature, group=group, backend=backend)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        refuse_create_graph("linear_token_logprobs")
        needs = tuple(ctx.needs_input_grad[:3])
        if (g_logp is None and g_entropy is None) or not any(needs):
            return (None,) * 9
        (hidden, weight, bias, local), lse, entropy, g_l, g_h, g_target = _shard_coefficients(ctx, g_logp, g_entropy)
        d_hidden, d_weight, d_bias = backends.get("linear_vocab_shard_grad", hidden, ctx.backend)(
            hidden, weight, bias, local, ctx.temperature, lse, entropy, g_l, g_h, g_target, needs)
        if d_hidden is not None:
            # hidden is replicated over the TP group: its gradient is the sum of every shard's part
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return (d_hidden, d_weight, d_bias) + (None,) * 6


def vocab_parallel_token_logprobs(logits, targets, *, group, vocab_start: int, temperature=1.0, mask=None,
                                  return_entropy=False, inplace_backward=False, backend="auto"):
    """``token_logprobs`` of a vocabulary shard logits[..., V_s] holding global ids
    [vocab_start, vocab_start + V_s); ``targets`` are global ids. Inputs already validated."""
    logp, entropy = VocabParallelLogprobsFunction.apply(logits, targets, mask, temperature, vocab_start, group,
                                                        inplace_backward, backend)
    return logp, (entropy if return_entropy else None)


def vocab_parallel_linear_token_logprobs(hidden, weight, targets, *, group, vocab_start: int, bias=None,
                                         temperature=1.0, mask=None, return_entropy=False, backend="auto"):
    """``linear_token_logprobs`` with ``weight`` [V_s, H] (and ``bias`` [V_s]) the rows
    [vocab_start, vocab_start + V_s) of the lm_head. Inputs already validated."""
    logp, entropy = LinearVocabParallelLogprobsFunction.apply(hidden, weight, bias, targets, mask, temperature,
                                                              vocab_start, group, backend)
    return logp, (entropy if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# Trainer entry point
# ---------------------------------------------------------------------------------------------
def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[v0, v1) of ``rank`` in an even split of ``vocab_size`` over ``world_size`` shards, Megatron's
    layout (shards of ceil(V / world) ids, the last one shorter when V does not divide)."""
    for name, value in (("vocab_size", vocab_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    per = -(-vocab_size // world_size)
    if per * (world_size - 1) >= vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is too small to give each of {world_size} shards a column")
    start = rank * per
    return start, min(vocab_size, start + per)


@dataclass(frozen=True)
class ParallelLayout:
    """How a rank's batch and vocabulary sit in the job: the entry point for trainer adapters.

    dp_group: the data-parallel group (whose gradients are averaged; completions of a group may sit
    on different ranks of it). tp_group: the tensor-parallel group that shards the vocabulary;
    vocab_start: this rank's first global vocabulary id (``vocab_shard_range`` gives Megatron's).
    Any may be None.

    verl: under FSDP, ``dp_group`` is the data-parallel process group of the actor's device mesh
    (with Ulysses sequence parallelism, the group over which the batch is split), ``tp_group`` None;
    under Megatron, ``mpu.get_data_parallel_group()``, ``mpu.get_tensor_model_parallel_group()``
    and ``vocab_start = mpu.get_tensor_model_parallel_rank() * (padded_vocab // tp_size)``.
    """

    dp_group: Optional[Any] = None
    tp_group: Optional[Any] = None
    vocab_start: Optional[int] = None

    def __post_init__(self):
        if self.dp_group is not None:
            check_process_group("dp_group", self.dp_group)
        check_vocab_parallel("tp_group", self.tp_group, self.vocab_start)

    @classmethod
    def even_vocab(cls, vocab_size: int, *, dp_group=None, tp_group=None) -> "ParallelLayout":
        """The layout with this rank's shard of an even split of ``vocab_size`` over ``tp_group``."""
        vocab_start = None
        if tp_group is not None:
            check_process_group("tp_group", tp_group)
            vocab_start = vocab_shard_range(vocab_size, dist.get_rank(tp_group), dist.get_world_size(tp_group))[0]
        return cls(dp_group=dp_group, tp_group=tp_group, vocab_start=vocab_start)

    def logprob_kwargs(self) -> Dict[str, Any]:
        """Keywords of ``token_logprobs`` / ``linear_token_logprobs``."""
        if self.tp_group is None:
            return {}
        return {"vocab_group": self.tp_group, "vocab_start": self.vocab_start}

    def loss_kwargs(self) -> Dict[str, Any]:
        """Keywords of ``policy_loss_from_logits`` / ``policy_loss_from_hidden`` (``policy_loss``
        takes only ``process_group``)."""
        kwargs: Dict[str, Any] = {"process_group": self.dp_group}
        if self.tp_group is not None:
            kwargs.update(vocab_group=self.tp_group, vocab_start=self.vocab_start)
        return kwargs

    def advantage_kwargs(self) -> Dict[str, Any]:
        """Keywords of ``group_advantages``."""
        return {"process_group": self.dp_group}
