"""drift-trainer: on-policy data refinement (DRIFT) for HuggingFace / TRL supervised fine-tuning."""

from drift_trainer.core.rewards import exact_match, math_answer
from drift_trainer.core.sampler import DriftSampler
from drift_trainer.core.state import DriftState
from drift_trainer.hf.callback import DriftCallback
from drift_trainer.hf.config import DriftArguments, DriftConfig, DriftTrainingArguments
from drift_trainer.hf.dpo_trainer import DriftDPOConfig, DriftDPOTrainer
from drift_trainer.hf.sft_trainer import DriftSFTTrainer

__version__ = "0.1.0"

__all__ = [
    "DriftArguments",
    "DriftCallback",
    "DriftConfig",
    "DriftDPOConfig",
    "DriftDPOTrainer",
    "DriftSFTTrainer",
    "DriftSampler",
    "DriftState",
    "DriftTrainingArguments",
    "exact_match",
    "math_answer",
]
