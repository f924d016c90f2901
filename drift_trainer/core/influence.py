"""Influence: scores of train features against the signed on-policy target.

``score_i = < H^-1 G, phi_i / ||phi_i||^alpha >`` with ``G = sum_j sign_j r_j / ||r_j||``. All arithmetic is float64
on CPU (the projected space is small), whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

EPS = 1e-12


def signed_target(rollout_features: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``G`` (k,): the signed sum of normalised rollout features."""
    r = np.asarray(rollout_features, dtype=np.float64)
    norms = np.linalg.norm(r, axis=1, keepdims=True)
    return (np.asarray(signs, dtype=np.float64)[:, None] * r / np.maximum(norms, EPS)).sum(0)


def second_moment(blocks: Iterable[np.ndarray], dim: int) -> tuple[np.ndarray, int]:
    """``(sum_i phi_i phi_i^T, n)`` over feature blocks (each ``(rows, dim)``), streamed in float64: the empirical
    Fisher is the sum over every rank's rows divided by their count."""
    total, count = np.zeros((dim, dim)), 0
    for block in blocks:
        b = np.asarray(block, dtype=np.float64)
        total += b.T @ b
        count += len(b)
    return total, count


def precondition(
    target: np.ndarray, preconditioner: str, fisher_matrix: np.ndarray | None, damping: float
) -> np.ndarray:
    """``H^-1 G``. ``fisher``: ``(F + damping * mean_eig(F) * I)^-1 G``; ``identity``: ``G``."""
    if preconditioner == "identity":
        return np.asarray(target, dtype=np.float64)
    if preconditioner != "fisher":
        raise ValueError(f"drift_preconditioner must be 'identity' or 'fisher'; got {preconditioner!r}.")
    k = fisher_matrix.shape[0]
    lam = damping * max(np.trace(fisher_matrix) / k, EPS)
    return np.linalg.solve(fisher_matrix + lam * np.eye(k), target)


def inner_products(blocks: Iterable[np.ndarray], direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores ``<direction, phi_i>`` (n,) and gradient norms ``||phi_i||`` (n,) of the rows of feature blocks,
    in block order (float64, one block at a time)."""
    raw, norms = [np.zeros(0)], [np.zeros(0)]
    for block in blocks:
        b = np.asarray(block, dtype=np.float64)
        raw.append(b @ direction)
        norms.append(np.linalg.norm(b, axis=1))
    return np.concatenate(raw), np.concatenate(norms)


def debias_raw(raw: np.ndarray, norms: np.ndarray, debias: str = "normalize", alpha: float = 1.0) -> np.ndarray:
    """Debias raw inner products ``<d, phi_i>`` against the gradient norms ``||phi_i||``.

    ``normalize``: ``raw / ||phi_i||^alpha``. ``regress``: raw scores minus their least-squares fit on
    ``[1, log ||phi_i||]``, plus their mean (so the scale is kept). ``none``: raw. Zero features (fully masked
    examples) score 0.
    """
    raw = np.asarray(raw, dtype=np.float64)
    norms = np.asarray(norms, dtype=np.float64)
    live = norms > EPS
    if debias == "none":
        scores = raw.copy()
    elif debias == "normalize":
        scores = np.where(live, raw / np.maximum(norms, EPS) ** alpha, 0.0)
    elif debias == "regress":
        scores = raw.copy()
        if live.sum() >= 3:
            x = np.stack([np.ones(live.sum()), np.log(norms[live])], axis=1)
            coef, *_ = np.linalg.lstsq(x, raw[live], rcond=None)
            scores[live] = raw[live] - x @ coef + raw[live].mean()
    else:
        raise ValueError(f"drift_debias must be one of 'normalize', 'regress', 'none'; got {debias!r}.")
    return np.where(live, scores, 0.0)
