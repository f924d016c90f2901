"""LossDiff-IRM pair selection: percentile bands, their intersection, and the two scores' formulas."""

import numpy as np
import pytest

from drift_trainer.methods.lossdiff import band_mask, lossdiff_irm_scores, select_pairs
from drift_trainer.methods.pairs import PairLogps


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


def test_copy_of_a_bf16_trained_model_computes_with_its_own_weights(tmp_path, tokenizer, tiny_model):
    """After a bf16 SFT run, accelerate's autocast wrapper on ``forward`` closes over the original model: a plain
    deep copy keeps computing with the original's weights. ``copy_model`` (used for LossDiff's theta_val) must not."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from drift_trainer.cli.toy import addition_dataset, build_tiny_llama
    from drift_trainer.methods.lossdiff import copy_model

    args = SFTConfig(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        bf16=True,
        report_to=[],
        save_strategy="no",
    )
    SFTTrainer(
        model=tiny_model, args=args, train_dataset=addition_dataset(16, seed=0), processing_class=tokenizer
    ).train()
    assert "_original_forward" in tiny_model.__dict__  # the wrapper this guards against is there
    x = torch.tensor([tokenizer(text="12+7=")["input_ids"]])
    clone = copy_model(tiny_model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        fresh = build_tiny_llama(tokenizer, seed=1)
        fresh.load_state_dict(clone.state_dict())
        own, expected, original = clone(x).logits, fresh(x).logits, tiny_model(x).logits
    assert torch.allclose(own, expected, atol=1e-5)  # the copy's own weights
    assert (own - original).abs().max() > 1e-2  # not the original's
