"""Preference pairs: tokenized rows, sequence log-probabilities and per-pair losses (DPO family and SimPO).

Shared by :mod:`drift_trainer.hf.dpo_trainer` (the weighted loss), DRIFT pair features (:data:`PAIR_ROWS`) and
:mod:`drift_trainer.methods.lossdiff`.
A pair's rows follow TRL's ``DPOTrainer`` preparation: ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``,
labels on the completion tokens only; log-probabilities are summed over the completion tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from drift_trainer.core.feature_pass import RowFormat, TrainView
from drift_trainer.core.features import IGNORE_INDEX, collate_right, per_example_loss, summed_logps

# loss types the per-pair (weighted) path implements; `simpo` is ours (TRL 1.16's DPOTrainer has none)
PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "sigmoid_norm", "simpo")
REFERENCE_FREE = ("simpo",)


def pair_rows(row: dict) -> tuple[dict, dict]:
    """``(chosen, rejected)`` rows of one TRL-prepared pair (``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""
    p = list(row["prompt_ids"])
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        c = list(row[key])
        out.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    return out[0], out[1]


@dataclass
class PairLogps:
    """Summed completion log-probabilities and completion lengths of ``n`` pairs (float64 numpy arrays)."""

    chosen: np.ndarray
    rejected: np.ndarray
    n_chosen: np.ndarray
    n_rejected: np.ndarray


def pair_logps(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 16, dist=None) -> PairLogps:
    """Log-probabilities of every TRL-prepared pair in ``rows`` under ``model`` (forward only, eval mode; split over
    the ranks of ``dist``, every rank ending with all of them)."""
    flat = [r for row in rows for r in pair_rows(row)]  # chosen, rejected, chosen, rejected, ...
    lp, nt = summed_logps(model, flat, pad_token_id, batch_size, dist)
    return PairLogps(lp[0::2], lp[1::2], nt[0::2], nt[1::2])


def pair_losses(
    loss_types: Sequence[str],
    loss_weights: Sequence[float] | None,
    beta: float,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    simpo_gamma: float = 0.5,
) -> torch.Tensor:
    """Per-pair loss (n,), the weighted sum over ``loss_types``, with TRL's formulas (reverse-KL DPO family).

    ``sigmoid`` (DPO), ``hinge``, ``ipo`` (length-normalised, as TRL), ``sigmoid_norm``, and ``simpo``:
    ``-logsigmoid(beta * (lp_w / |y_w| - lp_l / |y_l|) - simpo_gamma)`` (reference-free, Meng et al. 2024).
    """
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    total = torch.zeros_like(chosen_logps)
    nw, nl = n_chosen.clamp(min=1.0), n_rejected.clamp(min=1.0)
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if loss_type == "simpo":
            per = -F.logsigmoid(beta * (chosen_logps / nw - rejected_logps / nl) - simpo_gamma)
        else:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError(f"loss_type={loss_type!r} needs reference log-probabilities.")
            cr = chosen_logps - ref_chosen_logps
            rr = rejected_logps - ref_rejected_logps
            if loss_type == "sigmoid":
                per = -F.logsigmoid(beta * (cr - rr))
            elif loss_type == "hinge":
                per = torch.relu(1 - beta * (cr - rr))
            elif loss_type == "ipo":
                per = (cr / nw - rr / nl - 1 / (2 * beta)) ** 2
            elif loss_type == "sigmoid_norm":
                per = -F.logsigmoid(beta * (cr / nw - rr / nl))
            else:
                raise ValueError(
                    f"loss_type {loss_type!r} has no per-pair (reweighted) implementation; use one of "
                    f"{', '.join(map(repr, PAIR_LOSSES))}, or drift_method='uniform' for TRL's own loss."
                )
        total = total + weight * per
    return total


def implicit_rewards(
    loss_types: Sequence[str], beta: float, logps: torch.Tensor, ref_logps: torch.Tensor | None, n: torch.Tensor
) -> torch.Tensor:
    """The implicit reward of each completion: ``beta * log(pi/pi_ref)``, or ``beta * lp / |y|`` for SimPO."""
    if any(t in REFERENCE_FREE for t in loss_types) or ref_logps is None:
        return beta * logps / n.clamp(min=1.0)
    return beta * (logps - ref_logps)


def pair_nll_loss(model, batch: dict, fused_lm_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss for DRIFT features: ``-(log p(y_w|x) - log p(y_l|x))`` (summed over completion tokens).

    ``batch`` holds the chosen rows of ``E`` pairs followed by their rejected rows (``2E`` rows, right padded).
    Returns ``(loss (E,), num_tokens (E,))``.
    """
    loss, ntok = per_example_loss(model, batch, fused_lm_head)  # mean NLL per row
    nll = loss * ntok.to(loss.dtype)  # summed NLL per row
    e = nll.shape[0] // 2
    return nll[:e] - nll[e:], ntok[:e] + ntok[e:]


def pair_feature_batch(rows: Sequence[dict], pad_token_id: int, device) -> dict:
    """A feature batch of ``E`` TRL-prepared pairs: chosen rows, then rejected rows, with ``row_group``."""
    chosen, rejected = zip(*(pair_rows(r) for r in rows))
    batch = collate_right(list(chosen) + list(rejected), pad_token_id, device)
    e = len(rows)
    batch["row_group"] = torch.cat([torch.arange(e), torch.arange(e)]).to(device)
    return batch


def pair_length(row: dict) -> int:
    """Tokens of a pair's two rows (for length-sorted feature batches)."""
    return 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])


# DRIFT on pairs: a pair's feature is the gradient of -(log p(y_w|x) - log p(y_l|x)), from its two rows
PAIR_ROWS = RowFormat(collate=pair_feature_batch, length=pair_length, loss_fn=pair_nll_loss)


class PairView(TrainView):
    """TRL-prepared pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) as the rows a refresh scores."""

    def fetch(self, indices: np.ndarray) -> list[dict]:
        return [self.rows[int(i)] for i in indices]
