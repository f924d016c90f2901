"""drift-trainer: on-policy data refinement (DRIFT) for HuggingFace / TRL supervised fine-tuning."""

from .callback import DriftCallback
from .config import DriftArguments, DriftConfig, DriftTrainingArguments
from .preference import DriftDPOConfig, DriftDPOTrainer
from .rewards import exact_match, math_answer
from .sampler import DriftSampler
from .state import DriftState
from .trainer import DriftSFTTrainer

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
