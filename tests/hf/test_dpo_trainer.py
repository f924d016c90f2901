"""DriftDPOTrainer: scorers, band selection, weighted per-pair losses, and `uniform` = plain TRL DPO."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from drift_trainer import DriftConfig
from drift_trainer.methods.lossdiff import band_mask
from tests.helpers import cpu_args, digit_start_reward, preference_pairs as pairs


def make_args(tmp_path, **kw):
    from drift_trainer import DriftDPOConfig

    base = cpu_args(
        tmp_path,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        logging_steps=1,
        disable_tqdm=True,
        learning_rate=1e-3,
        drift_progress=False,
    )
    base.update(kw)
    return DriftDPOConfig(**base)


def make_trainer(tokenizer, model, args, n=16, **kw):
    from drift_trainer import DriftDPOTrainer

    return DriftDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=pairs(n, 0),
        processing_class=tokenizer,
        **kw,
    )


def test_uniform_is_plain_dpo(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from drift_trainer.cli.toy import build_tiny_llama

    losses = []
    for cls in ("plain", "drift"):
        model = build_tiny_llama(tokenizer, seed=0)
        common = cpu_args(
            tmp_path / cls,
            max_steps=3,
            per_device_train_batch_size=4,
            logging_steps=1,
            learning_rate=1e-2,
            disable_tqdm=True,
        )
        if cls == "plain":
            tr = DPOTrainer(
                model=model,
                ref_model=copy.deepcopy(model),
                args=DPOConfig(**common),
                train_dataset=pairs(12, 0),
                processing_class=tokenizer,
            )
        else:
            tr = make_trainer(tokenizer, model, make_args(tmp_path / cls, drift_method="uniform", **common), n=12)
        tr.train()
        losses.append([h["loss"] for h in tr.state.log_history if "loss" in h])
    assert len(losses[0]) == 3 and losses[0][0] != losses[0][-1]
    assert losses[0] == losses[1]


def test_weighted_pair_loss(tokenizer, tiny_model, tmp_path):
    from trl import DPOTrainer

    tr = make_trainer(
        tokenizer, tiny_model, make_args(tmp_path, drift_method="ica", max_steps=1), holdout_dataset=pairs(4, 9, 0)
    )
    examples = [tr.train_dataset[i] for i in range(4)]
    batch = tr.data_collator(examples)
    plain = {k: v for k, v in batch.items() if k != "drift_index"}
    tr.model.train()
    # all-equal weights: exactly TRL's DPO loss
    tr.pair_scorer.weights = np.full(16, 0.3)
    with torch.no_grad():
        ours = tr.compute_loss(tr.model, dict(batch)).item()
        theirs = DPOTrainer.compute_loss(tr, tr.model, dict(plain)).item()
    assert ours == pytest.approx(theirs, rel=1e-5)
    # a weight on one pair only: the loss (and its gradient) is that pair's alone
    w = np.zeros(16)
    w[int(batch["drift_index"][2])] = 0.7
    tr.pair_scorer.weights = w
    tr.model.zero_grad()
    tr.compute_loss(tr.model, dict(batch)).backward()
    g_weighted = [p.grad.clone() for p in tr.model.parameters() if p.grad is not None]
    tr.model.zero_grad()
    single = tr.data_collator([examples[2]])
    DPOTrainer.compute_loss(tr, tr.model, {k: v for k, v in single.items() if k != "drift_index"}).backward()
    g_single = [p.grad.clone() for p in tr.model.parameters() if p.grad is not None]
    for a, b in zip(g_weighted, g_single):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ica_scorer_weights_in_unit_interval(tokenizer, tiny_model, tmp_path):
    tr = make_trainer(
        tokenizer, tiny_model, make_args(tmp_path, drift_method="ica", max_steps=2), holdout_dataset=pairs(6, 9, 0)
    )
    tr.train()
    w = tr.pair_weights
    assert w.shape == (16,) and w.min() == 0.0 and w.max() == 1.0
    assert np.argmax(w) == np.argmax(tr.pair_scores["score"])
    assert any("drift/batch_weight_mean" in h for h in tr.state.log_history)


def test_lossdiff_irm_selects_middle_bands(tokenizer, tiny_model, tmp_path):
    args = make_args(tmp_path, drift_method="lossdiff_irm", drift_lossdiff_low=25.0, drift_lossdiff_high=75.0)
    tr = make_trainer(tokenizer, tiny_model, args, n=16, validation_dataset=pairs(8, 5, 0))
    tr.train()
    s = tr.pair_scores
    expected = band_mask(s["lossdiff"], 25, 75) & band_mask(s["irm"], 10, 90)
    assert band_mask(s["lossdiff"], 25, 75).sum() == 8  # 16 pairs, ranks 4 .. 11
    np.testing.assert_array_equal(s["keep"], expected)
    np.testing.assert_array_equal(tr.pair_weights, expected.astype(float))
    assert 0 < expected.sum() <= 8
    assert tr.pair_history[0]["step"] == 2  # after the warm-up epoch (16 pairs / batch 8)
    assert np.abs(s["lossdiff"]).max() > 0  # theta_val differs from theta


def test_drift_scorer_and_simpo(tokenizer, tiny_model, tmp_path):
    val = pairs(8, 5, 0)
    args = make_args(
        tmp_path,
        drift_method="drift",
        loss_type="simpo",
        beta=2.0,
        drift_refresh_steps=2,
        drift_num_queries=4,
        drift_num_rollouts=4,
        drift_max_new_tokens=2,
        drift_no_contrast="keep",
        drift_uniform_mix=0.0,
    )
    tr = make_trainer(
        tokenizer,
        tiny_model,
        args,
        query_dataset=val.select_columns(["prompt", "answer"]),
        reward_funcs=digit_start_reward,
    )
    tr.train()
    assert [h["step"] for h in tr.pair_history] == [2, 4]
    assert any(h["contrast"] for h in tr.pair_history)
    w = tr.pair_weights
    assert w.shape == (16,) and w.mean() == pytest.approx(1.0) and w.std() > 0
    assert np.isfinite(tr.pair_scores["score"]).all() and (tr.pair_scores["grad_norm"] > 0).all()
    # DPO's default weighting is `mixture` (SFT's stays `softmax`): only a low group loses weight, every other pair
    # shares the top weight (softmax weights would all differ)
    assert args.drift_weighting == "mixture"
    assert DriftConfig.__dataclass_fields__["drift_weighting"].default == "softmax"
    assert np.mean(np.isclose(w, w.max())) >= 0.5 and w.min() < w.max()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert all(np.isfinite(losses))


def test_config_validation(tmp_path, tokenizer, tiny_model):
    with pytest.raises(ValueError, match="drift_method"):
        make_args(tmp_path, drift_method="random")
    with pytest.raises(ValueError, match="drift_irm_low"):
        make_args(tmp_path, drift_irm_low=90.0, drift_irm_high=10.0)
    with pytest.raises(ValueError, match="per-pair"):
        make_trainer(
            tokenizer, tiny_model, make_args(tmp_path, drift_method="ica", loss_type="aot"), holdout_dataset=pairs(2, 1)
        )
    with pytest.raises(ValueError, match="validation_dataset"):
        make_trainer(tokenizer, tiny_model, make_args(tmp_path, drift_method="lossdiff_irm"))


def test_lossdiff_refuses_to_copy_a_zero3_partitioned_model(tokenizer, tiny_model, tmp_path):
    next(tiny_model.parameters()).ds_id = 0  # what DeepSpeed's zero.Init leaves on a partitioned parameter
    with pytest.raises(ValueError, match="validation_model="):
        make_trainer(
            tokenizer, tiny_model, make_args(tmp_path, drift_method="lossdiff_irm"), validation_dataset=pairs(4, 3)
        )


def test_rank_calls_give_every_rank_the_same_number_of_forwards():
    from drift_trainer.core.dist import rank_calls

    class D:
        def __init__(self, rank, world):
            self.rank, self.world_size = rank, world

    for n in (0, 1, 5, 6):
        calls = [rank_calls(n, D(r, 2)) for r in range(2)]
        assert len(calls[0]) == len(calls[1]) == -(-n // 2)  # equal forwards on both ranks
        kept = sorted(b for c in calls for b, keep in c if keep)
        assert kept == list(range(n))  # every batch kept exactly once
    assert rank_calls(3, None) == [(0, True), (1, True), (2, True)]


def _run_dir(tmp_path, name: str, checkpoint: str):
    """``tmp_path/name``; for the ``resumed`` run, holding a copy of the unbroken run's ``checkpoint``."""
    import shutil

    out = tmp_path / name
    if name == "resumed":
        out.mkdir()
        shutil.copytree(tmp_path / "unbroken" / checkpoint, out / checkpoint)
    return out


def _unbroken_and_resumed(tokenizer, tmp_path, method, n, max_steps, save_steps, inputs, **options):
    """``{"unbroken": trainer, "resumed": trainer}``: ``method`` on ``n`` pairs for ``max_steps`` (batch 4), once
    unbroken and once resumed from the unbroken run's checkpoint at ``save_steps``; ``inputs(name)``: the trainer's
    other inputs for that run."""
    from drift_trainer.cli.toy import build_tiny_llama

    runs = {}
    for name in ("unbroken", "resumed"):
        out = _run_dir(tmp_path, name, f"checkpoint-{save_steps}")
        args = make_args(
            out,
            drift_method=method,
            num_train_epochs=1,
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=save_steps,
            **options,
        )
        tr = make_trainer(tokenizer, build_tiny_llama(tokenizer, seed=0), args, n=n, **inputs(name))
        tr.train(resume_from_checkpoint=str(out / f"checkpoint-{save_steps}") if name == "resumed" else None)
        runs[name] = tr
    return runs


METHOD_INPUTS = {
    "ica": ({"drift_ica_batch_size": 4}, lambda: {"holdout_dataset": pairs(6, 9, 0)}),
    "lossdiff_irm": ({"drift_lossdiff_warmup_epochs": 1.0}, lambda: {"validation_dataset": pairs(8, 5, 0)}),
    "drift": (
        {
            "drift_refresh_steps": 2,
            "drift_num_queries": 4,
            "drift_num_rollouts": 4,
            "drift_max_new_tokens": 2,
            "drift_no_contrast": "keep",
        },
        lambda: {
            "query_dataset": pairs(8, 5, 0).select_columns(["prompt", "answer"]),
            "reward_funcs": digit_start_reward,
        },
    ),
}


@pytest.mark.parametrize("method", list(METHOD_INPUTS))
def test_pair_scorers_checkpoint_resume_and_artifacts(tokenizer, tmp_path, method):
    """drift_state.json in each checkpoint (12 pairs, batch 4: LossDiff-IRM selects at step 3, before the checkpoint at
    4); a resumed run restores it (the weights are neither lost nor recomputed
    at the resumed start) and ends like the unbroken run; per-scoring artifacts as for SFT."""
    import os

    import pandas as pd

    options, inputs = METHOD_INPUTS[method]
    runs = _unbroken_and_resumed(tokenizer, tmp_path, method, 12, 6, 4, lambda name: inputs(), **options)
    saved = json.load(open(tmp_path / "unbroken" / "checkpoint-4" / "drift_state.json"))
    assert saved["weights"] is not None and saved["num_refreshes"] >= 1
    a, b = runs["unbroken"].drift_state, runs["resumed"].drift_state
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-6)
    assert [h["step"] for h in b.history] == [h["step"] for h in a.history]
    first = a.history[0]["step"]
    scores = pd.read_parquet(tmp_path / "unbroken" / "drift" / f"refresh-{first:06d}" / "scores.parquet")
    assert len(scores) == 12
    if method != "drift":  # one scoring: its weights are the final ones (DRIFT's first refresh is not its last)
        np.testing.assert_allclose(scores["weight"], runs["unbroken"].pair_weights)
    assert os.path.exists(tmp_path / "unbroken" / "drift" / "examples.jsonl")


def test_sampler_mode_draws_pairs_by_weight(tokenizer, tmp_path):
    """drift_reweight_mode="sampler": LossDiff-IRM's 0/1 selection acts through the draw (the dropped pairs are never
    drawn again) and each drawn pair's loss counts once; a checkpoint holds the sampler, and a resumed run draws as
    the unbroken one."""
    import os

    from drift_trainer.cli.toy import build_tiny_llama

    drawn = {}
    for name in ("unbroken", "resumed"):
        out = _run_dir(tmp_path, name, "checkpoint-6")
        args = make_args(
            out,
            drift_method="lossdiff_irm",
            drift_reweight_mode="sampler",
            drift_lossdiff_warmup_epochs=1.0,
            max_steps=9,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=6,
        )
        tr = make_trainer(tokenizer, build_tiny_llama(tokenizer, seed=0), args, n=12, validation_dataset=pairs(8, 5, 0))
        seen = drawn[name] = {}
        original = tr.compute_loss

        def spy(model, inputs, *a, _seen=seen, _tr=tr, _orig=original, **k):
            if model.training:
                _seen.setdefault(_tr.state.global_step + 1, []).extend(inputs["drift_index"].tolist())
                assert _tr.pair_weights is None or _tr.samples_by_weight  # no loss weights in sampler mode
            return _orig(model, inputs, *a, **k)

        tr.compute_loss = spy
        tr.train(resume_from_checkpoint=str(out / "checkpoint-6") if name == "resumed" else None)
        if name == "unbroken":
            keep = tr.pair_scores["keep"]
            assert 0 < keep.sum() < 12 and tr.pair_history[0]["step"] == 3
            after = [i for step, rows in seen.items() if step >= 5 for i in rows]  # step 4's batch may be drawn early
            assert after and all(keep[i] for i in after)
            assert sorted({i for step, rows in seen.items() if step <= 3 for i in rows}) == list(range(12))
            assert os.path.exists(out / "checkpoint-6" / "drift_sampler.json")
    assert [drawn["resumed"][s] for s in (7, 8, 9)] == [drawn["unbroken"][s] for s in (7, 8, 9)]


@pytest.mark.parametrize("epochs, warmup", [(1, 1.0), (2, 1.5)])
def test_lossdiff_irm_refuses_a_selection_that_comes_when_training_ends(tokenizer, tmp_path, epochs, warmup):
    """It selects at an epoch end: a warm-up reaching the last epoch would select after the last step, silently."""
    from drift_trainer.cli.toy import build_tiny_llama

    args = make_args(
        tmp_path, drift_method="lossdiff_irm", num_train_epochs=epochs, drift_lossdiff_warmup_epochs=warmup
    )
    tr = make_trainer(tokenizer, build_tiny_llama(tokenizer, seed=0), args, validation_dataset=pairs(8, 5, 0))
    with pytest.raises(ValueError, match=r"selects its pairs at the end of epoch \d.*drift_lossdiff_warmup_epochs"):
        tr.train()


def _start_margins(tokenizer, model, data) -> np.ndarray:
    """log p(chosen|x) - log p(rejected|x) of each pair, by hand: prompt tokens, then the answer and EOS."""
    out = []
    for prompt, chosen, rejected in zip(data["prompt"], data["chosen"], data["rejected"]):
        p = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
        lps = []
        for answer in (chosen, rejected):
            a = tokenizer(text=answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1].float()
            lps.append(torch.log_softmax(logits, -1)[torch.arange(len(a)), torch.tensor(a)].sum().item())
        out.append(lps[0] - lps[1])
    return np.array(out)


@pytest.mark.parametrize("method", ["uniform", "ica"])
def test_pair_bound_drops_the_pairs_below_every_validation_margin_and_keeps_them_dropped(tokenizer, tmp_path, method):
    """drift_pair_bound: the validation pairs are the 8 train pairs the start model ranks best, so exactly the other 8
    fall below all of them and leave the train set (through TRL's tokenization and the index column). With ICA the
    scorer weights the rest. A resumed run restores the bound from its checkpoint, not from the model it is given."""
    from drift_trainer.cli.toy import build_tiny_llama

    train = pairs(16, 0)  # make_trainer's train pairs
    margin = _start_margins(tokenizer, build_tiny_llama(tokenizer, seed=0).eval(), train)
    best = np.argsort(-margin)[:8]
    expected = np.isin(np.arange(16), best).astype(float)
    extra = {"holdout_dataset": pairs(6, 9, 0)} if method == "ica" else {}

    def inputs(name):  # the resumed run is given other validation pairs: its bound must come from the checkpoint
        return {"validation_dataset": train.select(best.tolist()) if name == "unbroken" else pairs(8, 5, 0), **extra}

    runs = _unbroken_and_resumed(
        tokenizer, tmp_path, method, 16, 3, 2, inputs, drift_pair_bound=True, drift_ica_batch_size=4
    )
    unbroken = runs["unbroken"]
    np.testing.assert_array_equal(unbroken.pair_bound.keep, expected)
    np.testing.assert_array_equal(runs["resumed"].pair_bound.keep, expected)
    weights = np.asarray(unbroken.pair_weights)
    assert np.all(weights[expected == 0] == 0)
    for tr in runs.values():  # the dropped pairs are not in the train set at all
        assert sorted(tr.train_dataset["drift_index"]) == sorted(best.tolist())
    if method == "ica":  # the scorer's weights on the kept pairs
        scorer = np.asarray(unbroken.pair_scorer.weights)
        np.testing.assert_allclose(weights[expected == 1], scorer[expected == 1])
        assert len(set(np.round(weights[expected == 1], 6))) > 1
    logged = [h for h in unbroken.state.log_history if "drift/bound_dropped" in h]
    assert logged and logged[0]["drift/bound_dropped"] == 0.5
    assert "drift_pair_bound.json" in os.listdir(tmp_path / "unbroken" / "checkpoint-2")


def test_pair_bound_needs_validation_pairs(tokenizer, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="drift_pair_bound=True compares .* pass validation_dataset="):
        make_trainer(tokenizer, tiny_model, make_args(tmp_path, drift_method="uniform", drift_pair_bound=True))
