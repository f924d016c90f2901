"""DriftCallback: on a plain ``transformers.Trainer`` (also under bf16 with an eval set), the error when it is not
attached, and its checkpoints: a resumed run draws the same stream; scoring without reweighting trains exactly like
plain SFT."""

import os
import shutil

import numpy as np
import pytest

from drift_trainer import DriftCallback, DriftTrainingArguments, exact_match
from drift_trainer.cli.toy import addition_dataset, build_tiny_llama
from drift_trainer.core.sampler import DriftSampler
from tests.helpers import (
    addition_data,
    digit_start_reward,
    tiny_config,
    tiny_trainer,
    tiny_training_args,
    tokenize_dataset,
)

# ---------------------------------------------------------------------------------------------- on a plain Trainer


def test_plain_trainer_with_callback(tmp_path, tokenizer, tiny_model):
    from transformers import DataCollatorForSeq2Seq, Trainer

    train, queries = addition_data()
    tokenized = tokenize_dataset(tokenizer, train)
    args = tiny_training_args(tmp_path / "plain", learning_rate=3e-3)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    bare = Trainer(model=tiny_model, args=args, train_dataset=tokenized, data_collator=collator)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        DriftCallback(query_dataset=queries, reward_funcs=digit_start_reward).attach(bare)
    trainer = Trainer(
        model=tiny_model, args=args, train_dataset=tokenized, data_collator=collator, processing_class=tokenizer
    )
    cb = DriftCallback(query_dataset=queries, reward_funcs=digit_start_reward).attach(trainer)
    assert cb in trainer.callback_handler.callbacks
    trainer.train()
    assert cb.drift_state.num_refreshes == 2
    assert cb.sampler is not None and cb.sampler.version >= 1
    assert os.path.exists(tmp_path / "plain" / "drift" / "refresh-000008" / "scores.parquet")
    assert any("drift/rollout_accuracy" in h for h in trainer.state.log_history)


def test_unattached_callback_says_how_to_attach(tmp_path, tokenizer, tiny_model):
    from transformers import Trainer

    train, queries = addition_data(8)
    tokenized = train.map(
        lambda r: {"input_ids": tokenizer(r["prompt"])["input_ids"]}, remove_columns=train.column_names
    )
    args = DriftTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny_model, args=args, train_dataset=tokenized)
    trainer.add_callback(DriftCallback(query_dataset=queries, reward_funcs=exact_match))
    with pytest.raises(RuntimeError, match=r"\.attach\(trainer\)"):
        trainer.train()


def test_plain_trainer_and_callback_under_bf16_with_an_eval_set(tmp_path, tokenizer, tiny_model):
    from transformers import DataCollatorForSeq2Seq, Trainer

    train, queries = addition_data()
    args = tiny_training_args(tmp_path / "plain", bf16=True, eval_strategy="steps", eval_steps=4)
    trainer = Trainer(
        model=tiny_model,
        args=args,
        train_dataset=tokenize_dataset(tokenizer, train),
        eval_dataset=tokenize_dataset(tokenizer, addition_dataset(8, seed=5)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    cb = DriftCallback(query_dataset=queries, reward_funcs=digit_start_reward).attach(trainer)
    trainer.train()
    assert cb.drift_state.num_refreshes == 2 and np.isfinite(cb.drift_state.scores).all()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [4, 8]


# ---------------------------------------------------------------------------------------------- checkpoints


def _trainer(tmp_dir, tokenizer, **kw):
    base = dict(
        max_steps=10,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=4,
        seed=0,
        drift_refresh_steps=3,
        drift_num_queries=3,
        drift_num_rollouts=4,
        drift_score_ema=0.5,
    )
    base.update(kw)
    model = build_tiny_llama(tokenizer, seed=0)
    return tiny_trainer(model, tokenizer, tiny_config(tmp_dir, **base), *addition_data(27, num_queries=6))


def _record(monkeypatch):
    drawn = []
    original = DriftSampler.__iter__

    def recording(self):
        for i in original(self):
            drawn.append(i)
            yield i

    monkeypatch.setattr(DriftSampler, "__iter__", recording)
    return drawn


@pytest.mark.parametrize(
    "options",
    [{}, {"drift_target_ema": 0.5, "drift_reliability_shrink": True, "drift_loss_mix": 1.0}],
    ids=["defaults", "stable_target"],
)
def test_resumed_run_draws_the_same_stream_as_an_unbroken_one(tmp_path, tokenizer, monkeypatch, options):
    drawn = _record(monkeypatch)
    unbroken = _trainer(tmp_path / "a", tokenizer, **options)
    unbroken.train()
    full = list(drawn)
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / "drift_state.json").exists() and (ckpt / "drift_sampler.json").exists()
    # a run stopped at step 4 (after the refresh at step 3), resumed from its checkpoint
    os.makedirs(tmp_path / "b")
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoint-4")
    drawn.clear()
    resumed = _trainer(tmp_path / "b", tokenizer, **options)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.drift_state.num_refreshes == unbroken.drift_state.num_refreshes == 3
    assert drawn == full  # the replayed prefix and every draw after it
    np.testing.assert_array_equal(resumed.drift_state.weights, unbroken.drift_state.weights)
    if options:  # the smoothed target is part of the state a resume restores
        assert np.linalg.norm(resumed.drift_state.target) > 0
        np.testing.assert_array_equal(resumed.drift_state.target, unbroken.drift_state.target)
    losses = [h["loss"] for h in unbroken.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    np.testing.assert_allclose(resumed_losses[-6:], losses[-6:], rtol=1e-6)


def test_scoring_without_reweighting_trains_exactly_like_plain_sft(tmp_path, tokenizer):
    drift = _trainer(tmp_path / "d", tokenizer, drift_uniform_mix=1.0, save_strategy="no", drift_refresh_steps=2)
    drift.train()
    plain = _trainer(tmp_path / "p", tokenizer, drift_enabled=False, save_strategy="no")
    plain.train()
    assert drift.drift_state.num_refreshes == 5
    curve = [h["loss"] for h in drift.state.log_history if "loss" in h]
    assert len(curve) == 10
    np.testing.assert_allclose(curve, [h["loss"] for h in plain.state.log_history if "loss" in h], rtol=1e-6)


def test_adam_preconditioner_reads_the_optimizer_state(tmp_path, tokenizer):
    adam = _trainer(tmp_path / "adam", tokenizer, drift_preconditioner="adam", save_strategy="no", max_steps=6)
    adam.train()
    plain = _trainer(tmp_path / "id", tokenizer, save_strategy="no", max_steps=6)
    plain.train()
    assert adam.drift_state.num_refreshes == plain.drift_state.num_refreshes == 2
    first_adam, first_plain = adam.drift_state.history[0], plain.drift_state.history[0]
    assert first_adam["contrast"] and first_plain["contrast"]
    assert np.isfinite(adam.drift_state.scores).all()
    # same model, data and rollouts up to the first refresh; the Adam-preconditioned target scores differently
    assert not np.allclose(adam.drift_state.scores, plain.drift_state.scores)


def test_adam_preconditioner_is_refused_under_deepspeed(tmp_path, tokenizer, tiny_model):
    from transformers import DataCollatorForSeq2Seq, Trainer

    train, queries = addition_data()
    trainer = Trainer(
        model=tiny_model,
        args=tiny_training_args(tmp_path / "ds", drift_preconditioner="adam"),
        train_dataset=tokenize_dataset(tokenizer, train),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    trainer.is_deepspeed_enabled = True  # what Trainer sets under a DeepSpeed config
    with pytest.raises(ValueError, match="drift_preconditioner='adam' .* DeepSpeed"):
        DriftCallback(query_dataset=queries, reward_funcs=digit_start_reward).attach(trainer)


def test_reference_bound_needs_the_queries_answer_column_before_training():
    from drift_trainer import DriftArguments
    from drift_trainer.cli.toy import query_dataset_from

    queries = query_dataset_from(addition_dataset(4, seed=1))
    args = DriftArguments(drift_reference_bound=True)
    DriftCallback(queries, exact_match).validate(args, addition_dataset(8, seed=0))
    with pytest.raises(ValueError, match="drift_reference_bound=True compares .*no `answer` column"):
        DriftCallback(queries.remove_columns("answer"), exact_match).validate(args, addition_dataset(8, seed=0))
