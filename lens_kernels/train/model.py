"""The policy model and its tokenizer: a tiny Llama/Qwen2 built from a config with random init and a
character tokenizer made in code, or a real Hugging Face causal LM loaded from a local directory."""
from __future__ import annotations

import importlib.util
import os
from typing import List, Sequence

import torch

ARCHS = ("llama", "qwen2")


class CharTokenizer:
    """One token per character of the task's alphabet, plus an end-of-sequence token. The filler
    (a space) left-pads prompts to a common length as ordinary text, so no attention mask is needed."""

    alphabet = " 0123456789+-="

    def __init__(self):
        self.eos_token = "<eos>"
        self._ids = {c: i for i, c in enumerate(self.alphabet)}
        self.eos_id = len(self.alphabet)
        self.fill_id = self._ids[" "]
        self.vocab_size = len(self.alphabet) + 1

    def encode(self, text: str) -> List[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"text {text!r} has a character outside the tokenizer alphabet {self.alphabet!r}") from err

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] if i < len(self.alphabet) else "" for i in ids)


class HFTokenizer:
    """The same interface over a Hugging Face tokenizer (``--model PATH``)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("--model: the tokenizer has no eos_token; the loop needs one to end answers")
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.fill_id = int(pad) if pad is not None else self.eos_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 on a CUDA device where flash-attn is installed and the model is bf16/fp16 (what
    flash-attn supports), else sdpa (docs/training.md)."""
    if (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def build_tiny_model(vocab_size: int, *, arch: str = "llama", hidden_size: int = 64, layers: int = 4,
                     heads: int = 4, max_positions: int = 64, attn_implementation: str = "sdpa"):
    """A small causal LM from a ``transformers`` config, randomly initialized (seed torch first)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                        max_position_embeddings=max_positions, tie_word_embeddings=True,
                        attn_implementation=attn_implementation)
    return model_cls(config)


def load_pretrained(path: str, device: torch.device, attn_implementation: str, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a local directory; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"--model: {path!r} is not a directory (expected a local Hugging Face model directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model: {path!r} has no config.json (expected a saved Hugging Face causal LM)")
    # a model directory is data: no code from it runs (trust_remote_code off), and transformers reads
    # safetensors, or a pytorch_model.bin weights-only
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, trust_remote_code=False,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model: could not load a causal LM and tokenizer from {path!r}: {err}") from err
    return model, HFTokenizer(tokenizer)
