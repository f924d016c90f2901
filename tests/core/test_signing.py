"""Rollout signs: correctness signs balance each query's classes, advantage signs are centred per query."""

import numpy as np

from drift_trainer.core.signing import has_contrast, rollout_signs


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
