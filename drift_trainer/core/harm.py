"""``drift_harm_gate``: does the train data show harm? Two tests, each a p-value under "the data is clean".

DRIFT leaves the weights at exactly 1 (plain SFT's batches) until a refresh finds evidence of harm, then reweights
for the rest of training. On clean data a reweighting can only cost (the benchmark's clean kind: every rule that
moved weight lost to plain SFT), so the gate asks first whether there is anything to fix:

- **Loss beyond the top references** (:func:`loss_excess_p`): train rows whose loss is above the ``j``-th largest
  loss of the ``n`` sampled queries' reference answers, both measured by the same forward pass (a sample of ``N``
  train rows). If train rows and references were exchangeable (clean data from the queries' distribution), ``k`` or
  more of the ``N`` rows lie above the ``j``-th largest reference only when at most ``j - 1`` references are among
  the top ``k + j - 1`` of the ``N + n`` pooled losses: a hypergeometric tail (:func:`tail_count_p`; for ``j = 1``,
  ``prod_{i<k} (N - i) / (N + n - i)``). The test takes the smallest of these p-values over ``j`` = 1, 2, 4, ... up
  to ``drift_harm_max_rank`` (default 1: only the rows above every reference), times their number (Bonferroni).
  ``j = 1`` is the most sensitive to a few far-off wrong answers; larger ``j`` keep the test's power when one or two
  references are hard themselves (one hard query raises "every reference" above a wrong rule's rows). Training on
  the rows only lowers their loss, so the test is conservative. Wrong answers that the model finds less likely than
  right ones push ``k`` up.
- **Validation accuracy below the start** (:func:`accuracy_drop_p`): the rollouts' per-query accuracy now against the
  start model's (measured before the first step), one-sided, by a paired sign-flip test over the queries in both.
  Fine-tuning on clean data does not make the model worse at its own validation queries; a learnable wrong rule does.
"""

from __future__ import annotations

import math

import numpy as np

SIGN_FLIPS = 4000  # draws of the sign-flip test (its p-value resolution is 1 / (draws + 1))


def per_query_accuracy(rollouts, threshold: float) -> dict[int, float]:
    """Share of each query's rollouts judged right (reward >= ``threshold``), keyed by query row."""
    query = np.asarray(rollouts.query_index, dtype=np.int64)
    right = np.asarray(rollouts.rewards, dtype=np.float64) >= threshold
    return {int(q): float(right[query == q].mean()) for q in np.unique(query)}


def tail_count_p(num_train: int, num_refs: int, j: int, k: int) -> float:
    """Under exchangeability of ``num_train`` train losses and ``num_refs`` reference losses (no ties), the
    probability that ``k`` or more train losses lie above the ``j``-th largest reference loss: at most ``j - 1``
    references among the top ``k + j - 1`` pooled values (hypergeometric)."""
    if k <= 0:
        return 1.0
    total, draws = num_train + num_refs, k + j - 1
    if draws > total:
        return 0.0

    def log_choose(a, b):
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    terms = [
        log_choose(num_refs, r) + log_choose(num_train, draws - r) - log_choose(total, draws)
        for r in range(min(j - 1, num_refs) + 1)
        if draws - r <= num_train
    ]
    return float(min(1.0, sum(math.exp(t) for t in terms)))


def loss_excess_p(train_losses: np.ndarray, reference_losses: np.ndarray, max_rank: int = 1) -> float:
    """p-value of the train losses' upper tail under exchangeability with the references: the smallest
    :func:`tail_count_p` over the thresholds ``j`` = 1, 2, 4, ... up to ``max_rank`` (``drift_harm_max_rank``) and
    up to ``n``, times their number (1.0 without train rows or references)."""
    train = np.asarray(train_losses, dtype=np.float64)
    refs = np.sort(np.asarray(reference_losses, dtype=np.float64))[::-1]
    ranks = [2**i for i in range(int(max_rank).bit_length()) if 2**i <= min(max_rank, len(refs))]
    if not len(train) or not ranks:
        return 1.0
    ps = [tail_count_p(len(train), len(refs), j, int(np.count_nonzero(train > refs[j - 1]))) for j in ranks]
    return float(min(1.0, len(ranks) * min(ps)))


def accuracy_drop_p(start: dict, now: dict, draws: int = SIGN_FLIPS, seed: int = 0) -> float:
    """One-sided p-value that the per-query accuracy ``now`` is below ``start`` (dicts query row -> accuracy), by a
    seeded sign-flip test of the mean paired difference over the queries in both (1.0 with fewer than two, or when
    nothing changed)."""
    common = sorted(set(start) & set(now))
    if len(common) < 2:
        return 1.0
    d = np.array([now[q] - start[q] for q in common], dtype=np.float64)
    if not np.any(d):
        return 1.0
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(draws, len(d)))
    flipped = (signs * d).mean(axis=1)
    return float((1 + np.count_nonzero(flipped <= d.mean() + 1e-12)) / (draws + 1))
