"""DriftDPOTrainer: scorers, band selection, per-pair losses, and `uniform` = plain TRL DPO."""

import copy
import random

import numpy as np
import pytest
import torch
from datasets import Dataset

from drift_trainer.methods.lossdiff import band_mask, lossdiff_irm_scores, select_pairs
from drift_trainer.methods.pairs import PairLogps, pair_feature_batch, pair_losses, pair_nll_loss
from tests.conftest import digit_start_reward


def pairs(n, seed, flip=0.3):
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "answer": []}
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        right, wrong = str(a + b), str(a + b + rng.randint(1, 5))
        f = rng.random() < flip
        rows["prompt"].append(f"{a}+{b}=")
        rows["chosen"].append(wrong if f else right)
        rows["rejected"].append(right if f else wrong)
        rows["answer"].append(right)
    return Dataset.from_dict(rows)


def make_args(tmp_path, **kw):
    from drift_trainer import DriftDPOConfig

    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
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


# ----------------------------------------------------------------------------------------------- pure functions
def test_band_mask_exact_counts():
    v = np.random.default_rng(0).permutation(100).astype(float)
    m = band_mask(v, 10, 90)
    assert m.sum() == 80 and v[m].min() == 10 and v[m].max() == 89
    assert band_mask(np.arange(50.0), 25, 75).sum() == 25  # ranks 13 .. 37 (round half up)
    assert band_mask(np.arange(50.0), 25, 75)[[12, 38]].tolist() == [False, False]
    assert band_mask(np.arange(7.0), 0, 100).all()
    with pytest.raises(ValueError):
        band_mask(np.arange(5.0), 60, 40)


def test_select_pairs_intersection():
    i = np.arange(100)
    lossdiff, irm = i.astype(float), ((i * 37) % 100).astype(float)

    class A:
        drift_lossdiff_score = "both"
        drift_lossdiff_low, drift_lossdiff_high, drift_irm_low, drift_irm_high = 10.0, 90.0, 20.0, 100.0

    keep = select_pairs(lossdiff, irm, A())
    expected = [k for k in range(100) if 10 <= k < 90 and 20 <= (k * 37) % 100]
    assert np.flatnonzero(keep).tolist() == expected
    A.drift_lossdiff_score = "irm"
    assert select_pairs(lossdiff, irm, A()).sum() == 80


def test_lossdiff_irm_formulas():
    class A:
        loss_type, loss_weights, beta, simpo_gamma = ["sigmoid"], None, 0.5, 0.5

    pol = PairLogps(np.array([-1.0, -3.0]), np.array([-2.0, -1.0]), np.ones(2), np.ones(2))
    val = PairLogps(np.array([-1.5, -2.0]), np.array([-1.0, -2.0]), np.ones(2), np.ones(2))
    ref = PairLogps(np.array([-2.0, -2.0]), np.array([-2.0, -2.0]), np.ones(2), np.ones(2))
    ld, irm = lossdiff_irm_scores(A(), pol, val, ref)
    dpo = lambda p: -np.log(1 / (1 + np.exp(-0.5 * ((p.chosen + 2) - (p.rejected + 2)))))  # noqa: E731
    np.testing.assert_allclose(ld, dpo(pol) - dpo(val))
    np.testing.assert_allclose(irm, [0.5 * (1.0 - 0.0), 0.5 * (-1.0 - 1.0)])


def test_pair_losses_match_formulas():
    t = torch.tensor
    c, r, rc, rr, nc, nr = t([-2.0]), t([-4.0]), t([-3.0]), t([-3.0]), t([2.0]), t([4.0])
    sig = pair_losses(["sigmoid"], None, 0.1, c, r, rc, rr, nc, nr)
    assert sig.item() == pytest.approx(-torch.nn.functional.logsigmoid(t(0.1 * (1.0 + 1.0))).item())
    simpo = pair_losses(["simpo"], None, 2.0, c, r, None, None, nc, nr, simpo_gamma=0.5)
    assert simpo.item() == pytest.approx(-torch.nn.functional.logsigmoid(t(2.0 * (-1.0 + 1.0) - 0.5)).item())
    with pytest.raises(ValueError, match="per-pair"):
        pair_losses(["aot"], None, 0.1, c, r, rc, rr, nc, nr)


def test_pair_features_are_chosen_minus_rejected(tokenizer, tiny_model):
    from drift_trainer.core.features import ProjectedGradients, collate_right, select_target_modules
    from drift_trainer.methods.pairs import pair_rows

    proj = ProjectedGradients(select_target_modules(tiny_model), 4, seed=0)
    ids = lambda s: tokenizer(text=s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [
        {"prompt_ids": ids("1+2="), "chosen_ids": ids("3"), "rejected_ids": ids("45")},
        {"prompt_ids": ids("3+4="), "chosen_ids": ids("7"), "rejected_ids": ids("9")},
    ]
    tiny_model.eval()
    pair = proj.compute(tiny_model, pair_feature_batch(rows, tokenizer.pad_token_id, "cpu"), loss_fn=pair_nll_loss)
    single = [r for row in rows for r in pair_rows(row)]  # c0, r0, c1, r1
    rowf = proj.compute(tiny_model, collate_right(single, tokenizer.pad_token_id))
    f = rowf.features * rowf.num_tokens[:, None]  # features of summed (not mean) token losses
    expected = torch.stack([f[0] - f[1], f[2] - f[3]])
    torch.testing.assert_close(pair.features, expected, rtol=1e-4, atol=1e-5)
    assert pair.features.shape == (2, proj.dim)


# ----------------------------------------------------------------------------------------------- trainers
def test_uniform_is_plain_dpo(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from drift_trainer.cli.toy import build_tiny_llama

    losses = []
    for cls in ("plain", "drift"):
        model = build_tiny_llama(tokenizer, seed=0)
        common = dict(
            output_dir=str(tmp_path / cls),
            use_cpu=True,
            max_steps=3,
            per_device_train_batch_size=4,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
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
    tr._pairs.weights = np.full(16, 0.3)
    with torch.no_grad():
        ours = tr.compute_loss(tr.model, dict(batch)).item()
        theirs = DPOTrainer.compute_loss(tr, tr.model, dict(plain)).item()
    assert ours == pytest.approx(theirs, rel=1e-5)
    # a weight on one pair only: the loss (and its gradient) is that pair's alone
    w = np.zeros(16)
    w[int(batch["drift_index"][2])] = 0.7
    tr._pairs.weights = w
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
    assert tr._pairs.history[0]["step"] == 2  # after the warm-up epoch (16 pairs / batch 8)
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
    assert [h["step"] for h in tr._pairs.history] == [2, 4]
    assert any(h["contrast"] for h in tr._pairs.history)
    w = tr.pair_weights
    assert w.shape == (16,) and w.mean() == pytest.approx(1.0) and w.std() > 0
    assert np.isfinite(tr.pair_scores["score"]).all() and (tr.pair_scores["grad_norm"] > 0).all()
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


def test_scorers_refuse_several_processes_with_a_clear_error(tokenizer, tiny_model, tmp_path, monkeypatch):
    from drift_trainer import DriftConfig, DriftDPOConfig, DriftSFTTrainer

    monkeypatch.setattr(DriftDPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="single process"):
        make_trainer(tokenizer, tiny_model, make_args(tmp_path, drift_method="ica"))
    monkeypatch.setattr(DriftConfig, "world_size", property(lambda self: 2))
    args = DriftConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], drift_method="ica")
    with pytest.raises(ValueError, match="single process"):
        DriftSFTTrainer(model=tiny_model, args=args, train_dataset=pairs(4, 0), processing_class=tokenizer)
