import numpy as np
import pytest

from drift_trainer.core.sampler import DriftSampler


def test_uniform_is_a_seeded_permutation_and_len_is_fixed():
    s = DriftSampler(50, seed=3)
    first = list(s)
    assert sorted(first) == list(range(50))
    assert list(DriftSampler(50, seed=3)) == first
    assert list(DriftSampler(50, seed=4)) != first
    s.set_epoch(1)
    assert list(s) != first
    s.update(np.arange(50) + 1.0)
    assert len(s) == 50 and len(list(s)) == 50


def test_update_changes_draws_mid_epoch():
    s = DriftSampler(100, seed=0)
    it = iter(s)
    head = [next(it) for _ in range(30)]
    w = np.zeros(100)
    w[[7, 9]] = 1.0
    s.update(w)
    tail = list(it)
    assert len(head) + len(tail) == 100
    assert set(tail) <= {7, 9}
    assert len(set(head)) == 30  # before the update: distinct rows of a permutation


def test_weighted_draws_follow_weights():
    w = np.ones(10)
    w[0] = 20.0
    s = DriftSampler(10, seed=1, weights=w)
    counts = np.zeros(10)
    for epoch in range(300):
        s.set_epoch(epoch)
        for i in s:
            counts[i] += 1
    share = counts[0] / counts.sum()
    assert abs(share - 20 / 29) < 0.03


def test_same_sequence_on_every_rank():
    # two "ranks": two samplers with the same seed and the same update at the same position
    a, b = DriftSampler(64, seed=9), DriftSampler(64, seed=9)
    w = np.linspace(0.1, 2.0, 64)
    seqs = []
    for s in (a, b):
        it = iter(s)
        head = [next(it) for _ in range(10)]
        s.update(w)
        seqs.append(head + list(it))
    assert seqs[0] == seqs[1]


def test_state_dict_round_trip_replays_the_stream():
    s = DriftSampler(40, seed=5)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(12)]
    s.update(np.linspace(1, 3, 40))
    tail = list(it)
    state = s.state_dict()
    restored = DriftSampler(40, seed=0)
    restored.load_state_dict(state)
    assert restored.epoch == 2
    assert list(restored) == head + tail  # replays the weight switch at the same position
    # and continues identically in the next epoch
    s.set_epoch(3)
    restored.set_epoch(3)
    assert list(s) == list(restored)


def test_update_between_epochs_applies_from_next_epoch_start():
    s = DriftSampler(20, seed=2)
    list(s)
    w = np.zeros(20)
    w[4] = 1.0
    s.update(w)
    s.set_epoch(1)
    assert set(s) == {4}


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_samples"):
        DriftSampler(0)
    s = DriftSampler(5)
    with pytest.raises(ValueError, match="5 rows"):
        s.update(np.ones(4))
    with pytest.raises(ValueError, match="not all zero"):
        s.update(np.zeros(5))
    with pytest.raises(ValueError, match="same train_dataset"):
        DriftSampler(6).load_state_dict(s.state_dict())


def test_systematic_mode_sees_every_weight_one_row_once_and_follows_weights():
    w = np.ones(1000)
    w[:200] = 0.05  # demoted rows
    w = w / w.mean()
    counts = {}
    for mode in ("replacement", "systematic"):
        s = DriftSampler(1000, seed=3, mode=mode)
        s.update(w)
        counts[mode] = np.bincount(list(s), minlength=1000)
        assert counts[mode].sum() == 1000
    # with replacement about a third of the full-weight rows go unseen in an epoch; systematically none does
    assert (counts["replacement"][200:] == 0).mean() > 0.2
    assert (counts["systematic"][200:] == 0).mean() == 0.0
    expected = 1000 * w / w.sum()
    assert np.all(np.abs(counts["systematic"] - expected) < 1.0 + 1e-9)  # floor or ceil of the expected count


def test_systematic_mode_is_deterministic_and_replays_a_mid_epoch_switch():
    s = DriftSampler(60, seed=5, mode="systematic")
    s.set_epoch(1)
    it = iter(s)
    head = [next(it) for _ in range(17)]
    s.update(np.linspace(0.2, 3, 60))
    tail = list(it)
    plain = DriftSampler(60, seed=5)
    plain.set_epoch(1)
    uniform = list(plain)
    assert head == uniform[:17] and tail != uniform[17:] and len(head + tail) == 60  # the switch applied at 17
    restored = DriftSampler(60, seed=0)
    restored.load_state_dict(s.state_dict())
    assert restored.mode == "systematic" and list(restored) == head + tail
    with pytest.raises(ValueError, match="drift_sampling"):
        DriftSampler(10, mode="bogus")


def test_ordered_mode_keeps_plain_order_and_draws_the_systematic_counts():
    n = 1000
    w = np.ones(n)
    w[:200] = 0.05
    w[200:210] = 3.0
    plain = DriftSampler(n, seed=3)
    plain.set_epoch(1)
    uniform = list(plain)
    s = DriftSampler(n, seed=3, mode="ordered")
    s.update(w)
    s.set_epoch(1)
    seq = list(s)
    counts = np.bincount(seq, minlength=n)
    assert len(seq) == n
    assert np.all(np.abs(counts - n * w / w.sum()) < 1.0 + 1e-9)  # floor or ceil of each row's share
    # the kept rows come in plain SFT's order: dropping the demoted rows and the repeats leaves the permutation
    kept = [r for r in uniform if r >= 200]
    dedup = [r for i, r in enumerate(seq) if r >= 200 and (i == 0 or seq[i - 1] != r)]
    assert dedup == kept
    shared = np.mean([len(set(seq[i : i + 64]) & set(uniform[i : i + 64])) / 64 for i in range(0, n - 64, 64)])
    systematic = DriftSampler(n, seed=3, mode="systematic")
    systematic.update(w)
    systematic.set_epoch(1)
    seq_s = list(systematic)
    shared_s = np.mean([len(set(seq_s[i : i + 64]) & set(uniform[i : i + 64])) / 64 for i in range(0, n - 64, 64)])
    assert shared > 0.6 > 0.2 > shared_s


def test_ordered_mode_mid_epoch_switch_owes_what_was_not_yet_drawn_and_replays():
    n = 300
    s = DriftSampler(n, seed=7, mode="ordered")
    it = iter(s)
    head = [next(it) for _ in range(100)]
    s.update(np.ones(n) * 2.0)  # equal weights: still the plain permutation
    s.update(np.where(np.arange(n) < 30, 0.0, 1.0))  # rows 0..29 dropped from here on
    tail = list(it)
    uniform = list(DriftSampler(n, seed=7))
    assert head == uniform[:100] and len(tail) == n - 100
    assert not set(tail) & set(range(30))
    # every weight-1 row not yet drawn comes once, in plain order; the positions left over go to rows owed a bit more
    unseen = [r for r in uniform[100:] if r >= 30]
    firsts = [r for i, r in enumerate(tail) if r in set(unseen) and (i == 0 or tail[i - 1] != r)]
    assert firsts == unseen
    restored = DriftSampler(n, seed=0)
    restored.load_state_dict(s.state_dict())
    assert restored.mode == "ordered" and list(restored) == head + tail
