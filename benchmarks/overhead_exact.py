"""Overhead section 2, ``exact``: hook features against exact per-example gradients.

The exact references are a loop of single-example backward passes (then the same projection) and ``torch.func``
(``functional_call`` + ``grad`` + ``vmap``) [target >= 10x faster; same scores: max relative error reported]. The
same features captured in the training backward (``drift_capture_features``) are timed as their marginal cost over
the training passes that run anyway, and checked against the loop too.

    PYTHONPATH=. python benchmarks/overhead_exact.py --quick    # this section alone (prints JSON)
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import (
    CASES,
    batches_of,
    case_head,
    fmt,
    load_case,
    median,
    offline_setup,
    run_section,
    tokenizer,
)

from drift_trainer.core.capture import FeatureCache, TrainCapture
from drift_trainer.core.features import ProjectedGradients, collate_right, per_example_loss, select_target_modules

offline_setup()


def exact_loop_features(model, projector, rows):
    """Exact per-example gradients: one forward and backward per example (no padding), then the same projection."""
    weights = [m.weight for m in projector.modules]
    feats = []
    pad = tokenizer().pad_token_id
    for r in rows:
        batch = collate_right([r], pad)
        with torch.enable_grad():
            loss, _ = per_example_loss(model, batch)
            grads = torch.autograd.grad(loss.sum(), weights)
        feats.append(
            torch.cat(
                [(po @ g.float() @ pi.T).reshape(-1) for g, po, pi in zip(grads, projector.p_out, projector.p_in)]
            )
        )
    return torch.stack(feats)


def vmap_features(model, projector, batch):
    """Per-example gradients with torch.func (functional_call + grad + vmap), then the same projection.

    No attention mask is passed: transformers' mask construction branches on data, which vmap cannot trace. For a
    right-padded batch this is exact (causal attention: pad tokens come after every real token and carry no label).
    """
    from torch.func import functional_call, grad, vmap

    names = {id(m): n for n, m in model.named_modules()}
    keys = [names[id(m)] + ".weight" for m in projector.modules]
    params = {k: dict(model.named_parameters())[k].detach() for k in keys}

    def loss_fn(p, ids, labels):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids[None], "use_cache": False}).logits
        logits = logits[0, :-1].float()
        target = labels[1:]
        mask = (target != -100).float()
        lp = logits.gather(-1, target.clamp(min=0)[:, None])[:, 0] - torch.logsumexp(logits, -1)
        return -(lp * mask).sum() / mask.sum().clamp(min=1)

    g = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, batch["input_ids"], batch["labels"])
    return torch.cat(
        [
            torch.einsum("kd,bde,le->bkl", po, g[k].float(), pi).reshape(len(batch["input_ids"]), -1)
            for k, po, pi in zip(keys, projector.p_out, projector.p_in)
        ],
        dim=1,
    ).detach()


def _score_errors(fast: np.ndarray, exact: np.ndarray, direction: np.ndarray) -> dict:
    fast, exact = fast.astype(np.float64), exact.astype(np.float64)
    feat_err = np.linalg.norm(fast - exact, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-30)
    s_fast = fast @ direction / np.linalg.norm(fast, axis=1)
    s_exact = exact @ direction / np.linalg.norm(exact, axis=1)
    score_err = np.abs(s_fast - s_exact) / np.abs(s_exact).max()
    return {
        "max_rel_feature_error": float(feat_err.max()),
        "max_rel_score_error": float(score_err.max()),
        "score_pearson": float(np.corrcoef(s_fast, s_exact)[0, 1]),
    }


def _training_pass(model, capture, batches, starts, use: bool) -> None:
    """Forward + backward of the SFT loss on every batch, no optimizer step (the model stays the one scored)."""
    for bi, b in enumerate(batches):
        idx = np.arange(starts[bi], starts[bi + 1])  # cache rows in batch order, as the other paths
        if use:
            capture.arm(idx, 0)
        o = model(**b, fused_lm_head=True, use_cache=False)
        if use:
            capture.watch(o.log_probs, o.label_mask)
        model.zero_grad(set_to_none=True)
        (-o.log_probs.sum() / o.label_mask.sum().clamp(min=1)).backward()
        if use:
            capture.flush()


def _time_methods(cfg, model, projector, capture, batches, rows_in_order):
    """Seconds per repeat and the features of each method: training with and without capture, hook, loop, vmap."""
    starts = np.cumsum([0] + [len(b["input_ids"]) for b in batches])
    _training_pass(model, capture, batches, starts, True)
    _training_pass(model, capture, batches, starts, False)
    t = {"hook": [], "loop": [], "vmap": [], "train": [], "train_capture": []}
    feats = {}
    for _ in range(cfg.repeats):
        s = time.perf_counter()
        _training_pass(model, capture, batches, starts, False)
        t["train"].append(time.perf_counter() - s)
        s = time.perf_counter()
        _training_pass(model, capture, batches, starts, True)
        capture.flush(write=True)
        t["train_capture"].append(time.perf_counter() - s)
        feats["capture"] = np.asarray(capture.cache.features, dtype=np.float32).copy()
        s = time.perf_counter()
        feats["hook"] = torch.cat([projector.compute(model, b).features for b in batches]).numpy()
        t["hook"].append(time.perf_counter() - s)
        s = time.perf_counter()
        feats["loop"] = exact_loop_features(model, projector, rows_in_order).numpy()
        t["loop"].append(time.perf_counter() - s)
        s = time.perf_counter()
        feats["vmap"] = torch.cat([vmap_features(model, projector, b) for b in batches]).numpy()
        t["vmap"].append(time.perf_counter() - s)
    return t, feats


def _print_row(model_name: str, row: dict) -> None:
    print(
        f"  exact {model_name:6s}: hook {row['hook_ex_per_s']:.0f} ex/s, loop {row['loop_ex_per_s']:.0f}, "
        f"vmap {row['vmap_ex_per_s']:.0f}; x{row['speedup_vs_loop']:.1f} vs loop, "
        f"x{row['speedup_vs_vmap']:.1f} vs vmap; max rel feature err {row['vs_loop']['max_rel_feature_error']:.1e}"
        f" / score err {row['vs_loop']['max_rel_score_error']:.1e}; captured in training: "
        f"{row['capture_marginal_ms_per_example']:.3f} ms/example marginal, x{fmt(row['capture_speedup_vs_loop'], 1)} "
        f"vs loop, x{fmt(row['capture_speedup_vs_vmap'], 1)} vs vmap, max rel feature err "
        f"{row['capture_vs_loop']['max_rel_feature_error']:.1e}",
        flush=True,
    )


def _exact_case(cfg, model_name: str, data: str, length: int) -> dict:
    from trl.trainer.utils import add_fused_lm_head

    n = cfg.exact_examples
    model, rows = load_case(model_name, data, length, n, seed=3)
    model.eval()
    batches = batches_of(rows, cfg.batch_size, seed=1)
    # rows in batch order, so every method sees the same examples in the same order
    order = np.random.default_rng(1).permutation(n)
    rows_in_order = [rows[i] for i in order]
    projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
    projector.compute(model, batches[0])
    direction = np.random.default_rng(0).standard_normal(projector.dim)
    add_fused_lm_head(model)  # for the training passes below (the other paths call the model's own forward)
    capture = TrainCapture(projector, FeatureCache(n, projector.dim))
    t, feats = _time_methods(cfg, model, projector, capture, batches, rows_in_order)
    row = {
        **case_head(model_name, model, data, length),
        "examples": n,
        "batch_size": cfg.batch_size,
    }
    for k in t:
        row[f"{k}_ex_per_s"] = n / median(t[k])
    # captured in training: the marginal cost over the training step that runs anyway
    # (a difference of two timings: medians first, so one noisy repeat cannot make it vanish)
    marginal = median(t["train_capture"]) - median(t["train"])
    row["capture_marginal_ms_per_example"] = 1000 * marginal / n
    row["capture_speedup_vs_loop"] = median(t["loop"]) / marginal if marginal > 0 else None
    row["capture_speedup_vs_vmap"] = median(t["vmap"]) / marginal if marginal > 0 else None
    row["capture_vs_loop"] = _score_errors(feats["capture"], feats["loop"], direction)
    capture.remove()
    row["speedup_vs_loop"] = median([a / b for a, b in zip(t["loop"], t["hook"])])
    row["speedup_vs_vmap"] = median([a / b for a, b in zip(t["vmap"], t["hook"])])
    row["vs_loop"] = _score_errors(feats["hook"], feats["loop"], direction)
    row["vs_vmap"] = _score_errors(feats["hook"], feats["vmap"], direction)
    row["vmap_vs_loop"] = _score_errors(feats["vmap"], feats["loop"], direction)
    _print_row(model_name, row)
    return row


def bench_exact(cfg) -> list[dict]:
    return [_exact_case(cfg, model_name, data, length) for model_name, data, length in CASES[:2]]


if __name__ == "__main__":
    run_section("exact", bench_exact, __doc__)
