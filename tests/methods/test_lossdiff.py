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
