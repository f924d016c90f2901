import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from drift_trainer.cli.toy import build_char_tokenizer

    return build_char_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def tiny_model(tokenizer):
    from drift_trainer.cli.toy import build_tiny_llama

    return build_tiny_llama(tokenizer, seed=0)


def digit_start_reward(prompts, completions, **kwargs):
    """1.0 when the completion starts with a digit: gives a random tiny model a mix of right and wrong rollouts."""
    from drift_trainer.core.rewards import completion_text

    return [float(completion_text(c)[:1].isdigit()) for c in completions]


def tiny_config(output_dir, **overrides):
    """A DriftConfig sized for CPU tests: tiny batches, short rollouts, no progress bars, no reporting.

    Everything else is TRL's default, as users run it: bf16 autocast (``use_cpu`` makes it CPU autocast) and TRL's
    gradient checkpointing. A test about one of those options overrides it and says why.
    """
    from drift_trainer import DriftConfig

    base = dict(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        drift_refresh_steps=4,
        drift_num_queries=4,
        drift_num_rollouts=4,
        drift_max_new_tokens=4,
        drift_progress=False,
        drift_uniform_mix=0.0,
        drift_score_ema=0.0,
    )
    base.update(overrides)
    return DriftConfig(**base)
