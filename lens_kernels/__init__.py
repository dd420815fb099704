"""lens_kernels: the LENS advantage estimator and fused loss-head kernels for GRPO-family RL on LLMs.

The public API lives here and nowhere else::

    import lens_kernels as lk
    adv, stats = lk.group_advantages(rewards, group_size=8, estimator="lens", old_logps=old, mask=mask)
    loss, metrics = lk.policy_loss_from_logits(logits, targets, mask, adv, old_logps=old)
"""
from .advantages import TRAINER_EPS, group_advantages
from .backends import available_backends, backend_for
from .backends.cuda import HAS_CUDA_EXT
from .config import AdvantageConfig, LossConfig
from .distributed import ParallelLayout
from .lens_policy_loss import lens_policy_loss_from_hidden, lens_policy_loss_from_logits
from .logprobs import linear_token_logprobs, token_logprobs
from .loss import policy_loss, policy_loss_from_hidden, policy_loss_from_logits

__version__ = "0.1.0"

__all__ = [
    "AdvantageConfig",
    "HAS_CUDA_EXT",
    "LossConfig",
    "ParallelLayout",
    "TRAINER_EPS",
    "available_backends",
    "backend_for",
    "group_advantages",
    "lens_policy_loss_from_hidden",
    "lens_policy_loss_from_logits",
    "linear_token_logprobs",
    "policy_loss",
    "policy_loss_from_hidden",
    "policy_loss_from_logits",
    "token_logprobs",
]
