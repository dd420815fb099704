"""Boundary checks of the distributed keywords, and the one-rank group, in this process (no spawn).

A one-rank gloo group makes every collective a no-op copy, so the distributed paths must equal the
plain ones exactly there; the multi-rank cases are in test_distributed.py.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

import lens_kernels as lk
from lens_kernels.distributed import ParallelLayout, global_counts, vocab_shard_range

V = 37


def batch(seed=0, B=3, T=4, H=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    return dict(logits=torch.randn(B, T, V, generator=g) * 2, targets=torch.randint(0, V, (B, T), generator=g),
                mask=mask, adv=torch.randn(B, generator=g), hidden=torch.randn(B, T, H, generator=g),
                weight=torch.randn(V, H, generator=g) / H ** 0.5)


def test_process_group_without_init_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    d = batch()
    with pytest.raises(ValueError, match="not initialized"):
        lk.token_logprobs(d["logits"], d["targets"], vocab_group=object(), vocab_start=0)
    with pytest.raises(ValueError, match="not initialized"):
        lk.policy_loss_from_logits(d["logits"], d["targets"], d["mask"], d["adv"], process_group=object())


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    init = os.path.join(str(tmp_path_factory.mktemp("pg")), "init")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(vocab_start=0), ValueError, "vocab_group"),
    (dict(vocab_group="pg"), TypeError, "ProcessGroup"),
    (dict(vocab_group="WORLD"), ValueError, "vocab_start"),
    (dict(vocab_group="WORLD", vocab_start=-1), ValueError, "vocab_start must be an int >= 0"),
    (dict(vocab_group="WORLD", vocab_start=True), ValueError, "vocab_start must be an int >= 0"),
    (dict(vocab_group="WORLD", vocab_start=1.0), ValueError, "vocab_start must be an int >= 0"),
])
@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs"])
def test_logprob_keywords_are_validated(group, op, kwargs, error, match):
    d = batch()
    kwargs = {k: (group if v == "WORLD" else v) for k, v in kwargs.items()}
    if op == "token_logprobs":
        call = lambda: lk.token_logprobs(d["logits"], d["targets"], **kwargs)  # noqa: E731
    else:
        call = lambda: lk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], **kwargs)  # noqa: E731
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_loss_keywords_are_validated(group, path):
    d = batch()
    if path == "logits":
        call = lambda **kw: lk.policy_loss_from_logits(d["logits"], d["targets"], d["mask"], d["adv"], **kw)  # noqa: E731
    else:
        call = lambda **kw: lk.policy_loss_from_hidden(d["hidden"], d["weight"], d["targets"], d["mask"],  # noqa: E731
                                                       d["adv"], **kw)
    with pytest.raises(ValueError, match="vocab_group"):
        call(vocab_start=0)
    with pytest.raises(ValueError, match="vocab_start"):
        call(vocab_group=group)
    with pytest.raises(TypeError, match="ProcessGroup"):
        call(process_group=3)
    with pytest.raises(ValueError, match="dp_size"):
        call(process_group=group, config=lk.LossConfig(dp_size=2.0))


def test_targets_outside_every_shard_raise(group):
    d = batch()
    # one rank holding [5, 5 + V): targets below 5 have no owner
    targets = d["targets"].clone()
    targets[0, 0] = 2
    with pytest.raises(ValueError, match="exactly one shard"):
        lk.token_logprobs(d["logits"], targets, vocab_group=group, vocab_start=5)
    # masked padding ids need no owner
    targets = torch.where(d["mask"], d["targets"], torch.full_like(d["targets"], -100))
    lk.token_logprobs(d["logits"], targets, mask=d["mask"], vocab_group=group, vocab_start=0)


def test_one_rank_group_equals_plain_ops(group):
    d = batch(1)
    cfg = lk.LossConfig(entropy_coef=0.01, beta=0.0)
    plain, sharded = d["logits"].clone().requires_grad_(), d["logits"].clone().requires_grad_()
    loss_p, _ = lk.policy_loss_from_logits(plain, d["targets"], d["mask"], d["adv"], config=cfg)
    loss_d, _ = lk.policy_loss_from_logits(sharded, d["targets"], d["mask"], d["adv"], config=cfg,
                                           process_group=group, vocab_group=group, vocab_start=0)
    loss_p.backward()
    loss_d.backward()
    torch.testing.assert_close(loss_d, loss_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sharded.grad, plain.grad, rtol=1e-6, atol=1e-7)

    rewards = (torch.rand(8, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    old = -torch.rand(8, 3, generator=torch.Generator().manual_seed(3))
    adv_p, m_p = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old)
    adv_d, m_d = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old, process_group=group)
    torch.testing.assert_close(adv_d, adv_p, rtol=0, atol=0)
    for name in m_p:
        torch.testing.assert_close(m_d[name], m_p[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="summed over the process group"):
        lk.group_advantages(rewards[:6], group_size=4, process_group=group)
    with pytest.raises(TypeError, match="ProcessGroup"):
        lk.group_advantages(rewards, group_size=4, process_group="dp")


def test_global_counts_never_zero(group):
    tokens, sequences = global_counts(torch.zeros(3, 4, dtype=torch.bool), group)
    assert int(tokens) == 1 and int(sequences) == 3
    tokens, _ = global_counts(torch.ones(2, 5), group)
    assert int(tokens) == 10


@pytest.mark.parametrize("vocab,world", [(37, 2), (37, 4), (8, 4), (151936, 8), (5, 5)])
def test_vocab_shard_range_tiles_the_vocabulary(vocab, world):
    ranges = [vocab_shard_range(vocab, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(v1 > v0 for v0, v1 in ranges)
    assert len({v1 - v0 for v0, v1 in ranges[:-1]}) <= 1


@pytest.mark.parametrize("args,match", [((3, 0, 4), "too small"), ((37, 2, 2), "rank"), ((0, 0, 1), "vocab_size"),
                                        ((37, 0, 0), "world_size")])
def test_vocab_shard_range_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        vocab_shard_range(*args)


def test_parallel_layout_keywords(group):
    layout = ParallelLayout.even_vocab(V, dp_group=group, tp_group=group)
    assert layout.logprob_kwargs() == {"vocab_group": group, "vocab_start": 0}
    assert layout.loss_kwargs() == {"process_group": group, "vocab_group": group, "vocab_start": 0}
    assert layout.advantage_kwargs() == {"process_group": group}
    assert ParallelLayout().loss_kwargs() == {"process_group": None} and ParallelLayout().logprob_kwargs() == {}
    with pytest.raises(ValueError, match="vocab_start"):
        ParallelLayout(tp_group=group)
    with pytest.raises(TypeError, match="ProcessGroup"):
        ParallelLayout(dp_group="dp")


def test_earlier_argument_names_still_work_with_a_warning(group):
    d = batch()
    with pytest.warns(DeprecationWarning, match="process_group= is deprecated"):
        old, _ = lk.token_logprobs(d["logits"], d["targets"], process_group=group, vocab_start=0)
    new, _ = lk.token_logprobs(d["logits"], d["targets"], vocab_group=group, vocab_start=0)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="inplace_backward= is deprecated"):
        lk.token_logprobs(d["logits"].clone(), d["targets"], inplace_backward=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        lk.token_logprobs(d["logits"], d["targets"], inplace_grad=True)
