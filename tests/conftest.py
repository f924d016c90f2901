"""Pytest fixtures shared by every test module; plain shared setup (configs, trainers, rewards, data) is in helpers.py."""

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
