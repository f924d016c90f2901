"""Signing: turn rollout rewards into signed weights of the validation target."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from drift_trainer.core.params import SigningParams


def rollout_signs(
    rewards: np.ndarray,
    query_index: np.ndarray,
    signing: str = "correctness",
    threshold: float = 0.5,
    no_contrast: str = "skip",
) -> np.ndarray:
    """Signed weight of each rollout in the target ``G = sum_j sign_j * r_j / ||r_j||``.

    ``correctness``: correct (reward >= threshold) rollouts share +1 and wrong ones share -1, each class averaged over
    its members so neither dominates by count. With ``no_contrast="skip"`` the rollouts of a query whose rollouts are
    all correct or all wrong get 0. ``advantage``: reward minus the query's mean reward, scaled so the absolute signs
    sum to 2 (as under ``correctness``). Returns zeros when nothing carries contrast.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    query_index = np.asarray(query_index)
    groups: dict[int, list[int]] = defaultdict(list)
    for j, q in enumerate(query_index.tolist()):
        groups[q].append(j)
    signs = np.zeros_like(rewards)
    if signing == "advantage":
        for members in groups.values():
            r = rewards[members]
            signs[members] = r - r.mean()
    elif signing == "correctness":
        correct = rewards >= threshold
        use = np.ones_like(correct)
        if no_contrast == "skip":
            for members in groups.values():
                if correct[members].all() or not correct[members].any():
                    use[members] = False
        pos, neg = correct & use, ~correct & use
        if pos.any():
            signs[pos] = 1.0 / pos.sum()
        if neg.any():
            signs[neg] = -1.0 / neg.sum()
    else:
        raise ValueError(f"drift_signing must be 'correctness' or 'advantage'; got {signing!r}.")
    total = np.abs(signs).sum()
    if total > 0 and signing == "advantage":
        signs *= 2.0 / total
    return signs


def has_contrast(signs: np.ndarray) -> bool:
    """True when the target carries both a positive and a negative direction (or any advantage)."""
    return bool((signs > 0).any() and (signs < 0).any())


def sign_rollouts(rewards, query_index, params) -> tuple[np.ndarray, bool]:
    """Signs of a refresh's rollouts under ``params`` (a :class:`SigningParams` or a config with ``drift_signing``,
    ``drift_reward_threshold``, ``drift_no_contrast``) and whether they carry contrast (else the refresh keeps the previous weights)."""
    p = SigningParams.of(params)
    signs = rollout_signs(
        np.asarray(rewards),
        np.asarray(query_index),
        p.signing,
        p.reward_threshold,
        p.no_contrast,
    )
    contrast = has_contrast(signs) if p.signing == "correctness" else bool(np.abs(signs).sum() > 0)
    return signs, contrast
