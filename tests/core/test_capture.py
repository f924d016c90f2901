"""Features captured in the training backward (``drift_capture_features``) and the stale-row budget."""

import logging
import os

import numpy as np
import pytest

from drift_trainer.core.capture import FeatureCache, rescore_budget, stale_order
from drift_trainer.core.feature_pass import FeaturePass
from drift_trainer.core.features import ProjectedGradients, select_target_modules
from tests.helpers import addition_data, drift_args, tiny_config, tiny_trainer


def _trainer(tmp_path, tokenizer, model, n=40, peft_config=None, **overrides):
    kwargs = {"peft_config": peft_config} if peft_config is not None else {}
    return tiny_trainer(model, tokenizer, tiny_config(tmp_path / "out", **overrides), *addition_data(n), **kwargs)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights="gaussian")


# Exactness to float32 rounding needs a float32 forward, so these cases turn bf16 autocast off (the subject is the
# capture's arithmetic); the `bf16` case runs TRL's default autocast and is held to the bf16 tolerance instead.
FP32 = {"bf16": False}


@pytest.mark.parametrize(
    "overrides,lora,tol",
    [
        (FP32, False, 1e-4),
        # the loss scale includes 1/num_items over both micro-batches; reentrant checkpointing recomputes the forward
        # inside the backward, where the hooks must still see it
        (
            {
                **FP32,
                "gradient_accumulation_steps": 2,
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            },
            False,
            1e-4,
        ),
        # per-example loss weights (not all equal after the refresh at step 2) scale each row's gradient
        ({**FP32, "drift_reweight_mode": "loss", "drift_refresh_steps": 2, "drift_uniform_mix": 0.5}, False, 1e-4),
        (FP32, True, 1e-4),
        # TRL's defaults (bf16 autocast, gradient checkpointing): the training forward runs in bf16, the reference
        # feature pass below in float32, so the two differ by bf16 rounding (measured: up to 0.65% per row)
        ({}, False, 2e-2),
    ],
    ids=["plain", "ga2-reentrant-checkpointing", "loss-weights", "lora", "bf16"],
)
def test_captured_features_equal_a_feature_pass(tmp_path, tokenizer, tiny_model, overrides, lora, tol):
    """At learning rate 0 the model never changes, so every captured feature must equal a fresh feature pass."""
    from drift_trainer.cli.toy import build_tiny_llama

    # no refresh within the run, so capture at every step (the window before a refresh is the subject elsewhere)
    opts = {"learning_rate": 0.0, "max_steps": 6, "drift_refresh_steps": 100, "drift_capture_window": None, **overrides}
    trainer = _trainer(tmp_path, tokenizer, tiny_model, peft_config=_lora() if lora else None, **opts)
    trainer.train()
    cb = trainer.drift_callback
    cache = cb.capture.cache
    assert cache.features.dtype == np.float32
    captured = np.flatnonzero(cache.step >= 0)
    assert len(captured) >= 12  # 6 steps x 4 rows, with repeats
    # a float32 reference: the trained model itself when it ran in float32, else a fresh copy of the (unchanged,
    # learning rate 0) weights with the same projection, since accelerate leaves a mixed-precision model's forward
    # wrapped in autocast
    projector, reference = cb.projector, trainer.model
    if overrides.get("bf16") is not False:
        reference = build_tiny_llama(tokenizer, seed=0)
        args = cb.args
        projector = ProjectedGradients(
            select_target_modules(reference, args.drift_target_modules, args.drift_target_layers),
            args.drift_projection_dim,
            args.drift_projection_seed,
        )
        assert projector.names == cb.projector.names
    phi, loss, ntok = FeaturePass(projector, tokenizer.pad_token_id, 8).run(reference, cb.view.fetch(captured))
    got = np.asarray(cache.features[captured])
    assert np.abs(phi).max() > 0
    rel = np.linalg.norm(got - phi, axis=1) / np.linalg.norm(phi, axis=1)
    assert rel.max() < tol, rel.max()
    np.testing.assert_allclose(cache.loss[captured], loss, rtol=tol / 10 if tol < 1e-3 else tol)
    np.testing.assert_array_equal(cache.num_tokens[captured], ntok)
    if lora:
        assert all("lora_" in name for name in cb.projector.names)


def test_refresh_recomputes_only_stale_rows_within_the_budget(tmp_path, tokenizer, tiny_model):
    # the agreement check off (min 0, no check rows): at this toy's learning rate cached features go stale fast
    trainer = _trainer(
        tmp_path,
        tokenizer,
        tiny_model,
        n=200,
        max_steps=8,
        drift_rescore_budget=0.5,
        drift_capture_check_rows=0,
        drift_harm_gate=False,  # this test reads the weights; the gate would hold them at 1 on a random-init model
    )
    trainer.train()
    history = trainer.drift_state.history
    assert [h["step"] for h in history] == [4, 8]
    # 4 steps x 4 rows trained per interval -> ceil(0.5 x 16) = 8 rows recomputed
    assert [h["num_recomputed"] for h in history] == [8, 8]
    assert all(h["capture_agreement"] is None and not h["capture_full_rescoring"] for h in history)
    first, second = history
    assert first["num_scored"] <= 16 + 8  # what was trained plus what was recomputed, nothing else
    assert second["num_scored"] > first["num_scored"]
    # rows never trained nor recomputed keep weight 1 (the examples' previous weight)
    weights = trainer.drift_state.weights
    cache = trainer.drift_callback.capture.cache
    unseen = cache.step < 0
    assert unseen.sum() > 0 and np.all(weights[unseen] == 1.0)
    assert not np.allclose(weights[~unseen], 1.0)


def test_budget_zero_scores_only_trained_rows(tmp_path, tokenizer, tiny_model):
    trainer = _trainer(
        tmp_path, tokenizer, tiny_model, n=200, max_steps=4, drift_rescore_budget=0.0, drift_capture_check_rows=0
    )
    trainer.train()
    (summary,) = trainer.drift_state.history
    cache = trainer.drift_callback.capture.cache
    assert summary["num_recomputed"] == 0
    assert summary["num_scored"] == int((cache.step >= 0).sum()) > 0
    assert "features" in summary["timings"]


@pytest.mark.parametrize("learning_rate", [0.0, 3e-2])
def test_agreement_check_falls_back_to_full_rescoring_when_the_cache_is_stale(
    tmp_path, tokenizer, tiny_model, learning_rate, caplog
):
    # the fallback is opt-in (drift_capture_min_agreement, default 0: never)
    trainer = _trainer(
        tmp_path,
        tokenizer,
        tiny_model,
        n=200,
        max_steps=4,
        learning_rate=learning_rate,
        drift_capture_check_rows=8,
        drift_capture_min_agreement=0.9,
    )
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        trainer.train()
    (summary,) = trainer.drift_state.history
    agreement = summary["capture_agreement"]
    logged = [h["drift/capture_agreement"] for h in trainer.state.log_history if "drift/capture_agreement" in h]
    assert logged == [pytest.approx(agreement)]
    if learning_rate == 0:  # the model never moved: cached features are exact, only the budget is recomputed
        assert agreement == pytest.approx(1.0, abs=1e-5)
        assert not summary["capture_full_rescoring"]
        assert summary["num_recomputed"] == 8 + 2  # the check rows + ceil(0.1 x 16)
    else:  # a large step every update: the cache no longer matches, every row is recomputed
        assert agreement < 0.9
        assert summary["capture_full_rescoring"]
        assert summary["num_recomputed"] == summary["num_scored"] == 200
        assert "no longer agree" in caplog.text and "every row was recomputed" in caplog.text


def test_capture_turns_itself_off_after_two_stale_checks(tmp_path, tokenizer, tiny_model, caplog):
    trainer = _trainer(
        tmp_path,
        tokenizer,
        tiny_model,
        n=200,
        max_steps=12,
        learning_rate=3e-2,
        drift_capture_check_rows=8,
        drift_capture_min_agreement=0.9,
    )
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        trainer.train()
    history = trainer.drift_state.history
    checked = [h for h in history if h["contrast"]]
    assert len(checked) >= 2 and checked[0]["capture_full_rescoring"] and checked[1]["capture_full_rescoring"]
    assert not checked[1]["capture_on"] and trainer.drift_callback.capture.disabled
    assert "feature capture is off for the rest of this run" in caplog.text
    # afterwards: plain full rescoring, no check
    for h in checked[2:]:
        assert h["capture_agreement"] is None and h["num_recomputed"] == 200


def test_stale_cache_costs_a_bounded_refresh_by_default(tmp_path, tokenizer, tiny_model):
    """At a learning rate that makes cached features stale fast, the default never falls back to rescoring every
    row: each refresh recomputes the check sample plus the budget, capture stays on, and the stale rows' scores are
    shrunk by the measured agreement."""
    trainer = _trainer(
        tmp_path, tokenizer, tiny_model, n=200, max_steps=12, learning_rate=3e-2, drift_capture_check_rows=8
    )
    trainer.train()
    history = [h for h in trainer.drift_state.history if h["contrast"]]
    assert len(history) >= 2
    for h in history:
        assert not h["capture_full_rescoring"] and h["capture_on"]
        assert h["num_recomputed"] <= 8 + 2  # the check rows + ceil(0.1 x 16 rows trained), never all 200
    later = history[-1]
    assert later["capture_agreement"] < 0.9  # stale indeed: the old default would have rescored all 200 rows
    assert 0 < later["metrics"]["drift/stale_fraction"] < 1
    assert not trainer.drift_callback.capture.disabled


def test_stale_rows_are_shrunk_by_the_agreement():
    from drift_trainer.core.refresh import RefreshResult, new_weights
    from drift_trainer.core.rollouts import Rollouts

    rng = np.random.default_rng(0)
    n = 50
    scores = rng.normal(size=n)
    stale = np.arange(n) % 2 == 0

    def result(agreement, stale_rows):
        return RefreshResult(
            step=10,
            scores=scores,
            raw_scores=scores,
            grad_norm=np.ones(n),
            loss=np.ones(n),
            scored=np.ones(n, dtype=bool),
            rollouts=Rollouts(),
            signs=np.ones(4),
            contrast=True,
            num_recomputed=5,
            capture_agreement=agreement,
            stale=stale_rows,
        )

    args = drift_args(drift_score_ema=0.0)
    z_fresh, _ = new_weights(result(0.4, None), None, None, args)
    z, weights = new_weights(result(0.4, stale), None, None, args)
    np.testing.assert_allclose(z[stale], 0.4 * z_fresh[stale])
    np.testing.assert_allclose(z[~stale], z_fresh[~stale])
    # a stale row's weight is closer to 1 than it would be from a fresh feature of the same score
    _, w_fresh = new_weights(result(0.4, None), None, None, args)
    assert np.abs(np.log(weights[stale])).mean() < np.abs(np.log(w_fresh[stale])).mean()
    z_exact, _ = new_weights(result(1.0, stale), None, None, args)  # agreement 1: nothing to shrink
    np.testing.assert_allclose(z_exact, z_fresh)


@pytest.mark.parametrize("window,first_captured", [(1.0, 5), (0.5, 10), (None, 0)])
def test_capture_runs_only_in_the_window_before_a_refresh(tmp_path, tokenizer, tiny_model, window, first_captured):
    """40 rows at 4 per step: one epoch is 10 steps, so a window of 1.0 captures the last 10 of the 15 steps before
    the refresh at step 15 (global steps 5..14 at the forward), 0.5 the last 5, None every step."""
    trainer = _trainer(
        tmp_path,
        tokenizer,
        tiny_model,
        n=40,
        max_steps=15,
        drift_refresh_steps=15,
        drift_capture_window=window,
        drift_capture_check_rows=0,
        drift_rescore_budget=0.0,
    )
    trainer.train()
    (summary,) = trainer.drift_state.history
    steps = trainer.drift_callback.capture.cache.step
    captured = steps[steps >= 0]
    assert captured.min() == first_captured and captured.max() == 14
    assert summary["num_scored"] == len(captured)


@pytest.mark.parametrize("option", [{"drift_capture_features": False}, {"drift_max_train_examples": 1000}])
def test_capture_off_rescores_every_row(tmp_path, tokenizer, tiny_model, option):
    trainer = _trainer(tmp_path, tokenizer, tiny_model, max_steps=4, **option)
    trainer.train()
    assert trainer.drift_callback.capture is None
    assert trainer.drift_state.history[0]["num_recomputed"] == 40


def test_a_loss_without_log_probs_falls_back_to_full_rescoring(tmp_path, tokenizer, tiny_model, caplog):
    trainer = _trainer(tmp_path, tokenizer, tiny_model, max_steps=4, label_smoothing_factor=0.1)
    with caplog.at_level(logging.WARNING, logger="drift_trainer"):
        trainer.train()
    assert "cannot capture features" in caplog.text and "label smoothing" in caplog.text
    assert trainer.drift_callback.capture.disabled
    assert trainer.drift_state.history[0]["num_recomputed"] == 40


def test_checkpoint_keeps_the_captured_features(tmp_path, tokenizer, tiny_model):
    from drift_trainer.cli.toy import build_tiny_llama

    opts = dict(max_steps=9, save_strategy="steps", save_steps=6, drift_refresh_steps=3)
    unbroken = _trainer(tmp_path / "a", tokenizer, tiny_model, **opts)
    unbroken.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-6"
    assert os.path.exists(ckpt / "drift_features.npz")
    resumed = _trainer(tmp_path / "a", tokenizer, build_tiny_llama(tokenizer, seed=0), **opts)
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = unbroken.drift_callback.capture.cache, resumed.drift_callback.capture.cache
    np.testing.assert_array_equal(a.step, b.step)
    np.testing.assert_allclose(np.asarray(a.features), np.asarray(b.features), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(unbroken.drift_state.weights, resumed.drift_state.weights, rtol=1e-6)


def test_stale_order_and_budget():
    steps = np.array([5, -1, 2, -1, 9, 2])
    order = stale_order(steps, seed=0)
    assert sorted(order[:2].tolist()) == [1, 3]  # never captured first
    assert sorted(order[2:4].tolist()) == [2, 5] and order[4] == 0 and order[5] == 4
    assert np.array_equal(order, stale_order(steps, seed=0))  # the same on every rank
    assert rescore_budget(16, 0.1) == 2 and rescore_budget(16, 0.5) == 8 and rescore_budget(16, 0.0) == 0
    assert rescore_budget(0, 1.0) == 0


def test_feature_cache_round_trip_and_mismatch():
    cache = FeatureCache(5, 4)
    cache.put(np.array([1, 3]), np.ones((2, 4), np.float32), np.array([0.5, 0.7]), np.array([3, 4]), step=7)
    other = FeatureCache(5, 4)
    other.load_arrays(cache.state_arrays())
    np.testing.assert_array_equal(other.step, [-1, 7, -1, 7, -1])
    np.testing.assert_array_equal(np.asarray(other.features), np.asarray(cache.features))
    with pytest.raises(ValueError, match="drift_features.npz"):
        FeatureCache(2, 4).load_arrays(cache.state_arrays())


def test_rescore_budget_is_validated(tmp_path):
    with pytest.raises(ValueError, match="drift_rescore_budget"):
        tiny_config(tmp_path, drift_rescore_budget=-0.5)
    with pytest.raises(ValueError, match="drift_capture_min_agreement"):
        tiny_config(tmp_path, drift_capture_min_agreement=1.5)
    with pytest.raises(ValueError, match="drift_capture_check_rows"):
        tiny_config(tmp_path, drift_capture_check_rows=-1)
    with pytest.raises(ValueError, match="drift_capture_window"):
        tiny_config(tmp_path, drift_capture_window=0.0)
