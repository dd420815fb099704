"""TrainConfig: every knob of ``lens-train``, with defaults, from a TOML/YAML/JSON file and/or flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Optional

from .model import ARCHS
from .task import LEVELS, check_levels

ESTIMATORS = ("grpo", "lens", "dr_grpo", "neg_uniform", "nsr")
# the methods --compare can run: an estimator, or LENS restricted to one group kind (the paper's ablations)
COMPARE_METHODS = ("grpo", "lens", "lens_neg", "lens_mixed", "neg_uniform", "nsr")


@dataclass
class TrainConfig:
    # run
    out: str = field(default="lens_train_out", metadata={"help": "directory for metrics, plots and checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, data and sampling"})
    estimator: str = field(default="lens", metadata={"help": f"advantage estimator: {'|'.join(ESTIMATORS)}"})
    compare: bool = field(default=False, metadata={"help": "run GRPO and LENS on the same seeds; plot and table"})
    seeds: int = field(default=1, metadata={"help": "number of seeds (seed, seed+1, ...) for --compare"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoints in --out"})
    ablations: bool = field(default=False, metadata={
        "help": "with --compare, also run the paper's two ablations: LENS on negative groups only "
                "(lens_neg) and on mixed groups only (lens_mixed)"})
    methods: str = field(default="", metadata={
        "help": "with --compare, the comma-separated methods to run (of grpo, lens, lens_neg, lens_mixed, "
                "neg_uniform, nsr; default grpo,lens and with --ablations the two ablations); the table always "
                "needs grpo"})
    smoke: bool = field(default=False, metadata={"help": "a seconds-long run (CI)"})
    model: Optional[str] = field(default=None, metadata={"help": "local Hugging Face causal LM directory"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default); one thread is the "
                                                           "fastest for the tiny model on a busy CPU"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    # task
    levels: str = field(default="1,2,3,4,5", metadata={"help": "comma-separated task levels"})
    test_per_level: int = field(default=100, metadata={"help": "held-out problems per level"})
    eval_samples: int = field(default=16, metadata={
        "help": "n samples per held-out problem at temperature 1 for Pass@k (unbiased estimator, k <= n)"})
    pass_k: str = field(default="1,2,4,8,16", metadata={"help": "comma-separated k of the Pass@k columns"})
    hard_levels: str = field(default="4,5", metadata={"help": "levels whose Pass@16 and negative-group "
                                                                 "confidence are reported as 'hard'"})
    # tiny model (ignored with --model)
    arch: str = field(default="llama", metadata={"help": f"tiny model architecture: {'|'.join(ARCHS)}"})
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    # supervised warm-up
    warmup_steps: int = field(default=1200, metadata={"help": "supervised steps before RL"})
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    shortcut_steps: int = field(default=150, metadata={
        "help": "the last SHORTCUT_STEPS warm-up steps teach the dropped-carry shortcut (see --drop-carry)"})
    drop_carry: float = field(default=0.8, metadata={
        "help": "in the shortcut steps, each carry of a target answer is dropped with this probability: the "
                "warm-up leaves confident wrong answers on the levels with many carries"})
    warmup_level_weights: str = field(default="1,1,1,1,1", metadata={
        "help": "warm-up sampling weight of each level 1-5 (unselected levels are ignored; empty: uniform)"})
    # RL
    steps: int = field(default=60, metadata={"help": "RL steps (rollout batches)"})
    prompts_per_step: int = 16
    group_size: int = 16
    temperature: float = 1.0
    rl_level_weights: str = field(default="", metadata={
        "help": "sampling weight of each level 1-5 for the RL prompts (empty: uniform over --levels); "
                "0,0,1,1,1 draws RL prompts from the hard levels only, where most groups are negative"})
    lr: float = 1e-4
    lr_warmup_steps: int = field(default=0, metadata={
        "help": "RL steps over which the learning rate rises linearly to --lr"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    inner_updates: int = field(default=1, metadata={"help": "optimizer steps per rollout batch (mini-batches)"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    beta: float = field(default=0.0, metadata={"help": "KL weight to the warm-up policy (k3)"})
    loss_agg_mode: str = "token-mean"
    lens_alpha: float = field(default=0.25, metadata={
        "help": "weight of negative-group advantages (lens; neg_uniform: each wrong answer there gets -alpha/G)"})
    lens_groups: str = field(default="all", metadata={
        "help": "LENS on all groups, or the paper's ablations: negative (negative groups only), mixed"})
    fused_head: bool = field(default=False, metadata={"help": "loss from hidden states + lm_head "
                                                              "(policy_loss_from_hidden)"})
    fused_step: bool = field(default=True, metadata={
        "help": "the one-call LENS step (lens_policy_loss_from_logits/_from_hidden: log-probs, advantages and "
                "loss in one op) when it applies: --inner-updates 1 and micro-batches of whole groups; "
                "--no-fused-step forces the two-stage path (old log-probs, group_advantages, loss)"})
    eval_every: int = 10
    checkpoint_every: int = 20

    def k_list(self):
        return sorted(set(int(x) for x in str(self.pass_k).split(",") if x.strip()))

    def hard_level_list(self):
        return [lvl for lvl in (int(x) for x in str(self.hard_levels).split(",") if x.strip())
                if lvl in self.level_list()]

    def level_list(self):
        return check_levels(int(x) for x in str(self.levels).split(",") if x.strip())

    def validate(self) -> "TrainConfig":
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self.level_list()
        for name in ("warmup_level_weights", "rl_level_weights"):
            text = getattr(self, name)
            if not text:
                continue
            try:
                weights = [float(x) for x in text.split(",")]
            except ValueError:
                weights = []
            picked = [weights[lvl - 1] for lvl in self.level_list()] if len(weights) == len(LEVELS) else []
            if not picked or min(weights) < 0 or sum(picked) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} needs {len(LEVELS)} comma-separated non-negative "
                                 f"weights (levels 1-{len(LEVELS)}), not all zero on --levels; got {text!r}")
        for name in ("seeds", "prompts_per_step", "group_size", "inner_updates", "grad_accum", "eval_every",
                     "checkpoint_every", "warmup_batch", "test_per_level", "hidden_size", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        bad = [m for m in str(self.methods).split(",") if m.strip() and m.strip() not in COMPARE_METHODS]
        if bad:
            raise ValueError(f"--methods: unknown method(s) {bad}; known: {', '.join(COMPARE_METHODS)}")
        if self.lens_groups not in ("all", "negative", "mixed"):
            raise ValueError(f"--lens-groups must be all, negative or mixed, got {self.lens_groups!r}")
        if not 0 <= self.drop_carry <= 1:
            raise ValueError(f"--drop-carry must be a probability in [0, 1], got {self.drop_carry}")
        try:
            ks = self.k_list()
            [int(x) for x in str(self.hard_levels).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--pass-k and --hard-levels must be comma-separated integers, got "
                             f"{self.pass_k!r}, {self.hard_levels!r}") from None
        if self.eval_samples < 0 or (self.eval_samples and (not ks or ks[0] < 1 or ks[-1] > self.eval_samples)):
            raise ValueError(f"--pass-k needs 1 <= k <= --eval-samples ({self.eval_samples}), got {self.pass_k!r}")
        for name in ("steps", "warmup_steps", "threads", "shortcut_steps", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (group statistics), got {self.group_size}")
        if (self.prompts_per_step * self.group_size) % (self.inner_updates * self.grad_accum):
            raise ValueError(f"--prompts-per-step x --group-size ({self.prompts_per_step * self.group_size}) must be "
                             f"divisible by --inner-updates x --grad-accum ({self.inner_updates * self.grad_accum})")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 for sampling, got {self.temperature}")
        if self.model is not None and not os.path.isdir(self.model):
            raise ValueError(f"--model: {self.model!r} is not a directory (expected a local Hugging Face model)")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {list(ARCHS)}, got {self.arch!r}")
        return self

    def warmup_weights(self):
        return self._level_weights(self.warmup_level_weights)

    def rl_weights(self):
        return self._level_weights(self.rl_level_weights)

    def _level_weights(self, text: str):
        """The weights of the selected levels, in level order; None (uniform) for an empty string."""
        if not text:
            return None
        weights = [float(x) for x in text.split(",")]
        return [weights[lvl - 1] for lvl in self.level_list()]

    def to_dict(self):
        return dataclasses.asdict(self)


# --smoke: seconds on CPU (CI). Too short for the warm-up to learn addition (that takes a few hundred steps
# of the default model), so what it checks is the pipeline and the RL mechanism on negative groups; the
# RL effect itself is tested on a 450-step warm-up (tests/test_train_cli.py, about 22 s).
SMOKE = dict(levels="1,2", test_per_level=10, hidden_size=32, layers=2, heads=2, warmup_steps=60, shortcut_steps=20,
             warmup_batch=32, steps=6, prompts_per_step=4, group_size=8, inner_updates=1, grad_accum=2,
             eval_samples=8, pass_k="1,2,4,8", hard_levels="2", eval_every=3, checkpoint_every=3)


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--config: file {path!r} not found")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        if ext == ".toml":
            import tomllib
            data = tomllib.loads(raw.decode())
        elif ext in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(raw)
        elif ext == ".json":
            data = json.loads(raw)
        else:
            raise ValueError(f"--config: {path!r} must end in .toml, .yaml, .yml or .json")
    except ImportError as err:
        if err.name == "tomllib":
            raise ValueError(f"--config: reading {path!r} needs Python 3.11 or later (tomllib); on Python 3.10 "
                             "write the options as a .json (or .yaml) file instead") from err
        raise ValueError(f"--config: reading {ext} files needs {err.name}; use a .json file instead") from err
    except (ValueError, TypeError) as err:  # tomllib, yaml and json errors derive from ValueError
        raise ValueError(f"--config: could not parse {path!r}: {err}") from err
    except Exception as err:  # yaml.YAMLError
        raise ValueError(f"--config: could not parse {path!r}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path!r} must hold a table of option = value")
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config: unknown option(s) {unknown} in {path!r}; known: {sorted(known)}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-train",
        description="GRPO vs LENS on a built-in verifiable task, end to end on CPU in minutes.")
    parser.add_argument("--config", help="TOML, YAML or JSON file of options (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # every flag parses to None when absent (so a config file can set it); the help states the real
        # default once, here, rather than argparse's "(default: None)"
        shown = '""' if f.default == "" else f.default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})".lstrip()
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    return parser


def parse_config(argv=None) -> TrainConfig:
    """Defaults < --smoke preset < config file < explicit flags. Errors exit with a clear message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    try:
        file_values = read_config_file(args.config) if args.config else {}
        smoke = args.smoke if args.smoke is not None else bool(file_values.get("smoke", False))
        if smoke:
            values.update(SMOKE)
        values.update(file_values)
        values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
        config = TrainConfig(**values)
        for f in fields(TrainConfig):  # type-check file values too
            value = getattr(config, f.name)
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(f.type)
            if expected and value is not None and (not isinstance(value, expected)
                                                   or (expected is int and isinstance(value, bool))):
                raise ValueError(f"option {f.name} must be {f.type}, got {value!r}")
        return config.validate()
    except ValueError as err:
        parser.error(str(err))
