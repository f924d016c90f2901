"""Overhead section 5, ``growth``: time of one refresh against train-set size, projection size and model size.

Each is the best of the repeats, with fitted slopes (linear and log-log: an exponent of 1 is linear growth). Every
other rollout counts as correct, so every refresh has contrast and runs its whole pipeline. That is a full rescoring
(every row's feature recomputed). The default path, features captured in training, is timed in ``DriftSFTTrainer``
runs at a fixed interval (a refresh every 50 steps of batch 8, from a warmed-up model at lr 2e-5) against the
train-set size  [slope about 0].

    PYTHONPATH=. python benchmarks/overhead_growth.py --quick    # this section alone (prints JSON)
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import addition_rows, model_of, n_params, offline_setup, run_section, tokenizer
from overhead_e2e import e2e_run, warm_state

from drift_trainer.cli.toy import addition_dataset, query_dataset_from
from drift_trainer.core.feature_pass import TrainView
from drift_trainer.core.features import ProjectedGradients, select_target_modules
from drift_trainer.core.refresh import run_refresh

offline_setup()


def _alternating_reward(prompts, completions, **kwargs) -> list[float]:
    """Every other rollout counts as correct: every refresh has contrast, so the section times the whole pipeline
    (an untrained model's rollouts are all wrong, and a refresh without contrast skips its feature pass)."""
    return [float(i % 2) for i in range(len(completions))]


def _refresh_once(model, rows, k, queries, args_over=None, refresh_index=0):
    from drift_trainer.hf.config import DriftArguments

    args = DriftArguments(
        drift_num_queries=8,
        drift_num_rollouts=4,
        drift_max_new_tokens=8,
        drift_projection_dim=k,
        drift_progress=False,
        drift_no_contrast="keep",
        **(args_over or {}),
    )
    args.validate_drift()
    projector = ProjectedGradients(select_target_modules(model), k)
    view = TrainView(rows=rows, user_index=np.arange(len(rows)), num_examples=len(rows))
    s = time.perf_counter()
    res = run_refresh(
        args=args,
        step=0,
        model=model,
        tokenizer=tokenizer(),
        view=view,
        query_dataset=queries,
        reward_funcs=[_alternating_reward],
        projector=projector,
        refresh_index=refresh_index,
        seed=0,
        progress=False,
    )
    return time.perf_counter() - s, res


def _fit(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    loglog = np.polyfit(np.log(x), np.log(y), 1)[0]
    return {"intercept_s": float(a), "slope_s_per_unit": float(b), "r2": float(r2), "loglog_exponent": float(loglog)}


def _default_path(cfg, sizes) -> dict:
    """Seconds per refresh of the default path (captured features, bounded recompute) against the train-set size,
    at a fixed interval: 2 refreshes, every 50 steps of batch 8 (400 rows trained between them)."""
    init = warm_state(cfg)
    drift = {"drift_refresh_steps": 50}
    per = {n: [] for n in sizes}
    stages = {n: {} for n in sizes}
    recomputed = {}
    for _ in range(cfg.repeats):
        for n in sizes:
            r = e2e_run(cfg, n, drift, lr=2e-5, init=init, steps=100)
            per[n].append(r["refresh_s"] / max(r["refreshes"], 1))
            stages[n] = {k: v / max(r["refreshes"], 1) for k, v in r["timings"].items()}
            recomputed[n] = r["recomputed"]
    best = [min(per[n]) for n in sizes]
    out = {
        "x": sizes,
        "refresh_s": best,
        "features_influence_s": [stages[n].get("features", 0.0) + stages[n].get("influence", 0.0) for n in sizes],
        "recomputed": [recomputed[n] for n in sizes],
        "fit_refresh": _fit(sizes, best),
    }
    print(f"  growth default path n {sizes}: {[round(v, 3) for v in best]} s per refresh -> {out['fit_refresh']}")
    return out


def bench_growth(cfg) -> dict:
    queries = query_dataset_from(addition_dataset(32, seed=1))
    torch.manual_seed(0)
    out = {}
    # train-set size
    model = model_of("tiny")
    sizes = cfg.growth_sizes
    all_rows = addition_rows(max(sizes), seed=5)
    _refresh_once(model, all_rows[:64], cfg.projection_dim, queries)
    tot, feat = {n: [] for n in sizes}, {n: [] for n in sizes}
    for _ in range(cfg.repeats):
        for n in sizes:
            t, res = _refresh_once(model, all_rows[:n], cfg.projection_dim, queries)
            tot[n].append(t)
            feat[n].append(res.timings["features"] + res.timings["influence"])
    out["train_size"] = {
        "x": sizes,
        "refresh_s": [min(tot[n]) for n in sizes],
        "features_influence_s": [min(feat[n]) for n in sizes],
    }
    out["train_size"]["fit_refresh"] = _fit(sizes, out["train_size"]["refresh_s"])
    out["train_size"]["fit_features"] = _fit(sizes, out["train_size"]["features_influence_s"])
    print(
        f"  growth n {sizes}: features {[round(v, 3) for v in out['train_size']['features_influence_s']]} s "
        f"-> {out['train_size']['fit_features']}",
        flush=True,
    )
    out["default_path"] = _default_path(cfg, sizes + ([4 * max(sizes)] if not cfg.quick else []))
    # projection size
    n = cfg.growth_fixed_n
    rows = all_rows[:n]
    ks = cfg.growth_ks
    feat = {k: [] for k in ks}
    for _ in range(cfg.repeats):
        for k in ks:
            _, res = _refresh_once(model, rows, k, queries)
            feat[k].append(res.timings["features"] + res.timings["influence"])
    dims = [14 * k * k for k in ks]
    out["projection"] = {"x": ks, "feature_dim": dims, "features_influence_s": [min(feat[k]) for k in ks]}
    out["projection"]["fit_vs_dim"] = _fit(dims, out["projection"]["features_influence_s"])
    print(f"  growth k {ks}: {[round(v, 3) for v in out['projection']['features_influence_s']]} s", flush=True)
    # model size (tokens: the addition rows)
    names = ["tiny", "small", "medium"]
    models = {m: model_of(m) for m in names}
    feat = {m: [] for m in names}
    for _ in range(cfg.repeats):
        for m in names:
            _, res = _refresh_once(models[m], rows, cfg.projection_dim, queries)
            feat[m].append(res.timings["features"] + res.timings["influence"])
    params = [n_params(models[m]) for m in names]
    out["model"] = {"x": names, "params": params, "features_influence_s": [min(feat[m]) for m in names]}
    out["model"]["fit_vs_params"] = _fit(params, out["model"]["features_influence_s"])
    print(f"  growth model {params}: {[round(v, 3) for v in out['model']['features_influence_s']]} s", flush=True)
    out["examples_fixed"] = n
    return out


if __name__ == "__main__":
    run_section("growth", bench_growth, __doc__)
