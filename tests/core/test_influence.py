"""Influence: the signed target, the scores and their debiasing, and the Fisher preconditioner."""

import numpy as np
import pytest

from drift_trainer.core.influence import (
    debias_raw,
    inner_products,
    kronecker_factors,
    kronecker_precondition,
    precondition,
    second_moment,
    signed_target,
    split_half_reliability,
)


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


def test_kronecker_preconditioner_solves_each_modules_damped_factored_system():
    rng = np.random.default_rng(3)
    k, m = 3, 2
    phi = rng.normal(size=(60, m * k * k)) * rng.uniform(0.1, 5.0, size=m * k * k)
    s, a, count = kronecker_factors([phi[:25], phi[25:]], k, m * k * k)  # streamed over blocks
    assert count == 60
    for j in range(m):
        blocks = phi[:, j * k * k : (j + 1) * k * k].reshape(-1, k, k)
        np.testing.assert_allclose(s[j], sum(b @ b.T for b in blocks))
        np.testing.assert_allclose(a[j], sum(b.T @ b for b in blocks))
    target = rng.normal(size=m * k * k)
    d = kronecker_precondition(target, s, a, 0.1)
    for j in range(m):
        damped_s = s[j] + 0.1 * np.trace(s[j]) / k * np.eye(k)
        damped_a = a[j] + 0.1 * np.trace(a[j]) / k * np.eye(k)
        block = d[j * k * k : (j + 1) * k * k].reshape(k, k)
        np.testing.assert_allclose(damped_s @ block @ damped_a, target[j * k * k : (j + 1) * k * k].reshape(k, k))
    # several target columns at once are preconditioned alike
    both = kronecker_precondition(np.stack([target, -2 * target], axis=1), s, a, 0.1)
    np.testing.assert_allclose(both, np.stack([d, -2 * d], axis=1))
    assert not np.allclose(d / np.linalg.norm(d), target / np.linalg.norm(target))  # it does precondition


def test_inner_products_take_several_directions():
    rng = np.random.default_rng(4)
    phi, dirs = rng.normal(size=(9, 5)), rng.normal(size=(5, 3))
    raw, norms = inner_products([phi[:4], phi[4:]], dirs)
    np.testing.assert_allclose(raw, phi @ dirs)
    np.testing.assert_allclose(norms, np.linalg.norm(phi, axis=1))


def test_split_half_reliability():
    rng = np.random.default_rng(5)
    signal = rng.normal(size=400)
    assert split_half_reliability(signal, signal) == pytest.approx(1.0)
    noisy = [signal + rng.normal(size=400) for _ in range(2)]  # r = 0.5: Spearman-Brown 2/3
    assert split_half_reliability(*noisy) == pytest.approx(2 / 3, abs=0.08)
    assert split_half_reliability(rng.normal(size=400), rng.normal(size=400)) < 0.15  # no shared signal
    assert split_half_reliability(signal, -signal) == 0.0  # the halves disagree: no evidence
    assert split_half_reliability(signal, np.zeros(400)) == 0.0  # a half without contrast
