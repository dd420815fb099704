"""``lens-train --compare``: GRPO and LENS (and with ``--ablations`` the paper's two ablations) from the
same warm-up and prompt stream on each seed; paired differences with bootstrap intervals, a table shaped
like the paper's Table 1, and plots."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Dict, List

import torch

from .config import TrainConfig
from .loop import EARLY_STEPS, Setup, load_checkpoint, log, read_metrics, train_rl, warmup
from .stats import paired_bootstrap

# method name -> (estimator, lens_groups)
METHODS = {"grpo": ("grpo", "all"), "lens": ("lens", "all")}
ABLATIONS = {"lens_neg": ("lens", "negative"), "lens_mixed": ("lens", "mixed")}
# the simpler uses of negative groups, run only when --methods names them
BASELINES = {"neg_uniform": ("neg_uniform", "all"), "nsr": ("nsr", "all")}
LABELS = {"grpo": "GRPO", "lens": "LENS", "lens_neg": "LENS, negative groups only",
          "lens_mixed": "LENS, mixed groups only", "neg_uniform": "uniform negative penalty",
          "nsr": "NSR (wrong answers only)"}
COLORS = {"grpo": "tab:blue", "lens": "tab:red", "lens_neg": "tab:orange", "lens_mixed": "tab:purple",
          "neg_uniform": "tab:green", "nsr": "tab:brown"}
BASELINE = "grpo"
# per-step metrics averaged in the comparison, over all RL steps and over the first EARLY_STEPS
STEP_METRICS = ("frac_negative_groups", "frac_negative_groups_hard", "confidence_negative", "confidence_negative_hard",
                "mean_abs_adv_negative", "mean_abs_adv_mixed", "entropy")
# the warm-up options: a cached seed warm-up is reused only when these match
WARMUP_KEYS = ("levels", "test_per_level", "eval_samples", "pass_k", "arch", "hidden_size", "layers", "heads",
               "warmup_steps", "warmup_batch", "warmup_lr", "shortcut_steps", "drop_carry", "warmup_level_weights",
               "model")


def methods_of(config: TrainConfig) -> Dict[str, tuple]:
    known = {**METHODS, **ABLATIONS, **BASELINES}
    chosen = [m.strip() for m in str(config.methods).split(",") if m.strip()]
    if chosen:
        return {m: known[m] for m in known if m in chosen}
    return {**METHODS, **(ABLATIONS if config.ablations else {})}


def _cached_warmup(setup: Setup, path: str, config: TrainConfig) -> Dict:
    """The seed's warm-up: loaded when ``path`` holds one made with the same warm-up options (so runs of
    --compare with and without --ablations share it), else trained and saved there."""
    key = {k: getattr(config, k) for k in WARMUP_KEYS}
    if os.path.exists(path):
        state = load_checkpoint(path, setup.device)
        if state.get("warmup_options") == key:
            setup.model.load_state_dict(state["model"])
            log(f"warm-up: reused {path}")
            return state["eval"]
    result = warmup(setup, path, False)
    state = load_checkpoint(path, setup.device)
    state["warmup_options"] = key
    torch.save(state, path)
    return result


def _run_options(config: TrainConfig) -> Dict:
    """The options that make a run: all but where it is written and how it is shown or split up."""
    skip = ("out", "compare", "seeds", "ablations", "methods", "resume", "progress", "threads", "device")
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def _finished(run_dir: str, config: TrainConfig) -> bool:
    """A run of the same options finished there before (so seeds can run as separate processes into one
    --out, and a later --compare over all of them, or with --ablations, only adds what is missing)."""
    try:
        with open(os.path.join(run_dir, "options.json")) as fh:
            same = json.load(fh) == json.loads(json.dumps(_run_options(config)))
        return same and os.path.exists(os.path.join(run_dir, "summary.json"))
    except (OSError, ValueError):
        return False


def run_compare(config: TrainConfig, device: torch.device) -> Dict:
    os.makedirs(config.out, exist_ok=True)
    methods = methods_of(config)
    runs: Dict[str, Dict[int, List[Dict]]] = {m: {} for m in methods}
    for seed in range(config.seed, config.seed + config.seeds):
        seed_dir = os.path.join(config.out, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        base = dataclasses.replace(config, seed=seed, compare=False)
        setup = Setup(base, device, announce=seed == config.seed)
        warm_eval = _cached_warmup(setup, os.path.join(seed_dir, "warmup.pt"), base)
        warm_state = {k: v.clone() for k, v in setup.model.state_dict().items()}
        for method, (estimator, groups) in methods.items():
            setup.model.load_state_dict(warm_state)
            setup.config = dataclasses.replace(base, estimator=estimator, lens_groups=groups)
            run_dir = os.path.join(seed_dir, method)
            if not _finished(run_dir, setup.config):
                train_rl(setup, run_dir, warm_eval)
                with open(os.path.join(run_dir, "options.json"), "w") as fh:
                    json.dump(_run_options(setup.config), fh, indent=1)
            else:
                log(f"{method} seed {seed}: reused the finished run in {run_dir}")
            runs[method][seed] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if BASELINE not in runs:
        log(f"no comparison table: --methods has no {BASELINE} to pair with; the runs are in {config.out}")
        return {}
    result = aggregate(runs)
    table = comparison_table(result, config)
    with open(os.path.join(config.out, "compare.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(config.out, "compare.md"), "w") as fh:
        fh.write(table + "\n")
    png = os.path.join(config.out, "compare.png")
    plot(runs, png, hard_levels=[str(x) for x in config.hard_level_list()])
    log("\n" + table)
    log(f"\noutputs in {os.path.abspath(config.out)}: compare.png, compare.md, compare.json, "
        "seed*/<method>/metrics.jsonl, checkpoints")
    return result


def _evals(records: List[Dict]) -> List[Dict]:
    return [r for r in records if "pass" in r]


def _spread(values: List[float]) -> Dict:
    """Mean and std over seeds of the values that are not NaN (a kind of group absent in a run is NaN)."""
    kept = [v for v in values if v == v]
    return {"mean": statistics.fmean(kept) if kept else float("nan"),
            "std": statistics.stdev(kept) if len(kept) > 1 else 0.0, "values": values}


def _nanmean(values: List[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def aggregate(runs: Dict[str, Dict[int, List[Dict]]]) -> Dict:
    """Per method and seed: final held-out Pass@k per level (and "all") and greedy accuracy; means over
    the RL steps of the negative-group fraction and the confidence of their wrong answers. Per method
    other than GRPO: the paired difference method - GRPO per level and k (the seeds are paired: same
    warm-up, same prompts, same evaluation draws), its mean and paired bootstrap 95% interval over seeds.
    """
    methods = list(runs)
    seeds = sorted(runs[BASELINE])
    first = _evals(runs[BASELINE][seeds[0]])[0]
    levels = list(first["pass"])  # "1", ..., "all"
    ks = list(first["pass"]["all"])
    out = {"seeds": seeds, "levels": levels, "ks": ks, "steps": _evals(runs[BASELINE][seeds[0]])[-1]["step"],
           "eval_steps": [r["step"] for r in _evals(runs[BASELINE][seeds[0]])],
           "warmup": {}, "methods": {}, "diff": {}, "diff_curve": {}}
    for lvl in levels:
        out["warmup"][lvl] = {k: _spread([_evals(runs[BASELINE][s])[0]["pass"][lvl][k] for s in seeds]) for k in ks}
    out["warmup_greedy"] = {lvl: _spread([_evals(runs[BASELINE][s])[0]["test_acc"][lvl] for s in seeds])
                            for lvl in first["test_acc"]}
    for method in methods:
        final = {s: _evals(runs[method][s])[-1] for s in seeds}
        rl = {s: [r for r in runs[method][s] if r["phase"] == "rl"] for s in seeds}
        out["methods"][method] = {
            "pass": {lvl: {k: _spread([final[s]["pass"][lvl][k] for s in seeds]) for k in ks} for lvl in levels},
            "greedy": {lvl: _spread([final[s]["test_acc"][lvl] for s in seeds]) for lvl in first["test_acc"]},
            **{name: _spread([_nanmean([r.get(name, float("nan")) for r in rl[s]]) for s in seeds])
               for name in STEP_METRICS},
            # the regime the paper's claim is about is the start of RL, before the shortcut is unlearned
            "early": {name: _spread([_nanmean([r.get(name, float("nan")) for r in rl[s][:EARLY_STEPS]])
                                     for s in seeds]) for name in STEP_METRICS},
        }
        if method == BASELINE:
            continue
        base_final = {s: _evals(runs[BASELINE][s])[-1] for s in seeds}
        out["diff"][method], out["diff_curve"][method] = {}, {}
        for lvl in levels:
            out["diff"][method][lvl], out["diff_curve"][method][lvl] = {}, {}
            for k in ks:
                diffs = [final[s]["pass"][lvl][k] - base_final[s]["pass"][lvl][k] for s in seeds]
                out["diff"][method][lvl][k] = _paired(diffs)
                diffs = [_curve_mean(runs[method][s], lvl, k) - _curve_mean(runs[BASELINE][s], lvl, k) for s in seeds]
                out["diff_curve"][method][lvl][k] = _paired(diffs)
    return out


def _paired(diffs: List[float]) -> Dict:
    mean, lo, hi = paired_bootstrap(diffs)
    return {"mean": mean, "low": lo, "high": hi, "values": diffs}


def _curve_mean(records: List[Dict], lvl: str, k: str) -> float:
    """Mean of a held-out score over the evaluations after the warm-up: the area under the learning curve
    per step. A method that learns faster scores higher even when both end at the same ceiling."""
    return statistics.fmean(r["pass"][lvl][k] for r in _evals(records) if r["step"] > 0)


def _k(name: str) -> str:
    return name.replace("pass", "Pass")


def comparison_table(result: Dict, config: TrainConfig) -> str:
    levels, ks, n = result["levels"], result["ks"], len(result["seeds"])
    lines = [f"Held-out Pass@k at temperature 1.0 (unbiased estimator, {config.eval_samples} samples per problem, "
             f"{config.test_per_level} problems per level) after {result['steps']} RL steps, mean ± std over {n} "
             f"seed(s) {result['seeds']}; greedy accuracy as an extra column. Shaped like Table 1 of the LENS "
             "paper.", ""]
    header = "| method | level | " + " | ".join(_k(k) for k in ks) + " | greedy |"
    lines += [header, "|---" * (len(ks) + 3) + "|"]
    rows = [("warm-up", result["warmup"], result["warmup_greedy"])]
    rows += [(LABELS.get(m, m), r["pass"], r["greedy"]) for m, r in result["methods"].items()]
    for lvl in levels:
        for name, table, greedy in rows:
            g = (f"{greedy[lvl]['mean']:.3f}" if lvl in greedy else
                 f"{statistics.fmean(v['mean'] for v in greedy.values()):.3f}")
            cells = " | ".join(f"{table[lvl][k]['mean']:.3f} ± {table[lvl][k]['std']:.3f}" for k in ks)
            lines.append(f"| {name} | {'L' + lvl if lvl != 'all' else 'all'} | {cells} | {g} |")
    curve_steps = [r for r in result.get("eval_steps", []) if r > 0]
    for key, when in (("diff", f"after {result['steps']} RL steps"),
                      ("diff_curve", "averaged over the evaluations during RL (steps "
                       f"{', '.join(map(str, curve_steps)) or 'after 0'}: the area under the learning curve, "
                       "which also counts how fast a method learns)")):
        for method, diff in result.get(key, {}).items():
            lines += ["", f"Paired difference {LABELS.get(method, method)} - GRPO {when} (same warm-up, prompts and "
                      f"evaluation draws per seed): mean [95% paired bootstrap interval over {n} seeds].", "",
                      "| level | " + " | ".join(_k(k) for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
            for lvl in levels:
                lines.append(f"| {'L' + lvl if lvl != 'all' else 'all'} | " + " | ".join(
                    f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for d in (diff[lvl][k] for k in ks)) + " |")
    for early, span in ((False, "all RL steps"), (True, f"the first {EARLY_STEPS} RL steps")):
        lines += ["", f"Means over {span} (mean ± std over seeds): negative groups (all levels / hard levels), "
                  "old-policy confidence of the wrong answers in negative groups (all / hard levels), mean |A| per "
                  "group kind, entropy.", "",
                  "| method | negative groups | negative, hard | confidence in negative groups | same, hard | "
                  "mean abs A negative | mean abs A mixed | entropy |", "|---" * 8 + "|"]
        for method, r in result["methods"].items():
            r = r["early"] if early else r
            # LENS's negative-group |A| is bounded by alpha / G and is typically 1e-3: four decimals
            lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(
                f"{r[name]['mean']:.{4 if name == 'mean_abs_adv_negative' else 3}f} ± "
                f"{r[name]['std']:.{4 if name == 'mean_abs_adv_negative' else 3}f}" for name in STEP_METRICS) + " |")
    return "\n".join(lines)


def _band(series: List[List[float]]):
    mean = [_nanmean(list(col)) for col in zip(*series)]
    return mean, [min(col) for col in zip(*series)], [max(col) for col in zip(*series)]


def _smooth(values: List[float], width: int = 5) -> List[float]:
    return [_nanmean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


def plot(runs: Dict[str, Dict[int, List[Dict]]], path: str, hard_levels=("4", "5")) -> None:
    """Held-out Pass@1 (T=1) per level and Pass@16 of the hard levels against step; per RL step, the
    negative-group fraction, mean |A| per group kind, and the confidence of wrong answers in negative
    groups. One line per method (mean over seeds) with the min-max band of the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(runs)
    seeds = sorted(runs[methods[0]])
    first = _evals(runs[methods[0]][seeds[0]])[0]
    levels = [lvl for lvl in first["pass"] if lvl != "all"]
    kmax = list(first["pass"]["all"])[-1]
    hard = [lvl for lvl in hard_levels if lvl in levels]
    panels = len(levels) + 1 + 5
    cols = 3
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]

    def line(ax, xs, series, method, style="-", label=True):
        mean, lo, hi = _band(series)
        ax.plot(xs, mean, style, color=COLORS.get(method), label=LABELS.get(method, method) if label else None)
        if len(series) > 1:
            ax.fill_between(xs, lo, hi, color=COLORS.get(method), alpha=0.15)

    for method in methods:
        evals = [_evals(runs[method][s]) for s in seeds]
        steps = [r["step"] for r in evals[0]]
        for i, lvl in enumerate(levels):
            line(flat[i], steps, [[r["pass"][lvl]["pass@1"] for r in e] for e in evals], method)
            flat[i].set_title(f"level {lvl}: held-out Pass@1 (T=1)")
        ax = flat[len(levels)]
        hard_mean = [[statistics.fmean(r["pass"][lvl][kmax] for lvl in hard) for r in e] for e in evals] if hard else []
        if hard_mean:
            line(ax, steps, hard_mean, method)
        ax.set_title(f"levels {','.join(hard)}: held-out {_k(kmax)}")
        rl = [[r for r in runs[method][s] if r["phase"] == "rl"] for s in seeds]
        rl_steps = [r["step"] for r in rl[0]]
        ax = flat[len(levels) + 1]
        line(ax, rl_steps, [_smooth([r["frac_negative_groups"] for r in recs]) for recs in rl], method)
        line(ax, rl_steps, [_smooth([r.get("frac_negative_groups_hard", float("nan")) for r in recs]) for recs in rl],
             method, ":", label=False)
        ax.set_title("negative-group fraction (solid: all,\ndotted: hard levels; 5-step mean)", fontsize=10)
        ax = flat[len(levels) + 2]
        line(ax, rl_steps, [_smooth([r["mean_abs_adv_negative"] for r in recs]) for recs in rl], method)
        ax.set_title("mean |A| in negative groups")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax = flat[len(levels) + 3]
        line(ax, rl_steps, [_smooth([r["mean_abs_adv_mixed"] for r in recs]) for recs in rl], method)
        ax.set_title("mean |A| in mixed groups")
        ax = flat[len(levels) + 4]
        line(ax, rl_steps, [_smooth([r.get("confidence_negative", float("nan")) for r in recs]) for recs in rl], method)
        ax.set_title("old-policy confidence of wrong answers\nin negative groups (5-step mean)", fontsize=10)
    ax = flat[len(levels) + 5]  # the paired view: per seed, method - GRPO at each evaluation
    base_evals = {s: {r["step"]: r for r in _evals(runs[BASELINE][s])} for s in seeds} if BASELINE in runs else {}
    for method in methods:
        if method == BASELINE or not base_evals:
            continue
        evals = [_evals(runs[method][s]) for s in seeds]
        steps = [r["step"] for r in evals[0]]
        line(ax, steps, [[r["pass"]["all"]["pass@1"] - base_evals[s][r["step"]]["pass"]["all"]["pass@1"]
                          for r in e] for s, e in zip(seeds, evals)], method)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_title("paired difference vs GRPO:\nPass@1 (T=1), all levels", fontsize=10)
    for i, ax in enumerate(flat[:panels]):
        ax.set_xlabel("RL step")
        if i <= len(levels) + 1 or i == len(levels) + 4:
            ax.set_ylim(-0.02, 1.02)
    for ax in flat[panels:]:
        ax.axis("off")
    flat[0].legend(fontsize=8)
    fig.suptitle(f"{' vs '.join(LABELS.get(m, m) for m in methods)}: {len(seeds)} seed(s), mean and min-max band")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
