"""The training loop: supervised warm-up, then GRPO/LENS RL through the public ``lens_kernels`` API."""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import lens_kernels as lk

from .config import TrainConfig
from .model import CharTokenizer, attention_implementation, build_tiny_model, load_pretrained
from .rollout import encode_answers, encode_prompts, evaluate, rollout
from .stats import pass_table
from .task import Task, answer_text, prompt_text

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a dependency; keep the loop usable without it anyway
    tqdm = None


def log(message: str) -> None:
    print(message, flush=True)


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


class Setup:
    """Model, tokenizer, task and sequence geometry for one seed."""

    def __init__(self, config: TrainConfig, device: torch.device, announce: bool = True):
        self.config, self.device = config, device
        # a real model runs in bf16 on a GPU; the tiny built-in one trains in fp32 everywhere
        self.dtype = torch.bfloat16 if device.type == "cuda" and config.model else torch.float32
        self.attn = attention_implementation(device, self.dtype)
        torch.manual_seed(config.seed)
        if config.model:
            self.model, self.tokenizer = load_pretrained(config.model, device, self.attn, self.dtype)
            source = f"{config.model} ({sum(p.numel() for p in self.model.parameters()):,} parameters)"
        else:
            self.tokenizer = CharTokenizer()
            self.model = build_tiny_model(self.tokenizer.vocab_size, arch=config.arch,
                                          hidden_size=config.hidden_size, layers=config.layers, heads=config.heads,
                                          attn_implementation=self.attn)
            source = (f"tiny {config.arch} from config, random init "
                      f"({sum(p.numel() for p in self.model.parameters()):,} parameters)")
        self.model.to(device)
        self.task = Task(config.level_list(), config.test_per_level)
        # sequence geometry in tokens: every prompt and answer has the same number of characters; a
        # subword tokenizer (--model) may vary, so take the longest over the held-out problems
        enc = self.tokenizer.encode
        held_out = [p for problems in self.task.test.values() for p in problems]
        self.prompt_len = max(len(enc(prompt_text(p))) for p in held_out)
        self.completion_len = max(len(enc(answer_text(p))) for p in held_out) + 2  # eos, and room to ramble
        if announce:
            log(f"lens-train: model {source} on {device} ({str(self.dtype).replace('torch.', '')}), attention {self.attn}")


# ----- metrics and checkpoints -----------------------------------------------------------------------
class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped (they are redone)."""

    def __init__(self, path: str, resume_step: Optional[int]):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as fh:
                kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path, "w") as fh:
                fh.writelines(kept)

    def write(self, record: Dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> List[Dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_checkpoint(path: str, map_location) -> Dict:
    """A file lens-train wrote (warm-up or RL checkpoint), loaded weights-only: tensors, numbers, strings
    and containers of them. Result folders are shared between runs and people, so a file here is data:
    anything that would need to run code to load (a pickled object of another type) is refused."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load: not a lens-train checkpoint, or not saved weights-only (it holds "
            f"objects other than tensors, numbers, strings and containers of them). Delete or move the "
            f"file, or point --out at another folder. ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a lens-train checkpoint (expected a dict with a 'model' entry)")
    return state


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(data_rng: random.Random, sampler: torch.Generator) -> Dict:
    return {"data": data_rng.getstate(), "sampler": sampler.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: Dict, data_rng: random.Random, sampler: torch.Generator) -> None:
    data_rng.setstate(state["data"])
    # generator states are CPU byte tensors whatever the device the checkpoint was mapped to
    sampler.set_state(state["sampler"].cpu())
    torch.set_rng_state(state["torch"].cpu())


def _bar(total, desc, config, initial=0):
    if tqdm is None or not config.progress:
        return None
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)


# ----- supervised warm-up ----------------------------------------------------------------------------
def warmup(setup: Setup, path: str, resume: bool) -> Dict:
    """Teacher-forced cross-entropy on task answers, the last ``shortcut_steps`` of them on answers with
    carries dropped (``drop_carry``); saved to ``path`` and reused on resume (and by ``--compare``,
    whose methods share a seed's warm-up). Returns the held-out evaluation (see ``run_eval``)."""
    config, model = setup.config, setup.model
    if resume and os.path.exists(path):
        state = load_checkpoint(path, setup.device)
        model.load_state_dict(state["model"])
        log(f"warm-up: loaded {path}")
        return state["eval"]
    weights = config.warmup_weights()
    rng = random.Random(config.seed * 7919 + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.warmup_lr, weight_decay=0.0)
    P, C = setup.prompt_len, setup.completion_len
    bar = _bar(config.warmup_steps, "warm-up", config)
    model.train()
    for step in range(config.warmup_steps):
        problems = setup.task.sample(rng, config.warmup_batch, weights)
        prompts = encode_prompts(setup.tokenizer, problems, P, setup.device)
        # the shortcut phase comes last: the model first learns to add, then picks up the habit
        drop = config.drop_carry if step >= config.warmup_steps - config.shortcut_steps else 0.0
        texts = [setup.task.warmup_target(p, rng, drop) for p in problems]
        answers, answer_mask = encode_answers(setup.tokenizer, problems, C, setup.device, texts)
        logits = model(input_ids=torch.cat([prompts, answers], dim=1), use_cache=False).logits[:, P - 1:-1]
        # cosine decay: a short warm-up should end in a settled model
        for group in opt.param_groups:
            group["lr"] = config.warmup_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, config.warmup_steps)))
        loss = F.cross_entropy(logits[answer_mask].float(), answers[answer_mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    result = run_eval(setup, 0)
    atomic_save({"model": model.state_dict(), "eval": result}, path)
    log("warm-up: held-out " + _fmt_eval(result))
    return result


def run_eval(setup: Setup, step: int) -> Dict:
    """Held-out evaluation as in the paper's Table 1: Pass@k (unbiased, from ``eval_samples`` samples at
    temperature 1 per problem) per level and over all levels, plus greedy accuracy. The sampler is seeded
    by (seed, step), so methods compared at the same step draw with the same random numbers.

    Returns {"test_acc": {level: greedy}, "pass": {level|"all": {"pass@k": v}}, "counts": {level: [c]}}.
    """
    config = setup.config
    gen = torch.Generator(device=setup.device).manual_seed(config.seed * 1_000_003 + step + 7)
    greedy, counts = evaluate(setup.model, setup.tokenizer, setup.task.test, setup.prompt_len, setup.completion_len,
                              setup.device, samples=config.eval_samples, temperature=1.0, generator=gen)
    out = {"test_acc": {str(k): v for k, v in greedy.items()}, "counts": {str(k): v for k, v in counts.items()}}
    if counts:
        out["pass"] = pass_table(counts, config.eval_samples, config.k_list())
    return out


def _fmt_eval(result: Dict) -> str:
    text = "greedy " + "  ".join(f"L{k} {v:.2f}" for k, v in sorted(result["test_acc"].items()))
    if "pass" in result:
        text += " | pass@1 (T=1) " + "  ".join(f"L{k} {v['pass@1']:.2f}" for k, v in result["pass"].items())
    return text


# ----- RL --------------------------------------------------------------------------------------------
def loss_config(config: TrainConfig) -> lk.LossConfig:
    return lk.LossConfig(epsilon_low=config.epsilon_low, epsilon_high=config.epsilon_high, beta=config.beta,
                         loss_agg_mode=config.loss_agg_mode)


@torch.no_grad()
def sequence_logprobs(model, sequences: torch.Tensor, completions: torch.Tensor, mask: torch.Tensor,
                      prompt_len: int, temperature: float) -> torch.Tensor:
    """Token log-probs [N, C] of the completions, forward only, through lens_kernels."""
    logits = model(input_ids=sequences, use_cache=False).logits
    logps, _ = lk.token_logprobs(logits[:, prompt_len - 1:-1], completions, mask=mask, temperature=temperature)
    return logps


# group metrics of group_advantages that the JSONL keeps, and the kinds whose mean |A| it reports
GROUP_FRACTIONS = ("frac_negative_groups", "frac_mixed_groups", "frac_all_correct_groups")
ABS_ADV_KINDS = ("negative", "mixed")
ADVANTAGE_METRIC_PREFIXES = ("frac_", "mean_abs_adv_", "mean_confidence_")
# the "early" means of the summary and the comparison: the first RL steps, where the paper's regime is
EARLY_STEPS = 10


def fused_step_blocker(config: TrainConfig) -> Optional[str]:
    """Why the one-call LENS step does not apply to this config; None when it does.

    The op computes the advantages from the current log-probs of one micro-batch, so it needs the
    on-policy case (one optimizer update per rollout: accumulating micro-batches within it keeps the
    old policy equal to the current one) and micro-batches that hold whole groups. The advantage
    options of lens-train (per-group scale, LENS alpha) are all per group, so none rules it out.
    """
    if not config.fused_step:
        return "--no-fused-step"
    if config.inner_updates != 1:
        return f"--inner-updates {config.inner_updates}: updates after the first are off-policy"
    micro = config.prompts_per_step * config.group_size // config.grad_accum
    if micro % config.group_size:
        return (f"micro-batches of {micro} completions would split groups of {config.group_size} "
                f"(--prompts-per-step must be a multiple of --grad-accum)")
    return None


def micro_batch_order(n: int, group_size: int, whole_groups: bool, generator: torch.Generator, device):
    """A shuffled order of the N completions; with ``whole_groups`` the groups are shuffled and each keeps
    its G completions together, so consecutive slices of a multiple of G hold whole groups."""
    if not whole_groups:
        return torch.randperm(n, generator=generator, device=generator.device).to(device)
    groups = torch.randperm(n // group_size, generator=generator, device=generator.device).to(device)
    return (groups[:, None] * group_size + torch.arange(group_size, device=device)).reshape(-1)


def policy_update(setup: Setup, optimizer, batch, advantages, old_logps, ref_logps, lcfg, generator,
                  whole_groups: bool = False):
    """``inner_updates`` optimizer steps over shuffled mini-batches, each accumulated over ``grad_accum``
    micro-batches with the grad-scale contract. Returns averaged metrics.

    ``advantages`` and ``old_logps`` given: the two-stage path (``policy_loss_from_logits``/``_hidden``
    with the rollout batch's advantages). Both None: the one-call LENS step
    (``lens_policy_loss_from_logits``/``_hidden``) on micro-batches of whole groups, each computing its
    own advantages from the rewards; see ``fused_step_blocker`` for when that is exact.
    """
    config, model = setup.config, setup.model
    P, G, accum = setup.prompt_len, config.group_size, config.grad_accum
    fused_step = advantages is None
    if fused_step and (old_logps is not None or config.inner_updates != 1):
        raise ValueError("the one-call LENS step is on-policy: no old_logps, one inner update")
    n = batch.sequences.shape[0]
    order = micro_batch_order(n, G, whole_groups or fused_step, generator, setup.device)
    micro = n // (config.inner_updates * accum)
    totals: Dict[str, torch.Tensor] = {}
    group_sums: Dict[str, torch.Tensor] = {}
    grad_norms = []
    model.train()
    for update in range(config.inner_updates):
        optimizer.zero_grad(set_to_none=True)
        for k in range(accum):
            idx = order[(update * accum + k) * micro:(update * accum + k + 1) * micro]
            seqs = batch.sequences[idx]
            targets, mask = seqs[:, P:], batch.mask[idx]
            if config.fused_head:
                hidden = model.get_decoder()(input_ids=seqs, use_cache=False).last_hidden_state
                head = model.get_output_embeddings()
                inputs, head_kwargs = (hidden[:, P - 1:-1], head.weight), {"bias": head.bias}
                two_stage_loss, lens_step = lk.policy_loss_from_hidden, lk.lens_policy_loss_from_hidden
            else:
                # the completion positions as a strided view of the logits: no copy
                inputs, head_kwargs = (model(input_ids=seqs, use_cache=False).logits[:, P - 1:-1],), {}
                two_stage_loss, lens_step = lk.policy_loss_from_logits, lk.lens_policy_loss_from_logits
            common = dict(ref_logps=ref_logps[idx] if ref_logps is not None else None,
                          temperature=config.temperature, config=lcfg, grad_scale=1.0 / accum, **head_kwargs)
            if fused_step:
                loss, metrics = lens_step(*inputs, targets, mask, batch.rewards[idx], group_size=G,
                                          advantage_config=lk.AdvantageConfig(
                                              estimator=config.estimator, lens_alpha=config.lens_alpha,
                                              lens_groups=config.lens_groups), **common)
                _add_group_metrics(group_sums, metrics)
            else:
                loss, metrics = two_stage_loss(*inputs, targets, mask, advantages[idx], old_logps=old_logps[idx],
                                               **common)
            # the declared grad_scale is exactly the upstream gradient: no rescaling pass
            (loss / accum).backward()
            # metrics stay on the device until the end of the step: one host sync per step, not per micro-batch
            for name, value in metrics.items():
                if _is_loss_metric(name, value):
                    totals[name] = totals.get(name, 0.0) + value.detach().float()
            totals["loss"] = totals.get("loss", 0.0) + loss.detach().float()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        optimizer.step()
    count = config.inner_updates * accum
    averaged = {k: v / count for k, v in totals.items()}
    if fused_step:
        averaged.update(_group_metrics(group_sums, accum))
    names = list(averaged)
    out = dict(zip(names, torch.stack([averaged[k] for k in names]).tolist()))
    out["grad_norm"] = float(torch.stack(grad_norms).mean())
    return out


def _is_loss_metric(name: str, value: torch.Tensor) -> bool:
    """The loss's own scalar metrics; the one-call step adds the advantage side (group metrics,
    confidences, the [B] advantages), which is aggregated separately."""
    return value.dim() == 0 and name != "on_policy" and not name.startswith(ADVANTAGE_METRIC_PREFIXES)


def _add_group_metrics(sums: Dict[str, torch.Tensor], metrics: Dict[str, torch.Tensor]) -> None:
    for name in GROUP_FRACTIONS:
        sums[name] = sums.get(name, 0.0) + metrics[name].float()
    for kind in ABS_ADV_KINDS:
        # mean |A| over a kind's completions: weight each micro-batch's mean by its count of that kind
        # (its fraction of groups x the same number of groups in every micro-batch)
        name = f"mean_abs_adv_{kind}"
        sums[name] = sums.get(name, 0.0) + metrics[name].float() * metrics[f"frac_{kind}_groups"].float()


def _group_metrics(sums: Dict[str, torch.Tensor], micro_batches: int) -> Dict[str, torch.Tensor]:
    """The rollout batch's group metrics from its micro-batches of equally many whole groups: the same
    values ``group_advantages`` gives on the whole batch."""
    out = {name: sums[name] / micro_batches for name in GROUP_FRACTIONS}
    for kind in ABS_ADV_KINDS:
        weight = sums[f"frac_{kind}_groups"]
        out[f"mean_abs_adv_{kind}"] = sums[f"mean_abs_adv_{kind}"] / weight.clamp(min=1e-12)
    return out


def group_confidence(batch, group_size: int, hard_levels) -> Dict[str, float]:
    """Confidence of the sampling (old) policy, pbar = exp(mean token log-prob), the quantity LENS weighs
    mistakes by: mean over the completions of negative groups (all of them wrong), over the wrong and
    the right completions of mixed groups, and over the negative groups of the hard levels; and the
    fraction of negative groups on the hard levels. NaN where a kind is absent."""
    mask = batch.mask.float()
    pbar = torch.exp((batch.sample_logps * mask).sum(1) / mask.sum(1).clamp(min=1)).view(-1, group_size)
    rewards = batch.rewards.view(-1, group_size).to(pbar.device)
    k = rewards.sum(1)
    negative, mixed = k == 0, (k > 0) & (k < group_size)
    level = torch.tensor([p[0] for p in batch.problems[::group_size]], device=pbar.device)
    hard = torch.zeros_like(negative)
    for lvl in hard_levels:
        hard |= level == lvl

    def mean(values, where):
        return float(values[where].mean()) if bool(where.any()) else float("nan")

    wrong = rewards == 0
    return {"confidence_negative": mean(pbar, negative[:, None].expand_as(pbar)),
            "confidence_wrong_mixed": mean(pbar, mixed[:, None] & wrong),
            "confidence_right_mixed": mean(pbar, mixed[:, None] & ~wrong),
            "confidence_negative_hard": mean(pbar, (negative & hard)[:, None].expand_as(pbar)),
            "frac_negative_groups_hard": mean(negative.float(), hard)}


def transitions(before: Dict[str, List[int]], after: Dict[str, List[int]], n: int) -> Dict[str, int]:
    """Held-out problems whose n-sample "group" went from negative (no correct sample) to mixed, and back,
    between two evaluations (the same problems, the same n)."""
    out = {"neg_before": 0, "neg_to_mixed": 0, "neg_to_all_correct": 0, "mixed_to_neg": 0}
    for level in before:
        for c0, c1 in zip(before[level], after[level]):
            out["neg_before"] += c0 == 0
            out["neg_to_mixed"] += c0 == 0 and 0 < c1 < n
            out["neg_to_all_correct"] += c0 == 0 and c1 == n
            out["mixed_to_neg"] += 0 < c0 < n and c1 == 0
    return out


def rl_learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of RL step ``step`` (1-based): a linear ramp over ``lr_warmup_steps``, then ``lr``.

    Why a ramp: Adam divides by a second-moment estimate built from the few gradients seen so far, so its
    first updates move every weight by about ``lr`` whatever the size of the signal, and early RL batches
    carry little signal (most groups negative or all-correct)."""
    if config.lr_warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, step / config.lr_warmup_steps)


def train_rl(setup: Setup, out_dir: str, warm_eval: Dict) -> Dict:
    """RL from the warm-up weights now in ``setup.model``; writes metrics.jsonl, checkpoint.pt,
    summary.json under ``out_dir``. ``warm_eval`` is the warm-up's held-out evaluation. Returns the
    summary."""
    config, model, device = setup.config, setup.model, setup.device
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    ref_model = None
    if config.beta > 0 or not config.model:  # KL to the warm-up policy: the loss term, or a metric
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    data_rng = random.Random(config.seed * 104729 + 3)
    sampler = torch.Generator(device=device).manual_seed(config.seed + 12345)
    start = 1
    resume_step = None
    last_counts = warm_eval.get("counts", {})
    if config.resume and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], data_rng, sampler)
        resume_step = state["step"]
        last_counts = state.get("last_counts", last_counts)
        start = resume_step + 1
        log(f"resume: {ckpt_path} at step {resume_step}")
    metrics_log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), resume_step)
    if resume_step is None:
        record = {"step": 0, "phase": "warmup", "estimator": config.estimator, "lens_groups": config.lens_groups,
                  "seed": config.seed}
        record.update({k: v for k, v in warm_eval.items() if k != "counts"})
        metrics_log.write(record)
    lcfg = loss_config(config)
    P, C, G = setup.prompt_len, setup.completion_len, config.group_size
    hard = config.hard_level_list()
    blocker = fused_step_blocker(config)
    fused_step = blocker is None
    loss_path = "fused_lens_step" if fused_step else "two_stage"
    if fused_step:
        op = "lens_policy_loss_from_hidden" if config.fused_head else "lens_policy_loss_from_logits"
        log(f"RL loss path: fused_lens_step (lk.{op}: log-probs, advantages and loss in one op)")
    else:
        log(f"RL loss path: two_stage (old log-probs, group_advantages, policy loss), because {blocker}")
    name = config.estimator + ("" if config.lens_groups == "all" or config.estimator != "lens"
                               else f" ({config.lens_groups} groups)")
    bar = _bar(config.steps, f"RL {name} seed {config.seed}", config, initial=start - 1)
    for step in range(start, config.steps + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = rl_learning_rate(config, step)
        model.eval()
        problems = setup.task.sample(data_rng, config.prompts_per_step, config.rl_weights())
        batch = rollout(model, setup.tokenizer, problems, G, P, C, temperature=config.temperature,
                        generator=sampler, device=device)
        completions = batch.completions
        ref_logps = (sequence_logprobs(ref_model, batch.sequences, completions, batch.mask, P, config.temperature)
                     if ref_model is not None else None)
        if fused_step:
            # advantages inside the loss op, from the log-probs its own forward computes: no old-log-prob
            # forward; the sampler's log-probs of the drawn tokens stand in for them in the drift metric
            old_logps = batch.sample_logps
            stats = policy_update(setup, optimizer, batch, None, None, ref_logps if config.beta > 0 else None,
                                  lcfg, sampler)
            adv_stats = stats
        else:
            old_logps = sequence_logprobs(model, batch.sequences, completions, batch.mask, P, config.temperature)
            with torch.no_grad():
                lens = config.estimator == "lens"
                advantages, adv_stats = lk.group_advantages(
                    batch.rewards, group_size=G, estimator=config.estimator,
                    old_logps=old_logps if lens else None, mask=batch.mask if lens else None,
                    lens_alpha=config.lens_alpha, lens_groups=config.lens_groups)
            stats = policy_update(setup, optimizer, batch, advantages, old_logps,
                                  ref_logps if config.beta > 0 else None, lcfg, sampler)
        elapsed = time.perf_counter() - t0
        record = {"step": step, "phase": "rl", "estimator": config.estimator, "lens_groups": config.lens_groups,
                  "seed": config.seed, "loss_path": loss_path}
        record.update({k: round(v, 6) for k, v in stats.items()})
        record["reward"] = float(batch.rewards.mean())
        levels = torch.tensor([p[0] for p in batch.problems])
        record["train_acc"] = {str(lvl): float(batch.rewards.cpu()[levels == lvl].mean())
                               for lvl in setup.task.levels if bool((levels == lvl).any())}
        for key in ("frac_negative_groups", "frac_mixed_groups", "frac_all_correct_groups",
                    "mean_abs_adv_negative", "mean_abs_adv_mixed"):
            record[key] = float(adv_stats[key])
        record.update(group_confidence(batch, G, hard))
        if config.beta == 0 and ref_logps is not None:  # drift from the warm-up policy (k3), as a metric
            d = (ref_logps - old_logps)[batch.mask]
            record["kl"] = float((torch.exp(d) - d - 1).mean())
        record["tokens_per_s"] = float(batch.mask.sum()) / elapsed
        record["step_time_s"] = elapsed
        if step % config.eval_every == 0 or step == config.steps:
            model.eval()
            result = run_eval(setup, step)
            record.update({k: v for k, v in result.items() if k != "counts"})
            if last_counts and result["counts"]:
                record["transitions"] = transitions(last_counts, result["counts"], config.eval_samples)
            last_counts = result["counts"]
        metrics_log.write(record)
        if step % config.checkpoint_every == 0 or step == config.steps:
            atomic_save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "rng": _rng_state(data_rng, sampler), "config": config.to_dict(),
                         "last_counts": last_counts}, ckpt_path)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.2f}", neg=f"{record['frac_negative_groups']:.2f}")
    if bar is not None:
        bar.close()
    records = read_metrics(metrics_log.path)
    summary = summarize(records)
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def summarize(records: List[Dict]) -> Dict:
    """Warm-up and final held-out scores (Pass@k at T=1 and greedy), and means over the RL steps."""
    rl = [r for r in records if r["phase"] == "rl"]
    evals = [r for r in records if "test_acc" in r]
    first, last = evals[0], evals[-1]

    def mean(key, steps=None):
        values = [r[key] for r in rl[:steps] if r.get(key) == r.get(key)]  # NaN-free
        return sum(values) / len(values) if values else float("nan")

    out = {"warmup_test_acc": first["test_acc"], "final_test_acc": last["test_acc"],
           "warmup_pass": first.get("pass"), "final_pass": last.get("pass"),
           "steps": rl[-1]["step"] if rl else 0}
    for key in ("frac_negative_groups", "frac_negative_groups_hard", "confidence_negative",
                "confidence_negative_hard", "reward", "tokens_per_s"):
        out[f"mean_{key}"] = mean(key)
    # the paper's regime is the start of RL: before the policy unlearns its confident mistakes
    for key in ("frac_negative_groups", "frac_negative_groups_hard", "confidence_negative"):
        out[f"early_{key}"] = mean(key, EARLY_STEPS)
    return out


def summary_table(summary: Dict) -> str:
    """Pass@k at temperature 1 (unbiased, held-out) per level and over all, warm-up and after RL, and greedy
    accuracy as an extra column."""
    levels = sorted(summary["warmup_test_acc"], key=int)
    lines = []
    if summary.get("warmup_pass"):
        ks = list(summary["warmup_pass"]["all"])
        lines += ["| | level | " + " | ".join(k.replace("pass", "Pass") for k in ks) + " | greedy |",
                  "|---" * (len(ks) + 3) + "|"]
        for name, pk, gk in (("warm-up", "warmup_pass", "warmup_test_acc"), ("after RL", "final_pass",
                                                                               "final_test_acc")):
            for level in levels + ["all"]:
                greedy = (summary[gk][level] if level != "all"
                          else sum(summary[gk].values()) / len(summary[gk]))
                lines.append(f"| {name} | {'L' + level if level != 'all' else 'all'} | "
                             + " | ".join(f"{summary[pk][level][k]:.3f}" for k in ks) + f" | {greedy:.3f} |")
        lines += ["", "| change (after RL - warm-up) | " + " | ".join(f"L{l}" for l in levels) + " | all |",
                  "|---" * (len(levels) + 2) + "|"]
        for k in ks:
            lines.append(f"| {k.replace('pass', 'Pass')} | " + " | ".join(
                f"{summary['final_pass'][l][k] - summary['warmup_pass'][l][k]:+.3f}" for l in levels + ["all"]) + " |")
        lines.append("| greedy | " + " | ".join(
            f"{summary['final_test_acc'][l] - summary['warmup_test_acc'][l]:+.3f}" for l in levels) + " | |")
        return "\n".join(lines)
    lines = ["| | " + " | ".join(f"L{l}" for l in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for name, key in (("warm-up", "warmup_test_acc"), ("after RL", "final_test_acc")):
        lines.append(f"| {name} greedy | " + " | ".join(f"{summary[key][l]:.2f}" for l in levels) + " |")
    return "\n".join(lines)
