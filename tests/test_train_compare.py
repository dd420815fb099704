"""lens-train --compare: aggregation over seeds, the paired LENS - GRPO table, and the plot."""
import random

import pytest

pytest.importorskip("matplotlib")

from lens_kernels.train.compare import aggregate, comparison_table, plot  # noqa: E402
from lens_kernels.train.config import TrainConfig  # noqa: E402


def _records(rng, warm, steps=6, eval_every=3):
    records = [{"step": 0, "phase": "warmup", "test_acc": warm}]
    for step in range(1, steps + 1):
        r = {"step": step, "phase": "rl", "frac_negative_groups": rng.random(), "mean_abs_adv_negative": rng.random()}
        if step % eval_every == 0:
            r["test_acc"] = {k: rng.random() for k in warm}
        records.append(r)
    return records


def test_aggregate_table_and_plot(tmp_path):
    rng = random.Random(0)
    runs = {m: {} for m in ("grpo", "lens")}
    for seed in (3, 4, 5):
        warm = {"1": rng.random(), "2": rng.random()}
        for m in runs:
            runs[m][seed] = _records(rng, warm)
    result = aggregate(runs)
    assert result["seeds"] == [3, 4, 5] and result["levels"] == ["1", "2"]
    for lvl in ("1", "2"):
        finals = {m: [runs[m][s][-1]["test_acc"][lvl] for s in (3, 4, 5)] for m in runs}
        diff = result["lens_minus_grpo"][lvl]
        assert diff["values"] == pytest.approx([a - b for a, b in zip(finals["lens"], finals["grpo"])])
        assert result["methods"]["lens"]["final_test_acc"][lvl]["mean"] == pytest.approx(sum(finals["lens"]) / 3)
        assert result["warmup_test_acc"][lvl]["values"] == [runs["grpo"][s][0]["test_acc"][lvl] for s in (3, 4, 5)]
    neg = [sum(r["frac_negative_groups"] for r in runs["grpo"][s][1:]) / 6 for s in (3, 4, 5)]
    assert result["methods"]["grpo"]["mean_frac_negative_groups"]["values"] == pytest.approx(neg)
    table = comparison_table(result, TrainConfig(steps=6))
    assert table.count("\n| ") == 5 and "LENS - GRPO (paired)" in table and "3 seed(s)" in table
    png = tmp_path / "compare.png"
    plot(runs, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
