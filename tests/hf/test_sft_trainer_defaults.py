"""DriftSFTTrainer where TRL users stand: TRL's defaults (bf16 autocast, gradient checkpointing), an eval set, DRIFT
from flags alone, input mistakes caught at construction, and no silent no-op."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from datasets import Dataset

from drift_trainer import DriftCallback, DriftTrainingArguments, exact_match
from drift_trainer.cli.toy import addition_dataset, build_tiny_llama
from tests.helpers import addition_data, digit_start_reward, tiny_config, tiny_trainer, tokenize_dataset

TRL_METRICS = {"entropy", "mean_token_accuracy", "num_tokens"}


# ---------------------------------------------------------------------------------------------- TRL's defaults


@pytest.mark.parametrize("mode", ["sampler", "loss"])
def test_trl_defaults_with_an_eval_set(tmp_path, tokenizer, tiny_model, mode):
    train, queries = addition_data()
    args = tiny_config(tmp_path / "out", eval_strategy="steps", eval_steps=4, logging_steps=2, drift_reweight_mode=mode)
    assert args.bf16 and args.gradient_checkpointing and args.drift_capture_features  # TRL's and DRIFT's defaults
    trainer = tiny_trainer(tiny_model, tokenizer, args, train, queries, eval_dataset=addition_dataset(8, seed=5))
    trainer.train()
    assert trainer.drift_state.num_refreshes == 3
    assert any(h["contrast"] for h in trainer.drift_state.history)
    log = trainer.state.log_history
    assert [h["step"] for h in log if "eval_loss" in h] == [4, 8, 12]
    drift_rows = [h for h in log if "drift/ess" in h]
    loss_rows = [h for h in log if "loss" in h]
    assert [h["step"] for h in drift_rows] == [4, 8, 12]
    assert [h["step"] for h in loss_rows] == [2, 4, 6, 8, 10, 12]
    # TRL's buffered metrics stay on the loss rows (every one of them, also after loss weights apply) and never
    # move onto DRIFT's rows
    assert all(TRL_METRICS <= set(h) for h in loss_rows)
    assert not any(TRL_METRICS & set(h) for h in drift_rows)
    cache = trainer.drift_callback.capture.cache  # features captured in the bf16 training backward
    captured = cache.step >= 0
    assert cache.features.dtype == np.float32 and captured.any()
    assert np.isfinite(cache.features[captured]).all() and np.abs(cache.features[captured]).max() > 0


def test_capture_off_under_bf16(tmp_path, tokenizer, tiny_model):
    train, queries = addition_data()
    trainer = tiny_trainer(
        tiny_model, tokenizer, tiny_config(tmp_path / "out", max_steps=8, drift_capture_features=False), train, queries
    )
    trainer.train()
    assert trainer.drift_callback.capture is None and trainer.drift_state.num_refreshes == 2
    scored = trainer.drift_state.history[-1]["num_scored"]
    assert scored == 40 and np.isfinite(trainer.drift_state.scores).all()


# ---------------------------------------------------------------------------------------------- drop-in by flags


def test_drift_from_flags_alone(tmp_path, tokenizer, tiny_model):
    train, queries = addition_data()
    queries.to_json(str(tmp_path / "q.jsonl"))
    args = tiny_config(
        tmp_path / "out",
        max_steps=8,
        drift_query_dataset=str(tmp_path / "q.jsonl"),
        drift_reward_funcs=["tests.helpers:digit_start_reward", "exact_match"],
    )
    trainer = tiny_trainer(tiny_model, tokenizer, args, train, reward_funcs=None)
    cb = trainer.drift_callback
    assert cb.query_dataset.to_list() == queries.to_list()
    assert [f.__name__ for f in cb.reward_funcs] == ["digit_start_reward", "exact_match"]
    trainer.train()
    assert trainer.drift_state.num_refreshes == 2
    # objects passed in Python win over the flags (the flag's file is never read)
    args = tiny_config(tmp_path / "out2", drift_query_dataset="missing.jsonl", drift_reward_funcs=["no_such_reward"])
    trainer = tiny_trainer(build_tiny_llama(tokenizer), tokenizer, args, train, queries)
    assert trainer.drift_callback.reward_funcs == [digit_start_reward]


# ---------------------------------------------------------------------------------------------- early errors


def _no_kwargs(prompts, completions):
    return [0.0] * len(completions)


def _wrong_length(prompts, completions, **kwargs):
    return [0.0, 1.0]


def _nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def _reads_missing(prompts, completions, **kwargs):
    return [float(c == r) for c, r in zip(completions, kwargs["solution"])]


BAD_REWARDS = [
    (_no_kwargs, None, r"does not accept the query column 'answer'.*Add \*\*kwargs"),
    (exact_match, ["prompt"], r"'exact_match'.*`answer`"),
    (_wrong_length, None, r"'_wrong_length' returned 2 values for 1 completions"),
    (_nan, None, r"'_nan' returned NaN"),
    (_reads_missing, None, r"KeyError 'solution'.*columns besides `prompt`: \['answer'\]"),
]


@pytest.mark.parametrize("reward,columns,message", BAD_REWARDS, ids=lambda v: getattr(v, "__name__", None))
def test_reward_mistakes_fail_at_construction(tmp_path, tokenizer, tiny_model, reward, columns, message):
    train, queries = addition_data(8)
    if columns is not None:
        queries = queries.select_columns(columns)
    with pytest.raises(RuntimeError, match=message):
        tiny_trainer(tiny_model, tokenizer, tiny_config(tmp_path / "out"), train, queries, reward_funcs=reward)
    from transformers import Trainer

    trainer = Trainer(
        model=tiny_model,
        args=DriftTrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to=[]),
        train_dataset=tokenize_dataset(tokenizer, train),
        processing_class=tokenizer,
    )
    with pytest.raises(RuntimeError, match=message):
        DriftCallback(query_dataset=queries, reward_funcs=reward).attach(trainer)


@pytest.mark.parametrize("kind", ["DataFrame", "list", "dict"])
@pytest.mark.parametrize("method", ["drift", "ica"])
def test_train_sets_that_are_not_datasets_get_sft_trainers_error(tmp_path, tokenizer, tiny_model, kind, method):
    from trl import SFTConfig, SFTTrainer

    train, queries = addition_data(8)
    data = {"DataFrame": train.to_pandas(), "list": train.to_list(), "dict": train.to_dict()}[kind]
    with pytest.raises(TypeError) as plain:
        SFTTrainer(
            model=tiny_model,
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            train_dataset=data,
            processing_class=tokenizer,
        )
    with pytest.raises(TypeError) as drift:
        tiny_trainer(
            tiny_model,
            tokenizer,
            tiny_config(tmp_path / "out", drift_method=method),
            data,
            queries,
            holdout_dataset=addition_dataset(4, seed=4),
        )
    assert str(drift.value).startswith(str(plain.value))  # the same error, plus the conversion to use
    assert "Dataset.from_" in str(drift.value)


# ---------------------------------------------------------------------------------------------- no silent no-op


@pytest.mark.parametrize("value,cause", [(0.0, "every rollout was judged wrong"), (1.0, "already solves")])
def test_refreshes_without_contrast_warn_once_with_the_cause(tmp_path, tokenizer, tiny_model, caplog, value, cause):
    train, queries = addition_data(16)
    steps = 12 if value == 0.0 else 8  # three refreshes in a row warn during training; two, at its end

    def constant(prompts, completions, **kwargs):
        return [value] * len(completions)

    trainer = tiny_trainer(
        tiny_model, tokenizer, tiny_config(tmp_path / "out", max_steps=steps), train, queries, reward_funcs=constant
    )
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "DRIFT has changed no weights" in r.getMessage()]
    assert len(warnings) == 1 and cause in warnings[0], warnings
    assert f"for {steps // 4} refresh(es) in a row" in warnings[0]


def test_query_format_unlike_the_train_format_is_caught_up_front(tmp_path, tokenizer, tiny_model, caplog):
    train, _ = addition_data(8)
    _, chat_queries = addition_data(8, conversational=True)
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        tiny_trainer(tiny_model, tokenizer, tiny_config(tmp_path / "a"), train, chat_queries)
    assert "query prompts are chat messages but the train rows are plain text" in caplog.text
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        tiny_trainer(tiny_model, no_template, tiny_config(tmp_path / "b"), train, chat_queries)
    caplog.clear()
    _, plain_queries = addition_data(8)
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        tiny_trainer(tiny_model, tokenizer, tiny_config(tmp_path / "c"), train, plain_queries)
    assert "query prompts are" not in caplog.text
    assert isinstance(plain_queries, Dataset)
