import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from drift_trainer.toy import build_char_tokenizer

    return build_char_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def tiny_model(tokenizer):
    from drift_trainer.toy import build_tiny_llama

    return build_tiny_llama(tokenizer, seed=0)


def digit_start_reward(prompts, completions, **kwargs):
    """1.0 when the completion starts with a digit: gives a random tiny model a mix of right and wrong rollouts."""
    from drift_trainer.rewards import completion_text

    return [float(completion_text(c)[:1].isdigit()) for c in completions]
