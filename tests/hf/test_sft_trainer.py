"""End to end: DriftSFTTrainer, PEFT, loss mode, no contrast, masked rows, and the bad-input errors."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset, IterableDataset

from drift_trainer import DriftSFTTrainer, exact_match
from tests.helpers import addition_data, tiny_config, tiny_trainer

SCORE_COLUMNS = {"index", "score", "weight", "grad_norm"}
METRICS = {
    "drift/rollout_accuracy",
    "drift/reward_mean",
    "drift/ess",
    "drift/frac_positive",
    "drift/weight_max",
    "drift/refresh_seconds",
}


def _config(tmp_path, **kw):
    return tiny_config(tmp_path / "out", **kw)


@pytest.mark.parametrize("conversational", [False, True])
def test_sft_trainer_end_to_end(tmp_path, tokenizer, tiny_model, conversational, monkeypatch):
    from drift_trainer.core.sampler import DriftSampler

    calls = []  # (epoch being drawn or None, draw position) at each weight update
    original_update = DriftSampler.update

    def recording_update(self, weights):
        calls.append((self._iterating, self._position))
        return original_update(self, weights)

    monkeypatch.setattr(DriftSampler, "update", recording_update)
    train, queries = addition_data(conversational=conversational)
    # the weights must move for this test to see them reach the sampler; the harm gate (on by default) would hold
    # them at 1, since a random-init model shows no harm (test_harm_gate_* cover it)
    trainer = tiny_trainer(tiny_model, tokenizer, _config(tmp_path, drift_harm_gate=False), train, queries)
    trainer.train()
    state = trainer.drift_state
    assert state.num_refreshes == 3 and state.step == 12
    assert state.weights.shape == (len(train),) and abs(state.weights.mean() - 1) < 1e-6
    assert not np.allclose(state.weights, 1.0)
    # weights reached the sampler while an epoch was being drawn (40 rows / batch 4 = 10 steps per epoch)
    assert any(epoch is not None and 0 < pos < len(train) - 1 for epoch, pos in calls)
    assert len(calls) == 3
    np.testing.assert_allclose(trainer.drift_callback.sampler.weights, state.weights)
    refreshes = sorted(d for d in os.listdir(tmp_path / "out" / "drift") if d.startswith("refresh-"))
    assert refreshes == ["refresh-000004", "refresh-000008", "refresh-000012"]
    last = tmp_path / "out" / "drift" / refreshes[-1]
    frame = pd.read_parquet(last / "scores.parquet")
    assert SCORE_COLUMNS <= set(frame.columns) and len(frame) == len(train)
    np.testing.assert_allclose(frame["weight"], state.weights)
    rollouts = [json.loads(line) for line in open(last / "rollouts.jsonl")]
    assert len(rollouts) == 16 and {"query", "completion", "reward", "sign"} <= set(rollouts[0])
    examples = [json.loads(line) for line in open(tmp_path / "out" / "drift" / "examples.jsonl")]
    assert [e["index"] for e in examples] == list(range(len(train)))
    first = train[0]["prompt"] if not conversational else train[0]["prompt"][0]["content"]
    assert first in examples[0]["text"]
    summary = json.loads(open(last / "summary.json").read())
    assert set(summary["timings"]) >= {"rollouts", "rollout_features", "features", "influence", "weights"}
    # a refresh step still logs its training loss
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [4, 8, 12]
    logged = [h for h in trainer.state.log_history if "drift/ess" in h]
    assert len(logged) == 3 and METRICS <= set(logged[0])


def test_peft_lora_features_come_from_lora_modules(tmp_path, tokenizer, tiny_model):
    from peft import LoraConfig

    train, queries = addition_data(24)
    trainer = tiny_trainer(
        tiny_model,
        tokenizer,
        _config(tmp_path, max_steps=4, learning_rate=1e-2, gradient_checkpointing=True),
        train,
        queries,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    assert trainer.model.is_activation_checkpointing  # still on after the refresh's feature pass
    names = trainer.drift_callback.projector.names
    assert names and all("lora_" in n for n in names)
    assert trainer.drift_state.num_refreshes == 1
    assert np.abs(trainer.drift_state.scores).sum() > 0


def test_loss_mode_scales_per_example_losses(tmp_path, tokenizer, tiny_model):
    train, queries = addition_data(24)
    trainer = tiny_trainer(
        tiny_model,
        tokenizer,
        _config(tmp_path, max_steps=8, drift_reweight_mode="loss", drift_harm_gate=False),  # weights must move
        train,
        queries,
    )
    assert trainer.drift_callback.sampler is None
    trainer.train()
    weights = trainer.drift_callback.loss_weights
    assert weights is not None and not np.allclose(weights, 1.0)
    # the weighted loss equals the unweighted one with each row's tokens scaled by its weight
    import torch

    batch = trainer.data_collator(
        [trainer.train_dataset.select_columns(["input_ids", "labels", "drift_index"])[i] for i in range(4)]
    )
    trainer.model.train()
    weighted = trainer.compute_loss(trainer.model, dict(batch))
    trainer.drift_callback.loss_weights = np.ones_like(weights)
    plain = trainer.compute_loss(trainer.model, dict(batch))
    trainer.drift_callback.loss_weights = weights
    assert not torch.isclose(weighted, plain)


def test_drift_disabled_is_plain_sft(tmp_path, tokenizer, tiny_model):
    train, _ = addition_data(16)
    trainer = tiny_trainer(
        tiny_model, tokenizer, _config(tmp_path, drift_enabled=False, max_steps=4), train, reward_funcs=None
    )
    from torch.utils.data import RandomSampler

    assert isinstance(trainer._get_train_sampler(), RandomSampler)
    trainer.train()
    assert trainer.drift_state.num_refreshes == 0
    assert not os.path.exists(tmp_path / "out" / "drift")


def test_no_contrast_keeps_previous_weights_and_says_why(tmp_path, tokenizer, tiny_model, caplog):
    train, queries = addition_data(16)
    trainer = tiny_trainer(
        tiny_model,
        tokenizer,
        _config(tmp_path, max_steps=4),
        train,
        queries,
        reward_funcs=lambda prompts, completions, **kw: [1.0] * len(completions),
    )
    with caplog.at_level("WARNING", logger="drift_trainer"):
        trainer.train()
    assert "no contrast" in caplog.text
    assert np.allclose(trainer.drift_state.weights, 1.0)
    summary = trainer.drift_state.history[-1]
    assert summary["contrast"] is False and "no contrast" in summary["reason"]
    assert "features" not in summary["timings"]  # nothing to attribute towards: the feature pass is skipped
    assert trainer.drift_callback.sampler.version == 0


def test_fully_masked_examples_score_zero_and_are_counted(tmp_path, tokenizer, tiny_model):
    train, queries = addition_data(20)
    # rows whose completion is cut away by max_length: SFTTrainer drops them; they must keep weight 1 and score 0
    rows = train.to_list()
    for i in (2, 5):
        rows[i]["prompt"] = "1" * 40 + "+1="
    train = Dataset.from_list(rows)
    trainer = tiny_trainer(tiny_model, tokenizer, _config(tmp_path, max_steps=4, max_length=30), train, queries)
    trainer.train()
    state = trainer.drift_state
    assert state.scores.shape == (20,)
    assert state.scores[2] == 0 and state.scores[5] == 0
    assert state.weights[2] == 1.0 and state.weights[5] == 1.0
    assert state.history[-1]["num_masked"] == 2


def test_bad_inputs_fail_before_training(tmp_path, tokenizer, tiny_model):
    train, queries = addition_data(8)
    kwargs = dict(model=tiny_model, args=_config(tmp_path), train_dataset=train, processing_class=tokenizer)
    with pytest.raises(ValueError, match="no query_dataset"):
        DriftSFTTrainer(**kwargs, reward_funcs=exact_match)
    with pytest.raises(ValueError, match="no reward function"):
        DriftSFTTrainer(**kwargs, query_dataset=queries)
    with pytest.raises(ValueError, match="no `prompt` column"):
        DriftSFTTrainer(**kwargs, query_dataset=queries.rename_column("prompt", "q"), reward_funcs=exact_match)
    streaming = IterableDataset.from_generator(lambda: iter(train.to_list()))
    with pytest.raises(ValueError, match="IterableDataset"):
        DriftSFTTrainer(**{**kwargs, "train_dataset": streaming}, query_dataset=queries, reward_funcs=exact_match)
    with pytest.raises(ValueError, match="packing=False"):
        DriftSFTTrainer(
            **{**kwargs, "args": _config(tmp_path, packing=True)}, query_dataset=queries, reward_funcs=exact_match
        )


def test_reward_errors_surface_with_the_function_name(tmp_path, tokenizer, tiny_model):
    train, queries = addition_data(8)

    def broken_reward(prompts, completions, **kw):
        return [float("nan")] * len(completions)

    # found at construction (each reward is called once on a query row), not after the warm-up steps
    with pytest.raises(RuntimeError, match="'broken_reward' returned NaN"):
        tiny_trainer(tiny_model, tokenizer, _config(tmp_path, max_steps=4), train, queries, reward_funcs=broken_reward)


def test_harm_gate_trains_on_plain_sfts_batches_until_it_finds_harm(tmp_path, tokenizer):
    from drift_trainer.cli.toy import addition_dataset, build_tiny_llama, query_dataset_from

    train = addition_dataset(16, seed=0)  # clean rows
    queries = query_dataset_from(addition_dataset(8, seed=1))

    def losses(**kw):
        model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
        trainer = tiny_trainer(
            model, tokenizer, _config(tmp_path / str(len(kw)), max_steps=8, logging_steps=1, **kw), train, queries
        )
        trainer.train()
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    gated, gated_losses = losses(drift_harm_gate=True, drift_harm_alpha=1e-9)  # a gate that cannot open
    state = gated.drift_state
    assert state.num_refreshes >= 2 and state.harm_step is None
    assert set(state.start_accuracy) <= set(range(len(queries))) and len(state.start_accuracy) > 0
    assert all("drift/harm_p_loss" in h["metrics"] for h in state.history)
    assert all(v is None for v in gated.drift_callback.sampler.versions)  # the weights never left uniform
    _, plain_losses = losses(drift_enabled=False)
    assert gated_losses == plain_losses  # the same batches as plain SFT, step for step
