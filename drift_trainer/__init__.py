"""drift-trainer: on-policy data refinement (DRIFT) for HuggingFace / TRL supervised fine-tuning.

Layout: ``core/`` (the refresh pipeline: rollouts, signing, features, capture, influence, weighting, sampler, the
``Refresher``), ``methods/`` (scorers, ICA, LossDiff-IRM, preference pairs), ``hf/`` (config, callback, the SFT and DPO
trainers) and ``cli/`` (the ``drift-trainer`` commands). The public names below load on first use, so importing
``drift_trainer.core`` does not import ``transformers.Trainer`` or TRL's trainers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DriftArguments": "drift_trainer.hf.config",
    "DriftCallback": "drift_trainer.hf.callback",
    "DriftConfig": "drift_trainer.hf.config",
    "DriftDPOConfig": "drift_trainer.hf.dpo_trainer",
    "DriftDPOTrainer": "drift_trainer.hf.dpo_trainer",
    "DriftSFTTrainer": "drift_trainer.hf.sft_trainer",
    "DriftSampler": "drift_trainer.core.sampler",
    "DriftState": "drift_trainer.core.state",
    "DriftTrainingArguments": "drift_trainer.hf.config",
    "exact_match": "drift_trainer.core.rewards",
    "math_answer": "drift_trainer.core.rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'drift_trainer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
