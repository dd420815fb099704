"""LossConfig validation and the trainer converters, from plain namespaces with the trainers' field names."""
from types import SimpleNamespace

import pytest

import lens_kernels as lk


def test_defaults():
    cfg = lk.LossConfig()
    assert cfg.policy_loss == "ppo" and cfg.eps_high == cfg.epsilon_low == 0.2
    assert cfg.loss_agg_mode == "token-mean" and cfg.log_ratio_clamp is None


@pytest.mark.parametrize("loss_type,policy,agg", [
    ("grpo", "ppo", "seq-mean-token-mean"), ("bnpo", "ppo", "token-mean"), ("dapo", "ppo", "token-mean"),
    ("dr_grpo", "ppo", "seq-mean-token-sum-norm"), ("cispo", "cispo", "token-mean"),
    ("sapo", "sapo", "seq-mean-token-mean"),
])
def test_from_trl(loss_type, policy, agg):
    args = SimpleNamespace(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28 if loss_type != "cispo" else 5.0,
                           delta=None, beta=0.04, importance_sampling_level="token", sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, max_completion_length=256)
    cfg = lk.LossConfig.from_trl(args)
    assert (cfg.policy_loss, cfg.loss_agg_mode) == (policy, agg)
    assert cfg.beta == 0.04 and cfg.kl_estimator == "k3" and cfg.log_ratio_clamp is None
    assert cfg.entropy_agg_mode == "token-mean"
    if loss_type == "cispo":
        assert cfg.cispo_ratio_cap == 5.0
    else:
        assert cfg.eps_high == 0.28
    if loss_type == "dr_grpo":
        assert cfg.loss_norm_length == 256


def test_from_trl_sequence_level_and_delta():
    cfg = lk.LossConfig.from_trl(SimpleNamespace(loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4,
                                                 importance_sampling_level="sequence", delta=None))
    assert cfg.ratio_level == "sequence"
    cfg = lk.LossConfig.from_trl(SimpleNamespace(loss_type="dapo", delta=2.0))
    assert cfg.delta == 2.0


def test_from_verl():
    actor = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                            loss_agg_mode="seq-mean-token-sum-norm", entropy_coeff=0.001, use_kl_loss=True,
                            kl_loss_coef=0.01, kl_loss_type="low_var_kl", policy_loss=SimpleNamespace(loss_mode="vanilla"))
    cfg = lk.LossConfig.from_verl(actor)
    assert cfg.epsilon_low == 0.2 and cfg.eps_high == 0.28 and cfg.dual_clip == 3.0
    assert cfg.log_ratio_clamp == 20.0 and cfg.loss_agg_mode == "seq-mean-token-sum-norm"
    assert cfg.beta == 0.01 and cfg.kl_estimator == "k3" and cfg.kl_clamp == 10.0
    assert cfg.entropy_coef == 0.001
    gspo = lk.LossConfig.from_verl({"policy_loss": {"loss_mode": "gspo"}})
    assert gspo.ratio_level == "sequence_token"


def test_from_openrlhf():
    args = SimpleNamespace(eps_clip_low_high=(0.2, 0.3), dual_clip=3.0, policy_loss_type="gspo",
                           token_level_loss=False, use_kl_loss=True, init_kl_coef=0.02, kl_estimator="k3")
    cfg = lk.LossConfig.from_openrlhf(args)
    assert (cfg.epsilon_low, cfg.eps_high, cfg.dual_clip) == (0.2, 0.3, 3.0)
    assert cfg.ratio_level == "sequence" and cfg.loss_agg_mode == "seq-mean-token-mean"
    assert cfg.beta == 0.02 and cfg.kl_estimator == "k3"


def test_overrides():
    cfg = lk.LossConfig.from_trl(SimpleNamespace(loss_type="dapo"), entropy_coef=0.01)
    assert cfg.entropy_coef == 0.01


@pytest.mark.parametrize("kwargs,names", [
    (dict(policy_loss="ppo2"), "policy_loss"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode"),
    (dict(ratio_level="seq"), "ratio_level"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(epsilon_low=1.0), "epsilon_low"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(delta=1.1), "delta"),
    (dict(beta=-1.0), "beta"),
    (dict(dp_size=0), "dp_size"),
    (dict(entropy_agg_mode="avg"), "entropy_agg_mode"),
])
def test_invalid_config_names_the_field(kwargs, names):
    with pytest.raises(ValueError, match=names):
        lk.LossConfig(**kwargs)


def test_invalid_config_type():
    with pytest.raises(TypeError, match="beta"):
        lk.LossConfig(beta="0.1")


@pytest.mark.parametrize("bad,field", [
    (lambda: lk.LossConfig.from_trl(SimpleNamespace(loss_type="vespo")), "loss_type"),
    (lambda: lk.LossConfig.from_trl(SimpleNamespace(loss_type="dr_grpo")), "max_completion_length"),
    (lambda: lk.LossConfig.from_trl(SimpleNamespace(importance_sampling_level="group")), "importance_sampling_level"),
    (lambda: lk.LossConfig.from_verl(SimpleNamespace(policy_loss=SimpleNamespace(loss_mode="gpg"))), "loss_mode"),
    (lambda: lk.LossConfig.from_verl(SimpleNamespace(kl_loss_type="full")), "kl_loss_type"),
    (lambda: lk.LossConfig.from_openrlhf(SimpleNamespace(eps_clip_low_high=(0.2,))), "eps_clip_low_high"),
    (lambda: lk.LossConfig.from_openrlhf(SimpleNamespace(policy_loss_type="reinforce")), "policy_loss_type"),
])
def test_converter_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        bad()
