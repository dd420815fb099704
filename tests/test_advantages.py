"""group_advantages against hand-worked numbers, the float64 reference, and LENS's properties."""
import math
import time

import pytest
import torch
from seeds import stable_seed
from hypothesis import given, settings, strategies as st

import lens_kernels as lk
from lens_kernels import reference as ref


def _old_logps_for(pbar, T=3):
    """old log-probs [N, T] whose masked mean is log(pbar) (all tokens kept)."""
    return torch.log(torch.tensor(pbar, dtype=torch.float64)).unsqueeze(1).repeat(1, T)


# ---------------------------------------------------------------- hand-worked LENS examples (G = 4)
def test_lens_negative_group_by_hand():
    # pbar = [0.5, 0.2, 0.4, 0.1], all wrong: D = 2 * 0.5 = 1.0
    # rt = -(1/4) pbar / (D - pbar) = [-0.25, -0.0625, -0.1666667, -0.0277778]; mean rt = -0.1267361
    # A = 0.25 (rt - mean)
    rewards = torch.zeros(4, dtype=torch.float64)
    adv, stats = lk.group_advantages(rewards, group_size=4, estimator="lens",
                                     old_logps=_old_logps_for([0.5, 0.2, 0.4, 0.1]))
    expected = torch.tensor([-0.0308159722, 0.0160590278, -0.0099826389, 0.0247395833], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, atol=1e-9, rtol=0)
    assert float(stats["frac_negative_groups"]) == 1.0
    assert abs(float(adv.sum())) < 1e-12
    assert int(adv.argmin()) == 0  # the most confident mistake is pushed down hardest


def test_lens_mixed_group_by_hand():
    # r = [1, 0, 0, 0], pbar = [0.5, 0.2, 0.4, 0.1]
    # D_imp = 1 / ((1/4)(1/0.5)) = 2.0 > 2 max pbar = 1.0, so D = 2.0
    # rt = [1, -(1/4)(0.2/1.8), -(1/4)(0.4/1.6), -(1/4)(0.1/1.9)] = [1, -0.0277778, -0.0625, -0.0131579]
    # A = (rt - mean) / (std_unbiased + 1e-4): mean = 0.2241411, std = 0.5176531
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv, _ = lk.group_advantages(rewards, group_size=4, estimator="lens",
                                 old_logps=_old_logps_for([0.5, 0.2, 0.4, 0.1]))
    rt = [1.0, -0.25 * 0.2 / 1.8, -0.25 * 0.4 / 1.6, -0.25 * 0.1 / 1.9]
    mean = sum(rt) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in rt) / 3)
    assert abs(mean - 0.2241411) < 1e-6 and abs(std - 0.5176531) < 1e-6
    expected = torch.tensor([(x - mean) / (std + 1e-4) for x in rt], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, atol=1e-9, rtol=0)
    # GRPO would give the three wrong answers the same advantage; LENS orders them by confidence
    assert adv[2] < adv[1] < adv[3] < 0 < adv[0]


def test_lens_mixed_group_where_confidence_bound_wins():
    # r = [1, 0, 0, 1], pbar = [0.5, 0.4, 0.1, 0.25]: D_imp = 1 / ((1/4)(2 + 4)) = 0.667 < 2 max = 1.0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv, _ = lk.group_advantages(rewards, group_size=4, estimator="lens",
                                 old_logps=_old_logps_for([0.5, 0.4, 0.1, 0.25]))
    rt = [1.0, -0.25 * 0.4 / 0.6, -0.25 * 0.1 / 0.9, 1.0]
    mean = sum(rt) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in rt) / 3)
    expected = torch.tensor([(x - mean) / (std + 1e-4) for x in rt], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, atol=1e-9, rtol=0)


def test_lens_all_correct_group_is_zero():
    adv, stats = lk.group_advantages(torch.ones(4), group_size=4, estimator="lens",
                                     old_logps=_old_logps_for([0.5, 0.2, 0.4, 0.1]).float())
    assert torch.equal(adv, torch.zeros(4))
    assert float(stats["frac_all_correct_groups"]) == 1.0


def test_lens_sequence_d_estimate_uses_raw_sequence_probability():
    # 3 tokens each: the raw sequence probability of the correct answer is 0.5^3, so D_imp = 4 * 0.125 = 0.5
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    old = _old_logps_for([0.5, 0.2, 0.4, 0.1], T=3)
    adv_seq, _ = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old,
                                     lens_d_estimate="sequence")
    expected = ref.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old,
                                    mask=torch.ones_like(old), lens_d_estimate="sequence")
    torch.testing.assert_close(adv_seq, expected, atol=1e-9, rtol=0)
    adv_mean, _ = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old)
    assert not torch.allclose(adv_seq, adv_mean)


# ---------------------------------------------------------------- against the reference
ESTIMATOR_CASES = [("grpo", "all"), ("dr_grpo", "all"), ("rloo", "all"),
                   ("lens", "all"), ("lens", "negative"), ("lens", "mixed"),
                   ("neg_uniform", "all"), ("nsr", "all")]


@pytest.mark.parametrize("estimator,lens_groups", ESTIMATOR_CASES)
@pytest.mark.parametrize("scale", [None, "group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(estimator, scale, lens_groups, dtype):
    g = torch.Generator().manual_seed(stable_seed(estimator, scale, lens_groups))
    N, G, T = 40, 5, 9
    rewards = (torch.rand(N, generator=g) < 0.35).to(dtype)
    rewards[:G] = 0  # one negative group
    rewards[G:2 * G] = 1  # one all-correct group
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(N, T, generator=g) < 0.8
    mask[3] = False  # a completion with no tokens: pbar = 1
    kw = dict(estimator=estimator, old_logps=old.to(dtype), mask=mask, scale=scale, lens_groups=lens_groups)
    if estimator == "nsr" and scale in ("group", "batch"):
        with pytest.raises(ValueError, match="scale"):
            lk.group_advantages(rewards, group_size=G, **kw)
        return
    adv, _ = lk.group_advantages(rewards, group_size=G, **kw)
    expected = ref.group_advantages(rewards, group_size=G, **kw)
    assert adv.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(adv.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("eps,unbiased", [(1e-4, True), (1e-6, True), (1e-9, False)])
def test_eps_and_std_conventions(eps, unbiased):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.25, 1.0], dtype=torch.float64)
    adv, _ = lk.group_advantages(rewards, group_size=3, eps=eps, std_unbiased=unbiased)
    expected = ref.group_advantages(rewards, group_size=3, eps=eps, std_unbiased=unbiased)
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)
    grouped = rewards.view(2, 3)
    manual = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=unbiased, keepdim=True) + eps)
    torch.testing.assert_close(adv, manual.reshape(-1), atol=1e-12, rtol=0)


def test_batch_scale_matches_trl_convention():
    # TRL scale_rewards="batch": centered per group, divided by the std of the whole batch (+1e-4)
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    adv, _ = lk.group_advantages(rewards, group_size=6, scale="batch")
    grouped = rewards.view(4, 6)
    manual = (grouped - grouped.mean(1, keepdim=True)).reshape(-1) / (rewards.std() + 1e-4)
    torch.testing.assert_close(adv, manual, atol=1e-12, rtol=0)


def test_rloo_leave_one_out():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv, _ = lk.group_advantages(rewards, group_size=4, estimator="rloo")
    torch.testing.assert_close(adv, torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["grpo", "lens", "rloo"])
def test_shuffled_group_ids_equal_contiguous(estimator):
    g = torch.Generator().manual_seed(7)
    N, G, T = 64, 8, 5
    rewards = (torch.rand(N, generator=g) < 0.3).float()
    old = -torch.rand(N, T, generator=g) * 2
    mask = torch.rand(N, T, generator=g) < 0.9
    contiguous, m1 = lk.group_advantages(rewards, group_size=G, estimator=estimator, old_logps=old, mask=mask)
    perm = torch.randperm(N, generator=g)
    ids = (torch.arange(N) // G * 1000 + 17)[perm]  # arbitrary, non-dense ids in shuffled order
    shuffled, m2 = lk.group_advantages(rewards[perm], group_ids=ids, estimator=estimator, old_logps=old[perm],
                                       mask=mask[perm])
    torch.testing.assert_close(shuffled, contiguous[perm], atol=1e-6, rtol=0)
    for key in ("frac_negative_groups", "frac_mixed_groups", "frac_all_correct_groups"):
        torch.testing.assert_close(m1[key], m2[key])


def test_uneven_groups_by_ids_match_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    ids = torch.tensor([5, 5, 9, 9, 9, 2, 2])
    old = -torch.rand(7, 4, dtype=torch.float64)
    for est in ("grpo", "lens"):
        adv, _ = lk.group_advantages(rewards, group_ids=ids, estimator=est, old_logps=old)
        torch.testing.assert_close(adv, ref.group_advantages(rewards, group_ids=ids, estimator=est, old_logps=old,
                                                             mask=torch.ones_like(old)), atol=1e-10, rtol=0)


def test_nan_rewards_zero_advantage_like_trl():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    adv, _ = lk.group_advantages(rewards, group_size=3, nan_rewards="zero_advantage")
    assert adv[1] == 0 and torch.isfinite(adv).all()
    # the NaN completion is left out of its group's statistics: the group is [1, 0]
    torch.testing.assert_close(adv[[0, 2]], torch.tensor([0.5, -0.5], dtype=torch.float64) / (math.sqrt(0.5) + 1e-4))
    expected = ref.group_advantages(rewards, group_size=3, nan_rewards="zero_advantage")
    torch.testing.assert_close(adv, expected)


def test_correct_mask_with_graded_rewards():
    rewards = torch.tensor([0.9, 0.1, 0.0, 0.2], dtype=torch.float64)
    correct = torch.tensor([True, False, False, False])
    old = _old_logps_for([0.5, 0.2, 0.4, 0.1])
    adv, _ = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old, correct=correct)
    expected = ref.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old,
                                    mask=torch.ones_like(old), correct=correct)
    torch.testing.assert_close(adv, expected, atol=1e-10, rtol=0)


def test_metrics():
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    old = _old_logps_for([0.5, 0.2, 0.4, 0.1] * 3).float()
    adv, m = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old)
    third = torch.tensor(1 / 3)
    for key in ("frac_negative_groups", "frac_mixed_groups", "frac_all_correct_groups"):
        torch.testing.assert_close(m[key], third)
        assert m[key].dim() == 0
    torch.testing.assert_close(m["mean_abs_adv_negative"], adv[:4].abs().mean())
    torch.testing.assert_close(m["mean_abs_adv_mixed"], adv[4:8].abs().mean())
    assert float(m["mean_abs_adv_all_correct"]) == 0.0
    wrong = torch.tensor([0.5, 0.2, 0.4, 0.1, 0.2, 0.1]).mean()
    torch.testing.assert_close(m["mean_confidence_wrong"], wrong)
    torch.testing.assert_close(m["frac_zero_std_groups"], 2 * third)


def test_hundred_thousand_completions_fast():
    g = torch.Generator().manual_seed(0)
    N = 100_000
    rewards = (torch.rand(N, generator=g) < 0.3).float()
    old = -torch.rand(N, 4, generator=g)
    ids = torch.randperm(N, generator=g) // 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: other threads spinning on a loaded machine would count too
    try:
        lk.group_advantages(rewards, group_ids=ids, estimator="lens", old_logps=old)  # warm-up
        # CPU time of this process, so that other load on a shared CI machine does not count
        start = time.process_time()
        adv, _ = lk.group_advantages(rewards, group_ids=ids, estimator="lens", old_logps=old)
        elapsed = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(adv).all()
    assert elapsed < 1.0, f"100k completions took {elapsed * 1e3:.0f} ms"


# ---------------------------------------------------------------- LENS properties (hypothesis)
group_strategy = st.integers(min_value=2, max_value=8).flatmap(
    lambda G: st.tuples(
        st.just(G),
        st.lists(st.integers(0, 1), min_size=G, max_size=G),
        st.lists(st.floats(min_value=-6.0, max_value=-0.01), min_size=G, max_size=G),
    )
)


def _one_group(G, r, s, **kw):
    rewards = torch.tensor(r, dtype=torch.float64)
    old = torch.tensor(s, dtype=torch.float64).unsqueeze(1)
    return lk.group_advantages(rewards, group_size=G, estimator="lens", old_logps=old, **kw)[0]


@settings(max_examples=60, deadline=None)
@given(group_strategy)
def test_property_mixed_group_signs(group):
    G, r, s = group
    if not 0 < sum(r) < G:
        return
    adv = _one_group(G, r, s)
    for a, ri in zip(adv.tolist(), r):
        assert (a > 0) if ri == 1 else (a < 0)


@settings(max_examples=60, deadline=None)
@given(group_strategy, st.floats(min_value=0.05, max_value=2.0))
def test_property_negative_group_sums_to_zero_and_scales_with_alpha(group, alpha):
    G, _, s = group
    r = [0] * G
    base = _one_group(G, r, s, lens_alpha=1.0)
    adv = _one_group(G, r, s, lens_alpha=alpha)
    assert abs(float(adv.sum())) < 1e-12
    torch.testing.assert_close(adv, alpha * base, atol=1e-12, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(group_strategy)
def test_property_more_confident_mistake_never_gets_larger_advantage(group):
    G, r, s = group
    adv = _one_group(G, r, s)
    wrong = [i for i in range(G) if r[i] == 0]
    for i in wrong:
        for j in wrong:
            if s[i] > s[j]:  # i is the more confident mistake
                assert adv[i] <= adv[j] + 1e-12


@settings(max_examples=40, deadline=None)
@given(group_strategy, group_strategy)
def test_property_ablations_change_only_their_group_kind(g1, g2):
    G = min(g1[0], g2[0])
    r_neg, s_neg = [0] * G, g1[2][:G]
    r_mix = [1] + [0] * (G - 1)
    s_mix = g2[2][:G]
    rewards = torch.tensor(r_neg + r_mix, dtype=torch.float64)
    old = torch.tensor(s_neg + s_mix, dtype=torch.float64).unsqueeze(1)
    kw = dict(group_size=G, old_logps=old)
    lens, _ = lk.group_advantages(rewards, estimator="lens", **kw)
    grpo, _ = lk.group_advantages(rewards, estimator="grpo", **kw)
    neg_only, _ = lk.group_advantages(rewards, estimator="lens", lens_groups="negative", **kw)
    mixed_only, _ = lk.group_advantages(rewards, estimator="lens", lens_groups="mixed", **kw)
    torch.testing.assert_close(neg_only[:G], lens[:G])  # negative group: LENS
    torch.testing.assert_close(neg_only[G:], grpo[G:])  # mixed group: untouched GRPO
    torch.testing.assert_close(mixed_only[:G], grpo[:G])  # negative group: GRPO's zeros
    torch.testing.assert_close(mixed_only[G:], lens[G:])


# ---------------------------------------------------------------- uniform penalty and negative-sample reinforcement
def test_neg_uniform_and_nsr_by_hand():
    # G = 4: a negative group, a mixed group [1, 0, 0, 0], an all-correct group
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float64)
    adv, m = lk.group_advantages(rewards, group_size=4, estimator="neg_uniform", lens_alpha=0.5)
    # negative group: every wrong answer -alpha / G = -0.125, not de-meaned
    torch.testing.assert_close(adv[:4], torch.full((4,), -0.125, dtype=torch.float64), atol=0, rtol=0)
    # mixed group: rt = [1, -1/4, -1/4, -1/4] normalized like GRPO (an affine map of r: GRPO up to the eps)
    rt = torch.tensor([1.0, -0.25, -0.25, -0.25], dtype=torch.float64)
    torch.testing.assert_close(adv[4:8], (rt - rt.mean()) / (rt.std() + 1e-4), atol=1e-12, rtol=0)
    grpo, _ = lk.group_advantages(rewards, group_size=4, estimator="grpo")
    torch.testing.assert_close(adv[4:8], grpo[4:8], atol=1e-3, rtol=0)
    assert torch.equal(adv[8:], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(m["mean_abs_adv_negative"], torch.tensor(0.125, dtype=torch.float64))
    adv, m = lk.group_advantages(rewards, group_size=4, estimator="nsr")
    torch.testing.assert_close(adv, rewards - 1.0, atol=0, rtol=0)  # -1 for wrong, 0 for right, any group
    torch.testing.assert_close(m["mean_abs_adv_mixed"], torch.tensor(0.75, dtype=torch.float64))


def test_neg_uniform_negative_group_with_graded_rewards():
    # correct= with partial credit: the rewards are de-meaned, the uniform penalty is kept
    rewards = torch.tensor([0.3, 0.1, 0.0, 0.2], dtype=torch.float64)
    correct = torch.zeros(4, dtype=torch.bool)
    adv, _ = lk.group_advantages(rewards, group_size=4, estimator="neg_uniform", correct=correct)
    torch.testing.assert_close(adv, 0.25 * (rewards - rewards.mean()) - 0.25 / 4, atol=1e-12, rtol=0)
    adv_nsr, _ = lk.group_advantages(rewards, group_size=4, estimator="nsr", correct=correct)
    assert torch.equal(adv_nsr, -torch.ones(4, dtype=torch.float64))


def _fresh_batch(seed, G, groups, dtype, nan=False, unordered=False):
    g = torch.Generator().manual_seed(seed)
    N, T = G * groups, 7
    rewards = (torch.rand(N, generator=g) < 0.3).to(dtype)
    rewards[:G] = 0  # at least one negative group
    if groups > 2:
        rewards[G:2 * G] = 1  # and one all-correct group
    if nan:
        rewards[torch.randperm(N, generator=g)[:max(1, N // 7)]] = math.nan
    old = (-torch.rand(N, T, generator=g, dtype=torch.float64) * 4).to(dtype)
    mask = torch.rand(N, T, generator=g) < 0.85
    ids = None
    if unordered:
        ids = (torch.arange(N) // G * 37 + 5)[torch.randperm(N, generator=g)]
    return rewards, old, mask, ids


@pytest.mark.parametrize("estimator", ["neg_uniform", "nsr", "lens", "grpo", "rloo"])
@pytest.mark.parametrize("G,groups", [(2, 5), (3, 4), (8, 6), (16, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "unordered_ids", "nan_rewards"])
def test_estimators_match_reference_on_fresh_inputs(estimator, G, groups, dtype, layout):
    seed = stable_seed("fresh", estimator, G, groups, str(dtype), layout)
    rewards, old, mask, ids = _fresh_batch(seed, G, groups, dtype, nan=layout == "nan_rewards",
                                           unordered=layout == "unordered_ids")
    kw = dict(estimator=estimator, old_logps=old, mask=mask, lens_alpha=0.7,
              nan_rewards="zero_advantage" if layout == "nan_rewards" else "raise")
    where = dict(group_ids=ids) if ids is not None else dict(group_size=G)
    adv, metrics = lk.group_advantages(rewards, **where, **kw)
    expected = ref.group_advantages(rewards, **where, **kw)
    assert adv.dtype == dtype and torch.isfinite(adv).all()
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(adv.double(), expected, atol=tol, rtol=tol)
    for name, value in metrics.items():
        assert torch.isfinite(value).all(), name


# ---------------------------------------------------------------- edge values: eps = 0, correct=, NaN, tiny confidence
@pytest.mark.parametrize("estimator", ["grpo", "lens", "rloo", "neg_uniform"])
@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("rewards", [[1.0, 1.0, 1.0, 0.0, 1.0, 0.0], [0.0] * 6, [1.0] * 6])
def test_eps_zero_zero_std_group_gives_zero_not_nan(estimator, scale, rewards):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    old = -torch.rand(6, 3, generator=torch.Generator().manual_seed(stable_seed("eps0", estimator, scale)))
    kw = dict(group_size=3, estimator=estimator, old_logps=old, scale=scale, eps=0.0)
    adv, metrics = lk.group_advantages(rewards, **kw)
    assert torch.isfinite(adv).all()
    for name, value in metrics.items():
        assert torch.isfinite(value).all(), name
    expected = ref.group_advantages(rewards, **kw)
    torch.testing.assert_close(adv.double(), expected, atol=1e-6, rtol=1e-6)
    if estimator in ("grpo", "rloo"):
        assert torch.equal(adv[:3], torch.zeros(3))  # the all-correct group


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_zero_equal_graded_rewards_center_exactly(dtype):
    # 0.1 three times: the float mean is not exactly 0.1, and its residue over a residue std would be O(1)
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2, 0.3], dtype=dtype)
    adv, _ = lk.group_advantages(rewards, group_size=3, eps=0.0)
    assert torch.equal(adv[:3], torch.zeros(3, dtype=dtype))
    torch.testing.assert_close(adv.double(), ref.group_advantages(rewards, group_size=3, eps=0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, math.nan])
@pytest.mark.parametrize("estimator", ["grpo", "lens", "neg_uniform", "nsr"])
def test_float_correct_must_be_zero_or_one(value, estimator):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    correct = torch.tensor([1.0, 0.0, value, 0.0])
    with pytest.raises(ValueError, match=r"correct must hold 0 or 1.*correct\[2\]"):
        lk.group_advantages(rewards, group_size=2, estimator=estimator, correct=correct,
                            old_logps=torch.zeros(4, 2))
    ok = torch.tensor([1.0, 0.0, 1.0, 0.0])  # 0/1 floats are fine, and equal the bool mask
    a, _ = lk.group_advantages(rewards, group_size=2, estimator=estimator, correct=ok, old_logps=torch.zeros(4, 2))
    b, _ = lk.group_advantages(rewards, group_size=2, estimator=estimator, correct=ok.bool(),
                               old_logps=torch.zeros(4, 2))
    assert torch.equal(a, b)


def _nan_old_logps(dtype):
    g = torch.Generator().manual_seed(stable_seed("nan_old"))
    old = (-torch.rand(12, 5, generator=g, dtype=torch.float64) * 2).to(dtype)
    mask = torch.ones(12, 5, dtype=torch.bool)
    mask[:, 4] = False
    old[1, 2] = math.nan  # kept: group 0 (negative)
    old[6, 1] = math.nan  # kept: group 1 (mixed)
    old[9, 4] = math.nan  # under the mask: never read
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0], dtype=dtype)
    return rewards, old, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_old_logp_at_kept_token_is_an_error_when_checked(dtype):
    rewards, old, mask = _nan_old_logps(dtype)
    with pytest.raises(ValueError, match="old_logps must not be NaN at a kept token.*completion 1"):
        lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old, mask=mask)
    old[1, 2] = old[6, 1] = -1.0  # NaN only under the mask: fine, and never read
    adv, _ = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old, mask=mask)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), ref.group_advantages(rewards, group_size=4, estimator="lens",
                                                                  old_logps=old, mask=mask), atol=1e-6, rtol=0)
    # grpo never reads old_logps
    lk.group_advantages(rewards, group_size=4, estimator="grpo", old_logps=_nan_old_logps(dtype)[1], mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lens_groups", ["all", "negative", "mixed"])
def test_nan_old_logp_unchecked_gives_nan_for_its_group(monkeypatch, dtype, lens_groups):
    import lens_kernels.advantages as adv_mod
    monkeypatch.setattr(adv_mod, "value_checks_enabled", lambda t: False)
    rewards, old, mask = _nan_old_logps(dtype)
    kw = dict(group_size=4, estimator="lens", old_logps=old, mask=mask, lens_groups=lens_groups)
    adv, _ = lk.group_advantages(rewards, **kw)
    expected = ref.group_advantages(rewards, **kw)
    neg_nan = lens_groups != "mixed"  # the negative group reads its confidences unless LENS skips it
    mixed_nan = lens_groups != "negative"
    assert bool(torch.isnan(adv[:4]).all()) == neg_nan and bool(torch.isnan(adv[:4]).any()) == neg_nan
    assert bool(torch.isnan(adv[4:8]).all()) == mixed_nan and bool(torch.isnan(adv[4:8]).any()) == mixed_nan
    assert torch.isfinite(adv[8:]).all()  # the third group's NaN sits under the mask
    torch.testing.assert_close(adv.double(), expected, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_estimate", ["mean", "sequence"])
@pytest.mark.parametrize("shift", [0.0, -200.0, -5000.0])
def test_lens_penalty_exact_for_very_low_confidence(dtype, d_estimate, shift):
    # mean log-probs near -200 underflow exp() in fp32 (and near -750 in fp64): the penalty is
    # relative to the group's most confident completion, so it does not depend on the shift
    s = torch.tensor([-0.5, -1.5, -0.25, -3.0, -0.75, -1.0, -2.5, -0.375], dtype=torch.float64) + shift
    # two equal tokens: their sum and mean are exact in any dtype, so what is tested is the penalty
    old = s.unsqueeze(1).repeat(1, 2).to(dtype)
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0], dtype=dtype)
    kw = dict(group_size=4, estimator="lens", lens_d_estimate=d_estimate)
    adv, _ = lk.group_advantages(rewards, old_logps=old, **kw)
    expected = ref.group_advantages(rewards, old_logps=old, **kw)
    if d_estimate == "mean":  # the reference is shift-invariant too
        unshifted = ref.group_advantages(rewards, old_logps=old.double() - shift, **kw)
        torch.testing.assert_close(expected, unshifted, atol=1e-12, rtol=0)
    assert (adv[:4] != 0).all()  # the penalties did not vanish
    torch.testing.assert_close(adv.double(), expected, atol=2e-6 if dtype == torch.float32 else 1e-12, rtol=0)


def test_lens_zero_confidence_everywhere_gives_zero_penalty():
    # every completion holds a -inf token: pbar = 0 throughout, no penalty (the reference's 0 / D)
    old = torch.full((8, 2), -math.inf)
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0], dtype=torch.float32)
    adv, _ = lk.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old)
    expected = ref.group_advantages(rewards, group_size=4, estimator="lens", old_logps=old)
    assert torch.equal(adv[:4], torch.zeros(4))
    torch.testing.assert_close(adv.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_nsr_refuses_a_scale(scale):
    with pytest.raises(ValueError, match="scale.*nsr"):
        lk.group_advantages(torch.tensor([1.0, 0.0]), group_size=2, estimator="nsr", scale=scale)


@pytest.mark.parametrize("estimator", ["neg_uniform", "nsr"])
def test_new_estimators_need_binary_rewards_or_correct(estimator):
    with pytest.raises(ValueError, match=f"binary.*{estimator}"):
        lk.group_advantages(torch.tensor([1.0, 0.5]), group_size=2, estimator=estimator)
    adv, _ = lk.group_advantages(torch.tensor([1.0, 0.5]), group_size=2, estimator=estimator,
                                 correct=torch.tensor([True, False]))
    assert torch.isfinite(adv).all()
