"""Per-pair DPO losses and pair features (chosen minus rejected)."""

import pytest
import torch

from drift_trainer.methods.pairs import pair_feature_batch, pair_losses, pair_nll_loss


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
