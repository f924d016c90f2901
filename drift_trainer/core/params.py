"""Per-stage parameters: each stage of a refresh reads the few options it needs, not the whole training config.

Every class reads its fields from any object with ``drift_*`` attributes (``DriftConfig``, ``DriftArguments``, the
``refine`` command's options) through :meth:`Params.of`, so a stage can be called with a config or with its own
parameter object; a missing attribute takes the documented default (the same as ``DriftArguments``'s).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Params:
    """Base of the per-stage parameter objects: field ``x`` is read from attribute ``drift_x`` (or ``ATTRS[x]``)."""

    ATTRS = {}  # field -> attribute name where it is not ``drift_<field>``

    @classmethod
    def of(cls, source):
        """``source`` itself when it already is a ``cls``, else a ``cls`` read from its ``drift_*`` attributes."""
        if isinstance(source, cls):
            return source
        values = {}
        for f in fields(cls):
            if not f.init:
                continue
            attr = cls.ATTRS.get(f.name, f"drift_{f.name}")
            if hasattr(source, attr):
                values[f.name] = getattr(source, attr)
        return cls(**values)


@dataclass(frozen=True)
class RolloutParams(Params):
    """Sampling and judging the validation queries' rollouts."""

    num_queries: int = 32
    num_rollouts: int = 4
    batch_size: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    contrast_rollouts: int = 0
    ATTRS = {"batch_size": "drift_rollout_batch_size"}


@dataclass(frozen=True)
class SigningParams(Params):
    """How judged rollouts sign the target."""

    signing: str = "correctness"
    reward_threshold: float = 0.5
    no_contrast: str = "skip"


@dataclass(frozen=True)
class FeatureParams(Params):
    """The train feature pass: batch size, where the features live, which rows a refresh rescores."""

    batch_size: int = 16
    memmap_dir: str | None = None
    memory_mb: float | None = 4096.0
    max_train_examples: int | None = None
    ATTRS = {
        "batch_size": "drift_feature_batch_size",
        "memmap_dir": "drift_feature_memmap_dir",
        "memory_mb": "drift_feature_memory_mb",
    }


@dataclass(frozen=True)
class InfluenceParams(Params):
    """Preconditioning and debiasing of the raw inner products."""

    preconditioner: str = "identity"
    damping: float = 0.1
    debias: str = "normalize"
    norm_exponent: float = 1.0
    loss_mix: float = 1.0
    loss_gate: bool = False
    loss_ranks: bool = False
    target_ema: float = 0.0
    reliability_shrink: bool = False


@dataclass(frozen=True)
class WeightingParams(Params):
    """Scores to sampling / loss weights, and their smoothing across refreshes."""

    weighting: str = "softmax"
    softmax_temperature: float = 1.0
    prune_fraction: float = 0.3
    truncate_low: float = 10.0
    truncate_high: float = 90.0
    weight_clip: float = 5.0
    uniform_mix: float = 0.1
    score_ema: float = 0.5
    demote_threshold: float = 1.0
    reference_bound: bool = False
    harm_gate: bool = True
    harm_alpha: float = 0.01
    harm_max_rank: int = 1


@dataclass(frozen=True)
class CaptureParams(Params):
    """Features captured in the training backward: how many stale rows a refresh recomputes, and the staleness check."""

    rescore_budget: float = 0.1
    capture_check_rows: int = 32
    capture_min_agreement: float = 0.0


@dataclass(frozen=True)
class RefreshParams(Params):
    """Everything one refresh reads, stage by stage (see :mod:`drift_trainer.core.pipeline`)."""

    scorer: str = "drift"
    rollouts: RolloutParams = field(default_factory=RolloutParams)
    signing: SigningParams = field(default_factory=SigningParams)
    features: FeatureParams = field(default_factory=FeatureParams)
    influence: InfluenceParams = field(default_factory=InfluenceParams)
    weighting: WeightingParams = field(default_factory=WeightingParams)
    capture: CaptureParams = field(default_factory=CaptureParams)

    @classmethod
    def of(cls, source) -> RefreshParams:
        if isinstance(source, cls):
            return source
        return cls(
            scorer=getattr(source, "drift_scorer", None) or "drift",
            rollouts=RolloutParams.of(source),
            signing=SigningParams.of(source),
            features=FeatureParams.of(source),
            influence=InfluenceParams.of(source),
            weighting=WeightingParams.of(source),
            capture=CaptureParams.of(source),
        )
