"""Options of the methods other than DRIFT's refresh: which method runs (``drift_method``), ICA, and the preference
methods of ``DriftDPOTrainer``. Choices and help of ``drift_method`` come from :data:`drift_trainer.methods.METHODS`."""

from __future__ import annotations

from dataclasses import dataclass, field

from drift_trainer.hf.fields import _choice, _help
from drift_trainer.methods import method_choices, method_help
from drift_trainer.methods.ica import ICA_WEIGHTINGS
from drift_trainer.methods.lossdiff import LOSSDIFF_SCORES


@dataclass
class SFTMethodArguments:
    """``drift_method`` of ``DriftConfig``."""

    drift_method: str = field(default="drift", metadata=_help(method_help("sft"), method_choices("sft")))

    def validate_method(self) -> None:
        _choice(self, "drift_method", method_choices("sft"))


@dataclass
class ICAArguments:
    """Options of the ICA scorer (``drift_method="ica"``)."""

    drift_ica_num_demos: int = field(
        default=3,
        metadata={"help": "Holdout examples retrieved per candidate and shown as demonstrations (the paper's k=3)."},
    )
    drift_ica_refresh_steps: int | None = field(
        default=None,
        metadata={
            "help": "Recompute the ICA weights every this many optimizer steps. Default: once, at the start of "
            "training (the paper's default; recomputing changed little there)."
        },
    )
    drift_ica_weighting: str = field(
        default="minmax",
        metadata=_help(
            "How ICA scores become loss weights. `minmax`: (s - min) / (max - min), in [0, 1] (the paper). "
            "`softmax`, `prune`, `truncate`: the `drift_weighting` rules with their `drift_*` options (e.g. "
            "`truncate` keeps scores between percentiles `drift_truncate_low` and `drift_truncate_high`).",
            ICA_WEIGHTINGS,
        ),
    )
    drift_ica_batch_size: int = field(
        default=16, metadata={"help": "Sequences per forward when scoring with ICA (forward passes only)."}
    )

    def validate_ica(self) -> None:
        if self.drift_ica_weighting not in ICA_WEIGHTINGS:
            raise ValueError(
                f"drift_ica_weighting must be one of {', '.join(map(repr, ICA_WEIGHTINGS))}; got "
                f"{self.drift_ica_weighting!r}."
            )
        for name in ("drift_ica_num_demos", "drift_ica_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.drift_ica_refresh_steps is not None and int(self.drift_ica_refresh_steps) < 1:
            raise ValueError(
                f"drift_ica_refresh_steps must be a positive integer (or None: once at the start), got "
                f"{self.drift_ica_refresh_steps!r}."
            )


# ---------------------------------------------------------------------------------------------------------- texts


@dataclass
class PreferenceArguments:
    """Options of the preference scorers (``DriftDPOConfig``)."""

    drift_method: str = field(
        default="drift",
        metadata=_help(
            method_help("dpo"),
            method_choices("dpo"),
        ),
    )
    drift_lossdiff_warmup_epochs: float = field(
        default=1.0, metadata=_help("`lossdiff_irm`: epochs of DPO on all pairs before scoring and selecting (> 0).")
    )
    drift_lossdiff_val_epochs: float = field(
        default=1.0,
        metadata=_help("`lossdiff_irm`: epochs the auxiliary model theta_val trains on the validation pairs (> 0)."),
    )
    drift_lossdiff_score: str = field(
        default="both",
        metadata=_help(
            "`lossdiff_irm`: which bands select. `both`: pairs in the middle band of LossDiff and of IRM "
            "(intersection, the paper); `lossdiff` or `irm`: one score only (truncated influence on one proxy).",
            LOSSDIFF_SCORES,
        ),
    )
    drift_lossdiff_low: float = field(default=10.0, metadata=_help("Lower percentile of the LossDiff band, [0, 100)."))
    drift_lossdiff_high: float = field(
        default=90.0, metadata=_help("Upper percentile of the LossDiff band, (low, 100].")
    )
    drift_irm_low: float = field(default=10.0, metadata=_help("Lower percentile of the IRM band, [0, 100)."))
    drift_irm_high: float = field(default=90.0, metadata=_help("Upper percentile of the IRM band, (low, 100]."))
    simpo_gamma: float = field(
        default=0.5, metadata=_help("Target reward margin of `loss_type='simpo'` (SimPO; beta is `beta`).")
    )
    drift_pair_bound: bool = field(
        default=False,
        metadata=_help(
            "Before the first step, remove from the train set for the whole run every pair whose start-model margin "
            "log p(chosen|x) - log p(rejected|x) is below every `validation_dataset` pair's (clean pairs: a clean "
            "train pair from their distribution falls below all n of them with probability 1/(n+1)). A flipped "
            "pair that the start model ranks confidently the other way is dropped. Combines with any `drift_method` "
            "(`uniform`: TRL's DPO on the kept pairs; a scorer scores and weights the kept ones). Needs "
            "`validation_dataset`; one process (the start forwards are not split over ranks)."
        ),
    )

    def validate_preference(self) -> None:
        _choice(self, "drift_method", method_choices("dpo"))
        _choice(self, "drift_lossdiff_score", LOSSDIFF_SCORES)
        for lo, hi in (("drift_lossdiff_low", "drift_lossdiff_high"), ("drift_irm_low", "drift_irm_high")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0.0 <= a < b <= 100.0:
                raise ValueError(f"{lo} and {hi} must satisfy 0 <= low < high <= 100, got {a!r} and {b!r}.")
        for name in ("drift_lossdiff_warmup_epochs", "drift_lossdiff_val_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
