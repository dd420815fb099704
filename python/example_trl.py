"""LENS with TRL on CPU: a tiny Llama and a character tokenizer made in code (no downloads), 3 steps,
with a verifier and a format reward (the recipe of docs/trl.md).

    python python/example_trl.py
"""
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lens_kernels.integrations.trl import LensGRPOConfig, LensGRPOTrainer

VOCAB = ["<pad>", "<eos>"] + list("0123456789+=")


def tiny_model_and_tokenizer(seed=0):
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config), tokenizer


def accuracy(prompts, completions, **kwargs):
    """The verifier: 1 when the completion starts with the sum's last digit (mostly 0 for a random model)."""
    return [float(c[:1] == str(sum(int(x) for x in p.rstrip("=").split("+")) % 10))
            for p, c in zip(prompts, completions)]


def format_reward(completions, **kwargs):
    """A format reward: 0.1 for an answer of one digit and nothing else."""
    return [0.1 * float(len(c) == 1 and c.isdigit()) for c in completions]


def main(output_dir=None, max_steps=3, **overrides):
    model, tokenizer = tiny_model_and_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+1=", "2+2="] * 4})
    output_dir = output_dir or tempfile.mkdtemp()
    # docs/trl.md shows the lines from here to trainer.train() (a test checks that they are these)
    args = LensGRPOConfig(
        output_dir=output_dir,
        advantage_estimator="lens",      # "grpo" keeps TRL's advantages, "dr_grpo" the mean-centred ones
        lens_alpha=0.25,                 # weight of the all-wrong groups (the paper's default)
        num_generations=4,               # G: LENS compares the G completions of a prompt
        per_device_train_batch_size=4,   # a multiple of G keeps the one-call step (see "Paths")
        # two reward functions: say which one verifies the answer (else the build refuses; see "Rewards")
        lens_correct_reward_func="accuracy", lens_correct_threshold=1.0,
        max_completion_length=6, max_steps=max_steps, learning_rate=5e-2, logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0, **overrides,
    )
    trainer = LensGRPOTrainer(model=model, args=args, reward_funcs=[accuracy, format_reward],
                              train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            print({k: round(v, 4) for k, v in row.items()
                   if k in ("step", "loss", "reward", "lens/frac_negative_groups", "lens/mean_abs_adv_negative",
                            "lens/mean_confidence_negative")})
    return trainer


if __name__ == "__main__":
    main()
