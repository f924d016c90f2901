"""Preference benchmark: uniform DPO against ICA, LossDiff-IRM and DRIFT on a task where DPO learns, with flipped pairs.

Run from the repository root (one torch thread)::

    PYTHONPATH=. python benchmarks/preference.py                    # full run: 8 seeds, all methods, TIF bands
    PYTHONPATH=. python benchmarks/preference.py --quick            # smoke run: 1 seed, small (< 2 minutes)
    PYTHONPATH=. python benchmarks/preference.py --aggregate-only   # rebuild json/md from the checkpointed runs

Task (:mod:`preference_task`): fixed-width addition ``"07+23="`` -> ``"30"`` with operands in ``[0, 29]``; the
prompts are split into disjoint train / validation / test prompts. A pair's rejected answer is the right sum ``± d``,
``d`` in {1, 2, 5, 10}, both signs (no "bigger is better" shortcut); ``d`` is recorded per pair (``distance``: near
distractors differ in the units digit, far ones mostly in the tens digit). A share ``--flip`` of the train pairs swap
chosen and rejected (label noise). A tiny Llama is fine-tuned briefly (SFT) on clean sums of the train prompts: a
weak-but-not-hopeless start shared by every method of a seed (and DPO's reference). Then DPO (``sigmoid``) with
``DriftDPOTrainer(drift_method=...)``:

- ``uniform``: plain DPO on the noisy pairs; ``oracle``: plain DPO on the *same pairs unflipped* (clean labels);
- ``ica``, ``lossdiff_irm``, ``drift``: the scorers on the noisy pairs; ``*_simpo``: the same with ``loss_type="simpo"``.
  ``drift`` and its variants run at ``drift_weighting="softmax"``, the default when they were measured;
  ``drift_mixture`` is DRIFT at ``DriftDPOConfig``'s default since 2026-12-03.

Held-out clean pairs on unseen test prompts measure ``pref_acc`` (policy log-prob of the right answer above the
distractor's), ``margin_acc`` / ``margin_mean`` / ``eval_loss`` (the implicit DPO reward margin, and the DPO loss, with
the start as reference) and ``exact`` (greedy exact match on the test prompts). Statistics: paired differences over
seeds with 95% bootstrap CIs (``quality_stats.bootstrap_ci``). The TIF bands check trains uniform DPO on each third
of the train pairs ranked by LossDiff (from the seed's ``lossdiff_irm`` run) and compares the held-out metrics.

Each (method, seed) result is appended to ``benchmarks/results/preference_runs/runs.jsonl``; a rerun with the same
configuration skips finished runs. Writes ``benchmarks/results/preference.json`` and ``preference.md``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from preference_task import auroc, evaluate, make_pairs, prompt_split, quiet_setup, sft_start  # noqa: E402
from quality_stats import bootstrap_ci  # noqa: E402

START = "start"
BANDS = ("low", "medium", "high")
METRICS = ("pref_acc", "exact", "margin_mean", "eval_loss", "margin_acc")
FULL = {
    "operand_max": 29,
    "width": 2,
    "n_val_prompts": 50,
    "n_test_prompts": 150,
    "n_train": 2048,
    "n_val_pairs": 256,
    "n_test_pairs": 600,
    "sft_steps": 200,
    "epochs": 2,
    "lr": 1e-3,
    "beta": 1.0,
    "batch": 16,
    "refresh": 32,
    "simpo_beta": 2.0,
    "simpo_gamma": 0.5,
}
QUICK = {"n_train": 256, "n_val_pairs": 64, "n_test_pairs": 200, "refresh": 8}


def run_config(sft_steps: int | None = None, sft_demos: int = 0, quick: bool = False) -> dict:
    """The configuration of a run: ``FULL`` (``QUICK`` over it for a smoke run) with the command line's start
    options. ``sft_demos`` enters only when set, so the default configuration keeps its key (and its recorded runs)."""
    cfg = dict(FULL)
    if sft_steps is not None:
        cfg["sft_steps"] = sft_steps
    if sft_demos:
        cfg["sft_demos"] = sft_demos
    if quick:
        cfg.update(QUICK)
    return cfg


def config_key(cfg: dict, flip: float) -> str:
    return hashlib.sha1(json.dumps({**cfg, "flip": flip}, sort_keys=True).encode()).hexdigest()[:10]


class Seed:
    """Data and start model of one seed (shared by every method of the seed)."""

    def __init__(self, tok, seed: int, cfg: dict, flip: float):
        self.seed = seed
        tr, va, te = prompt_split(cfg["operand_max"], seed, cfg["n_val_prompts"], cfg["n_test_prompts"])
        w = cfg["width"]
        self.train = make_pairs(tr, cfg["n_train"], 10 + seed, flip, w)
        self.val = make_pairs(va, cfg["n_val_pairs"], 100 + seed, 0.0, w)
        self.test = make_pairs(te, cfg["n_test_pairs"], 1000 + seed, 0.0, w)
        self.clean = unflip(self.train)
        self.start = sft_start(tok, tr, seed, cfg["sft_steps"], w, demos=cfg.get("sft_demos", 0))
        self.flipped = np.asarray(self.train["flipped"], dtype=bool)


def unflip(ds):
    """The same pairs with chosen and rejected swapped back where ``flipped`` (the clean labels)."""
    f = ds["flipped"]
    chosen = [r if x else c for c, r, x in zip(ds["chosen"], ds["rejected"], f)]
    rejected = [c if x else r for c, r, x in zip(ds["chosen"], ds["rejected"], f)]
    return ds.remove_columns(["chosen", "rejected"]).add_column("chosen", chosen).add_column("rejected", rejected)


# method -> (the method it is a variant of, its drift_* options on top of that method's defaults)
VARIANTS = {
    # ICA checks of the paper's choices (arXiv 2510.14459): retrieval k in {1, 3, 5} (``ica`` is k = 3, the default)
    # and one computation at the start (``ica``) against recomputing every 64 steps (3 recomputations in 256 steps)
    "ica_k1": ("ica", {"drift_ica_num_demos": 1}),
    "ica_k5": ("ica", {"drift_ica_num_demos": 5}),
    "ica_refresh": ("ica", {"drift_ica_refresh_steps": 64}),
    # LossDiff's auxiliary model trained longer on the validation pairs (default: 1 epoch, 16 steps here): a check of
    # why LossDiff is blind to flips on this task, not a tuned setting
    "lossdiff_irm_val4": ("lossdiff_irm", {"drift_lossdiff_val_epochs": 4.0}),
    "lossdiff_irm_val16": ("lossdiff_irm", {"drift_lossdiff_val_epochs": 16.0}),
    # DRIFT for DPO with its weights drawing the pairs (each at weight 1 in its batch) instead of scaling their
    # losses; and with less debiasing against the gradient norm (half, none), since its weights favour the easy pairs
    "drift_sampler": ("drift", {"drift_reweight_mode": "sampler"}),
    "drift_alpha05": ("drift", {"drift_norm_exponent": 0.5}),
    "drift_raw": ("drift", {"drift_debias": "none"}),
    # DRIFT for DPO on the influence alone: the loss hybrid (drift_loss_mix, 1 by default, chosen on the SFT
    # benchmark) reads a pair's loss as -(log p(chosen) - log p(rejected)), so it favours the pairs the policy already
    # ranks right by a wide margin
    "drift_influence": ("drift", {"drift_loss_mix": 0.0}),
    # each query's contrast anchored at its reference answer, so queries whose rollouts are all wrong count (most of
    # them here: the start's exact match is about 0.08); with and without the loss hybrid
    "drift_anchored": ("drift", {"drift_scorer": "drift_anchored"}),
    "drift_anchored_influence": ("drift", {"drift_scorer": "drift_anchored", "drift_loss_mix": 0.0}),
    # weight taken only from a separate low group of a two-Gaussian mixture of the scores (no upweighting): the
    # library's default for DPO since 2026-12-03 (`DEFAULT_DRIFT`)
    "drift_mixture": ("drift", {"drift_weighting": "mixture"}),
    # drift_pair_bound: pairs whose start-model margin is below every validation pair's get weight 0 for the run
    # (uniform: DPO on the kept pairs; drift: its weights times the bound)
    "uniform_bound": ("uniform", {"drift_pair_bound": True}),
    "drift_bound": ("drift", {"drift_pair_bound": True}),
    "ica_bound": ("ica", {"drift_pair_bound": True}),
    "lossdiff_irm_bound": ("lossdiff_irm", {"drift_pair_bound": True}),
}
# `drift` and its variants run at `softmax` weighting, the default when they were measured (DriftDPOConfig's default
# is now `mixture`: the `drift_mixture` rows), unless a variant sets its own weighting
SOFTMAX = {"drift_weighting": "softmax"}
DEFAULT_DRIFT = "drift_mixture"
# the methods, then every variant (a variant missing here would be left out of the tables)
METHODS = (
    "uniform",
    "oracle",
    "ica",
    "lossdiff_irm",
    "drift",
    "uniform_simpo",
    "ica_simpo",
    "lossdiff_irm_simpo",
    *VARIANTS,
)
ICA_VARIANTS = {m: opts for m, (base, opts) in VARIANTS.items() if base == "ica"}
LOSSDIFF_VARIANTS = [m for m, (base, _) in VARIANTS.items() if base == "lossdiff_irm"]


def train_dpo(method: str, data, s: Seed, tok, cfg: dict, tag: str):
    """One DPO run from the seed's start; returns the trainer (after training) and its wall seconds."""
    from common import quiet_cpu_args  # here: after main has set up the environment

    from drift_trainer import DriftDPOConfig, DriftDPOTrainer

    base, variant = VARIANTS.get(method, (method, {}))
    base, simpo = base.removesuffix("_simpo"), method.endswith("_simpo")
    if base == "drift" and "drift_weighting" not in variant:
        variant = {**SOFTMAX, **variant}  # measured before `mixture` became the default: keep their meaning
    drift_method = "uniform" if base in ("uniform", "oracle", "band") else base
    model, ref = copy.deepcopy(s.start), copy.deepcopy(s.start)
    extra = {"loss_type": ["simpo"], "simpo_gamma": cfg["simpo_gamma"]} if simpo else {}
    args = DriftDPOConfig(
        output_dir=f"/tmp/drift-pref-bench/{tag}",
        bf16=False,
        seed=s.seed,
        num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=cfg["batch"],
        learning_rate=cfg["lr"],
        beta=cfg["simpo_beta"] if simpo else cfg["beta"],
        logging_steps=10_000,
        drift_method=drift_method,
        drift_lossdiff_warmup_epochs=1.0,
        drift_refresh_steps=cfg["refresh"],
        drift_first_refresh_step=cfg["refresh"],
        drift_num_queries=16,
        drift_num_rollouts=4,
        drift_max_new_tokens=cfg["width"] + 1,
        drift_no_contrast="keep",
        **extra,
        **variant,
        **quiet_cpu_args(),
    )
    trainer = DriftDPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=data,
        processing_class=tok,
        holdout_dataset=s.val,
        validation_dataset=s.val,
        query_dataset=s.val.select_columns(["prompt", "answer"]),
        reward_funcs="exact_match",
    )
    t0 = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - t0


def run_method(method: str, s: Seed, tok, cfg: dict) -> dict:
    data = s.clean if method == "oracle" else s.train
    trainer, seconds = train_dpo(method, data, s, tok, cfg, f"{method}-{s.seed}")
    out = {"method": method, "seed": s.seed, "seconds": round(seconds, 1)}
    out.update(evaluate(trainer.model, s.start, tok, s.test, cfg["beta"], cfg["width"]))
    w = trainer.pair_weights
    if w is not None:
        w = np.asarray(w, dtype=float)
        out["flip_auroc"] = auroc(w, ~s.flipped)
        out["weight_mean"] = float(np.mean(w))
        if method.startswith("lossdiff_irm"):
            kept = w > 0
            dist = np.asarray(s.train["distance"])
            out["kept_fraction"] = float(kept.mean())
            out["flipped_share_kept"] = float(s.flipped[kept].mean()) if kept.any() else float("nan")
            out["kept_by_distance"] = {str(d): float(kept[dist == d].mean()) for d in sorted(set(dist.tolist()))}
            sc = trainer.pair_scores
            for k in ("lossdiff", "irm"):
                if k in sc:
                    out[f"{k}_flip_auroc"] = auroc(-np.asarray(sc[k], dtype=float), ~s.flipped)
                    out[f"{k}_scores"] = [round(float(x), 5) for x in sc[k]]
        if method.startswith("ica"):
            sc = trainer.pair_scores.get("score")
            if sc is not None:
                out["ica_scores"] = [round(float(x), 5) for x in sc]
    out["flipped_share_all"] = float(s.flipped.mean())
    return out


def run_bands(s: Seed, tok, cfg: dict, scores, source: str) -> list[dict]:
    """TIF bands: uniform DPO on each third of the train pairs ranked by ``scores`` (ascending), alone."""
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    thirds = np.array_split(order, 3)
    outs = []
    dist = np.asarray(s.train["distance"])
    for name, idx in zip(BANDS, thirds):
        idx = np.sort(idx)
        trainer, seconds = train_dpo("band", s.train.select(idx.tolist()), s, tok, cfg, f"band-{name}-{s.seed}")
        r = {"method": f"band_{name}", "seed": s.seed, "band_source": source, "seconds": round(seconds, 1)}
        r.update(evaluate(trainer.model, s.start, tok, s.test, cfg["beta"], cfg["width"]))
        r["band_pairs"] = int(len(idx))
        r["band_flipped_share"] = float(s.flipped[idx].mean())
        r["band_mean_distance"] = float(dist[idx].mean())
        outs.append(r)
    return outs


# ------------------------------------------------------------------------------------------------ checkpoints


def runs_path(out: str, tag: str) -> str:
    return os.path.join(out, "preference_runs", f"runs{tag}.jsonl")


def load_runs(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_run(path: str, rec: dict) -> None:
    """Append one run as one line, in one ``write`` to an ``O_APPEND`` file: processes running other seeds into the
    same file (``--first-seed``) do not interleave their lines."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ statistics


def paired(by: dict, a: str, b: str, metric: str) -> dict | None:
    seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
    if len(seeds) < 1:
        return None
    d = np.array([by[a][s][metric] - by[b][s][metric] for s in seeds], dtype=float)
    lo, hi = bootstrap_ci(d)
    return {"n": len(d), "mean": float(d.mean()), "ci": [lo, hi], "below": int((d < 0).sum()), "diffs": d.tolist()}


def aggregate(runs: list[dict]) -> dict:
    by: dict[str, dict[int, dict]] = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    names = [START] + [m for m in METHODS if m in by] + [f"band_{b}" for b in BANDS if f"band_{b}" in by]
    table = {}
    for m in names:
        if m not in by:
            continue
        rs = list(by[m].values())
        row = {"n": len(rs)}
        for k in (
            *METRICS,
            "seconds",
            "flip_auroc",
            "weight_mean",
            "kept_fraction",
            "flipped_share_kept",
            "lossdiff_flip_auroc",
            "irm_flip_auroc",
            "band_flipped_share",
            "band_mean_distance",
        ):
            vals = [r[k] for r in rs if r.get(k) is not None and not (isinstance(r[k], float) and np.isnan(r[k]))]
            if vals:
                row[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
        dk = sorted({k for r in rs for k in r if k.startswith("pref_acc_d")}, key=lambda k: int(k[10:]))
        row["pref_acc_by_distance"] = {k[10:]: float(np.mean([r[k] for r in rs if k in r])) for k in dk}
        kb = [r["kept_by_distance"] for r in rs if "kept_by_distance" in r]
        if kb:
            row["kept_by_distance"] = {d: float(np.mean([x[d] for x in kb])) for d in kb[0]}
        for ref in ("uniform", "oracle", START, "uniform_simpo", "ica"):
            if ref == "uniform_simpo" and not m.endswith("_simpo"):
                continue
            if ref == "ica" and m not in ICA_VARIANTS:
                continue
            if m != ref and not m.startswith("band_"):
                row[f"vs_{ref}"] = {k: paired(by, m, ref, k) for k in ("pref_acc", "exact", "margin_mean")}
        table[m] = row
    bands = {}
    if all(f"band_{b}" in by for b in BANDS):
        for a, b in (("medium", "low"), ("medium", "high"), ("high", "low")):
            bands[f"{a}-{b}"] = {k: paired(by, f"band_{a}", f"band_{b}", k) for k in METRICS}
    return {"table": table, "bands": bands, "by": by}


def targets(agg: dict) -> list[dict]:
    t = agg["table"]
    out = []

    def add(name, cond, value):
        out.append({"target": name, "met": cond, "value": value})

    def ci(m, ref, k):
        p = (t.get(m, {}).get(f"vs_{ref}") or {}).get(k)
        return p

    def fmt(p):
        return "n/a" if p is None else f"{p['mean']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"

    for k in ("pref_acc", "exact"):
        p = ci("oracle", START, k)
        add(f"(task) oracle DPO beats the start on {k} (CI > 0)", bool(p and p["ci"][0] > 0), fmt(p))
    for k in ("pref_acc", "exact"):
        p = ci("uniform", "oracle", k)
        add(f"(task) flips hurt: uniform below oracle on {k} (CI < 0)", bool(p and p["ci"][1] < 0), fmt(p))
    for m in ("lossdiff_irm", "ica"):
        for k in ("pref_acc", "exact"):
            p = ci(m, "uniform", k)
            add(f"{m} beats uniform DPO on {k} (95% CI excludes 0, > 0)", bool(p and p["ci"][0] > 0), fmt(p))
    for m in (DEFAULT_DRIFT, "drift"):
        if m not in t:
            continue
        label = (
            "DRIFT at its DPO default (`mixture`)" if m == DEFAULT_DRIFT else "drift (`softmax`, the earlier default)"
        )
        for k in ("pref_acc", "exact"):
            p = ci(m, "uniform", k)
            add(
                f"{label} does not fall below uniform on {k} (CI low >= -0.01 or mean >= 0)",
                bool(p and (p["ci"][0] >= -0.01 or p["mean"] >= 0)),
                fmt(p),
            )
    b = agg["bands"]
    for k in ("pref_acc", "exact", "eval_loss"):
        lo, hi = (b.get("medium-low") or {}).get(k), (b.get("medium-high") or {}).get(k)
        if lo and hi:
            better = (lambda p: p["ci"][1] < 0) if k == "eval_loss" else (lambda p: p["ci"][0] > 0)
            add(
                f"(TIF) medium band best on {k} (CI vs low and vs high excludes 0)",
                better(lo) and better(hi),
                f"vs low {fmt(lo)}; vs high {fmt(hi)}",
            )
    return out


# ------------------------------------------------------------------------------------------------ report


def _ms(row, k, digits=3):
    v = row.get(k)
    return "-" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


def _p(p):
    if p is None:
        return "-"
    return f"{p['mean']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] ({p['below']}/{p['n']} <0)"


def write_md(path: str, meta: dict, agg: dict, tg: list[dict]) -> None:
    t = agg["table"]
    cfg = meta["config"]
    L = [
        "# Preference benchmark: uniform DPO vs ICA, LossDiff-IRM and DRIFT (a task where DPO learns)",
        "",
        f"Command: `{meta['command']}`"
        + (f" (tables rebuilt from its checkpointed runs by `{meta['rebuilt_by']}`)" if meta.get("rebuilt_by") else ""),
        "",
        f"Machine: {meta['machine']}, one torch thread. Wall time of the command: {meta['wall_seconds']} s "
        f"(runs loaded from the checkpoint file, not rerun: {meta['skipped']}; sum of the recorded per-run training "
        f"seconds: {meta['train_seconds']:.0f} s). Seeds: {meta['seeds']}. Flipped train pairs: {meta['flip']:.0%}. "
        f"Config: `{json.dumps(cfg)}`.",
        "",
        "## Task",
        "",
        f'Fixed-width addition `"07+23="` -> `"30"` (operands 0..{cfg["operand_max"]}, answers {cfg["width"]} '
        f"digits + EOS). The {(cfg['operand_max'] + 1) ** 2} prompts are split per seed into disjoint train / "
        f"validation ({cfg['n_val_prompts']}) / test ({cfg['n_test_prompts']}) prompts. Pairs: chosen = right sum, "
        'rejected = right sum ± d, d in {1, 2, 5, 10}, sign + or - with equal chance (so neither "bigger" nor '
        '"smaller" is a shortcut); `distance` d is recorded per pair (1, 2: near, units digit differs; 5, 10: far, '
        f"tens digit mostly differs). {cfg['n_train']} train pairs on train prompts, of which a share "
        f"{meta['flip']:.0%} have chosen and rejected swapped (`flipped`); {cfg['n_val_pairs']} clean validation pairs "
        "(ICA's demonstrations, LossDiff-IRM's theta_val data, DRIFT's queries with `exact_match`); "
        f"{cfg['n_test_pairs']} clean test pairs on the unseen test prompts.",
        "",
        f"Start: a tiny random-init Llama (`build_tiny_llama` defaults) after {cfg['sft_steps']} SFT steps (batch 32, "
        "AdamW 3e-3) on clean sums of the train prompts"
        + (
            f", each SFT row after 0 to {cfg['sft_demos']} other solved problems in the same sequence (`--sft-demos`: "
            "text after demonstrations is in distribution, as ICA's scoring puts it; this start's steps were set "
            "from the start's held-out strength only, no DPO run)"
            if cfg.get("sft_demos")
            else ""
        )
        + ": weak but not hopeless. It is the start of every method of a "
        f"seed and DPO's reference. DPO: `DriftDPOTrainer`, `loss_type=sigmoid`, beta {cfg['beta']}, lr {cfg['lr']}, "
        f"batch {cfg['batch']}, {cfg['epochs']} epochs (LossDiff-IRM: 1 warm-up epoch on all pairs, then selection; "
        f"DRIFT: refresh every {cfg['refresh']} steps). `*_simpo`: `loss_type=simpo`, beta {cfg['simpo_beta']}, "
        f"gamma {cfg['simpo_gamma']}. DPO hyper-parameters (lr, beta, pairs, epochs) were chosen on seeds 0-1, "
        "before any scorer ran, only from oracle vs start; the SFT steps (200) were raised from 100 after a first "
        "8-seed run in which the oracle's greedy exact-match gain over the start had a CI including 0 "
        "(`preference_sft100.md`), again judged only on oracle/uniform vs start (seeds 0-2), never on a scorer.",
        "",
        "Methods: `uniform` = plain DPO on the noisy pairs; `oracle` = plain DPO on the same pairs with the flips "
        "undone (clean labels, same pairs and order); the scorers run on the noisy pairs with their defaults.",
        "",
        "Metrics on the held-out test pairs/prompts: `pref_acc` = policy log-prob of the right answer above the "
        "distractor's; `exact` = greedy exact match; `margin_mean` = mean implicit reward margin "
        "beta*[log pi/pi_ref(y_w) - log pi/pi_ref(y_l)] (reference = start); `eval_loss` = DPO sigmoid loss on them; "
        "`flip_auroc` = AUROC of the method's train-pair weights for clean (positive) vs flipped (for LossDiff-IRM: of "
        "the 0/1 keep mask). Paired differences: mean over seeds [95% percentile bootstrap CI] (seeds below 0 / seeds).",
        "",
        "## Results (mean ± std over seeds)",
        "",
        "| method | n | pref_acc | exact | margin_mean | eval_loss | flip_auroc | weight mean / kept | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, row in t.items():
        L.append(
            f"| {m} | {row['n']} | {_ms(row, 'pref_acc')} | {_ms(row, 'exact')} | {_ms(row, 'margin_mean')} | "
            f"{_ms(row, 'eval_loss')} | {_ms(row, 'flip_auroc')} | {_ms(row, 'weight_mean')} | "
            f"{_ms(row, 'seconds', 1)} |"
        )
    L += [
        "",
        "## Paired differences",
        "",
        "| method | pref_acc vs uniform | exact vs uniform | pref_acc vs oracle | exact vs oracle | pref_acc vs start "
        "| exact vs start |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, row in t.items():
        if m == START or m.startswith("band_"):
            continue
        g = lambda ref, k, row=row: _p((row.get(f"vs_{ref}") or {}).get(k))  # noqa: E731
        L.append(
            f"| {m} | {g('uniform', 'pref_acc')} | {g('uniform', 'exact')} | {g('oracle', 'pref_acc')} | "
            f"{g('oracle', 'exact')} | {g(START, 'pref_acc')} | {g(START, 'exact')} |"
        )
    simpo = [m for m in t if m.endswith("_simpo") and m != "uniform_simpo" and t[m].get("vs_uniform_simpo")]
    if simpo:
        L += [
            "",
            "SimPO variants against uniform SimPO (same loss, noisy pairs):",
            "",
            "| method | pref_acc vs uniform_simpo | exact vs uniform_simpo |",
            "|---|---|---|",
        ]
        for m in simpo:
            v = t[m]["vs_uniform_simpo"]
            L.append(f"| {m} | {_p(v['pref_acc'])} | {_p(v['exact'])} |")
    variants = [m for m in ICA_VARIANTS if m in t and t[m].get("vs_ica")]
    if variants:
        L += [
            "",
            "ICA variants against `ica` (k = 3 demonstrations, scored once at the start; the paper found k = 1, 5, 10 "
            "worse than 3 and recomputing 3-9 times about equal):",
            "",
            "| method | options | pref_acc vs ica | exact vs ica | flip AUROC |",
            "|---|---|---|---|---|",
        ]
        for m in variants:
            v = t[m]["vs_ica"]
            L.append(
                f"| {m} | `{json.dumps(ICA_VARIANTS[m])}` | {_p(v['pref_acc'])} | {_p(v['exact'])} | "
                f"{_ms(t[m], 'flip_auroc')} |"
            )
    L += [
        "",
        "## Held-out pref_acc by distractor distance (mean over seeds)",
        "",
        "| method | " + " | ".join(f"d={d}" for d in ("1", "2", "5", "10")) + " |",
        "|---|---|---|---|---|",
    ]
    for m, row in t.items():
        pd = row.get("pref_acc_by_distance", {})
        L.append(f"| {m} | " + " | ".join(f"{pd[d]:.3f}" if d in pd else "-" for d in ("1", "2", "5", "10")) + " |")
    L += [
        "",
        "## LossDiff-IRM selection",
        "",
        "| method | kept fraction | flipped share among kept | flipped share of all | keep-mask flip AUROC | "
        "AUROC of -LossDiff | AUROC of -IRM | kept share by distance d=1/2/5/10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("lossdiff_irm", *LOSSDIFF_VARIANTS, "lossdiff_irm_simpo"):
        if m not in t:
            continue
        row = t[m]
        kb = row.get("kept_by_distance", {})
        fs = np.mean([r["flipped_share_all"] for r in agg["by"][m].values()])
        L.append(
            f"| {m} | {_ms(row, 'kept_fraction')} | {_ms(row, 'flipped_share_kept')} | {fs:.3f} | "
            f"{_ms(row, 'flip_auroc')} | {_ms(row, 'lossdiff_flip_auroc')} | {_ms(row, 'irm_flip_auroc')} | "
            + " / ".join(f"{kb[d]:.2f}" for d in kb)
            + " |"
        )
    if agg["bands"]:
        src = next(iter(agg["by"]["band_low"].values())).get("band_source", "?")
        L += [
            "",
            "## TIF bands check",
            "",
            f"Per seed the train pairs are ranked by `{src}` (the seed's `lossdiff_irm` run, scored after its warm-up "
            "epoch) and split into thirds (low / medium / high); uniform DPO (same settings) trains on each third "
            "alone. Held-out metrics as above.",
            "",
            "| band | pref_acc | exact | margin_mean | eval_loss | flipped share in band | mean distance in band |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in BANDS:
            row = t[f"band_{b}"]
            L.append(
                f"| {b} | {_ms(row, 'pref_acc')} | {_ms(row, 'exact')} | {_ms(row, 'margin_mean')} | "
                f"{_ms(row, 'eval_loss')} | {_ms(row, 'band_flipped_share')} | {_ms(row, 'band_mean_distance', 2)} |"
            )
        L += ["", "| paired difference | pref_acc | exact | margin_mean | eval_loss |", "|---|---|---|---|---|"]
        for k, v in agg["bands"].items():
            L.append(
                f"| {k} | {_p(v['pref_acc'])} | {_p(v['exact'])} | {_p(v['margin_mean'])} | {_p(v['eval_loss'])} |"
            )
    L += ["", "## Targets", "", "| target | value (mean [95% CI]) | met? |", "|---|---|---|"]
    for x in tg:
        L.append(f"| {x['target']} | {x['value']} | {'met' if x['met'] else 'missed'} |")
    L += [
        "",
        "## Per seed",
        "",
        "| method | seed | pref_acc | exact | margin_mean | flip_auroc | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in t:
        for s, r in sorted(agg["by"][m].items()):
            fa = r.get("flip_auroc")
            kf = r.get("kept_fraction")
            L.append(
                f"| {m} | {s} | {r['pref_acc']:.3f} | {r['exact']:.3f} | {r['margin_mean']:+.3f} | "
                f"{'-' if fa is None else f'{fa:.3f}'} | {'-' if kf is None else f'{kf:.3f}'} |"
            )
    notes = os.path.join(os.path.dirname(path), os.path.basename(path).replace(".md", "_notes.md"))
    if os.path.exists(notes):  # hand-written reading of the numbers, kept across --aggregate-only rebuilds
        with open(notes) as f:
            L += [
                "",
                f"## Notes (from `{os.path.basename(notes)}`, written after reading the numbers)",
                "",
                f.read().strip(),
            ]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def check_start(runs: list[dict], key: str, s: Seed, tok, cfg: dict) -> None:
    """Refuse to add runs of a seed whose start model, retrained here, differs from the one its recorded runs began
    from (SFT does not reproduce across machines and library versions: the same seed has started at pref_acc 0.725
    and 0.730). New runs from another start would be paired with the recorded ones as if they shared it."""
    kept = [r for r in runs if r.get("key") == key and r["method"] == START and r["seed"] == s.seed]
    if not kept:
        return
    now = evaluate(s.start, s.start, tok, s.test, cfg["beta"], cfg["width"])
    for metric in ("pref_acc", "exact"):
        if abs(now[metric] - kept[-1][metric]) > 1e-9:
            raise SystemExit(
                f"The start of seed {s.seed} was retrained here to {metric} {now[metric]:.4f}, but the recorded runs of "
                f"that seed began from a start at {kept[-1][metric]:.4f}: new runs would not be paired with them. Run "
                f"new methods on new seeds (--first-seed) with uniform and oracle beside them, or give --tag a new "
                f"name and rerun every method there."
            )


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, fewer pairs (smoke run, < 2 minutes)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-bands", action="store_true", help="skip the TIF bands check")
    ap.add_argument("--flip", type=float, default=0.33, help="share of flipped train pairs")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files (preference{tag}.json / .md / runs)")
    ap.add_argument("--sft-steps", type=int, default=None, help=f"SFT steps of the start (default {FULL['sft_steps']})")
    ap.add_argument(
        "--sft-demos",
        type=int,
        default=0,
        help="the start's SFT puts 0 to N other solved problems before each row (an in-context-capable start, which "
        "ICA's demonstrations need); 0: one problem per row (the default)",
    )
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--aggregate-only", action="store_true", help="rebuild json/md from the checkpointed runs")
    a = ap.parse_args(argv)
    quiet_setup()
    from drift_trainer.cli.toy import build_char_tokenizer

    cfg = run_config(a.sft_steps, a.sft_demos, a.quick)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    tag = a.tag
    if a.quick:
        seeds = list(range(min(a.seeds, 1)))
        tag = tag or "_quick"
    key = config_key(cfg, a.flip)
    methods = [m for m in a.methods.split(",") if m]
    path = runs_path(a.out, tag)
    done = {(r["method"], r["seed"]) for r in load_runs(path) if r.get("key") == key}
    t0 = time.perf_counter()
    skipped = 0
    if not a.aggregate_only:
        tok = build_char_tokenizer()
        for seed in seeds:
            want = [START] + methods + ([] if a.no_bands else [f"band_{b}" for b in BANDS])
            todo = [m for m in want if (m, seed) not in done]
            skipped += len(want) - len(todo)
            if not todo:
                continue
            s = Seed(tok, seed, cfg, a.flip)
            check_start(load_runs(path), key, s, tok, cfg)
            for m in todo:
                if m == START:
                    rec = {
                        "method": START,
                        "seed": seed,
                        **evaluate(s.start, s.start, tok, s.test, cfg["beta"], cfg["width"]),
                    }
                elif m.startswith("band_"):
                    continue
                else:
                    rec = run_method(m, s, tok, cfg)
                rec["key"] = key
                append_run(path, rec)
                done.add((m, seed))
                print(json.dumps({k: v for k, v in rec.items() if not k.endswith("_scores")}), flush=True)
            if not a.no_bands and any(m.startswith("band_") for m in todo):
                ld = [
                    r
                    for r in load_runs(path)
                    if r.get("key") == key
                    and r["method"] == "lossdiff_irm"
                    and r["seed"] == seed
                    and "lossdiff_scores" in r
                ]
                if ld:
                    for rec in run_bands(s, tok, cfg, ld[-1]["lossdiff_scores"], "lossdiff"):
                        rec["key"] = key
                        append_run(path, rec)
                        print(json.dumps(rec), flush=True)
    wall = time.perf_counter() - t0
    runs = [r for r in load_runs(path) if r.get("key") == key and r["seed"] in seeds]
    agg = aggregate(runs)
    tg = targets(agg)
    command = "PYTHONPATH=. python benchmarks/preference.py " + " ".join(shlex.quote(x) for x in argv)
    meta = {
        "command": command.strip(),
        "config": cfg,
        "config_key": key,
        "flip": a.flip,
        "seeds": seeds,
        "wall_seconds": round(wall, 1),
        "skipped": skipped if not a.aggregate_only else "all (aggregate only)",
        "train_seconds": float(sum(r.get("seconds", 0) for r in runs)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    os.makedirs(a.out, exist_ok=True)
    json_path = os.path.join(a.out, f"preference{tag}.json")
    if a.aggregate_only and os.path.exists(json_path):  # keep the command and wall time of the run that made them
        with open(json_path) as f:
            prev = json.load(f).get("meta", {})
        same = prev.get("config_key") == key and prev.get("seeds") == seeds  # not one of several --first-seed runs
        if same and "--aggregate-only" not in prev.get("command", ""):
            for k in ("command", "wall_seconds", "skipped", "machine"):
                meta[k] = prev[k]
            meta["rebuilt_by"] = command.strip()
    slim = {
        m: {str(s): {k: v for k, v in r.items() if not k.endswith("_scores")} for s, r in rs.items()}
        for m, rs in agg["by"].items()
    }
    with open(json_path, "w") as f:
        json.dump(
            {"meta": meta, "table": agg["table"], "bands": agg["bands"], "targets": tg, "runs": slim}, f, indent=1
        )
    write_md(os.path.join(a.out, f"preference{tag}.md"), meta, agg, tg)
    print(f"wrote {os.path.join(a.out, f'preference{tag}.md')} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
