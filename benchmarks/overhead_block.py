"""Overhead section 6, ``block``: the fast paths against full rescoring along one training trajectory.

The fast paths are captured features (the default) and block rescoring (``drift_max_train_examples``). Reported per
refresh: time, and the correlation of their scores, smoothed scores and weights with full rescoring (for captured
features, split by the age of the feature). One shared trajectory per learning rate isolates staleness.

    PYTHONPATH=. python benchmarks/overhead_block.py --quick    # this section alone (prints JSON)
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch
from common import first_digit_reward, model_of, offline_setup, run_section, sft_rows, sft_step, tokenizer

from drift_trainer.cli.toy import Corruption, addition_dataset, query_dataset_from
from drift_trainer.core.capture import FeatureCache, TrainCapture
from drift_trainer.core.feature_pass import TrainView
from drift_trainer.core.features import ProjectedGradients, collate_right, select_target_modules
from drift_trainer.core.refresh import new_weights, run_refresh

offline_setup()


def bench_block(cfg) -> dict:
    """Fast paths vs full rescoring along shared training trajectories (one per learning rate; isolates staleness)."""
    return {"trajectories": [_fast_path_trajectory(cfg, lr) for lr in cfg.block_lrs]}


def _spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties), without scipy."""
    import pandas as pd

    return float(np.corrcoef(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())[0, 1])


def _trajectory_setup(cfg, lr: float) -> SimpleNamespace:
    """The model, rows, queries, optimizer, the four paths' arguments, and one capture per capture path."""
    from trl.trainer.utils import add_fused_lm_head

    from drift_trainer.hf.config import DriftArguments

    torch.manual_seed(0)
    model = model_of("tiny")
    add_fused_lm_head(model)  # as SFTTrainer does: the loss is built from fused per-token log-probabilities
    data = addition_dataset(cfg.block_train, seed=0, corruption=Corruption("systematic", 0.3))
    rows = sft_rows(data)
    queries = query_dataset_from(addition_dataset(64, seed=1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    block = len(rows) // cfg.block_fraction
    common = dict(drift_num_queries=32, drift_num_rollouts=4, drift_max_new_tokens=8, drift_progress=False)
    paths = {
        "full": DriftArguments(**common, drift_capture_features=False),
        "block": DriftArguments(**common, drift_capture_features=False, drift_max_train_examples=block),
        "capture": DriftArguments(**common),
        "capture_fallback": DriftArguments(**common, drift_capture_min_agreement=0.9),
        "capture_unchecked": DriftArguments(**common, drift_capture_check_rows=0),
    }
    projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
    # one cache per capture path (a refresh writes its recomputed rows into its own cache), both fed by the training
    captures = {
        name: TrainCapture(projector, FeatureCache(len(rows), projector.dim)) for name in paths if "capture" in name
    }
    view = TrainView(rows=rows, user_index=np.arange(len(rows)), num_examples=len(rows))
    return SimpleNamespace(
        model=model,
        data=data,
        rows=rows,
        queries=queries,
        opt=opt,
        rng=rng,
        block=block,
        paths=paths,
        projector=projector,
        captures=captures,
        view=view,
        step=0,
    )


def _train(cfg, t: SimpleNamespace, steps: int) -> None:
    """The SFT loss (token mean) with features captured in its backward, as DriftSFTTrainer does."""
    t.model.train()
    for _ in range(steps):
        idx = t.rng.integers(0, len(t.rows), cfg.e2e_batch_size)
        batch = collate_right([t.rows[i] for i in idx], tokenizer().pad_token_id)
        sft_step(t.model, t.opt, batch, list(t.captures.values()), idx, t.step)
        t.step += 1


def _score_paths(t: SimpleNamespace, r: int, state: dict, rec: dict) -> dict:
    """Refresh ``r`` on every path (same model, same rollouts); updates each path's smoothed scores and weights in
    ``state``, times and counts in ``rec``; returns each path's (scores, scored mask)."""
    scores = {}
    for name, a in t.paths.items():
        s = time.perf_counter()
        res = run_refresh(
            args=a,
            step=t.step,
            model=t.model,
            tokenizer=tokenizer(),
            view=t.view,
            query_dataset=t.queries,
            reward_funcs=[first_digit_reward],
            projector=t.projector,
            refresh_index=r,
            seed=0,
            progress=False,
            capture=t.captures.get(name),
        )
        rec[f"{name}_s"] = time.perf_counter() - s
        rec["contrast"] = res.contrast
        rec["rollout_accuracy"] = res.rollout_accuracy
        scores[name] = (res.scores, res.scored)
        rec[f"{name}_scored"] = int(res.scored.sum())
        rec[f"{name}_recomputed"] = res.num_recomputed if res.num_recomputed >= 0 else int(res.scored.sum())
        if name in t.captures:
            rec[f"{name}_agreement"] = res.capture_agreement
            rec[f"{name}_fallback"] = res.capture_full
        if res.contrast:
            state[name] = new_weights(res, *state[name], a)
    return scores


def _compare_to_full(t: SimpleNamespace, state: dict, scores: dict, corrupted: np.ndarray, rec: dict) -> None:
    """Pearson/Spearman of each fast path's smoothed scores, weights and own scores against the full path."""
    zf, wf = state["full"]
    rec["corrupted_mean_weight_full"] = float(wf[corrupted].mean()) if wf is not None else None
    sf, okf = scores["full"]
    for name in t.paths:
        if name == "full":
            continue
        z, w = state[name]
        if zf is not None and z is not None:
            rec[f"{name}_pearson_smoothed"] = float(np.corrcoef(zf, z)[0, 1])
            rec[f"{name}_spearman_smoothed"] = float(_spearman(zf, z))
            rec[f"{name}_pearson_weights"] = float(np.corrcoef(wf, w)[0, 1])
            rec[f"{name}_corrupted_mean_weight"] = float(w[corrupted].mean())
        sc, okc = scores[name]
        both = okf & okc
        if both.sum() > 2:  # this refresh's own scores (before smoothing), over the rows both paths scored
            rec[f"{name}_pearson_scores"] = float(np.corrcoef(sf[both], sc[both])[0, 1])


def _by_age(cfg, t: SimpleNamespace, scores: dict, rec: dict) -> None:
    """The cache alone, by the age of the feature: rows trained since the previous refresh vs older ones."""
    sf, okf = scores["full"]
    cache = t.captures["capture_unchecked"].cache
    age = t.step - cache.step
    sc, okc = scores["capture_unchecked"]
    both = okf & okc
    for label, sel in (("fresh", both & (age <= cfg.block_every)), ("old", both & (age > cfg.block_every))):
        rec[f"n_{label}"] = int(sel.sum())
        if sel.sum() > 2:
            rec[f"pearson_scores_{label}"] = float(np.corrcoef(sf[sel], sc[sel])[0, 1])


def _print_refresh(lr: float, r: int, rec: dict) -> None:
    print(
        f"  fast paths lr {lr:g} refresh {r}: acc {rec['rollout_accuracy']:.2f}; s full {rec['full_s']:.2f} block "
        f"{rec['block_s']:.2f} capture {rec['capture_s']:.2f} (agreement {rec.get('capture_agreement')}, "
        f"fallback {rec.get('capture_fallback')}) unchecked {rec['capture_unchecked_s']:.2f}; pearson of this "
        f"refresh's scores vs full: block {rec.get('block_pearson_scores', float('nan')):.3f}, capture "
        f"{rec.get('capture_pearson_scores', float('nan')):.3f}, unchecked "
        f"{rec.get('capture_unchecked_pearson_scores', float('nan')):.3f} (fresh rows "
        f"{rec.get('pearson_scores_fresh', float('nan')):.3f}, older {rec.get('pearson_scores_old', float('nan')):.3f})",
        flush=True,
    )


def _fast_path_trajectory(cfg, lr: float) -> dict:
    """One training trajectory; at each refresh the full path and the fast paths score the same model with the same
    rollouts: block rescoring (``drift_max_train_examples``), captured features as by default (budget 0.1, stale rows
    shrunk by the 32-row check's agreement), with the opt-in fallback to full rescoring below an agreement of 0.9, and
    with the check off (what the cache alone gives)."""
    t = _trajectory_setup(cfg, lr)
    state = {name: (None, None) for name in t.paths}
    _train(cfg, t, cfg.block_warmup)
    log = []
    corrupted = np.asarray(t.data["corrupted"])
    for r in range(cfg.block_refreshes):
        if r:
            _train(cfg, t, cfg.block_every)
        rec = {"refresh": r, "step": t.step}
        scores = _score_paths(t, r, state, rec)
        _compare_to_full(t, state, scores, corrupted, rec)
        _by_age(cfg, t, scores, rec)
        log.append(rec)
        _print_refresh(lr, r, rec)
    for c in t.captures.values():
        c.remove()
    return {
        "learning_rate": lr,
        "train_examples": len(t.rows),
        "drift_max_train_examples": t.block,
        "warmup_steps": cfg.block_warmup,
        "steps_between": cfg.block_every,
        "batch_size": cfg.e2e_batch_size,
        "refreshes": log,
    }


if __name__ == "__main__":
    run_section("block", bench_block, __doc__)
