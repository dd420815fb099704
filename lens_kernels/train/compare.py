"""``lens-train --compare``: GRPO and LENS from the same warm-up, on the same seeds; a plot and a table."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Dict, List

import torch

from .config import TrainConfig
from .loop import Setup, log, read_metrics, train_rl, warmup

METHODS = ("grpo", "lens")


def run_compare(config: TrainConfig, device: torch.device) -> Dict:
    os.makedirs(config.out, exist_ok=True)
    runs: Dict[str, Dict[int, List[Dict]]] = {m: {} for m in METHODS}
    for seed in range(config.seed, config.seed + config.seeds):
        seed_dir = os.path.join(config.out, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        base = dataclasses.replace(config, seed=seed, compare=False)
        setup = Setup(base, device, announce=seed == config.seed)
        warm_acc = warmup(setup, os.path.join(seed_dir, "warmup.pt"), config.resume)
        warm_state = {k: v.clone() for k, v in setup.model.state_dict().items()}
        for method in METHODS:
            setup.model.load_state_dict(warm_state)
            setup.config = dataclasses.replace(base, estimator=method)
            run_dir = os.path.join(seed_dir, method)
            train_rl(setup, run_dir, warm_acc)
            runs[method][seed] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    result = aggregate(runs)
    table = comparison_table(result, config)
    with open(os.path.join(config.out, "compare.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(config.out, "compare.md"), "w") as fh:
        fh.write(table + "\n")
    png = os.path.join(config.out, "compare.png")
    plot(runs, png)
    log("\n" + table)
    log(f"\noutputs in {os.path.abspath(config.out)}: compare.png, compare.md, compare.json, "
        "seed*/{grpo,lens}/metrics.jsonl, checkpoints")
    return result


def _final_acc(records: List[Dict]) -> Dict[str, float]:
    return [r for r in records if "test_acc" in r][-1]["test_acc"]


def _spread(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def aggregate(runs: Dict[str, Dict[int, List[Dict]]]) -> Dict:
    """Per method: final held-out accuracy per level and mean negative-group fraction, over seeds;
    and the per-seed LENS - GRPO difference (the seeds are paired: same warm-up, same prompts)."""
    seeds = sorted(runs[METHODS[0]])
    levels = sorted(_final_acc(runs[METHODS[0]][seeds[0]]), key=int)
    warm = {lvl: _spread([runs[METHODS[0]][s][0]["test_acc"][lvl] for s in seeds]) for lvl in levels}
    out = {"seeds": seeds, "levels": levels, "warmup_test_acc": warm, "methods": {}}
    for method in METHODS:
        per_seed = [runs[method][s] for s in seeds]
        rl = [[r for r in recs if r["phase"] == "rl"] for recs in per_seed]
        out["methods"][method] = {
            "final_test_acc": {lvl: _spread([_final_acc(recs)[lvl] for recs in per_seed]) for lvl in levels},
            "mean_frac_negative_groups": _spread([statistics.fmean(r["frac_negative_groups"] for r in recs)
                                                  for recs in rl]),
            "mean_abs_adv_negative": _spread([statistics.fmean(r["mean_abs_adv_negative"] for r in recs)
                                              for recs in rl]),
        }
    out["lens_minus_grpo"] = {
        lvl: _spread([_final_acc(runs["lens"][s])[lvl] - _final_acc(runs["grpo"][s])[lvl] for s in seeds])
        for lvl in levels}
    return out


def comparison_table(result: Dict, config: TrainConfig) -> str:
    levels = result["levels"]
    n = len(result["seeds"])

    def fmt(spread):
        return f"{spread['mean']:.3f} ± {spread['std']:.3f}"

    lines = [f"Held-out greedy accuracy per level after {config.steps} RL steps, mean ± std over {n} seed(s) "
             f"{result['seeds']}; negative groups = mean fraction of all-wrong groups over the RL steps.", "",
             "| method | " + " | ".join(f"L{l}" for l in levels) + " | negative groups |",
             "|---" * (len(levels) + 2) + "|",
             "| warm-up | " + " | ".join(fmt(result["warmup_test_acc"][l]) for l in levels) + " | |"]
    for method in METHODS:
        m = result["methods"][method]
        lines.append(f"| {method} | " + " | ".join(fmt(m["final_test_acc"][l]) for l in levels)
                     + f" | {fmt(m['mean_frac_negative_groups'])} |")
    diff = result["lens_minus_grpo"]
    lines.append("| LENS - GRPO (paired) | " + " | ".join(
        f"{diff[l]['mean']:+.3f} [{diff[l]['min']:+.3f}, {diff[l]['max']:+.3f}]" for l in levels) + " | |")
    return "\n".join(lines)


def _band(series: List[List[float]]):
    mean = [statistics.fmean(col) for col in zip(*series)]
    return mean, [min(col) for col in zip(*series)], [max(col) for col in zip(*series)]


def _smooth(values: List[float], width: int = 5) -> List[float]:
    return [statistics.fmean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


def plot(runs: Dict[str, Dict[int, List[Dict]]], path: str) -> None:
    """Held-out accuracy per level against step, and the negative-group fraction; one line per method
    (mean over seeds) with the min-max band of the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(runs[METHODS[0]])
    levels = sorted(_final_acc(runs[METHODS[0]][seeds[0]]), key=int)
    panels = len(levels) + 1
    cols = 3
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = {"grpo": "tab:blue", "lens": "tab:red"}
    for method in METHODS:
        evals = [[r for r in runs[method][s] if "test_acc" in r] for s in seeds]
        steps = [r["step"] for r in evals[0]]
        for i, lvl in enumerate(levels):
            ax = axes[i // cols][i % cols]
            mean, lo, hi = _band([[r["test_acc"][lvl] for r in recs] for recs in evals])
            ax.plot(steps, mean, color=colors[method], label=method.upper())
            ax.fill_between(steps, lo, hi, color=colors[method], alpha=0.2)
            ax.set_title(f"level {lvl}: held-out accuracy")
            ax.set_xlabel("RL step")
            ax.set_ylim(-0.02, 1.02)
        rl = [[r for r in runs[method][s] if r["phase"] == "rl"] for s in seeds]
        rl_steps = [r["step"] for r in rl[0]]
        mean, lo, hi = _band([_smooth([r["frac_negative_groups"] for r in recs]) for recs in rl])
        ax = axes[len(levels) // cols][len(levels) % cols]
        ax.plot(rl_steps, mean, color=colors[method], label=method.upper())
        ax.fill_between(rl_steps, lo, hi, color=colors[method], alpha=0.2)
        ax.set_title("negative-group fraction (5-step mean)")
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
    for j in range(panels, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend()
    fig.suptitle(f"GRPO vs LENS, {len(seeds)} seed(s): mean and min-max band")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
