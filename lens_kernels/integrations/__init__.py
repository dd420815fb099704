"""Drop-in adapters for TRL, verl and OpenRLHF (docs/trl.md, docs/verl.md, docs/openrlhf.md).

Each adapter is its own module and imports its trainer lazily: ``import lens_kernels`` never needs a
trainer installed, and importing an adapter without its trainer raises an ImportError that names
the pip extra to install::

    from lens_kernels.integrations.trl import LensGRPOConfig, LensGRPOTrainer   # docs/trl.md
    VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl (or verl's plugin)  # docs/verl.md
    python -m lens_kernels.integrations.openrlhf_cli ... --algo.advantage.estimator lens   # docs/openrlhf.md

The adapters call only the public API (``policy_loss``, ``policy_loss_from_logits``,
``policy_loss_from_hidden``, ``linear_token_logprobs``, ``group_advantages``, ``LossConfig``), so
they pick up faster backends without change.
"""
from __future__ import annotations

import importlib

__all__ = ["require"]


def require(module: str, extra: str, what: str):
    """Import ``module`` or raise an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the '{module}' package, which could not be imported ({exc}). "
            + (f"Install it with: pip install 'lens-kernels[{extra}]'" if extra == "trl" else
               f"Install {extra} by its own instructions (see docs/{extra}.md)")
        ) from exc
