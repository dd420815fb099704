"""Checks run inside a Ray worker. This module imports no trainer at import time, so a worker that
unpickles one of these functions has registered nothing yet: the check sees what the worker's own
environment gives."""
from __future__ import annotations


def verl_lens_problem() -> str:
    """'' when verl in this process resolves the 'lens' estimator and policy loss, else why not."""
    try:
        from verl.trainer.ppo import core_algos

        core_algos.get_adv_estimator_fn("lens")
        core_algos.get_policy_loss_fn("lens")
    except Exception as exc:  # reported to the driver
        return repr(exc)
    return ""


def openrlhf_patch_state() -> dict:
    """What a worker's OpenRLHF modules hold after the setup hook: class names and the estimator choice."""
    import sys

    state = {}
    for name in ("openrlhf.models.loss", "openrlhf.models"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "PolicyLoss"):
            state[name] = module.PolicyLoss.__name__
    maker = sys.modules.get("openrlhf.trainer.ppo_utils.experience_maker")
    if maker is not None:
        method = maker.RemoteExperienceMaker.compute_advantages_and_returns
        state["compute_advantages_and_returns"] = method.__module__
    return state
