"""Weighting: scores to weights (softmax, prune, truncate, demote, mixture), clipping to mean one, the effective
sample size."""

import numpy as np
import pytest

from drift_trainer.core.weighting import (
    clip_mean_one,
    effective_sample_size,
    mixture_weights,
    scores_to_weights,
    standardize,
)
from tests.helpers import drift_args


def test_softmax_weights_mean_one_clipped_and_mixed():
    scores = np.linspace(-3, 3, 100)
    w = scores_to_weights(scores, drift_args(drift_uniform_mix=0.0, drift_weight_clip=3.0))
    assert abs(w.mean() - 1.0) < 1e-9 and w.max() <= 3.0 + 1e-9
    assert np.all(np.diff(w) >= 0)  # monotone in score
    mixed = scores_to_weights(scores, drift_args(drift_uniform_mix=0.5, drift_weight_clip=3.0))
    np.testing.assert_allclose(mixed, 0.5 * w + 0.5)
    uniform = scores_to_weights(scores, drift_args(drift_uniform_mix=1.0))
    np.testing.assert_allclose(uniform, 1.0)


def test_prune_and_truncate_rules():
    scores = np.arange(10.0)
    w = scores_to_weights(scores, drift_args(drift_weighting="prune", drift_prune_fraction=0.3, drift_uniform_mix=0.0))
    assert (w[:3] == 0).all() and np.allclose(w[3:], 10 / 7)
    t = scores_to_weights(
        scores,
        drift_args(drift_weighting="truncate", drift_truncate_low=20, drift_truncate_high=80, drift_uniform_mix=0.0),
    )
    kept = t > 0
    assert kept.sum() == 6 and not kept[0] and not kept[-1]
    w_mix = scores_to_weights(
        scores, drift_args(drift_weighting="prune", drift_prune_fraction=0.3, drift_uniform_mix=0.1)
    )
    assert (w_mix > 0).all()


def test_unscored_examples_keep_weight_one_and_are_excluded_from_the_mean():
    scores = np.array([1.0, 2.0, 3.0, 0.0])
    mask = np.array([True, True, True, False])
    w = scores_to_weights(scores, drift_args(drift_uniform_mix=0.0), mask)
    assert w[3] == 1.0 and abs(w[:3].mean() - 1.0) < 1e-9


def test_clip_and_ess():
    w = clip_mean_one(np.array([100.0, 1, 1, 1]), 2.0)
    assert abs(w.mean() - 1) < 1e-9 and w.max() <= 2.0 + 1e-9
    assert effective_sample_size(np.ones(10)) == pytest.approx(1.0)
    assert effective_sample_size(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)
    z = standardize(np.array([1.0, 2.0, 3.0, 100.0]), np.array([True, True, True, False]))
    assert z[3] == 0 and abs(z[:3].mean()) < 1e-12


def test_all_zero_weights_are_refused_naming_the_options():
    with pytest.raises(ValueError, match="drift_prune_fraction"):
        clip_mean_one(np.zeros(5), 5.0)


def test_prune_breaks_ties_at_random_not_by_row_order():
    w = scores_to_weights(
        np.zeros(100), drift_args(drift_weighting="prune", drift_prune_fraction=0.3, drift_uniform_mix=0.0)
    )
    dropped = np.flatnonzero(w == 0)
    assert len(dropped) == 30 and dropped.max() > 50  # not simply the first 30 rows


def test_demote_leaves_all_but_confidently_harmful_rows_at_one():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.0, 0.3, 180), rng.normal(-3.0, 0.3, 20)])  # 20 clearly harmful rows
    w = scores_to_weights(scores, drift_args(drift_weighting="demote", drift_uniform_mix=0.0))
    assert abs(w.mean() - 1.0) < 1e-9
    assert np.ptp(w[:180]) < 0.05 * w[:180].mean()  # the clean bulk keeps one common weight
    assert w[180:].max() < 0.3 * w[:180].min()
    assert effective_sample_size(w) > 0.85
    softmax = scores_to_weights(scores, drift_args(drift_uniform_mix=0.0))
    assert effective_sample_size(w) > effective_sample_size(softmax)
    flat = scores_to_weights(rng.normal(size=100), drift_args(drift_weighting="demote", drift_demote_threshold=10.0))
    np.testing.assert_allclose(flat, 1.0)  # no row far enough below: nothing moves


def test_mixture_takes_weight_only_from_a_separate_low_group():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.0, 1.0, 900), rng.normal(-5.0, 1.0, 100)])  # 10% in a low group
    w = mixture_weights(scores)
    assert np.median(w[:900]) > 0.999 and (w[:900] > 0.9).mean() > 0.97
    assert (w[900:] < 0.1).mean() > 0.9
    order = np.argsort(scores)
    assert np.all(np.diff(w[order]) >= 0)  # never more weight for a lower score
    weights = scores_to_weights(scores, drift_args(drift_weighting="mixture", drift_uniform_mix=0.0))
    assert abs(weights.mean() - 1.0) < 1e-9 and weights.max() < 1.15  # no row is drawn much more than once
    softmax = scores_to_weights(scores, drift_args(drift_uniform_mix=0.0))
    assert effective_sample_size(weights[:900]) > 0.99 > effective_sample_size(softmax[:900])


@pytest.mark.parametrize("sample", ["normal", "heavy_tailed"])
def test_mixture_leaves_unimodal_scores_near_uniform(sample):
    rng = np.random.default_rng(1)
    scores = rng.normal(size=1000) if sample == "normal" else rng.standard_t(3, size=1000)
    w = scores_to_weights(scores, drift_args(drift_weighting="mixture", drift_uniform_mix=0.0))
    assert effective_sample_size(w) > 0.9
    assert (w < 0.5).mean() < 0.05  # at most the far tail loses weight
    np.testing.assert_allclose(mixture_weights(np.full(10, 3.0)), 1.0)  # no spread: nothing to separate


def test_mixture_weights_are_the_same_for_a_shifted_and_scaled_score():
    scores = np.random.default_rng(2).normal(size=300)
    np.testing.assert_allclose(mixture_weights(scores), mixture_weights(3.0 * scores - 7.0), atol=1e-9)


def test_flat_keeps_one_and_a_demote_mask_takes_weight_only_from_its_rows():
    scores = np.random.default_rng(3).normal(size=50)
    np.testing.assert_allclose(scores_to_weights(scores, drift_args(drift_weighting="flat")), 1.0)
    gone = np.zeros(50, dtype=bool)
    gone[:5] = True
    w = scores_to_weights(scores, drift_args(drift_weighting="flat", drift_uniform_mix=0.1), demote=gone)
    np.testing.assert_allclose(w[:5], 0.1)  # drawn only at the uniform-mix rate
    np.testing.assert_allclose(w[5:], 0.9 * 50 / 45 + 0.1)  # the others share the rest equally
    assert abs(w.mean() - 1.0) < 1e-9
    # after another rule the kept rows keep their order, the demoted ones get the floor whatever their score
    soft = scores_to_weights(scores, drift_args(drift_uniform_mix=0.1), demote=gone)
    np.testing.assert_allclose(soft[:5], 0.1)
    assert np.array_equal(np.argsort(soft[5:]), np.argsort(scores[5:]))
    # a mask that would take every row is ignored rather than zeroing the draw
    every = scores_to_weights(scores, drift_args(drift_weighting="flat"), demote=np.ones(50, dtype=bool))
    np.testing.assert_allclose(every, 1.0)
