"""``lens-train``: the command line. Defaults run GRPO-family RL with LENS on the built-in task."""
from __future__ import annotations

import os
import sys
import time

# no network, ever: the built-in model needs none and --model reads a local directory
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from .config import TrainConfig, parse_config  # noqa: E402
from .loop import EARLY_STEPS, Setup, log, resolve_device, summary_table, train_rl, warmup  # noqa: E402


def print_config(config: TrainConfig) -> None:
    defaults = TrainConfig()
    log("lens-train options (* = changed from the default):")
    for name, value in config.to_dict().items():
        mark = "*" if getattr(defaults, name) != value else " "
        log(f"  {mark} {name} = {value!r}")


def run_single(config: TrainConfig, device: torch.device) -> None:
    os.makedirs(config.out, exist_ok=True)
    setup = Setup(config, device)
    warm_eval = warmup(setup, os.path.join(config.out, "warmup.pt"), config.resume)
    summary = train_rl(setup, config.out, warm_eval)
    log(f"\n{config.estimator} seed {config.seed}, {summary['steps']} RL steps: held-out Pass@k at temperature 1 "
        f"(unbiased, {config.eval_samples} samples per problem) and greedy accuracy, warm-up and after RL\n"
        + summary_table(summary))
    log(f"mean over RL steps: negative groups {summary['mean_frac_negative_groups']:.2f} (hard levels "
        f"{summary['mean_frac_negative_groups_hard']:.2f}), confidence of their wrong answers "
        f"{summary['mean_confidence_negative']:.2f}, reward {summary['mean_reward']:.2f}; over the first "
        f"{EARLY_STEPS} steps: negative groups {summary['early_frac_negative_groups']:.2f} (hard levels "
        f"{summary['early_frac_negative_groups_hard']:.2f}), confidence {summary['early_confidence_negative']:.2f}")
    out = os.path.abspath(config.out)
    log(f"\noutputs in {out}: metrics.jsonl (per step), summary.json, checkpoint.pt, warmup.pt")


def main(argv=None) -> int:
    config = parse_config(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        device = resolve_device(config)
    except ValueError as err:
        print(f"lens-train: error: {err}", file=sys.stderr)
        return 2
    print_config(config)
    t0 = time.perf_counter()
    try:
        if config.compare:
            from .compare import run_compare
            run_compare(config, device)
        else:
            run_single(config, device)
    except ValueError as err:
        print(f"lens-train: error: {err}", file=sys.stderr)
        return 2
    log(f"lens-train: done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
