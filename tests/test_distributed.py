"""Distributed ops on CPU with gloo: data parallel, groups across ranks, vocab parallel.

Each world size is one ``torch.multiprocessing`` launch that runs every scenario of that size in
order (a launch costs seconds, a scenario milliseconds); each test then reads its scenario's result
from every rank. Nothing can hang: collectives time out after ``COLLECTIVE_TIMEOUT_S``, the launch
is killed after ``LAUNCH_TIMEOUT_S``. Every rank builds the same full batch from one seed, runs the
single-process op on it, and compares its own slice of the distributed run, to 1e-6 in fp32.
"""
from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lens_kernels as lk
from lens_kernels.distributed import ParallelLayout, vocab_shard_range

COLLECTIVE_TIMEOUT_S = 20
LAUNCH_TIMEOUT_S = 120

# (rtol, atol) of values computed in fp32 from the same inputs, and of gradients stored in the
# input dtype (one rounding of a value that may differ in its last fp32 bits). fp32 gradients: the
# single-process torch loss forms p = exp(y - m) / l while a shard forms exp(z / tau - lse); the two
# differ by up to 1.2e-6 relative on a [2, 5, 37] batch (measured), hence 3e-6 (2.5x margin).
VALUE_TOL = (1e-6, 1e-6)
GRAD_TOL = {torch.float32: (3e-6, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-4)}


def close(actual, expected, tol=VALUE_TOL, what=""):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def all_mean(x, group=None):
    x = x.detach().clone().float()
    dist.all_reduce(x, group=group)
    return x / dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------
# Inputs: the same full batch on every rank
# ---------------------------------------------------------------------------------------------
def make_batch(seed, B=8, T=5, V=37, H=8, dtype=torch.float32, empty_rows=(), dense_rows=0):
    g = torch.Generator().manual_seed(seed)
    logits_full = (torch.randn(B, T + 1, V, generator=g) * 3).to(dtype)  # sliced [:, :-1]: a strided view
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    mask[:dense_rows] = True  # rank 0 then holds more loss tokens than the others
    for row in empty_rows:
        mask[row] = False
    targets = torch.randint(0, V, (B, T), generator=g)
    targets = torch.where(mask, targets, torch.full_like(targets, -100))
    old = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    temperature = torch.rand(B, 1, generator=g) + 0.5
    return dict(logits_full=logits_full, mask=mask, targets=targets, old=old, ref=ref, adv=adv, hidden=hidden,
                weight=weight, bias=bias, temperature=temperature)


def rows_of(rank, world, B):
    per = B // world
    return slice(rank * per, (rank + 1) * per)


LOSS_CONFIG = lk.LossConfig(beta=0.05, entropy_coef=0.01, epsilon_high=0.28)


def loss_inputs(d, rows):
    return dict(old_logps=d["old"][rows], ref_logps=d["ref"][rows], temperature=d["temperature"][rows])


# ---------------------------------------------------------------------------------------------
# Scenarios: run on every rank; raise on mismatch
# ---------------------------------------------------------------------------------------------
def scenario_dp_logits(rank, world, agg, ratio_level="token", empty_rows=(), backend="torch"):
    """Data parallel, loss from logits: sum over ranks of the losses / world = the global loss,
    each rank's logits gradient = world * the single-process gradient of its rows. With
    backend="triton" the fused kernel (interpreted on CPU) gets the global normalizers."""
    B = 2 * world
    d = make_batch(1, B=B, empty_rows=empty_rows, dense_rows=2)
    cfg = LOSS_CONFIG.replace(loss_agg_mode=agg, ratio_level=ratio_level)
    full = d["logits_full"].clone().requires_grad_()
    loss_s, _ = lk.policy_loss_from_logits(full[:, :-1], d["targets"], d["mask"], d["adv"], config=cfg,
                                           backend=backend, **loss_inputs(d, slice(None)))
    loss_s.backward()
    rows = rows_of(rank, world, B)
    mine = d["logits_full"][rows].clone().requires_grad_()
    loss_r, metrics = lk.policy_loss_from_logits(mine[:, :-1], d["targets"][rows], d["mask"][rows], d["adv"][rows],
                                                 config=cfg, process_group=dist.group.WORLD, backend=backend,
                                                 **loss_inputs(d, rows))
    loss_r.backward()
    close(all_mean(loss_r), loss_s.detach(), what="mean over ranks of the loss")
    close(mine.grad / world, full.grad[rows], what="logits gradient / dp_size")
    assert all(torch.isfinite(v).all() for v in metrics.values())
    # Control: with token-mean, the local token count (ranks hold different counts) gives another
    # gradient after DP averaging, so the comparison above can fail.
    if agg == "token-mean":
        local = d["logits_full"][rows].clone().requires_grad_()
        loss_l, _ = lk.policy_loss_from_logits(local[:, :-1], d["targets"][rows], d["mask"][rows], d["adv"][rows],
                                               config=cfg, backend=backend, **loss_inputs(d, rows))
        loss_l.backward()
        diff = (local.grad / world - full.grad[rows]).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        assert diff > 1e-4, f"control: local normalizers must not match the global gradient ({diff})"


def scenario_dp_hidden(rank, world):
    """Data parallel, loss from hidden states with a replicated lm_head: the DP-averaged dW equals
    the single-process dW."""
    B = 2 * world
    d = make_batch(2, B=B, empty_rows=(B - 1, B - 2) if world > 1 else ())
    cfg = LOSS_CONFIG.replace(loss_agg_mode="token-mean")
    w_s = d["weight"].clone().requires_grad_()
    loss_s, _ = lk.policy_loss_from_hidden(d["hidden"], w_s, d["targets"], d["mask"], d["adv"], config=cfg,
                                           **loss_inputs(d, slice(None)))
    loss_s.backward()
    rows = rows_of(rank, world, B)
    w_r = d["weight"].clone().requires_grad_()
    loss_r, _ = lk.policy_loss_from_hidden(d["hidden"][rows], w_r, d["targets"][rows], d["mask"][rows],
                                           d["adv"][rows], config=cfg, process_group=dist.group.WORLD, **loss_inputs(d, rows))
    loss_r.backward()
    close(all_mean(loss_r), loss_s.detach(), what="loss")
    close(all_mean(w_r.grad), w_s.grad, what="DP-averaged weight gradient")


def scenario_dp_policy_loss_empty_rank(rank, world):
    """policy_loss from log-probs; the last rank has no loss token: it contributes 0, no NaN."""
    B = 2 * world
    d = make_batch(3, B=B, empty_rows=tuple(range(B - 2, B)))
    logps_full = -torch.rand(B, 5, generator=torch.Generator().manual_seed(9)) * 3
    entropy_full = torch.rand(B, 5, generator=torch.Generator().manual_seed(10))
    cfg = LOSS_CONFIG
    l_s, h_s = logps_full.clone().requires_grad_(), entropy_full.clone().requires_grad_()
    loss_s, _ = lk.policy_loss(l_s, d["adv"], d["mask"], old_logps=d["old"], ref_logps=d["ref"], entropy=h_s,
                               config=cfg)
    loss_s.backward()
    rows = rows_of(rank, world, B)
    l_r, h_r = logps_full[rows].clone().requires_grad_(), entropy_full[rows].clone().requires_grad_()
    loss_r, metrics = lk.policy_loss(l_r, d["adv"][rows], d["mask"][rows], old_logps=d["old"][rows],
                                     ref_logps=d["ref"][rows], entropy=h_r, config=cfg, process_group=dist.group.WORLD)
    loss_r.backward()
    close(all_mean(loss_r), loss_s.detach(), what="loss")
    close(l_r.grad / world, l_s.grad[rows], what="logps gradient / dp_size")
    close(h_r.grad / world, h_s.grad[rows], what="entropy gradient / dp_size")
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    if rank == world - 1:
        assert float(loss_r.detach()) == 0.0 and not l_r.grad.any() and not h_r.grad.any()


def scenario_dp_all_empty(rank, world):
    """No rank has a loss token: loss 0, gradient 0, no NaN, no hang."""
    d = make_batch(4, B=2 * world, empty_rows=range(2 * world))
    rows = rows_of(rank, world, 2 * world)
    mine = d["logits_full"][rows].clone().requires_grad_()
    loss, metrics = lk.policy_loss_from_logits(mine[:, :-1], d["targets"][rows], d["mask"][rows], d["adv"][rows],
                                               config=LOSS_CONFIG, process_group=dist.group.WORLD, **loss_inputs(d, rows))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not mine.grad.any()
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics


def _shard(rank, world, V):
    return vocab_shard_range(V, rank, world)


def scenario_tp_logprobs(rank, world, dtype, backend="auto"):
    """Vocab parallel token_logprobs of a strided logits shard, odd V, masked -100 targets, per-row
    temperature, with entropy: values equal the full-vocabulary ones, the gradient is the shard's.
    With backend="triton" the shard ops run as triton kernels (interpreted on CPU)."""
    d = make_batch(5, dtype=dtype)
    V = d["logits_full"].shape[-1]
    g = torch.Generator().manual_seed(11)
    g_l, g_h = torch.randn(d["mask"].shape, generator=g), torch.randn(d["mask"].shape, generator=g)
    full = d["logits_full"].clone().requires_grad_()
    l_s, h_s = lk.token_logprobs(full[:, :-1], d["targets"], mask=d["mask"], temperature=d["temperature"],
                                 return_entropy=True)
    ((l_s * g_l).sum() + (h_s * g_h).sum()).backward()
    v0, v1 = _shard(rank, world, V)
    shard = d["logits_full"][..., v0:v1].clone().requires_grad_()
    l_r, h_r = lk.token_logprobs(shard[:, :-1], d["targets"], mask=d["mask"], temperature=d["temperature"],
                                 return_entropy=True, vocab_group=dist.group.WORLD, vocab_start=v0,
                                 backend=backend)
    ((l_r * g_l).sum() + (h_r * g_h).sum()).backward()
    assert (l_r <= 0).all()
    close(l_r, l_s.detach(), what="logps")
    close(h_r, h_s.detach(), what="entropy")
    close(shard.grad, full.grad[..., v0:v1], tol=GRAD_TOL[dtype], what="logits shard gradient")
    assert not shard.grad[:, -1].any(), "the row outside the [:, :-1] view must get no gradient"


def scenario_tp_linear(rank, world):
    """Vocab parallel linear_token_logprobs: lm_head rows and bias sharded, hidden replicated."""
    d = make_batch(6)
    V = d["weight"].shape[0]
    g = torch.Generator().manual_seed(12)
    g_l, g_h = torch.randn(d["mask"].shape, generator=g), torch.randn(d["mask"].shape, generator=g)
    h_s, w_s, b_s = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    l_s, e_s = lk.linear_token_logprobs(h_s, w_s, d["targets"], bias=b_s, mask=d["mask"], temperature=0.8,
                                        return_entropy=True)
    ((l_s * g_l).sum() + (e_s * g_h).sum()).backward()
    v0, v1 = _shard(rank, world, V)
    h_r = d["hidden"].clone().requires_grad_()
    w_r, b_r = d["weight"][v0:v1].clone().requires_grad_(), d["bias"][v0:v1].clone().requires_grad_()
    l_r, e_r = lk.linear_token_logprobs(h_r, w_r, d["targets"], bias=b_r, mask=d["mask"], temperature=0.8,
                                        return_entropy=True, vocab_group=dist.group.WORLD, vocab_start=v0)
    ((l_r * g_l).sum() + (e_r * g_h).sum()).backward()
    close(l_r, l_s.detach(), what="logps")
    close(e_r, e_s.detach(), what="entropy")
    close(h_r.grad, h_s.grad, what="hidden gradient (summed over shards)")
    close(w_r.grad, w_s.grad[v0:v1], what="weight shard gradient")
    close(b_r.grad, b_s.grad[v0:v1], what="bias shard gradient")


def _mesh(rank, world, dp_size):
    """(dp_group, tp_group) of a dp_size x (world / dp_size) mesh; rank = dp_rank * tp + tp_rank.
    Every rank creates every group, in the same order (new_group is collective)."""
    tp = world // dp_size
    tp_groups = [dist.new_group(list(range(i * tp, (i + 1) * tp))) for i in range(dp_size)]
    dp_groups = [dist.new_group(list(range(j, world, tp))) for j in range(tp)]
    return dp_groups[rank % tp], tp_groups[rank // tp], rank // tp, rank % tp


def scenario_dp_tp(rank, world, dp_size, path, backend="auto"):
    """DP x TP: rows split over the DP group, vocabulary over the TP group. The loss averaged over
    DP equals the single-process loss; DP-averaged parameter gradients (lm_head shard) equal the
    single-process ones; activation gradients are dp_size x the single-process ones."""
    dp_group, tp_group, dp_rank, tp_rank = _mesh(rank, world, dp_size)
    tp = world // dp_size
    B = 2 * dp_size
    d = make_batch(7, B=B, empty_rows=(B - 1,))
    V = d["weight"].shape[0]
    cfg = LOSS_CONFIG.replace(loss_agg_mode="token-mean")
    rows = rows_of(dp_rank, dp_size, B)
    v0, v1 = vocab_shard_range(V, tp_rank, tp)
    layout = ParallelLayout.even_vocab(V, dp_group=dp_group, tp_group=tp_group)
    assert layout.vocab_start == v0
    if path == "logits":
        full = d["logits_full"].clone().requires_grad_()
        loss_s, _ = lk.policy_loss_from_logits(full[:, :-1], d["targets"], d["mask"], d["adv"], config=cfg,
                                               **loss_inputs(d, slice(None)))
        loss_s.backward()
        mine = d["logits_full"][rows, :, v0:v1].clone().requires_grad_()
        loss_r, _ = lk.policy_loss_from_logits(mine[:, :-1], d["targets"][rows], d["mask"][rows], d["adv"][rows],
                                               config=cfg, backend=backend, **layout.loss_kwargs(),
                                               **loss_inputs(d, rows))
        loss_r.backward()
        close(mine.grad / dp_size, full.grad[rows, :, v0:v1], tol=GRAD_TOL[torch.float32], what="logits shard gradient / dp_size")
    else:
        h_s, w_s, b_s = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        loss_s, _ = lk.policy_loss_from_hidden(h_s, w_s, d["targets"], d["mask"], d["adv"], bias=b_s, config=cfg,
                                               **loss_inputs(d, slice(None)))
        loss_s.backward()
        h_r = d["hidden"][rows].clone().requires_grad_()
        w_r, b_r = d["weight"][v0:v1].clone().requires_grad_(), d["bias"][v0:v1].clone().requires_grad_()
        loss_r, _ = lk.policy_loss_from_hidden(h_r, w_r, d["targets"][rows], d["mask"][rows], d["adv"][rows],
                                               bias=b_r, config=cfg, **layout.loss_kwargs(), **loss_inputs(d, rows))
        loss_r.backward()
        close(h_r.grad / dp_size, h_s.grad[rows], what="hidden gradient / dp_size")
        close(all_mean(w_r.grad, dp_group), w_s.grad[v0:v1], what="DP-averaged weight shard gradient")
        close(all_mean(b_r.grad, dp_group), b_s.grad[v0:v1], what="DP-averaged bias shard gradient")
    close(all_mean(loss_r, dp_group), loss_s.detach(), what="loss averaged over DP")


def _uneven_slices(n, world):
    """Slices of [0, n) of unequal sizes; with 4 ranks one of them is empty."""
    cuts = {2: [0, 5, n], 4: [0, 3, 3, 14, n]}[world] if world in (2, 4) else [n * r // world for r in range(world + 1)]
    return [slice(cuts[r], cuts[r + 1]) for r in range(world)]


ADVANTAGE_CASES = {
    "lens_ids": dict(estimator="lens", ids=True),
    "lens_correct_ids": dict(estimator="lens", ids=True, correct=True, lens_d_estimate="sequence"),
    "grpo_group_size": dict(estimator="grpo", ids=False),
    "rloo_ids": dict(estimator="rloo", ids=True),
    "dr_grpo_batch_scale": dict(estimator="dr_grpo", ids=True, scale="batch"),
    "neg_uniform_ids": dict(estimator="neg_uniform", ids=True),
    "nsr_correct_ids": dict(estimator="nsr", ids=True, correct=True),
}


def scenario_advantages(rank, world, case):
    """Groups across ranks: shuffled, non-contiguous group ids, uneven slices per rank."""
    opts = dict(ADVANTAGE_CASES[case])
    G, groups, T = 4, 6, 7
    n = G * groups
    g = torch.Generator().manual_seed(13)
    rewards = (torch.rand(n, generator=g) < 0.4).float()
    rewards[:G] = 0.0  # a negative group
    rewards[G:2 * G] = 1.0  # an all-correct group
    old = -torch.rand(n, T, generator=g) * 2
    mask = torch.rand(n, T, generator=g) < 0.8
    mask[3] = False  # a completion with no token
    kwargs = dict(estimator=opts["estimator"], eps=1e-6)
    if opts.get("scale"):
        kwargs["scale"] = opts["scale"]
    if opts.get("lens_d_estimate"):
        kwargs["lens_d_estimate"] = opts["lens_d_estimate"]
    ids = None
    if opts["ids"]:
        perm = torch.randperm(n, generator=g)
        ids = (torch.arange(n) // G * 7919 + 11)[perm]  # arbitrary id values, shuffled order
        rewards, old, mask = rewards[perm], old[perm], mask[perm]
    correct = rewards > 0 if opts.get("correct") else None
    if opts.get("correct"):
        rewards = torch.where(correct, 0.5 + torch.rand(n, generator=g), torch.rand(n, generator=g) * 0.4)

    def call(sl, **extra):
        kw = dict(kwargs, **extra)
        if ids is None:
            kw["group_size"] = G
        else:
            kw["group_ids"] = ids[sl]
        if correct is not None:
            kw["correct"] = correct[sl]
        if kwargs["estimator"] == "lens":
            kw.update(old_logps=old[sl], mask=mask[sl])
        return lk.group_advantages(rewards[sl], **kw)

    adv_s, metrics_s = call(slice(None))
    sl = _uneven_slices(n, world)[rank]
    adv_r, metrics_r = call(sl, process_group=dist.group.WORLD)
    assert adv_r.shape == (sl.stop - sl.start,)
    close(adv_r, adv_s[sl], what="advantages")
    for name, value in metrics_s.items():
        close(metrics_r[name], value[sl] if name == "confidence" else value, what=f"metric {name}")
    assert adv_s.abs().sum() > 0


def scenario_advantages_error_on_one_rank(rank, world):
    """A non-binary LENS reward on one rank: every rank raises the same ValueError, none hangs."""
    n, T = 4 * world, 3
    rewards = torch.zeros(n)
    rewards[1] = 1.0
    if rank == world - 1:
        rewards[-1] = 0.5  # this rank's last completion (ranks hold 4 each)
    sl = rows_of(rank, world, n)
    old = -torch.rand(n, T)
    try:
        lk.group_advantages(rewards[sl], group_size=4, estimator="lens", old_logps=old[sl], process_group=dist.group.WORLD)
    except ValueError as exc:
        assert "binary" in str(exc), exc
    else:
        raise AssertionError("a non-binary reward on one rank must raise on every rank")


def scenario_advantages_value_errors_on_one_rank(rank, world):
    """A correct= of 0.5, or a NaN old log-prob at a kept token, on one rank: every rank raises the same
    ValueError (the checks run on the gathered batch), none hangs."""
    n, T = 4 * world, 3
    sl = rows_of(rank, world, n)
    rewards = torch.zeros(n)
    rewards[1] = 1.0
    for bad, message in (("correct", "correct must hold 0 or 1"), ("old_logps", "old_logps must not be NaN")):
        correct = (rewards > 0).float()
        old = -torch.rand(n, T, generator=torch.Generator().manual_seed(3))
        if rank == world - 1:
            if bad == "correct":
                correct[-1] = 0.5
            else:
                old[-1, 1] = float("nan")
        try:
            lk.group_advantages(rewards[sl], group_size=4, estimator="lens", old_logps=old[sl], correct=correct[sl],
                                process_group=dist.group.WORLD)
        except ValueError as exc:
            assert message in str(exc), exc
        else:
            raise AssertionError(f"a bad {bad} on one rank must raise on every rank")


def scenario_vocab_overlap_error(rank, world):
    """Shards that overlap (every rank claims vocab_start 0): every rank raises, none hangs."""
    d = make_batch(8)
    V = d["logits_full"].shape[-1]
    width = -(-V // world)
    try:
        lk.token_logprobs(d["logits_full"][:, :-1, :width], d["targets"], mask=d["mask"], vocab_group=dist.group.WORLD,
                          vocab_start=0)
    except ValueError as exc:
        assert "exactly one shard" in str(exc), exc
    else:
        raise AssertionError("overlapping shards must raise on every rank")


SCENARIOS = {
    2: {
        **{f"dp_logits_{agg}": (scenario_dp_logits, (agg,)) for agg in
           ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")},
        "dp_logits_gspo": (scenario_dp_logits, ("token-mean", "sequence")),
        "dp_logits_triton": (scenario_dp_logits, ("token-mean", "token", (), "triton")),
        "dp_hidden": (scenario_dp_hidden, ()),
        "dp_empty_rank": (scenario_dp_policy_loss_empty_rank, ()),
        "dp_all_empty": (scenario_dp_all_empty, ()),
        **{f"tp_logprobs_{str(dt)[6:]}": (scenario_tp_logprobs, (dt,))
           for dt in (torch.float32, torch.bfloat16, torch.float16)},
        "tp_logprobs_triton": (scenario_tp_logprobs, (torch.float32, "triton")),
        "tp_linear": (scenario_tp_linear, ()),
        "tp_loss_logits": (scenario_dp_tp, (1, "logits")),
        "tp_loss_logits_triton": (scenario_dp_tp, (1, "logits", "triton")),
        "tp_loss_hidden": (scenario_dp_tp, (1, "hidden")),
        **{f"adv_{case}": (scenario_advantages, (case,)) for case in ADVANTAGE_CASES},
        "adv_error_on_one_rank": (scenario_advantages_error_on_one_rank, ()),
        "adv_value_errors_on_one_rank": (scenario_advantages_value_errors_on_one_rank, ()),
        "vocab_overlap_error": (scenario_vocab_overlap_error, ()),
    },
    4: {
        "dp_logits_token-mean": (scenario_dp_logits, ("token-mean", "token", (6, 7))),
        "dp_empty_rank": (scenario_dp_policy_loss_empty_rank, ()),
        "tp_logprobs_float32": (scenario_tp_logprobs, (torch.float32,)),
        "tp_linear": (scenario_tp_linear, ()),
        "dp2_tp2_logits": (scenario_dp_tp, (2, "logits")),
        "dp2_tp2_hidden": (scenario_dp_tp, (2, "hidden")),
        "adv_lens_ids": (scenario_advantages, ("lens_ids",)),
        "adv_grpo_group_size": (scenario_advantages, ("grpo_group_size",)),
    },
}


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _worker(rank, world, init_file, results):
    torch.set_num_threads(1)
    if not torch.cuda.is_available():  # this child only: the triton scenario runs interpreted on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for name, (fn, args) in SCENARIOS[world].items():
            try:
                fn(rank, world, *args)
                results.put((name, rank, None))
            except Exception:  # reported by the test of this scenario
                results.put((name, rank, traceback.format_exc()))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(world):
    """{scenario: {rank: traceback or None}} of one launch of ``world`` ranks, killed if late."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(prefix="lens_dist_"), "init")
    procs = mp.start_processes(_worker, args=(world, init_file, results), nprocs=world, join=False,
                               start_method="spawn")
    expected = world * len(SCENARIOS[world])
    out = {name: {} for name in SCENARIOS[world]}
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    got = 0
    try:
        while got < expected and time.monotonic() < deadline:
            try:
                name, rank, err = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            out[name][rank] = err
            got += 1
        while time.monotonic() < deadline and not procs.join(timeout=max(0.1, deadline - time.monotonic())):
            pass
    except Exception as exc:  # a rank died: its scenarios stay without a result
        out.setdefault("_launch", {})[0] = repr(exc)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return out


_launches = {}


def results_of(world):
    if world not in _launches:
        _launches[world] = launch(world)
    return _launches[world]


@pytest.mark.parametrize("world,scenario", [(w, s) for w in sorted(SCENARIOS) for s in SCENARIOS[w]])
def test_distributed_matches_single_process(world, scenario):
    results = results_of(world)
    per_rank = results[scenario]
    missing = [r for r in range(world) if r not in per_rank]
    assert not missing, f"ranks {missing} gave no result in {LAUNCH_TIMEOUT_S} s (hang or crash): {results.get('_launch')}"
    errors = {r: e for r, e in per_rank.items() if e is not None}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items()))
