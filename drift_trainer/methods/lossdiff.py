"""LossDiff-IRM selection with truncated influence (arXiv 2510.13212) for preference data.

After a DPO warm-up on all pairs, two forward-only proxies of a pair's influence:

- ``LossDiff(d) = loss(theta; d) - loss(theta_val; d)``, ``theta_val`` an auxiliary copy of the initial model trained
  one epoch on the validation pairs;
- ``IRM(d) = beta * log(pi/pi_ref)(y_w|x) - beta * log(pi/pi_ref)(y_l|x)`` (the implicit reward margin).

Medium-influence pairs are the valuable ones (TIF): keep the pairs whose LossDiff and IRM both fall in middle
percentile bands (the paper keeps about 50-64% of the data), then continue training on them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from drift_trainer.core.features import collate_right, per_example_loss
from drift_trainer.methods.pairs import PairLogps, pair_logps, pair_losses, pair_rows

LOSSDIFF_SCORES = ("both", "lossdiff", "irm")


def copy_model(model):
    """An independent copy of ``model`` that computes with its own weights.

    ``copy.deepcopy`` alone is not enough for a model that has been through a mixed-precision ``Trainer.train()``:
    accelerate leaves its ``forward`` replaced by an autocast wrapper whose closure holds the original model's bound
    ``forward``, and a deep copy shares that closure, so the copy would keep computing with the original's weights
    however it is trained. The copy drops the wrapper (any instance ``forward`` next to accelerate's
    ``_original_forward``) and uses its class's ``forward``; a later ``Trainer`` wraps it again as it needs."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        attrs = module.__dict__
        if "_original_forward" in attrs:
            attrs.pop("_original_forward")
            attrs.pop("forward", None)
    return clone


def band_mask(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Keep the middle band of ``values`` by rank: exactly ``r(n*high/100) - r(n*low/100)`` entries, ``r(x) =
    floor(x + 0.5)`` (round half up).

    The entries ranked ``r(n*low/100)`` .. ``r(n*high/100) - 1`` (ascending, ties in index order) are True.
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"A percentile band needs 0 <= low < high <= 100; got {low!r} and {high!r}.")
    lo, hi = int(np.floor(n * low / 100.0 + 0.5)), int(np.floor(n * high / 100.0 + 0.5))
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(v, kind="stable")[lo:hi]] = True
    return mask


def select_pairs(lossdiff: np.ndarray, irm: np.ndarray, args) -> np.ndarray:
    """Bool mask of the pairs kept: in the middle band of LossDiff and (``both``) / or only of one score."""
    which = getattr(args, "drift_lossdiff_score", "both")
    ld = band_mask(lossdiff, args.drift_lossdiff_low, args.drift_lossdiff_high)
    ir = band_mask(irm, args.drift_irm_low, args.drift_irm_high)
    if which == "lossdiff":
        return ld
    if which == "irm":
        return ir
    return ld & ir


def _losses(args, pol: PairLogps, ref: PairLogps | None) -> np.ndarray:
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    out = pair_losses(
        args.loss_type,
        args.loss_weights,
        args.beta,
        t(pol.chosen),
        t(pol.rejected),
        t(ref.chosen) if ref is not None else None,
        t(ref.rejected) if ref is not None else None,
        t(pol.n_chosen),
        t(pol.n_rejected),
        getattr(args, "simpo_gamma", 0.5),
    )
    return out.numpy()


def lossdiff_irm_scores(
    args, policy_logps: PairLogps, val_logps: PairLogps, ref_logps: PairLogps | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(LossDiff (n,), IRM (n,))`` from the pairs' log-probabilities under theta, theta_val and the reference.

    Losses are the run's own per-pair preference loss (``args.loss_type``). IRM is ``beta * (log-ratio margin)``;
    for a reference-free loss (SimPO, no ``ref_logps``) it is the length-normalised margin ``beta*(lp_w/|y_w| -
    lp_l/|y_l|)``.
    """
    lossdiff = _losses(args, policy_logps, ref_logps) - _losses(args, val_logps, ref_logps)
    p = policy_logps
    if ref_logps is None:
        irm = args.beta * (p.chosen / np.maximum(p.n_chosen, 1) - p.rejected / np.maximum(p.n_rejected, 1))
    else:
        irm = args.beta * ((p.chosen - ref_logps.chosen) - (p.rejected - ref_logps.rejected))
    return lossdiff, irm


def train_validation_model(
    initial_model,
    rows: Sequence[dict],
    ref_logps: PairLogps | None,
    args,
    pad_token_id: int,
    epochs: float = 1.0,
    seed: int = 0,
):
    """``theta_val``: a copy of ``initial_model`` trained ``epochs`` epochs on the validation pairs ``rows``
    (TRL-prepared) with the run's preference loss, AdamW at ``args.learning_rate``, batch
    ``args.per_device_train_batch_size``. A small plain loop (no Trainer); the RNG of the caller is left untouched."""
    model = copy_model(initial_model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    device = next(model.parameters()).device
    bs = max(1, int(args.per_device_train_batch_size))
    n = len(rows)
    steps = int(np.ceil(epochs * n / bs))
    gen = np.random.default_rng(seed)
    order = np.concatenate([gen.permutation(n) for _ in range(int(np.ceil(epochs)) + 1)])
    ref = (
        None
        if ref_logps is None
        else {k: torch.as_tensor(getattr(ref_logps, k), dtype=torch.float32) for k in ("chosen", "rejected")}
    )
    for s in range(steps):
        idx = order[s * bs : (s + 1) * bs]
        chosen, rejected = zip(*(pair_rows(rows[i]) for i in idx))
        batch = collate_right(list(chosen) + list(rejected), pad_token_id, device)
        loss, ntok = per_example_loss(model, batch)
        lp = -loss * ntok.to(loss.dtype)
        e = len(idx)
        per = pair_losses(
            args.loss_type,
            args.loss_weights,
            args.beta,
            lp[:e],
            lp[e:],
            ref["chosen"][idx].to(device) if ref is not None else None,
            ref["rejected"][idx].to(device) if ref is not None else None,
            ntok[:e].float(),
            ntok[e:].float(),
            getattr(args, "simpo_gamma", 0.5),
        )
        opt.zero_grad(set_to_none=True)
        per.mean().backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
    model.eval()
    return model


def score_and_select(
    policy, val_model, ref_fn, rows: Sequence[dict], args, pad_token_id: int, batch_size: int = 16, dist=None
) -> dict:
    """Score every prepared pair and select the middle bands. ``ref_fn(rows) -> PairLogps | None``. ``dist``: split
    the forwards over its ranks (every rank must call and ends with every score).

    Returns a dict with ``lossdiff``, ``irm`` (n,) and ``keep`` (bool, n).
    """
    pol = pair_logps(policy, rows, pad_token_id, batch_size, dist)
    val = pair_logps(val_model, rows, pad_token_id, batch_size, dist)
    ref = ref_fn(rows)
    lossdiff, irm = lossdiff_irm_scores(args, pol, val, ref)
    return {"lossdiff": lossdiff, "irm": irm, "keep": select_pairs(lossdiff, irm, args)}
