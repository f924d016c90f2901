"""Signing, influence and weighting."""

import numpy as np
import pytest

from drift_trainer.core.influence import debias_raw, fisher, influence_scores, precondition, signed_target
from drift_trainer.core.signing import has_contrast, rollout_signs
from drift_trainer.core.weighting import clip_mean_one, effective_sample_size, scores_to_weights, standardize
from drift_trainer.hf.config import DriftArguments


def test_correctness_signs_balance_classes_and_skip_no_contrast_queries():
    rewards = np.array([1, 0, 0, 0, 1, 1, 0, 0])
    query = np.array([0, 0, 0, 0, 1, 1, 2, 2])  # q1 all correct, q2 all wrong
    signs = rollout_signs(rewards, query, "correctness", 0.5, "skip")
    np.testing.assert_allclose(signs, [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0])
    kept = rollout_signs(rewards, query, "correctness", 0.5, "keep")
    np.testing.assert_allclose(kept[rewards == 1], 1 / 3)
    np.testing.assert_allclose(kept[rewards == 0], -1 / 5)
    assert has_contrast(signs)
    assert not has_contrast(rollout_signs(np.ones(4), np.zeros(4), "correctness", 0.5, "keep"))


def test_advantage_signs_are_centred_per_query():
    rewards = np.array([1.0, 0.0, 0.5, 0.5])
    signs = rollout_signs(rewards, np.array([0, 0, 1, 1]), "advantage")
    np.testing.assert_allclose(signs, [1.0, -1.0, 0.0, 0.0])


def test_signed_target_and_scores_point_the_right_way():
    good, bad = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    target = signed_target(np.stack([good * 3, bad * 5]), np.array([1.0, -1.0]))
    np.testing.assert_allclose(target, [1.0, -1.0])
    train = np.array([[2.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    scores, norms = influence_scores(train, target, "none")
    assert scores[0] > scores[2] > scores[1]
    np.testing.assert_allclose(norms, np.linalg.norm(train, axis=1))


def test_normalize_removes_gradient_norm_advantage():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    base = rng.normal(size=(200, 8))
    scale = np.exp(rng.normal(size=200) * 1.5)
    phi = base * scale[:, None]
    raw, norms = influence_scores(phi, direction, "none")
    cos, _ = influence_scores(phi, direction, "normalize", 1.0)
    np.testing.assert_allclose(cos, (base @ direction) / np.linalg.norm(base, axis=1), rtol=1e-9)
    assert np.abs(np.corrcoef(np.abs(raw), norms)[0, 1]) > np.abs(np.corrcoef(np.abs(cos), norms)[0, 1])


def test_regress_removes_linear_dependence_on_log_norm():
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(size=300))
    raw = 2.0 * np.log(norms) + rng.normal(size=300) * 0.1
    out = debias_raw(raw, norms, "regress")
    assert abs(np.corrcoef(out, np.log(norms))[0, 1]) < 1e-6
    assert debias_raw(np.array([1.0, 2.0]), np.array([0.0, 1.0]), "none")[0] == 0.0  # zero feature scores 0
    with pytest.raises(ValueError, match="drift_debias"):
        debias_raw(raw, norms, "bogus")


def test_fisher_preconditioner_solves_the_damped_system():
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(50, 4)) * np.array([10.0, 1.0, 1.0, 0.1])
    f = fisher(phi)
    target = np.ones(4)
    d = precondition(target, "fisher", f, 0.1)
    lam = 0.1 * np.trace(f) / 4
    np.testing.assert_allclose((f + lam * np.eye(4)) @ d, target, rtol=1e-8)
    np.testing.assert_allclose(precondition(target, "identity", None, 0.1), target)


def _args(**kw):
    a = DriftArguments(**kw)
    a.validate_drift()
    return a


def test_softmax_weights_mean_one_clipped_and_mixed():
    scores = np.linspace(-3, 3, 100)
    w = scores_to_weights(scores, _args(drift_uniform_mix=0.0, drift_weight_clip=3.0))
    assert abs(w.mean() - 1.0) < 1e-9 and w.max() <= 3.0 + 1e-9
    assert np.all(np.diff(w) >= 0)  # monotone in score
    mixed = scores_to_weights(scores, _args(drift_uniform_mix=0.5, drift_weight_clip=3.0))
    np.testing.assert_allclose(mixed, 0.5 * w + 0.5)
    uniform = scores_to_weights(scores, _args(drift_uniform_mix=1.0))
    np.testing.assert_allclose(uniform, 1.0)


def test_prune_and_truncate_rules():
    scores = np.arange(10.0)
    w = scores_to_weights(scores, _args(drift_weighting="prune", drift_prune_fraction=0.3, drift_uniform_mix=0.0))
    assert (w[:3] == 0).all() and np.allclose(w[3:], 10 / 7)
    t = scores_to_weights(
        scores,
        _args(drift_weighting="truncate", drift_truncate_low=20, drift_truncate_high=80, drift_uniform_mix=0.0),
    )
    kept = t > 0
    assert kept.sum() == 6 and not kept[0] and not kept[-1]
    w_mix = scores_to_weights(scores, _args(drift_weighting="prune", drift_prune_fraction=0.3, drift_uniform_mix=0.1))
    assert (w_mix > 0).all()


def test_unscored_examples_keep_weight_one_and_are_excluded_from_the_mean():
    scores = np.array([1.0, 2.0, 3.0, 0.0])
    mask = np.array([True, True, True, False])
    w = scores_to_weights(scores, _args(drift_uniform_mix=0.0), mask)
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
        np.zeros(100), _args(drift_weighting="prune", drift_prune_fraction=0.3, drift_uniform_mix=0.0)
    )
    dropped = np.flatnonzero(w == 0)
    assert len(dropped) == 30 and dropped.max() > 50  # not simply the first 30 rows
