"""Data-value methods, and DRIFT's scorers.

``drift_method`` picks the method a trainer runs; ``drift_scorer`` picks how a DRIFT refresh scores (only with
``drift_method="drift"``; see :mod:`drift_trainer.methods.scorers`). The two are different axes: a method decides when
and from what scores are computed (on-policy refreshes, a forward-only in-context score at the start, a warm-up then
band selection), a scorer is one rule inside DRIFT's refresh pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    trainers: tuple[str, ...]  # "sft", "dpo"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "drift",
            "on-policy signed influence, refreshed every `drift_refresh_steps` (the `drift_*` options; needs "
            "query_dataset and reward_funcs; `drift_scorer` picks the scoring rule).",
            ("sft", "dpo"),
        ),
        Method(
            "ica",
            "in-context approximation scores (forward passes only, needs a holdout_dataset), min-max normalised and "
            "applied as per-example loss weights (the `drift_ica_*` options; no rollouts).",
            ("sft", "dpo"),
        ),
        Method(
            "lossdiff_irm",
            "after a warm-up, keep the pairs in the middle percentile bands of LossDiff and IRM (needs "
            "validation_dataset).",
            ("dpo",),
        ),
        Method("uniform", "plain TRL DPO: no scoring at all (the same as drift_enabled=False).", ("dpo",)),
    )
}


def method_choices(trainer: str) -> tuple[str, ...]:
    """Names of the methods ``trainer`` (``"sft"`` or ``"dpo"``) runs."""
    return tuple(m.name for m in METHODS.values() if trainer in m.trainers)


def method_help(trainer: str) -> str:
    return "Which data-value method reweights the train set. " + " ".join(
        f"`{m.name}`: {m.help}" for m in METHODS.values() if trainer in m.trainers
    )
