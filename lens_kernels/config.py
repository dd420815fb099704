"""LossConfig: every option of the policy loss (docs/design.md, Policy loss), and converters from the trainers' configs.

The converters read the trainers' own field names from any object with attributes (their config
dataclasses, an OmegaConf node, or a plain ``types.SimpleNamespace``), so the trainers need not be
installed.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Optional

POLICY_LOSSES = ("ppo", "cispo", "sapo")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
)
KL_ESTIMATORS = ("k1", "k2", "k3")

# TRL's loss_type names -> (policy loss, aggregation). "dapo" is token-mean with the global normalizer
# that the caller passes (`num_tokens=`); "bnpo" is the same with the local token count.
_TRL_LOSS_TYPES = {
    "grpo": ("ppo", "seq-mean-token-mean"),
    "bnpo": ("ppo", "token-mean"),
    "dapo": ("ppo", "token-mean"),
    "dr_grpo": ("ppo", "seq-mean-token-sum-norm"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
}


@dataclass(frozen=True)
class LossConfig:
    """Every option of the GRPO-family policy loss (docs/design.md, Policy loss).

    Policy term, per token, with rho the importance ratio and A the advantage:

    - ``policy_loss="ppo"``: ``-min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A)``;
      ``delta`` clamps the unclipped rho from above (INTELLECT-2 two-sided clip); ``dual_clip=c``
      bounds the loss of A < 0 tokens by ``-c A`` (verl ``clip_ratio_c``, OpenRLHF ``dual_clip``).
    - ``policy_loss="cispo"``: ``-sg(min(rho, cispo_ratio_cap)) A l`` (MiniMax-M1).
    - ``policy_loss="sapo"``: ``-(4 / tau) sigmoid(tau (rho - 1)) A`` with ``tau`` =
      ``sapo_temperature_pos`` for A > 0 and ``sapo_temperature_neg`` otherwise.

    Ratio: ``ratio_level="token"``: rho_t = exp(l_t - l_old_t). ``"sequence"`` (GSPO): rho_i =
    exp(s_i - s_old_i), s the masked mean log-prob, the gradient flowing through the mean.
    ``"sequence_token"`` (GSPO-token): the same value, with gradient rho_i dl_t per token.
    ``log_ratio_clamp`` clamps the log-ratio to +-c before exp (verl and OpenRLHF use 20). Without it a
    log-ratio above ~88.7 nats (stale old log-probs) overflows the ratio to +inf in fp32: gated tokens
    (clipped, capped, saturated) still get an exact 0 gradient, an unbounded term becomes +inf.
    Numbers may be Python or numpy scalars; they are stored as floats.

    KL: ``beta * k(l, l_ref)`` per token with ``kl_estimator`` k1 = l - l_ref, k2 = (l - l_ref)^2 / 2,
    k3 = exp(l_ref - l) - (l_ref - l) - 1; ``kl_clamp`` clamps the estimate to +-c (verl's
    low_var_kl uses 10). Entropy bonus: ``- entropy_coef * H``.

    Aggregation (``loss_agg_mode``), with m the loss mask, and T_norm / B_norm the token and sequence
    normalizers (the caller's global counts when given, else the local ones):

    - ``token-mean``: sum m L / T_norm
    - ``seq-mean-token-mean``: sum_i (sum_t m L / max(1, sum_t m)) / B_norm
    - ``seq-mean-token-sum``: sum_i sum_t m L / B_norm
    - ``seq-mean-token-sum-norm``: sum m L / (B_norm * loss_norm_length) (Dr. GRPO); the length is
      ``loss_norm_length`` or, if None, the T dimension of the mask
    - ``token-sum``: sum m L

    The result is multiplied by ``dp_size`` (undoing data-parallel gradient averaging, as verl does).
    The entropy bonus is aggregated with ``entropy_agg_mode`` when set (TRL uses token-mean whatever
    the loss type), else with ``loss_agg_mode`` (verl).
    """

    policy_loss: str = "ppo"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    dual_clip: Optional[float] = None
    cispo_ratio_cap: float = 5.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    ratio_level: str = "token"
    log_ratio_clamp: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: Optional[float] = None
    entropy_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    entropy_agg_mode: Optional[str] = None
    loss_norm_length: Optional[float] = None
    dp_size: float = 1.0

    def __post_init__(self):
        _check_choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        _check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        if self.entropy_agg_mode is not None:
            _check_choice("entropy_agg_mode", self.entropy_agg_mode, LOSS_AGG_MODES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        # every number is checked and stored as a Python float (numpy scalars are accepted)
        number = lambda name, **bounds: object.__setattr__(  # noqa: E731
            self, name, _check_number(name, getattr(self, name), **bounds))
        number("epsilon_low", low=0.0, high=1.0, high_open=True)
        if self.epsilon_high is not None:
            number("epsilon_high", low=0.0)
        for name in ("delta", "dual_clip", "log_ratio_clamp", "kl_clamp", "loss_norm_length"):
            if getattr(self, name) is not None:
                number(name, low=0.0, low_open=True)
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1.0 (the bound -c*A for A < 0), got {self.dual_clip}")
        if self.delta is not None and self.delta <= 1.0 + self.eps_high:
            raise ValueError(
                f"delta must be > 1 + epsilon_high = {1.0 + self.eps_high}, got {self.delta}"
            )
        number("cispo_ratio_cap", low=0.0, low_open=True)
        number("sapo_temperature_pos", low=0.0, low_open=True)
        number("sapo_temperature_neg", low=0.0, low_open=True)
        number("beta", low=0.0)
        number("entropy_coef")
        number("dp_size", low=0.0, low_open=True)

    @property
    def eps_high(self) -> float:
        """Upper clip epsilon; equal to ``epsilon_low`` when not set (TRL's convention)."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_sequence_stats(self) -> bool:
        """Whether the loss of a token depends on other tokens' log-probs (GSPO): the 3-pass path."""
        return self.ratio_level != "token"

    def replace(self, **changes) -> "LossConfig":
        return dataclasses.replace(self, **changes)

    # ----- converters -------------------------------------------------------------------------
    @classmethod
    def from_trl(cls, args: Any, **overrides) -> "LossConfig":
        """From a TRL ``GRPOConfig`` (or anything with its field names).

        Reads ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta``, ``beta``,
        ``importance_sampling_level``, ``sapo_temperature_pos/neg``, ``max_completion_length`` and
        ``entropy_coef``. TRL does not clamp the log-ratio, uses the k3 KL, and aggregates the entropy
        bonus as a token mean whatever the loss type. For ``cispo`` TRL's ``epsilon_high`` is the
        absolute ratio cap. For ``dapo`` pass TRL's normalizer as ``num_tokens=`` at call time.
        """
        loss_type = _get(args, "loss_type", "dapo")
        if loss_type not in _TRL_LOSS_TYPES:
            raise ValueError(
                f"args.loss_type must be one of {sorted(_TRL_LOSS_TYPES)} to map onto LossConfig, "
                f"got {loss_type!r}"
            )
        policy_loss, agg = _TRL_LOSS_TYPES[loss_type]
        epsilon = float(_get(args, "epsilon", 0.2))
        epsilon_high = _get(args, "epsilon_high", None)
        level = _get(args, "importance_sampling_level", "token")
        if level not in ("token", "sequence"):
            raise ValueError(
                f"args.importance_sampling_level must be 'token' or 'sequence', got {level!r}"
            )
        kwargs = dict(
            policy_loss=policy_loss,
            loss_agg_mode=agg,
            epsilon_low=epsilon,
            epsilon_high=None if epsilon_high is None else float(epsilon_high),
            delta=_get(args, "delta", None),
            beta=float(_get(args, "beta", 0.0)),
            kl_estimator="k3",
            ratio_level=level,
            sapo_temperature_pos=float(_get(args, "sapo_temperature_pos", 1.0)),
            sapo_temperature_neg=float(_get(args, "sapo_temperature_neg", 1.05)),
            entropy_coef=float(_get(args, "entropy_coef", 0.0) or 0.0),
            entropy_agg_mode="token-mean",
        )
        if policy_loss == "cispo":
            cap = epsilon_high if epsilon_high is not None else 5.0
            kwargs.update(cispo_ratio_cap=float(cap), epsilon_high=None)
        if agg == "seq-mean-token-sum-norm":
            max_len = _get(args, "max_completion_length", None)
            if max_len is None:
                raise ValueError("args.max_completion_length is required for loss_type='dr_grpo'")
            kwargs["loss_norm_length"] = float(max_len)
        sources = dict(epsilon_low="args.epsilon", epsilon_high="args.epsilon_high", delta="args.delta",
                       beta="args.beta", sapo_temperature_pos="args.sapo_temperature_pos",
                       sapo_temperature_neg="args.sapo_temperature_neg", entropy_coef="args.entropy_coef",
                       cispo_ratio_cap="args.epsilon_high", loss_norm_length="args.max_completion_length")
        return _from_trainer(cls, kwargs, overrides, sources)

    @classmethod
    def from_verl(cls, actor_cfg: Any, **overrides) -> "LossConfig":
        """From verl's ``actor_rollout_ref.actor`` config node (or its ``policy_loss`` sub-node).

        Reads ``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``, ``clip_ratio_c`` (dual clip,
        verl applies it always), ``loss_agg_mode``, ``entropy_coeff``, ``use_kl_loss``,
        ``kl_loss_coef``, ``kl_loss_type`` and ``policy_loss.loss_mode``. verl clamps the log-ratio at
        +-20.
        """
        clip = float(_get(actor_cfg, "clip_ratio", 0.2))
        low = _get(actor_cfg, "clip_ratio_low", None)
        high = _get(actor_cfg, "clip_ratio_high", None)
        policy_node = _get(actor_cfg, "policy_loss", None)
        loss_mode = _get(policy_node, "loss_mode", "vanilla") if policy_node is not None else "vanilla"
        modes = {"vanilla": ("ppo", "token"), "gspo": ("ppo", "sequence_token"), "cispo": ("cispo", "token")}
        if loss_mode not in modes:
            raise ValueError(
                f"actor_cfg.policy_loss.loss_mode must be one of {sorted(modes)}, got {loss_mode!r}"
            )
        policy_loss, level = modes[loss_mode]
        kl_type = _get(actor_cfg, "kl_loss_type", "low_var_kl")
        kl_map = {"kl": ("k1", None), "k1": ("k1", None), "mse": ("k2", None), "k2": ("k2", None),
                  "low_var_kl": ("k3", 10.0), "k3": ("k3", None)}
        if kl_type not in kl_map:
            raise ValueError(f"actor_cfg.kl_loss_type must be one of {sorted(kl_map)}, got {kl_type!r}")
        kl_estimator, kl_clamp = kl_map[kl_type]
        use_kl = bool(_get(actor_cfg, "use_kl_loss", False))
        kwargs = dict(
            policy_loss=policy_loss,
            ratio_level=level,
            epsilon_low=float(clip if low is None else low),
            epsilon_high=float(clip if high is None else high),
            dual_clip=float(_get(actor_cfg, "clip_ratio_c", 3.0)),
            log_ratio_clamp=20.0,
            loss_agg_mode=_get(actor_cfg, "loss_agg_mode", "token-mean"),
            entropy_coef=float(_get(actor_cfg, "entropy_coeff", 0.0) or 0.0),
            beta=float(_get(actor_cfg, "kl_loss_coef", 0.001)) if use_kl else 0.0,
            kl_estimator=kl_estimator,
            kl_clamp=kl_clamp,
        )
        if policy_loss == "cispo":
            kwargs["cispo_ratio_cap"] = 1.0 + kwargs["epsilon_high"]
        sources = dict(epsilon_low="actor_cfg.clip_ratio" if low is None else "actor_cfg.clip_ratio_low",
                       epsilon_high="actor_cfg.clip_ratio" if high is None else "actor_cfg.clip_ratio_high",
                       dual_clip="actor_cfg.clip_ratio_c", loss_agg_mode="actor_cfg.loss_agg_mode",
                       entropy_coef="actor_cfg.entropy_coeff", beta="actor_cfg.kl_loss_coef",
                       cispo_ratio_cap="actor_cfg.clip_ratio_high" if high is not None else "actor_cfg.clip_ratio")
        return _from_trainer(cls, kwargs, overrides, sources)

    @classmethod
    def from_openrlhf(cls, args: Any, **overrides) -> "LossConfig":
        """From OpenRLHF's training args.

        Reads ``eps_clip_low_high`` (a pair) or ``eps_clip``, ``dual_clip``, ``policy_loss_type``
        (``ppo`` or ``gspo``), ``token_level_loss``, ``init_kl_coef`` with ``use_kl_loss`` and
        ``kl_estimator``, and ``entropy_loss_coef``. The log-ratio clamp follows OpenRLHF's
        ``PolicyLoss``: +-20 for ``ppo``, none for ``gspo``; its group normalization uses eps 1e-9
        (see ``group_advantages``).
        """
        pair = _get(args, "eps_clip_low_high", None)
        if pair is not None:
            if len(pair) != 2:
                raise ValueError(f"args.eps_clip_low_high must be a pair (low, high), got {pair!r}")
            low, high = float(pair[0]), float(pair[1])
        else:
            low = high = float(_get(args, "eps_clip", 0.2))
        loss_type = _get(args, "policy_loss_type", "ppo")
        if loss_type not in ("ppo", "gspo"):
            raise ValueError(f"args.policy_loss_type must be 'ppo' or 'gspo', got {loss_type!r}")
        token_level = bool(_get(args, "token_level_loss", True))
        use_kl = bool(_get(args, "use_kl_loss", False))
        kl_name = _get(args, "kl_estimator", "k1")
        if kl_name not in KL_ESTIMATORS:
            raise ValueError(f"args.kl_estimator must be one of {KL_ESTIMATORS}, got {kl_name!r}")
        dual = _get(args, "dual_clip", None)
        kwargs = dict(
            policy_loss="ppo",
            ratio_level="sequence" if loss_type == "gspo" else "token",
            epsilon_low=low,
            epsilon_high=high,
            dual_clip=None if dual is None else float(dual),
            log_ratio_clamp=None if loss_type == "gspo" else 20.0,
            loss_agg_mode="token-mean" if token_level and loss_type != "gspo" else "seq-mean-token-mean",
            beta=float(_get(args, "init_kl_coef", 0.0)) if use_kl else 0.0,
            kl_estimator=kl_name,
            entropy_coef=float(_get(args, "entropy_loss_coef", 0.0) or 0.0),
        )
        eps = "args.eps_clip" if pair is None else "args.eps_clip_low_high"
        sources = dict(epsilon_low=eps if pair is None else eps + "[0]", epsilon_high=eps if pair is None else eps + "[1]",
                       dual_clip="args.dual_clip", beta="args.init_kl_coef", entropy_coef="args.entropy_loss_coef")
        return _from_trainer(cls, kwargs, overrides, sources)


def _get(obj: Any, name: str, default: Any) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_number(name, value, low=None, high=None, low_open=False, high_open=False) -> float:
    """``value`` as a float: any real number (Python or numpy scalar), not a bool, finite, within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _from_trainer(cls, kwargs, overrides, sources):
    """``cls(**kwargs, **overrides)``, with an invalid value that came from the trainer's config named as
    the user wrote it: ``sources`` maps a LossConfig field to the trainer field it was read from."""
    fields = dict(kwargs, **overrides)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        message = str(err)
        for field, source in sources.items():
            if field in overrides or not message.startswith(field + " "):
                continue
            raise type(err)(f"{source} (LossConfig.{field}) {message[len(field) + 1:]}") from None
        raise


@dataclass(frozen=True)
class AdvantageConfig:
    """The options of ``group_advantages`` as one value, for the one-call LENS steps (and anything
    that passes them along): ``lens_policy_loss_from_logits(..., advantage_config=AdvantageConfig(...))``.

    Fields as in ``group_advantages``: ``estimator`` (default "lens" here), ``scale`` (None: the
    estimator's default), ``eps`` (TRL 1e-4, verl 1e-6, OpenRLHF 1e-9: ``TRAINER_EPS``),
    ``std_unbiased``, ``lens_alpha``, ``lens_d_estimate``, ``lens_groups``, ``nan_rewards``.
    Choices are checked when the config is made.
    """

    estimator: str = "lens"
    scale: Optional[str] = None
    eps: float = 1e-4
    std_unbiased: bool = True
    lens_alpha: float = 0.25
    lens_d_estimate: str = "mean"
    lens_groups: str = "all"
    nan_rewards: str = "raise"

    def __post_init__(self):
        from . import advantages as adv

        _check_choice("estimator", self.estimator, adv.ESTIMATORS)
        if self.scale is not None:
            _check_choice("scale", self.scale, adv.SCALES)
        _check_choice("lens_d_estimate", self.lens_d_estimate, adv.LENS_D_ESTIMATES)
        _check_choice("lens_groups", self.lens_groups, adv.LENS_GROUPS)
        _check_choice("nan_rewards", self.nan_rewards, adv.NAN_REWARDS)
        _check_number("eps", self.eps, low=0.0)
        _check_number("lens_alpha", self.lens_alpha, low=0.0)
        if not isinstance(self.std_unbiased, bool):
            raise TypeError(f"std_unbiased must be a bool, got {type(self.std_unbiased).__name__}")

    def replace(self, **changes) -> "AdvantageConfig":
        return dataclasses.replace(self, **changes)

    def kwargs(self) -> dict:
        """The keyword arguments of ``group_advantages``."""
        return dataclasses.asdict(self)
