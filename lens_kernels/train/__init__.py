"""``lens-train``: a thin GRPO/LENS training loop on a built-in verifiable task (docs/training.md).

Run ``lens-train`` (or ``python -m lens_kernels.train``); ``lens-train --help`` lists the options.
"""
