"""``drift_harm_gate``: does the train data show harm? Two tests, each a p-value under "the data is clean".

DRIFT leaves the weights at exactly 1 (plain SFT's batches) until a refresh finds evidence of harm, then reweights
for the rest of training. On clean data a reweighting can only cost (the benchmark's clean kind: every rule that
moved weight lost to plain SFT), so the gate asks first whether there is anything to fix:

- **Loss beyond every reference** (:func:`loss_excess_p`): train rows whose loss is above the loss of every one of
  the ``n`` sampled queries' reference answers, both measured at the refresh by the same forward pass (a sample of
  ``N`` train rows). If train rows and references were exchangeable (clean data from the queries' distribution), ``k``
  or more of the ``N`` rows lie above all ``n`` references only when the top ``k`` of the ``N + n`` pooled losses are
  all train rows, with probability ``prod_{i<k} (N - i) / (N + n - i)``; training on the rows only lowers their loss,
  so the test is conservative. Wrong answers that the model finds less likely than any right one push ``k`` up.
- **Validation accuracy below the start** (:func:`accuracy_drop_p`): the rollouts' per-query accuracy now against the
  start model's (measured before the first step), one-sided, by a paired sign-flip test over the queries in both.
  Fine-tuning on clean data does not make the model worse at its own validation queries; a learnable wrong rule does.
"""

from __future__ import annotations

import numpy as np

SIGN_FLIPS = 4000  # draws of the sign-flip test (its p-value resolution is 1 / (draws + 1))


def per_query_accuracy(rollouts, threshold: float) -> dict[int, float]:
    """Share of each query's rollouts judged right (reward >= ``threshold``), keyed by query row."""
    query = np.asarray(rollouts.query_index, dtype=np.int64)
    right = np.asarray(rollouts.rewards, dtype=np.float64) >= threshold
    return {int(q): float(right[query == q].mean()) for q in np.unique(query)}


def loss_excess_p(train_losses: np.ndarray, reference_losses: np.ndarray) -> float:
    """p-value of as many train losses above the largest reference loss under exchangeability:
    ``prod_{i<k} (N - i) / (N + n - i)`` for ``k`` of ``N`` train rows above all ``n`` references (1.0 without
    either)."""
    train = np.asarray(train_losses, dtype=np.float64)
    refs = np.asarray(reference_losses, dtype=np.float64)
    if not len(train) or not len(refs):
        return 1.0
    k = int(np.count_nonzero(train > refs.max()))
    i = np.arange(k)
    return float(np.exp(np.sum(np.log(len(train) - i) - np.log(len(train) + len(refs) - i))))


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
