"""Batched rollouts: prompt encoding, sampling with a KV cache, verification, and the completion view.

Every row is one dense sequence ``prompt (P tokens, left-filled) + completion (C tokens)``: tokens after
the first end-of-sequence are kept as filler and masked out of the loss, and causal attention keeps them
from touching earlier positions. So no attention mask or padding is ever needed.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .task import Problem, answer_text, prompt_text, verify


@dataclass
class Rollout:
    problems: List[Problem]     # [N] (each prompt repeated G times, contiguous)
    sequences: torch.Tensor     # [N, P + C] int64
    mask: torch.Tensor          # [N, C] bool: completion tokens up to and including the first eos
    rewards: torch.Tensor       # [N] float32 in {0, 1}
    prompt_len: int
    sample_logps: Optional[torch.Tensor] = None  # [N, C] float32: log-probs of the drawn tokens when sampled

    @property
    def completions(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]


def encode_prompts(tokenizer, problems: Sequence[Problem], prompt_len: int, device) -> torch.Tensor:
    rows = []
    for problem in problems:
        ids = tokenizer.encode(prompt_text(problem))
        if len(ids) > prompt_len:
            raise ValueError(f"prompt {prompt_text(problem)!r} is {len(ids)} tokens, longer than prompt_len={prompt_len}")
        rows.append([tokenizer.fill_id] * (prompt_len - len(ids)) + ids)
    return torch.tensor(rows, dtype=torch.long, device=device)


def encode_answers(tokenizer, problems: Sequence[Problem], completion_len: int, device,
                   texts: Optional[Sequence[str]] = None):
    """Teacher-forcing targets for the warm-up: answer (``texts``, default the true answers) + eos,
    filled after; and their mask."""
    rows, mask = [], []
    if texts is None:
        texts = [answer_text(problem) for problem in problems]
    for problem, text in zip(problems, texts):
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        if len(ids) > completion_len:
            raise ValueError(f"answer of {prompt_text(problem)!r} needs {len(ids)} tokens > completion_len={completion_len}")
        pad = completion_len - len(ids)
        rows.append(ids + [tokenizer.fill_id] * pad)
        mask.append([True] * len(ids) + [False] * pad)
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.bool, device=device))


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True up to and including the first eos of each row (the whole row if there is none)."""
    is_eos = (completions == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return eos_before == 0


def _cache_kwarg(model) -> str:
    """transformers 5.x calls the KV cache ``cache``; 4.x calls it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(model, prompts: torch.Tensor, completion_len: int, eos_id: int, fill_id: int, *,
           temperature: float, generator: Optional[torch.Generator], return_logps: bool = False):
    """Sample ``completion_len`` tokens per row from softmax(logits / temperature), exactly (no top-k or
    top-p), with the model's KV cache; temperature 0 is greedy. Returns [N, C]; after eos, filler. With
    ``return_logps`` (temperature > 0), also the [N, C] float32 log-probs of the drawn tokens under the
    sampling distribution (rows after eos hold the filler's, which the completion mask drops)."""
    cache_kw = _cache_kwarg(model)
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    tokens, logps = [], []
    for step in range(completion_len):
        logits = out.logits[:, -1]
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, fill_id), token)
        if return_logps:
            # the probabilities the draw used: free here, and the sampling policy's log-probs for metrics
            logps.append(torch.log(probs.gather(1, token[:, None]).squeeze(1)))
        tokens.append(token)
        done = done | (token == eos_id)
        if step + 1 < completion_len:
            out = model(input_ids=token[:, None], use_cache=True, **{cache_kw: getattr(out, cache_kw)})
    if return_logps:
        return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)
    return torch.stack(tokens, dim=1)


def decode_completions(tokenizer, completions: torch.Tensor) -> List[Optional[str]]:
    """The text before the first eos of each row; None for a row with no eos (never a valid answer)."""
    texts = []
    for row in completions.tolist():
        texts.append(tokenizer.decode(row[:row.index(tokenizer.eos_id)]) if tokenizer.eos_id in row else None)
    return texts


def score(tokenizer, problems: Sequence[Problem], completions: torch.Tensor) -> torch.Tensor:
    """Binary rewards [N]: 1 when the completion ends with eos and is exactly the answer."""
    texts = decode_completions(tokenizer, completions)
    return torch.tensor([float(t is not None and verify(p, t)) for p, t in zip(problems, texts)])


def rollout(model, tokenizer, problems: Sequence[Problem], group_size: int, prompt_len: int, completion_len: int,
            *, temperature: float, generator: Optional[torch.Generator], device) -> Rollout:
    """G samples of each prompt (groups contiguous), verified, with the log-probs of the drawn tokens."""
    repeated = [p for p in problems for _ in range(group_size)]
    prompts = encode_prompts(tokenizer, repeated, prompt_len, device)
    completions, logps = sample(model, prompts, completion_len, tokenizer.eos_id, tokenizer.fill_id,
                                temperature=temperature, generator=generator, return_logps=True)
    rewards = score(tokenizer, repeated, completions).to(device)
    return Rollout(repeated, torch.cat([prompts, completions], dim=1),
                   completion_mask(completions, tokenizer.eos_id), rewards, prompt_len, logps)


@torch.no_grad()
def evaluate(model, tokenizer, test: Dict[int, List[Problem]], prompt_len: int, completion_len: int,
             device, *, samples: int = 0, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
             batch_size: int = 2048):
    """Greedy accuracy per level on the held-out split, and with ``samples`` = n > 0 the number of
    correct answers among n samples at ``temperature`` of every held-out problem (for Pass@k).

    Returns (greedy {level: accuracy}, counts {level: [c per problem]}; counts is empty when n = 0)."""
    greedy, counts = {}, {}
    for level, problems in test.items():
        correct = 0.0
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            prompts = encode_prompts(tokenizer, chunk, prompt_len, device)
            completions = sample(model, prompts, completion_len, tokenizer.eos_id, tokenizer.fill_id,
                                 temperature=0.0, generator=None)
            correct += float(score(tokenizer, chunk, completions).sum())
        greedy[level] = correct / max(1, len(problems))
        if samples > 0:
            per_chunk = max(1, batch_size // samples)
            level_counts = []
            for start in range(0, len(problems), per_chunk):
                chunk = problems[start:start + per_chunk]
                repeated = [p for p in chunk for _ in range(samples)]
                prompts = encode_prompts(tokenizer, repeated, prompt_len, device)
                completions = sample(model, prompts, completion_len, tokenizer.eos_id, tokenizer.fill_id,
                                     temperature=temperature, generator=generator)
                level_counts += score(tokenizer, repeated, completions).view(-1, samples).sum(1).long().tolist()
            counts[level] = level_counts
    return greedy, counts
