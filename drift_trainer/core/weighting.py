"""Weighting: scores to sampling weights (mean 1 over the scored examples, clipped, mixed with uniform)."""

from __future__ import annotations

import numpy as np
import torch

from drift_trainer.core.params import WeightingParams


def standardize(scores: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """z-scores over ``mask`` (all if None); entries outside the mask are 0."""
    s = np.asarray(scores, dtype=np.float64)
    mask = np.ones(len(s), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    z = np.zeros_like(s)
    if mask.sum() > 1:
        mu, sd = s[mask].mean(), s[mask].std()
        z[mask] = (s[mask] - mu) / (sd if sd > 0 else 1.0)
    return z


def normal_scores(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``drift_loss_ranks``: each masked entry's rank mapped through the standard normal quantile, ``Phi^-1((r -
    0.5) / m)`` (ties share their mean rank); entries outside the mask are 0. Standard normal whatever the values'
    distribution, so a long tail counts no more than a short one."""
    v = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(v)
    m = int(mask.sum())
    if m > 1:
        _, group, count = np.unique(v[mask], return_inverse=True, return_counts=True)
        ranks = (np.cumsum(count) - (count - 1) / 2.0)[group]  # 1-based; ties: their mean rank
        out[mask] = torch.special.ndtri(torch.from_numpy((ranks - 0.5) / m)).numpy()
    return out


def _normalise_mean_one(w: np.ndarray) -> np.ndarray:
    total = w.sum()
    if total <= 0:
        raise ValueError(
            "Every weight is zero after weighting: lower drift_prune_fraction, widen drift_truncate_low / "
            "drift_truncate_high, or raise drift_uniform_mix."
        )
    return w * (len(w) / total)


def clip_mean_one(w: np.ndarray, clip: float, iters: int = 20) -> np.ndarray:
    """Scale to mean 1 and cap at ``clip``, repeating until both hold (water-filling)."""
    w = _normalise_mean_one(np.asarray(w, dtype=np.float64))
    for _ in range(iters):
        if w.max() <= clip * (1 + 1e-9):
            break
        capped = w >= clip
        w[capped] = clip
        free = ~capped
        budget = len(w) - capped.sum() * clip
        if free.sum() == 0 or w[free].sum() <= 0:
            break
        w[free] *= budget / w[free].sum()
    return w


def mixture_weights(z: np.ndarray, iters: int = 200, tol: float = 1e-8) -> np.ndarray:
    """The ``mixture`` rule: weights in [0, 1] from a two-Gaussian mixture fit by EM to the scores ``z``.

    A row's weight is its posterior probability of the upper component (the one with the higher mean). Rows at or
    above that mean keep 1, and below it a weight never rises as the score falls (a running minimum from the top),
    so the rule only takes weight away, and only from rows in a separate low group. On unimodal scores the low
    component is a thin tail and almost every row keeps 1; a group of rows with harmful evidence becomes the low
    component as a whole. When the two means lie closer than the narrower component's standard deviation, the fit
    describes one group's shape (a narrow core and heavy tails) and every row keeps 1. Deterministic (initialised at
    the 10th and 60th percentiles), no tuned parameters."""
    x = np.asarray(z, dtype=np.float64)
    n = len(x)
    if n < 2 or x.std() == 0:
        return np.ones(n)
    x = standardize(x)
    mu = np.percentile(x, [10.0, 60.0])
    sd = np.ones(2)
    pi = np.array([0.3, 0.7])
    prev = -np.inf
    for _ in range(iters):
        logp = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(pi)
        top = logp.max(axis=1, keepdims=True)
        resp = np.exp(logp - top)
        total = resp.sum(axis=1, keepdims=True)
        resp /= total
        loglik = float((np.log(total) + top).sum())
        nk = resp.sum(axis=0) + 1e-12
        pi = np.clip(nk / n, 1e-6, None)
        pi /= pi.sum()
        mu = (resp * x[:, None]).sum(axis=0) / nk
        sd = np.sqrt((resp * (x[:, None] - mu) ** 2).sum(axis=0) / nk) + 1e-3
        if loglik - prev < tol * n:
            break
        prev = loglik
    hi, lo = int(np.argmax(mu)), int(np.argmin(mu))
    if mu[hi] - mu[lo] <= sd.min():
        # means closer than the narrower component's spread: the two components describe one group's shape (a
        # narrow core and heavy tails), not a group below the rest
        return np.ones(n)
    w = resp[:, hi].copy()
    w[x >= mu[hi]] = 1.0
    order = np.argsort(-x, kind="stable")
    out = np.empty(n)
    out[order] = np.minimum.accumulate(w[order])
    return out


def scores_to_weights(
    scores: np.ndarray, params, mask: np.ndarray | None = None, demote: np.ndarray | None = None
) -> np.ndarray:
    """Weights (n,) with mean 1 over ``mask`` (examples that were scored); unscored examples get 1.

    ``params``: a :class:`WeightingParams` or a config. Rules (``weighting``, flag ``drift_weighting``): ``softmax``
    of standardised scores over ``drift_softmax_temperature``; ``prune`` sets the lowest ``drift_prune_fraction`` to 0
    and the rest to 1; ``truncate`` keeps (1) the scores between percentiles ``drift_truncate_low`` and
    ``drift_truncate_high`` and sets the rest to 0; ``demote`` keeps 1 for standardised scores ``z >=
    -drift_demote_threshold`` and ``exp((z + threshold) / drift_softmax_temperature)`` below; ``mixture`` keeps 1
    except for rows in a separate low group of a two-Gaussian mixture (:func:`mixture_weights`); ``flat`` keeps 1.
    ``demote`` (n,) bool: rows whose weight is set to 0 after the rule (``drift_reference_bound``; ignored if it
    would take every scored row). Then weights are clipped at ``drift_weight_clip`` keeping mean 1, and mixed:
    ``(1 - drift_uniform_mix) * w + drift_uniform_mix``.
    """
    s = np.asarray(scores, dtype=np.float64)
    mask = np.ones(len(s), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out = np.ones(len(s), dtype=np.float64)
    if mask.sum() == 0:
        return out
    live = s[mask]
    p = WeightingParams.of(params)
    rule = p.weighting
    if rule == "softmax":
        z = standardize(live) / p.softmax_temperature
        w = np.exp(z - z.max())
    elif rule == "prune":
        n_drop = int(np.floor(p.prune_fraction * len(live)))
        w = np.ones(len(live))
        if n_drop:
            tiebreak = np.random.default_rng(0).random(len(live))  # equal scores: drop a seeded random subset
            w[np.lexsort((tiebreak, live))[:n_drop]] = 0.0
    elif rule == "demote":
        # only confident harmful evidence moves a weight: rows above -threshold (in std units) keep weight 1
        z = standardize(live)
        w = np.exp(np.minimum(z + p.demote_threshold, 0.0) / p.softmax_temperature)
    elif rule == "mixture":
        w = mixture_weights(live)
    elif rule == "flat":
        w = np.ones(len(live))
    elif rule == "truncate":
        lo, hi = np.percentile(live, [p.truncate_low, p.truncate_high])
        w = ((live >= lo) & (live <= hi)).astype(np.float64)
    else:
        raise ValueError(
            f"drift_weighting must be 'softmax', 'prune', 'truncate', 'demote', 'mixture' or 'flat'; got {rule!r}."
        )
    if demote is not None:
        gone = np.asarray(demote, dtype=bool)[mask]
        if gone.any() and not (gone | (w <= 0)).all():
            w = np.where(gone, 0.0, w)
    w = clip_mean_one(w, p.weight_clip)
    mix = p.uniform_mix
    out[mask] = (1.0 - mix) * w + mix
    return out


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size as a fraction of n: ``(sum w)^2 / (n * sum w^2)``, in (0, 1]."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / (len(w) * (w**2).sum())) if (w**2).sum() > 0 else 0.0
