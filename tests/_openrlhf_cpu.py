"""OpenRLHF's real modules on a machine without a GPU (used by the OpenRLHF tests and, as a Ray worker
setup hook, by the Ray cluster test).

OpenRLHF's ``openrlhf.models`` package __init__ imports flash-attn (no CPU install), so
``load_loss_module`` loads the real ``openrlhf.models.loss`` module (and the ``utils`` it imports)
without running that __init__; no code on the compared path is replaced.

``experience_maker`` imports ``RayActorGroup`` from ``openrlhf.trainer.ray.launcher``, only to annotate
``RemoteExperienceMaker.__init__`` (not called here); that launcher imports ``openrlhf.models``' Actor
(flash-attn) and its package __init__ imports vLLM. While the real ``experience_maker`` module loads,
``load_experience_maker_module`` puts in ``sys.modules`` the ``openrlhf.trainer.ray`` package without
its __init__ and a launcher module that holds only an empty ``RayActorGroup`` class, then removes both.
"""
import importlib
import os
import sys
import types

import openrlhf


def load_loss_module():
    try:
        return importlib.import_module("openrlhf.models.loss")
    except ImportError:  # the package __init__ needs flash-attn: load the submodules from the real path
        sys.modules["openrlhf.models"] = package_without_init("openrlhf.models", "models")
        return importlib.import_module("openrlhf.models.loss")


def package_without_init(name, *parts):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(os.path.dirname(openrlhf.__file__), *parts)]
    return package


def load_experience_maker_module():
    name = "openrlhf.trainer.ppo_utils.experience_maker"
    try:
        return importlib.import_module(name)
    except ImportError:  # the Ray launcher pulls flash-attn and vLLM: see the module docstring
        pass
    launcher = types.ModuleType("openrlhf.trainer.ray.launcher")
    launcher.RayActorGroup = type("RayActorGroup", (), {})
    stand_ins = {"openrlhf.trainer.ray": package_without_init("openrlhf.trainer.ray", "trainer", "ray"),
                 launcher.__name__: launcher}
    saved = {key: sys.modules.get(key) for key in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(name)
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module



def cpu_worker_setup():
    """A Ray ``worker_process_setup_hook`` for CPU test clusters: the stand-ins above, then the
    adapter's real hook (what ``lens_kernels.integrations.openrlhf_cli`` installs on GPU clusters)."""
    load_loss_module()
    load_experience_maker_module()
    from lens_kernels.integrations import openrlhf as lk_openrlhf

    lk_openrlhf.worker_setup()
