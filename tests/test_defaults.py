"""Where TRL users stand: TRL's defaults (bf16 autocast, gradient checkpointing), an eval set, DRIFT from flags alone,
input mistakes caught at construction, and no silent no-op."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset, DatasetDict

from drift_trainer import DriftCallback, DriftSFTTrainer, DriftTrainingArguments, exact_match
from drift_trainer.cli.datafiles import load_dataset_from
from drift_trainer.cli.toy import Corruption, addition_dataset, build_tiny_llama, query_dataset_from
from drift_trainer.core.features import ProjectedGradients, collate_right, select_target_modules

from .conftest import digit_start_reward, tiny_config

TRL_METRICS = {"entropy", "mean_token_accuracy", "num_tokens"}


def _data(n=40, conversational=False):
    train = addition_dataset(n, seed=0, corruption=Corruption("random", 0.3), conversational=conversational)
    queries = query_dataset_from(addition_dataset(8, seed=1, conversational=conversational))
    return train, queries


def _tokenize(tokenizer, dataset):
    def tok(row):
        p = tokenizer(row["prompt"])["input_ids"]
        c = tokenizer(row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": p + c, "labels": [-100] * len(p) + c, "attention_mask": [1] * (len(p) + len(c))}

    return dataset.map(tok, remove_columns=dataset.column_names)


# ---------------------------------------------------------------------------------------------- TRL's defaults


@pytest.mark.parametrize("mode", ["sampler", "loss"])
def test_trl_defaults_with_an_eval_set(tmp_path, tokenizer, tiny_model, mode):
    train, queries = _data()
    args = tiny_config(tmp_path / "out", eval_strategy="steps", eval_steps=4, logging_steps=2, drift_reweight_mode=mode)
    assert args.bf16 and args.gradient_checkpointing and args.drift_capture_features  # TRL's and DRIFT's defaults
    trainer = DriftSFTTrainer(
        model=tiny_model,
        args=args,
        train_dataset=train,
        eval_dataset=addition_dataset(8, seed=5),
        query_dataset=queries,
        reward_funcs=digit_start_reward,
        processing_class=tokenizer,
    )
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
    train, queries = _data()
    trainer = DriftSFTTrainer(
        model=tiny_model,
        args=tiny_config(tmp_path / "out", max_steps=8, drift_capture_features=False),
        train_dataset=train,
        query_dataset=queries,
        reward_funcs=digit_start_reward,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.drift_callback.capture is None and trainer.drift_state.num_refreshes == 2
    scored = trainer.drift_state.history[-1]["num_scored"]
    assert scored == 40 and np.isfinite(trainer.drift_state.scores).all()


def test_plain_trainer_and_callback_under_bf16_with_an_eval_set(tmp_path, tokenizer, tiny_model):
    from transformers import DataCollatorForSeq2Seq, Trainer

    train, queries = _data()
    args = DriftTrainingArguments(
        output_dir=str(tmp_path / "plain"),
        bf16=True,
        use_cpu=True,
        max_steps=8,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=4,
        report_to=[],
        save_strategy="no",
        drift_refresh_steps=4,
        drift_num_queries=4,
        drift_max_new_tokens=4,
        drift_progress=False,
    )
    trainer = Trainer(
        model=tiny_model,
        args=args,
        train_dataset=_tokenize(tokenizer, train),
        eval_dataset=_tokenize(tokenizer, addition_dataset(8, seed=5)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    cb = DriftCallback(query_dataset=queries, reward_funcs=digit_start_reward).attach(trainer)
    trainer.train()
    assert cb.drift_state.num_refreshes == 2 and np.isfinite(cb.drift_state.scores).all()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [4, 8]


def test_feature_pass_inside_an_autocast_forward_is_float32_and_close_to_fp32(tokenizer):
    """accelerate wraps a mixed-precision model's forward in autocast, and leaves it wrapped after training: the
    projections inside the forward hooks then run under autocast, the products after it do not."""
    train, _ = _data(8)
    rows = [r for r in _tokenize(tokenizer, train)]
    batch = collate_right(rows, tokenizer.pad_token_id)
    model = build_tiny_llama(tokenizer, seed=0).eval()
    projector = ProjectedGradients(select_target_modules(model), projection_dim=8, seed=0)
    fp32 = projector.compute(model, batch).features
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    mixed = projector.compute(model, batch).features
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    rel = (mixed - fp32).norm(dim=1) / fp32.norm(dim=1)
    assert rel.max() < 2e-2, rel  # bf16 rounding of the forward itself; measured 0.2-0.6%


# ---------------------------------------------------------------------------------------------- drop-in by flags


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk", "disk-dict"])
def test_query_dataset_from_every_local_format(tmp_path, fmt):
    queries = query_dataset_from(addition_dataset(6, seed=1))
    path = str(tmp_path / f"q.{fmt}")
    if fmt == "jsonl":
        queries.to_json(path)
    elif fmt == "json":  # one JSON array
        pd.DataFrame(queries.to_list()).to_json(path, orient="records")
    elif fmt == "parquet":
        queries.to_parquet(path)
    elif fmt == "disk":
        queries.save_to_disk(path)
    else:
        DatasetDict({"validation": queries, "train": queries.select(range(2))}).save_to_disk(path)
    loaded = load_dataset_from(path, split="validation", what="drift_query_dataset")
    assert loaded.to_list() == queries.to_list()


def test_query_dataset_errors_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="drift_query_dataset: file not found"):
        load_dataset_from(str(tmp_path / "missing.jsonl"), what="drift_query_dataset")
    DatasetDict({"train": query_dataset_from(addition_dataset(2, seed=1))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train'\]\)"):
        load_dataset_from(str(tmp_path / "dd"), split="test", what="drift_query_dataset")
    with pytest.raises(ValueError, match="drift_query_dataset: 'no-such-org/no-such-set' is neither"):
        load_dataset_from("no-such-org/no-such-set", what="drift_query_dataset")  # offline: no hub


def test_drift_from_flags_alone(tmp_path, tokenizer, tiny_model):
    train, queries = _data()
    queries.to_json(str(tmp_path / "q.jsonl"))
    args = tiny_config(
        tmp_path / "out",
        max_steps=8,
        drift_query_dataset=str(tmp_path / "q.jsonl"),
        drift_reward_funcs=["tests.conftest:digit_start_reward", "exact_match"],
    )
    trainer = DriftSFTTrainer(model=tiny_model, args=args, train_dataset=train, processing_class=tokenizer)
    cb = trainer.drift_callback
    assert cb.query_dataset.to_list() == queries.to_list()
    assert [f.__name__ for f in cb.reward_funcs] == ["digit_start_reward", "exact_match"]
    trainer.train()
    assert trainer.drift_state.num_refreshes == 2
    # objects passed in Python win over the flags (the flag's file is never read)
    args = tiny_config(tmp_path / "out2", drift_query_dataset="missing.jsonl", drift_reward_funcs=["no_such_reward"])
    trainer = DriftSFTTrainer(
        model=build_tiny_llama(tokenizer),
        args=args,
        train_dataset=train,
        query_dataset=queries,
        reward_funcs=digit_start_reward,
        processing_class=tokenizer,
    )
    assert trainer.drift_callback.reward_funcs == [digit_start_reward]


def test_drift_trainer_sft_command(tmp_path, tokenizer, capsys):
    """`drift-trainer sft` is TRL's SFT script with DRIFT: its arguments, its main, DRIFT's flags."""
    import trl

    from drift_trainer.cli import main

    model_dir = tmp_path / "model"
    build_tiny_llama(tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    train, queries = _data()
    (tmp_path / "data").mkdir()
    train.to_json(str(tmp_path / "data" / "train.jsonl"))
    addition_dataset(8, seed=5).to_json(str(tmp_path / "data" / "test.jsonl"))
    queries.to_json(str(tmp_path / "q.jsonl"))
    sft_trainer = trl.SFTTrainer
    argv = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "2",
            "--report_to", "none", "--save_strategy", "no", "--drift_refresh_steps", "2",
            "--drift_query_dataset", str(tmp_path / "q.jsonl"), "--drift_reward_funcs", "exact_match",
            "--drift_max_new_tokens", "4", "--drift_progress", "false"]  # fmt: skip
    assert main(argv) == 0
    assert trl.SFTTrainer is sft_trainer  # the swap is undone
    assert "Training completed" in capsys.readouterr().out
    refreshes = sorted(p.name for p in (tmp_path / "out" / "drift").iterdir() if p.name.startswith("refresh-"))
    assert refreshes == ["refresh-000002", "refresh-000004"]
    assert (tmp_path / "out" / "model.safetensors").exists()


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
    train, queries = _data(8)
    if columns is not None:
        queries = queries.select_columns(columns)
    with pytest.raises(RuntimeError, match=message):
        DriftSFTTrainer(
            model=tiny_model,
            args=tiny_config(tmp_path / "out"),
            train_dataset=train,
            query_dataset=queries,
            reward_funcs=reward,
            processing_class=tokenizer,
        )
    from transformers import Trainer

    trainer = Trainer(
        model=tiny_model,
        args=DriftTrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to=[]),
        train_dataset=_tokenize(tokenizer, train),
        processing_class=tokenizer,
    )
    with pytest.raises(RuntimeError, match=message):
        DriftCallback(query_dataset=queries, reward_funcs=reward).attach(trainer)


@pytest.mark.parametrize("kind", ["DataFrame", "list", "dict"])
@pytest.mark.parametrize("method", ["drift", "ica"])
def test_train_sets_that_are_not_datasets_get_sft_trainers_error(tmp_path, tokenizer, tiny_model, kind, method):
    from trl import SFTConfig, SFTTrainer

    train, queries = _data(8)
    data = {"DataFrame": train.to_pandas(), "list": train.to_list(), "dict": train.to_dict()}[kind]
    with pytest.raises(TypeError) as plain:
        SFTTrainer(
            model=tiny_model,
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            train_dataset=data,
            processing_class=tokenizer,
        )
    with pytest.raises(TypeError) as drift:
        DriftSFTTrainer(
            model=tiny_model,
            args=tiny_config(tmp_path / "out", drift_method=method),
            train_dataset=data,
            query_dataset=queries,
            reward_funcs=digit_start_reward,
            holdout_dataset=addition_dataset(4, seed=4),
            processing_class=tokenizer,
        )
    assert str(drift.value).startswith(str(plain.value))  # the same error, plus the conversion to use
    assert "Dataset.from_" in str(drift.value)


# ---------------------------------------------------------------------------------------------- no silent no-op


@pytest.mark.parametrize("value,cause", [(0.0, "every rollout was judged wrong"), (1.0, "already solves")])
def test_refreshes_without_contrast_warn_once_with_the_cause(tmp_path, tokenizer, tiny_model, caplog, value, cause):
    train, queries = _data(16)
    steps = 12 if value == 0.0 else 8  # three refreshes in a row warn during training; two, at its end

    def constant(prompts, completions, **kwargs):
        return [value] * len(completions)

    trainer = DriftSFTTrainer(
        model=tiny_model,
        args=tiny_config(tmp_path / "out", max_steps=steps),
        train_dataset=train,
        query_dataset=queries,
        reward_funcs=constant,
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "DRIFT has changed no weights" in r.getMessage()]
    assert len(warnings) == 1 and cause in warnings[0], warnings
    assert f"for {steps // 4} refresh(es) in a row" in warnings[0]


def test_query_format_unlike_the_train_format_is_caught_up_front(tmp_path, tokenizer, tiny_model, caplog):
    train, _ = _data(8)
    _, chat_queries = _data(8, conversational=True)
    kwargs = dict(model=tiny_model, train_dataset=train, reward_funcs=digit_start_reward)
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        DriftSFTTrainer(
            args=tiny_config(tmp_path / "a"), query_dataset=chat_queries, processing_class=tokenizer, **kwargs
        )
    assert "query prompts are chat messages but the train rows are plain text" in caplog.text
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        DriftSFTTrainer(
            args=tiny_config(tmp_path / "b"), query_dataset=chat_queries, processing_class=no_template, **kwargs
        )
    caplog.clear()
    _, plain_queries = _data(8)
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        DriftSFTTrainer(
            args=tiny_config(tmp_path / "c"), query_dataset=plain_queries, processing_class=tokenizer, **kwargs
        )
    assert "query prompts are" not in caplog.text
    assert isinstance(plain_queries, Dataset)
