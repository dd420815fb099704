"""OpenRLHF's own PPO CLI with LENS and the lens_kernels loss in every Ray worker::

    python -m lens_kernels.integrations.openrlhf_cli <the arguments of openrlhf.cli.train_ppo_ray> \
        --algo.advantage.estimator lens --algo.advantage.lens_alpha 0.25 --rollout.n_samples_per_prompt 8

It runs ``openrlhf.cli.train_ppo_ray`` as ``__main__`` (its parser, its checks, its ``train``) with
three changes, undone when it returns:

- the parser accepts ``lens`` for ``--algo.advantage.estimator`` and two more options,
  ``--algo.advantage.lens_alpha`` (0.25) and ``--algo.advantage.lens_correct_threshold`` (graded rewards:
  a sample is correct when its reward before OpenRLHF's length penalties is >= this; default: the
  rewards must be binary). With ``lens`` it checks ``--rollout.n_samples_per_prompt > 1`` as OpenRLHF
  does for its group estimators, and warns when ``--algo.dynamic_filtering_enable`` is on (it drops
  the all-wrong groups LENS learns from);
- OpenRLHF's ``ray.init`` gets ``worker_process_setup_hook=lens_kernels.integrations.openrlhf.worker_setup``
  in its runtime env, so ``patch()`` runs in every worker process of the job (``PolicyModelActor``, the
  ``PPOTrainer`` actor and the experience maker included) before they import OpenRLHF's classes;
- ``patch()`` also runs in this driver process.

On an existing cluster (``ray job submit``) OpenRLHF's ``ray.init`` connects to it and the hook
still applies: it is part of the job's runtime env. lens-kernels must be installed on every node.
"""
from __future__ import annotations

import argparse
import runpy
import sys
import warnings
from typing import List, Optional

ESTIMATOR_OPTION = "--algo.advantage.estimator"
SETUP_HOOK = "lens_kernels.integrations.openrlhf.worker_setup"
OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"

# the namespace OpenRLHF's parser returned (flat, before its hierarchize), for tests and tools
last_parsed: Optional[argparse.Namespace] = None


def _add_argument(original):
    def add_argument(self, *names, **kwargs):
        if ESTIMATOR_OPTION in names and "choices" in kwargs and "lens" not in kwargs["choices"]:
            kwargs["choices"] = list(kwargs["choices"]) + ["lens"]
            kwargs["help"] = (kwargs.get("help") or "") + " lens (lens_kernels: LENS calibrated rewards)"
            action = original(self, *names, **kwargs)
            original(self, "--algo.advantage.lens_alpha", type=float, default=0.25,
                     help="LENS weight of the all-wrong groups' advantages (lens_kernels)")
            original(self, "--algo.advantage.lens_correct_threshold", type=float, default=None,
                     help="LENS with graded rewards: correct means reward (before length penalties) >= this")
            return action
        return original(self, *names, **kwargs)

    return add_argument


def check_lens_args(namespace: argparse.Namespace) -> None:
    """The checks OpenRLHF makes for its group estimators, for ``lens``, and the dynamic-filtering warning."""
    if getattr(namespace, "algo.advantage.estimator", None) != "lens":
        return
    if getattr(namespace, "rollout.n_samples_per_prompt", 1) < 2:
        raise SystemExit("lens requires --rollout.n_samples_per_prompt > 1 (LENS compares the samples of a prompt)")
    if getattr(namespace, "algo.dynamic_filtering_enable", False):
        warnings.warn("lens_kernels: --algo.dynamic_filtering_enable drops the groups outside "
                      "--algo.dynamic_filtering_range, such as the all-wrong groups that LENS turns into a "
                      "learning signal; leave it off with --algo.advantage.estimator lens", stacklevel=2)


def _parse_args(original):
    def parse_args(self, *args, **kwargs):
        global last_parsed
        namespace = original(self, *args, **kwargs)
        if hasattr(namespace, "algo.advantage.estimator"):
            check_lens_args(namespace)
            last_parsed = namespace
        return namespace

    return parse_args


def with_setup_hook(runtime_env: Optional[dict]) -> dict:
    """``runtime_env`` plus the lens_kernels worker setup hook (an existing different hook is an error:
    Ray takes one)."""
    runtime_env = dict(runtime_env or {})
    hook = runtime_env.get("worker_process_setup_hook")
    if hook not in (None, SETUP_HOOK):
        raise ValueError(f"runtime_env already has worker_process_setup_hook={hook!r}; call "
                         f"{SETUP_HOOK} from it")
    runtime_env["worker_process_setup_hook"] = SETUP_HOOK
    return runtime_env


def _ray_init(original):
    def init(*args, **kwargs):
        kwargs["runtime_env"] = with_setup_hook(kwargs.get("runtime_env"))
        return original(*args, **kwargs)

    init._lens_hook = True
    return init


def main(argv: Optional[List[str]] = None) -> None:
    import ray

    from . import openrlhf as lk_openrlhf

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = (argparse.ArgumentParser.add_argument, argparse.ArgumentParser.parse_args, ray.init, sys.argv)
    argparse.ArgumentParser.add_argument = _add_argument(saved[0])
    argparse.ArgumentParser.parse_args = _parse_args(saved[1])
    ray.init = _ray_init(saved[2])
    sys.argv = [OPENRLHF_CLI.replace(".", "/") + ".py"] + argv
    try:
        lk_openrlhf.patch()
        runpy.run_module(OPENRLHF_CLI, run_name="__main__", alter_sys=False)
    finally:
        argparse.ArgumentParser.add_argument, argparse.ArgumentParser.parse_args, ray.init, sys.argv = saved


if __name__ == "__main__":
    main()
