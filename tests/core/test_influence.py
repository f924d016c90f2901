"""Influence: the signed target, the scores and their debiasing, and the Fisher preconditioner."""

import numpy as np
import pytest

from drift_trainer.core.influence import debias_raw, inner_products, precondition, second_moment, signed_target


def influence_scores(phi, direction, debias, alpha=1.0):
    """Debiased scores and norms as a refresh computes them: inner products over feature blocks, then debiasing."""
    phi = np.asarray(phi, dtype=np.float64)
    raw, norms = inner_products([phi[: len(phi) // 2], phi[len(phi) // 2 :]], direction)
    return debias_raw(raw, norms, debias, alpha), norms


def fisher(phi):
    total, count = second_moment([phi[:20], phi[20:]], phi.shape[1])
    return total / count


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
