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


def kronecker_factors(blocks: Iterable[np.ndarray], k: int, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-module Kronecker factors of the features, streamed in float64: ``S (m, k, k) = sum_i Phi_i Phi_i^T`` and
    ``A (m, k, k) = sum_i Phi_i^T Phi_i``, with ``Phi_i`` a row's ``k x k`` block of module ``m`` (blocks are laid out
    module by module, each row-major ``(out, in)``, as :class:`~drift_trainer.core.features.ProjectedGradients`
    writes them); and the row count."""
    m = dim // (k * k)
    s_total, a_total, count = np.zeros((m, k, k)), np.zeros((m, k, k)), 0
    for block in blocks:
        phi = np.asarray(block, dtype=np.float64).reshape(-1, m, k, k)  # (rows, modules, k_out, k_in)
        s_total += np.einsum("rmij,rmlj->mil", phi, phi)
        a_total += np.einsum("rmji,rmjl->mil", phi, phi)
        count += len(phi)
    return s_total, a_total, count


def _damped_inverse(factor: np.ndarray, damping: float) -> np.ndarray:
    k = factor.shape[-1]
    lam = damping * max(np.trace(factor) / k, EPS)
    return np.linalg.inv(factor + lam * np.eye(k))


def kronecker_precondition(target: np.ndarray, s: np.ndarray, a: np.ndarray, damping: float) -> np.ndarray:
    """``H^-1 G`` with ``H`` block-diagonal over modules, each block ``S_m kron A_m`` damped factor by factor:
    module ``m``'s ``k x k`` block of ``G`` becomes ``(S_m + lam I)^-1 G_m (A_m + lam' I)^-1``. ``target``: ``(dim,)``
    or ``(dim, c)`` (columns preconditioned alike)."""
    g = np.asarray(target, dtype=np.float64)
    m, k = s.shape[0], s.shape[1]
    cols = g.reshape(m * k * k, -1)
    out = np.empty_like(cols)
    for j in range(m):
        s_inv, a_inv = _damped_inverse(s[j], damping), _damped_inverse(a[j], damping)
        block = cols[j * k * k : (j + 1) * k * k].T.reshape(-1, k, k)  # (c, k_out, k_in)
        out[j * k * k : (j + 1) * k * k] = (s_inv @ block @ a_inv).reshape(len(block), -1).T
    return out.reshape(g.shape)


def precondition(
    target: np.ndarray, preconditioner: str, fisher_matrix: np.ndarray | None, damping: float
) -> np.ndarray:
    """``H^-1 G`` (``G``: ``(dim,)`` or ``(dim, c)``). ``fisher``: ``(F + damping * mean_eig(F) * I)^-1 G``;
    ``identity``: ``G``."""
    if preconditioner == "identity":
        return np.asarray(target, dtype=np.float64)
    if preconditioner != "fisher":
        raise ValueError(
            f"precondition: 'identity' or 'fisher' (kronecker: kronecker_precondition); got {preconditioner!r}."
        )
    k = fisher_matrix.shape[0]
    lam = damping * max(np.trace(fisher_matrix) / k, EPS)
    return np.linalg.solve(fisher_matrix + lam * np.eye(k), target)


def inner_products(blocks: Iterable[np.ndarray], direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores ``<direction, phi_i>`` ((n,), or (n, c) for a ``(dim, c)`` direction) and gradient norms
    ``||phi_i||`` (n,) of the rows of feature blocks, in block order (float64, one block at a time)."""
    direction = np.asarray(direction, dtype=np.float64)
    raw, norms = [np.zeros((0, *direction.shape[1:]))], [np.zeros(0)]
    for block in blocks:
        b = np.asarray(block, dtype=np.float64)
        raw.append(b @ direction)
        norms.append(np.linalg.norm(b, axis=1))
    return np.concatenate(raw), np.concatenate(norms)


def split_half_reliability(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman-Brown reliability ``2r / (1 + r)`` of the scores two independent halves of the evidence give the
    same rows (``r``: their Pearson correlation), clipped to ``[0, 1]``; 0 when either half is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or a.std() <= EPS or b.std() <= EPS:
        return 0.0
    r = float(np.corrcoef(a, b)[0, 1])
    return float(np.clip(2 * r / (1 + r), 0.0, 1.0)) if r > 0 else 0.0


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
