"""lens-train --compare: aggregation over seeds, the paired differences with bootstrap intervals, the
Table-1-shaped table, and the plot."""
import random

import pytest

pytest.importorskip("matplotlib")

from lens_kernels.train.compare import aggregate, comparison_table, plot  # noqa: E402
from lens_kernels.train.config import TrainConfig  # noqa: E402
from lens_kernels.train.stats import paired_bootstrap  # noqa: E402

KS = ("pass@1", "pass@16")


def _eval(rng, levels=("1", "2")):
    table = {lvl: {k: rng.random() for k in KS} for lvl in levels + ("all",)}
    return {"pass": table, "test_acc": {lvl: rng.random() for lvl in levels}}


def _records(rng, warm, steps=6, eval_every=3):
    records = [{"step": 0, "phase": "warmup", **warm}]
    for step in range(1, steps + 1):
        r = {"step": step, "phase": "rl", "frac_negative_groups": rng.random(), "mean_abs_adv_negative": rng.random(),
             "mean_abs_adv_mixed": rng.random(), "confidence_negative": rng.random(), "entropy": rng.random(),
             "frac_negative_groups_hard": rng.random(), "confidence_negative_hard": float("nan")}
        if step % eval_every == 0:
            r.update(_eval(rng))
        records.append(r)
    return records


@pytest.mark.parametrize("methods", [("grpo", "lens"), ("grpo", "lens", "lens_neg", "lens_mixed"),
                                     ("grpo", "lens", "neg_uniform", "nsr")])
def test_aggregate_table_and_plot(tmp_path, methods):
    rng = random.Random(0)
    runs = {m: {} for m in methods}
    seeds = (3, 4, 5)
    for seed in seeds:
        warm = _eval(rng)
        for m in runs:
            runs[m][seed] = _records(rng, warm)
    result = aggregate(runs)
    assert result["seeds"] == [3, 4, 5] and result["levels"] == ["1", "2", "all"] and result["ks"] == list(KS)
    assert set(result["diff"]) == set(methods) - {"grpo"}
    for lvl in ("1", "2", "all"):
        for k in KS:
            finals = {m: [runs[m][s][-1]["pass"][lvl][k] for s in seeds] for m in runs}
            diff = result["diff"]["lens"][lvl][k]
            want = [a - b for a, b in zip(finals["lens"], finals["grpo"])]
            assert diff["values"] == pytest.approx(want)  # paired per seed
            assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx(paired_bootstrap(want))
            assert diff["low"] <= diff["mean"] <= diff["high"]
            assert result["methods"]["lens"]["pass"][lvl][k]["mean"] == pytest.approx(sum(finals["lens"]) / 3)
            assert result["warmup"][lvl][k]["values"] == [runs["grpo"][s][0]["pass"][lvl][k] for s in seeds]
            # the learning-curve difference: per seed, the mean over the RL evaluations (steps 3 and 6)
            curves = {m: [(runs[m][s][3]["pass"][lvl][k] + runs[m][s][6]["pass"][lvl][k]) / 2 for s in seeds]
                      for m in runs}
            curve = result["diff_curve"]["lens"][lvl][k]
            assert curve["values"] == pytest.approx([a - b for a, b in zip(curves["lens"], curves["grpo"])])
            assert curve["low"] <= curve["mean"] <= curve["high"]
    neg = [sum(r["frac_negative_groups"] for r in runs["grpo"][s][1:]) / 6 for s in seeds]
    assert result["methods"]["grpo"]["frac_negative_groups"]["values"] == pytest.approx(neg)
    table = comparison_table(result, TrainConfig(steps=6))
    assert "| LENS | L1 |" in table and "| warm-up | all |" in table and "3 seed(s)" in table
    assert table.count("Paired difference") == 2 * (len(methods) - 1) and "Pass@16" in table
    assert "averaged over the evaluations during RL (steps 3, 6" in table
    assert "Means over the first 10 RL steps" in table and "Means over all RL steps" in table
    png = tmp_path / "compare.png"
    plot(runs, str(png), hard_levels=("2",))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_early_regime_means_cover_the_first_ten_rl_steps():
    rng = random.Random(1)
    runs = {m: {} for m in ("grpo", "lens")}
    for seed in (0, 1):
        warm = _eval(rng)
        for m in runs:
            runs[m][seed] = _records(rng, warm, steps=14, eval_every=7)
    result = aggregate(runs)
    for m in runs:
        early = [sum(r["frac_negative_groups"] for r in runs[m][s][1:11]) / 10 for s in (0, 1)]
        assert result["methods"][m]["early"]["frac_negative_groups"]["values"] == pytest.approx(early)
