"""Checkpoint and resume; scoring without reweighting leaves training exactly as plain SFT."""

import os
import shutil

import numpy as np

from drift_trainer import DriftSFTTrainer
from drift_trainer.cli.toy import Corruption, addition_dataset, build_tiny_llama, query_dataset_from
from drift_trainer.core.sampler import DriftSampler

from .conftest import digit_start_reward, tiny_config


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
    train = addition_dataset(27, seed=0, corruption=Corruption("random", 0.3))
    return DriftSFTTrainer(
        model=build_tiny_llama(tokenizer, seed=0),
        args=tiny_config(tmp_dir, **base),
        train_dataset=train,
        query_dataset=query_dataset_from(addition_dataset(6, seed=1)),
        reward_funcs=digit_start_reward,
        processing_class=tokenizer,
    )


def _record(monkeypatch):
    drawn = []
    original = DriftSampler.__iter__

    def recording(self):
        for i in original(self):
            drawn.append(i)
            yield i

    monkeypatch.setattr(DriftSampler, "__iter__", recording)
    return drawn


def test_resumed_run_draws_the_same_stream_as_an_unbroken_one(tmp_path, tokenizer, monkeypatch):
    drawn = _record(monkeypatch)
    unbroken = _trainer(tmp_path / "a", tokenizer)
    unbroken.train()
    full = list(drawn)
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / "drift_state.json").exists() and (ckpt / "drift_sampler.json").exists()
    # a run stopped at step 4 (after the refresh at step 3), resumed from its checkpoint
    os.makedirs(tmp_path / "b")
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoint-4")
    drawn.clear()
    resumed = _trainer(tmp_path / "b", tokenizer)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.drift_state.num_refreshes == unbroken.drift_state.num_refreshes == 3
    assert drawn == full  # the replayed prefix and every draw after it
    np.testing.assert_array_equal(resumed.drift_state.weights, unbroken.drift_state.weights)
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
