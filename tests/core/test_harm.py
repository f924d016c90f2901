"""drift_harm_gate's two tests: their p-values hold their level on clean data and fire on harm; the gate in a
refresh keeps the weights at 1 until it finds harm and then stays open."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from drift_trainer.core.harm import accuracy_drop_p, loss_excess_p, per_query_accuracy, tail_count_p
from drift_trainer.core.rollouts import Rollouts
from drift_trainer.core.state import DriftState


def test_loss_excess_p_holds_its_level_on_exchangeable_losses_and_fires_on_wrong_answers():
    rng = np.random.default_rng(0)
    n_refs, alpha, trials = 64, 0.05, 400
    clean = [loss_excess_p(rng.gamma(2.0, size=500), rng.gamma(2.0, size=n_refs)) for _ in range(trials)]
    # the same distribution for train rows and references: the false-alarm rate is at most about the level
    assert np.mean(np.array(clean) < alpha) < alpha + 0.03
    noisy = []
    for _ in range(50):
        train = rng.gamma(2.0, size=500)
        train[:50] += 20.0  # 10% of rows far less likely than any right answer
        noisy.append(loss_excess_p(train, rng.gamma(2.0, size=n_refs)))
    assert np.mean(np.array(noisy) < 0.01) > 0.95
    # one hard reference (a query the model finds harder than any wrong answer) hides every row from "above all
    # references"; the thresholds at the 2nd, 4th and 8th largest reference still see them
    hidden = []
    for _ in range(50):
        train, refs = rng.gamma(2.0, size=500), rng.gamma(2.0, size=n_refs)
        train[:100] += 20.0  # 20% of rows wrong
        refs[0] = 100.0
        assert loss_excess_p(train, refs, max_rank=1) == 1.0
        hidden.append(loss_excess_p(train, refs, max_rank=8))
    assert np.mean(np.array(hidden) < 0.01) > 0.95
    # by default only the rows above every reference: 1 of N=3 rows above both n=2 references, the top of the 5
    # pooled losses is a train row, p = 3/5; 2 of 3: p = 3/5 * 2/4
    assert loss_excess_p(np.array([0.1, 0.2, 9.0]), np.array([0.3, 0.4])) == pytest.approx(3 / 5)
    assert loss_excess_p(np.array([8.0, 9.0, 0.1]), np.array([0.3, 0.4])) == pytest.approx(3 / 5 * 2 / 4)
    # max_rank 8 with n = 2 references: thresholds j = 1, 2 (4 and 8 left out), Bonferroni over both: rows 8.0 and 9.0 above
    # the 2nd largest reference too (at most one reference in the top 3 of 5: 1 - 3/10), the smaller p doubled
    two = dict(max_rank=8)
    assert loss_excess_p(np.array([8.0, 9.0, 0.1]), np.array([0.3, 0.4]), **two) == pytest.approx(2 * 3 / 5 * 2 / 4)
    assert loss_excess_p(np.array([0.1, 0.2, 9.0]), np.array([0.3, 0.4]), **two) == 1.0  # 2 * 3/5, capped
    assert loss_excess_p(np.array([0.1]), np.array([0.3])) == 1.0  # none above
    assert loss_excess_p(np.array([0.1]), np.zeros(0)) == 1.0 and loss_excess_p(np.zeros(0), np.ones(3)) == 1.0


@pytest.mark.parametrize("num_train,num_refs", [(3, 2), (4, 3), (5, 4)])
def test_tail_count_p_is_the_exact_null_probability(num_train, num_refs):
    """Against every placement of the references in the pooled ranking (all equally likely under
    exchangeability): the share where k or more train rows lie above the j-th largest reference."""
    placements = list(itertools.combinations(range(num_train + num_refs), num_refs))  # ref positions, best first
    for j in range(1, num_refs + 1):
        for k in range(num_train + 1):
            hits = sum(1 for pos in placements if pos[j - 1] - (j - 1) >= k)  # train rows ranked above ref j
            assert tail_count_p(num_train, num_refs, j, k) == pytest.approx(hits / len(placements), abs=1e-12)
    # j = 1 is the product formula: the top k of the pooled losses all train rows
    assert tail_count_p(1000, 64, 1, 40) == pytest.approx(np.prod([(1000 - i) / (1064 - i) for i in range(40)]))


def test_accuracy_drop_p_is_uniform_without_a_drop_and_small_with_one():
    rng = np.random.default_rng(1)
    start = {q: float(a) for q, a in enumerate(rng.uniform(size=40))}
    null = []
    for i in range(200):  # accuracy moves by symmetric noise: p-values near uniform
        now = {q: a + rng.normal(0, 0.2) for q, a in start.items()}
        null.append(accuracy_drop_p(start, now, draws=999, seed=i))
    assert abs(np.mean(np.array(null) < 0.1) - 0.1) < 0.06
    dropped = {q: a - 0.3 + rng.normal(0, 0.1) for q, a in start.items()}
    assert accuracy_drop_p(start, dropped) < 0.001
    risen = {q: a + 0.3 for q, a in start.items()}
    assert accuracy_drop_p(start, risen) > 0.99
    assert accuracy_drop_p(start, dict(start)) == 1.0  # nothing changed
    assert accuracy_drop_p(start, {0: 0.0}) == 1.0  # fewer than two queries in common


def test_per_query_accuracy_and_the_state_keep_the_start_measurement():
    ro = Rollouts.__new__(Rollouts)
    ro.query_index, ro.rewards = [3, 3, 5, 5], [1.0, 0.0, 0.0, 0.0]
    start = per_query_accuracy(ro, 0.5)
    assert start == {3: 0.5, 5: 0.0}
    state = DriftState.from_dict(DriftState(start_accuracy=start, harm_step=40).to_dict())
    assert state.start_accuracy == start and state.harm_step == 40
    assert DriftState.from_dict(DriftState().to_dict()).start_accuracy is None
