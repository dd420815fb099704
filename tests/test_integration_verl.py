"""Parity of the verl adapter with verl's own installed functions (fp32, 1e-6), called for real:
``compute_policy_loss_vanilla`` (+ ``agg_loss``) for every ``loss_agg_mode``, with dual clip, the +-20
clamp, rollout IS weights and ``global_batch_info``; ``compute_grpo_outcome_advantage``; the fused
log-prob kernel; and verl's registries returning the adapter's estimator and loss by name."""
import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl is not installed (see requirements-integrations.txt)")
from omegaconf import OmegaConf  # noqa: E402

import lens_kernels as lk  # noqa: E402
from lens_kernels.integrations import verl as lk_verl  # noqa: E402

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
B, T = 6, 9


def actor_config(global_batch_info=None, clip_high=0.28):
    """The actor fields the vanilla loss reads, as an OmegaConf node (verl passes DictConfig or ActorConfig)."""
    info = global_batch_info or {}
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": clip_high,
                             "clip_ratio_c": 3.0, "global_batch_info": info,
                             "policy_loss": {"loss_mode": "lens"}})


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = log_prob + 0.4 * torch.randn(B, T, generator=g)
    old[0, 1] = log_prob[0, 1] - 30.0  # beyond the +-20 clamp
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[2] = 0.0
    mask[0, 1] = 1.0
    weights = 0.5 + torch.rand(B, T, generator=g)
    return log_prob, old, adv, mask, weights


def grads(fn, log_prob):
    lp = log_prob.clone().requires_grad_(True)
    loss, metrics = fn(lp)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, metrics


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_is", (False, True))
@pytest.mark.parametrize("info", ({}, {"dp_size": 2, "batch_num_tokens": 50.0, "global_batch_size": 11.0,
                                       "loss_scale_factor": 16.0}))
def test_policy_loss_parity(mode, with_is, info):
    log_prob, old, adv, mask, weights = make_batch(MODES.index(mode) + 10 * with_is)
    config = actor_config(info)
    kw = dict(loss_agg_mode=mode, config=config, rollout_is_weights=weights if with_is else None)
    verl_fn = core_algos.get_policy_loss_fn("vanilla")
    want = grads(lambda lp: verl_fn(old, lp, adv, mask, **kw), log_prob)
    got = grads(lambda lp: core_algos.get_policy_loss_fn("lens")(old, lp, adv, mask, **kw), log_prob)
    assert want[1].abs().sum() > 0 and want[1][0, 1] == 0  # the clamp cuts the gradient there
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert set(got[2]) == set(want[2])
    for name in want[2]:
        assert got[2][name] == pytest.approx(want[2][name], abs=1e-6), name


def test_registry_returns_the_adapter():
    assert core_algos.get_policy_loss_fn("lens") is lk_verl.compute_policy_loss_lens
    assert core_algos.get_adv_estimator_fn("lens") is lk_verl.compute_lens_outcome_advantage


def shuffled_groups(seed, n_groups=4, g_size=4):
    rng = np.random.default_rng(seed)
    uids = np.array([f"prompt-{i}" for i in range(n_groups) for _ in range(g_size)], dtype=object)
    return uids[rng.permutation(len(uids))]


@pytest.mark.parametrize("norm_by_std", (True, False))
def test_grpo_advantage_parity(norm_by_std):
    index = shuffled_groups(0)
    n = len(index)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(n, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    rewards = torch.zeros(n, T)
    rewards[:, 3] = torch.randn(n, generator=g)
    want, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm_by_std)
    ids = lk_verl._group_ids(index, rewards.device)
    adv, _ = lk.group_advantages(rewards.sum(-1), group_ids=ids, eps=lk.TRAINER_EPS["verl"],
                                 estimator="grpo" if norm_by_std else "dr_grpo")
    torch.testing.assert_close(adv.unsqueeze(-1) * mask, want, rtol=1e-6, atol=1e-6)


def test_lens_estimator_through_registry_and_compute_advantage():
    """Through verl's registry, the estimator gives lk.group_advantages' LENS numbers; the wrapped
    compute_advantage supplies old_log_probs, and without them the call fails clearly."""
    index = shuffled_groups(3)
    n = len(index)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(n, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    correct = torch.rand(n, generator=g) > 0.6
    correct[np.where(index == "prompt-0")[0]] = False  # one negative group
    rewards = torch.zeros(n, T)
    rewards[:, 0] = correct.float()
    old = -torch.rand(n, T, generator=g) * 2
    fn = core_algos.get_adv_estimator_fn("lens")
    config = OmegaConf.create({"lens_alpha": 0.3})
    with pytest.raises(ValueError, match="old_log_probs"):
        fn(token_level_rewards=rewards, response_mask=mask, index=index, config=config)

    class Data:  # the two fields of DataProto that the wrapper reads
        batch = {"old_log_probs": old}

    seen = {}

    def fake_compute_advantage(data):
        seen["adv"] = fn(token_level_rewards=rewards, response_mask=mask, index=index, config=config)[0]
        return data

    lk_verl._wrap_compute_advantage(fake_compute_advantage)(Data())
    want, stats = lk.group_advantages(rewards.sum(-1), group_ids=lk_verl._group_ids(index, rewards.device),
                                      estimator="lens", old_logps=old, mask=mask, eps=1e-6, lens_alpha=0.3)
    assert stats["frac_negative_groups"] > 0
    torch.testing.assert_close(seen["adv"], want.unsqueeze(-1) * mask, rtol=1e-6, atol=1e-6)
    neg = torch.as_tensor(index == "prompt-0")
    assert (seen["adv"][neg].abs().sum() > 0)  # LENS gives negative groups a gradient signal


def test_fused_logprob_kernel_swap():
    tf = pytest.importorskip("verl.utils.experimental.torch_functional")
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(37, 8, generator=g)
    ids = torch.randint(0, 37, (2, 5), generator=g)
    module = tf.FusedLinearForPPO()
    want = [t.detach() for t in module(hidden, weight, ids, temperature=0.7)]
    try:
        lk_verl.swap_fused_logprob_kernel(True)
        got = [t.detach() for t in module(hidden, weight, ids, temperature=0.7)]
    finally:
        lk_verl.swap_fused_logprob_kernel(False)
    assert tf.FusedLinearForPPO.forward is not lk_verl.lens_fused_linear_forward
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def one_rank_group(tmp_path):
    import datetime

    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    yield dist.group.WORLD
    lk_verl.set_parallel_layout(None)
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", MODES)
def test_parallel_layout_is_passed_through(one_rank_group, mode):
    """With verl's process groups set (a one-rank group here; the multi-rank equality with the
    single-process run is tested in test_distributed.py), the loss takes its normalizers over the DP
    group and the fused log-prob kernel runs vocab-parallel, giving verl's numbers."""
    log_prob, old, adv, mask, _ = make_batch(40 + MODES.index(mode))
    kw = dict(loss_agg_mode=mode, config=actor_config({}))
    want = grads(lambda lp: core_algos.get_policy_loss_fn("vanilla")(old, lp, adv, mask, **kw), log_prob)
    seen = []
    real = lk_verl.policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("process_group"))
        return real(*args, **kwargs)

    lk_verl.set_parallel_layout(lk.ParallelLayout(dp_group=one_rank_group, tp_group=one_rank_group, vocab_start=0))
    try:
        lk_verl.policy_loss = spy
        got = grads(lambda lp: core_algos.get_policy_loss_fn("lens")(old, lp, adv, mask, **kw), log_prob)
    finally:
        lk_verl.policy_loss = real
    assert seen == [one_rank_group]
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(37, 8, generator=g)
    ids = torch.randint(0, 37, (2, 5), generator=g)
    sharded = lk_verl.lens_fused_linear_forward(None, hidden, weight, ids, temperature=0.7)
    plain = lk.linear_token_logprobs(hidden, weight, ids, temperature=0.7, return_entropy=True)
    for a, b in zip(sharded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="ParallelLayout"):
        lk_verl.set_parallel_layout("dp")


# ----- verl's real compute_advantage (ray_trainer, v1), the algorithm config, warnings -------------
import importlib  # noqa: E402
import os  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402


def import_trainer_module(name):
    """verl's trainer module, or a skip naming the install line; CI (LENS_KERNELS_REQUIRE_TRAINERS=1)
    fails instead, so the real path cannot go untested there."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("LENS_KERNELS_REQUIRE_TRAINERS") == "1":
            raise
        pytest.skip(f"{name} does not import ({exc}); see requirements-integrations.txt")


def lens_batch(seed, graded=False):
    index = shuffled_groups(seed)
    n = len(index)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    correct = torch.rand(n, generator=g) > 0.5
    correct[np.where(index == "prompt-0")[0]] = False  # a negative group
    scores = torch.zeros(n, T)
    scores[:, 0] = torch.where(correct, 1.0, -1.0) if graded else correct.float()
    rewards = scores - 0.01 * torch.rand(n, T, generator=g) * mask if graded else scores.clone()  # KL in the reward
    old = -torch.rand(n, T, generator=g) * 2
    return index, mask, correct, scores, rewards, old


@pytest.mark.parametrize("module_name", ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils"))
@pytest.mark.parametrize("norm_by_std", (True, False))
def test_real_compute_advantage_is_wrapped(module_name, norm_by_std):
    """verl's own compute_advantage (the legacy trainer's, and the v1 trainer's route through
    compute_advantage_for_multi_trajectories), wrapped on import: the estimator gets the batch's
    old_log_probs and reads norm_adv_by_std_in_grpo from the algorithm config as verl's estimators do."""
    module = import_trainer_module(module_name)
    from verl import DataProto

    ray_trainer = importlib.import_module("verl.trainer.ppo.ray_trainer")
    assert getattr(ray_trainer.compute_advantage, "_lens_wrapped", False)
    assert getattr(module.compute_advantage, "_lens_wrapped", False)
    index, mask, correct, scores, rewards, old = lens_batch(7)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "token_level_scores": scores,
                                        "response_mask": mask, "old_log_probs": old},
                               non_tensors={"uid": index})
    config = OmegaConf.create({"lens_alpha": 0.3, "norm_adv_by_std_in_grpo": norm_by_std})
    if module_name.endswith("v1.utils"):
        keys = [f"{uid}_0_0" for uid in index]
        out = module.compute_advantage_for_multi_trajectories(data, keys, "lens", config=config)
    else:
        out = module.compute_advantage(data, "lens", config=config)
    want, stats = lk.group_advantages(rewards.sum(-1), group_ids=lk_verl._group_ids(index, rewards.device),
                                      estimator="lens", old_logps=old, mask=mask, eps=1e-6, lens_alpha=0.3,
                                      scale="group" if norm_by_std else "none")
    assert stats["frac_negative_groups"] > 0 and stats["frac_mixed_groups"] > 0
    torch.testing.assert_close(out.batch["advantages"], want.unsqueeze(-1) * mask, rtol=1e-6, atol=1e-6)


def test_failed_wrap_is_an_error():
    with pytest.raises(ImportError, match="cannot wrap lens_kernels.no_such_module"):
        lk_verl.install_compute_advantage_wrapper(("lens_kernels.no_such_module",))
    with pytest.raises(ImportError, match="has no compute_advantage"):
        lk_verl._wrap_module(types.ModuleType("verl.trainer.ppo.renamed"))


def test_graded_rewards_and_kl_in_reward_need_a_threshold():
    """+-1 scores and a KL penalty in the reward are not binary: without lens_correct_threshold the
    estimator fails naming it; with it, correct = score before the KL penalty >= threshold."""
    index, mask, correct, scores, rewards, old = lens_batch(8, graded=True)
    fn = core_algos.get_adv_estimator_fn("lens")
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=index, old_log_probs=old)
    with pytest.raises(ValueError, match=r"^LENS needs to know which responses are correct: set "
                                         r"\+algorithm.lens_correct_threshold") as info:
        fn(config=OmegaConf.create({}), **kw)
    assert "correct=" not in str(info.value).replace("lens_correct_", "")
    got, _ = fn(config=OmegaConf.create({"lens_correct_threshold": 1.0}), token_level_scores=scores, **kw)
    want, stats = lk.group_advantages(rewards.sum(-1), group_ids=lk_verl._group_ids(index, rewards.device),
                                      estimator="lens", old_logps=old, mask=mask, eps=1e-6, correct=correct)
    assert stats["frac_negative_groups"] > 0
    torch.testing.assert_close(got, want.unsqueeze(-1) * mask, rtol=1e-6, atol=1e-6)


def test_groups_of_one_and_group_filtering_warn_once():
    fn = core_algos.get_adv_estimator_fn("lens")
    n = 6
    g = torch.Generator().manual_seed(9)
    mask = torch.ones(n, T)
    rewards = torch.zeros(n, T)
    rewards[::2, 0] = 1.0
    old = -torch.rand(n, T, generator=g)
    lk_verl._warned.clear()
    kw = dict(token_level_rewards=rewards, response_mask=mask, old_log_probs=old)
    single = np.array([f"p{i}" for i in range(n)], dtype=object)  # rollout.n = 1
    with pytest.warns(UserWarning, match="rollout.n"):
        adv, _ = fn(index=single, config=OmegaConf.create({}), **kw)
    assert adv.abs().sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(index=single, config=OmegaConf.create({}), **kw)  # once only
    pairs = np.repeat(np.array([f"p{i}" for i in range(n // 2)], dtype=object), 2)
    with pytest.warns(UserWarning, match="filter_groups"):
        fn(index=pairs, config=OmegaConf.create({"filter_groups": {"enable": True}}), **kw)
    lk_verl._warned.clear()


def test_runtime_env_forwards_the_variables(monkeypatch):
    """verl's get_ppo_ray_runtime_env (what main_ppo passes to ray.init) carries the variables a worker
    needs, so workers of an existing cluster (ray start) load the adapter too."""
    constants = importlib.import_module("verl.trainer.constants_ppo")
    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "lens_kernels.integrations.verl")
    monkeypatch.setenv("LENS_KERNELS_VERL_FUSED_LOGPROBS", "1")
    import ray
    real_init = ray.init
    try:
        env = constants.get_ppo_ray_runtime_env()
        assert getattr(ray.init, "_lens_check", False)  # the next ray.init checks the cluster
    finally:
        ray.init = real_init
    assert env["env_vars"]["VERL_USE_EXTERNAL_MODULES"] == "lens_kernels.integrations.verl"
    assert env["env_vars"]["LENS_KERNELS_VERL_FUSED_LOGPROBS"] == "1"
    assert "TOKENIZERS_PARALLELISM" in env["env_vars"] or os.environ.get("TOKENIZERS_PARALLELISM")


def test_verl_plugin_entry_point_loads_the_adapter():
    """With lens-kernels installed from this checkout, verl's plugin discovery imports the adapter in any
    process that imports verl, without VERL_USE_EXTERNAL_MODULES (as on Ray workers of any node)."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="verl.plugins")}
    if "lens_kernels.integrations.verl" not in names:
        pytest.skip("the installed lens-kernels does not declare the verl.plugins entry point (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_USE_EXTERNAL_PLUGINS")}
    code = ("import sys, verl; from verl.trainer.ppo import core_algos; "
            "print(core_algos.get_adv_estimator_fn('lens').__module__)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "lens_kernels.integrations.verl"


def docs_command(path, marker):
    """The tokens of the first shell command in a docs page's code block that mentions ``marker``."""
    import pathlib
    import re
    import shlex

    text = (pathlib.Path(__file__).resolve().parents[1] / path).read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if marker in block:
            lines = [line.split("#")[0] for line in block.splitlines() if line.strip()
                     and not line.lstrip().startswith("#")]
            return shlex.split(" ".join(line.rstrip().rstrip("\\") for line in lines))
    raise AssertionError(f"no command with {marker!r} in {path}")


def test_docs_command_composes():
    """The verl recipe's Hydra overrides (docs/verl.md) compose against verl's own ppo_trainer config,
    and its algorithm config drives verl's real compute_advantage to the LENS advantages."""
    import_trainer_module("hydra")
    ray_trainer = import_trainer_module("verl.trainer.ppo.ray_trainer")
    from hydra import compose, initialize_config_dir
    from verl import DataProto

    tokens = docs_command("docs/verl.md", "verl.trainer.main_ppo")
    assert tokens[0] == "VERL_USE_EXTERNAL_MODULES=lens_kernels.integrations.verl"
    overrides = [t for t in tokens[tokens.index("verl.trainer.main_ppo") + 1:] if not t.endswith("=...")]
    config_dir = os.path.join(os.path.dirname(core_algos.__file__), "..", "config")
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    assert cfg.algorithm.adv_estimator == "lens" and cfg.actor_rollout_ref.rollout.n == 8
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == "lens_kernels.integrations.verl"
    index, mask, correct, scores, rewards, old = lens_batch(11)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask, "old_log_probs": old},
                               non_tensors={"uid": index})
    out = ray_trainer.compute_advantage(data, cfg.algorithm.adv_estimator, config=cfg.algorithm)
    want, _ = lk.group_advantages(rewards.sum(-1), group_ids=lk_verl._group_ids(index, rewards.device),
                                  estimator="lens", old_logps=old, mask=mask, eps=1e-6,
                                  lens_alpha=float(cfg.algorithm.lens_alpha))
    torch.testing.assert_close(out.batch["advantages"], want.unsqueeze(-1) * mask, rtol=1e-6, atol=1e-6)
