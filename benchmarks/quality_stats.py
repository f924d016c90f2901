"""Statistics and tables of the quality benchmark: paired differences with bootstrap CIs, gap closed, weight AUROC,
and the issue's targets (see ``quality.py``)."""

from __future__ import annotations

import json
import os

import numpy as np

BASELINES = ("loss", "cosine", "off_policy", "random")
CORRUPTED = ("random10", "random40", "systematic", "format", "target")


def is_drift(config: str) -> bool:
    """DRIFT configurations (the library's defaults and every candidate) are named ``drift*``."""
    return config.startswith("drift")


def drift_configs(table: dict) -> list[str]:
    """The DRIFT configurations present in a result table, ``drift`` (the defaults) first."""
    names = {c for kinds in table.values() for rows in kinds.values() for c in rows if is_drift(c)}
    return sorted(names, key=lambda c: (c != "drift", c))


def bootstrap_ci(diffs, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean of paired differences (over seeds)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired(acc: dict, a: str, b: str, resamples: int) -> dict | None:
    """Paired difference ``a - b`` of final accuracy over the seeds both have."""
    seeds = sorted(set(acc.get(a, {})) & set(acc.get(b, {})))
    if not seeds:
        return None
    d = np.array([acc[a][s] - acc[b][s] for s in seeds])
    lo, hi = bootstrap_ci(d, resamples)
    return {"n": len(d), "mean": float(d.mean()), "ci": [lo, hi], "below": int((d < 0).sum()), "diffs": d.tolist()}


def load_runs(out: str) -> list[dict]:
    run_dir = os.path.join(out, "runs")
    runs = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        with open(os.path.join(run_dir, name)) as f:
            runs.append(json.load(f))
    return runs


def kind_table(runs: list[dict], resamples: int) -> dict:
    """Per configuration of one regime and kind: accuracy, paired differences, gap closed, weight AUROC."""
    acc = {}
    for r in runs:
        acc.setdefault(r["config"], {})[r["seed"]] = r["final_accuracy"]
    if "clean" not in acc and "plain" in acc:
        acc["clean"] = dict(acc["plain"])  # `none`: the oracle of clean data is plain SFT
    rows = {}
    for c, by_seed in acc.items():
        vals = np.array(list(by_seed.values()))
        wa = [r["weight_auroc"][-1] for r in runs if r["config"] == c and r.get("weight_auroc")]
        row = {
            "n": len(vals),
            "acc_mean": float(vals.mean()),
            "acc_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "weight_auroc": float(np.nanmean(wa)) if wa and not np.all(np.isnan(wa)) else None,
            "vs_plain": paired(acc, c, "plain", resamples) if c != "plain" else None,
            "gap_closed": None,
        }
        seeds = sorted(set(by_seed) & set(acc.get("plain", {})) & set(acc.get("clean", {})))
        if seeds and c not in ("plain",):
            p = np.mean([acc["plain"][s] for s in seeds])
            o = np.mean([acc["clean"][s] for s in seeds])
            a = np.mean([by_seed[s] for s in seeds])
            row["gap_closed"] = float((a - p) / (o - p)) if abs(o - p) > 1e-9 else None
        if is_drift(c):
            row["vs_baselines"] = {b: paired(acc, c, b, resamples) for b in BASELINES if b in acc}
        rows[c] = row
    return rows


def aggregate(ns, command: str) -> dict:
    runs = load_runs(ns.out)
    table = {}
    for regime in ns.regimes.split(","):
        for kind in ns.kinds.split(","):
            rs = [r for r in runs if r.get("regime", "warm") == regime and r["kind"] == kind]
            if rs:
                table.setdefault(regime, {})[kind] = kind_table(rs, ns.bootstrap)
    bases, icl_bases = base_accuracies(ns.out, ns.seeds)
    result = {"command": command, "options": vars(ns), "base_accuracy": bases, "table": table}
    if icl_bases:
        result["icl_base_accuracy"] = icl_bases
    drifts = drift_configs(table)
    result["targets"] = {regime: {c: targets(kinds, c) for c in drifts} for regime, kinds in table.items()}
    with open(os.path.join(ns.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(ns.out, "quality.md"), "w") as f:
        f.write(markdown(result, ns))
    return result


def kept_bases(out: str) -> dict:
    """``{regime: {seed (str): base test accuracy}}`` from ``{out}/base_accuracy.json`` (empty if absent)."""
    kept = {"warm": {}, "icl": {}}
    path = os.path.join(out, "base_accuracy.json")
    if os.path.exists(path):
        with open(path) as f:
            kept.update(json.load(f))
    return kept


def save_kept_bases(out: str, kept: dict) -> None:
    with open(os.path.join(out, "base_accuracy.json"), "w") as f:
        json.dump(kept, f, indent=1, sort_keys=True)


def base_accuracies(out: str, seeds: int) -> tuple[dict, dict]:
    """Test accuracy of each seed's base model, warm and icl. The base models are not committed (``base/`` is
    ignored), so their accuracies are kept in ``{out}/base_accuracy.json`` (``quality.check_base`` records each base
    a run is made from), filled in from any ``base.json`` present for a seed it lacks: a clean clone that only
    aggregates, or only runs new seeds, still reports every seed's base."""
    kept = kept_bases(out)
    for folder, regime in (("base", "warm"), ("base_icl", "icl")):
        for s in range(seeds):
            p = os.path.join(out, folder, f"seed{s}", "base.json")
            if os.path.exists(p) and str(s) not in kept[regime]:  # a kept entry is the base its runs came from
                with open(p) as f:
                    kept[regime][str(s)] = json.load(f)["test_accuracy"]
    save_kept_bases(out, kept)
    pick = [{int(s): a for s, a in kept[r].items() if int(s) < seeds} for r in ("warm", "icl")]
    return pick[0], pick[1]


def targets(kinds: dict, config: str) -> dict:
    """The issue's targets for ``config``: True / False, or None when a kind or a comparison is missing."""
    out = {}

    def vs(kind, other="plain"):
        row = kinds.get(kind, {}).get(config)
        if row is None:
            return None
        return row["vs_plain"] if other == "plain" else (row.get("vs_baselines") or {}).get(other)

    for kind in ("none", "random10"):
        d = vs(kind)
        out[f"never_hurts_{kind}"] = None if d is None else bool(d["mean"] >= -0.005 and d["ci"][0] >= -0.015)
    for kind in CORRUPTED:
        d = vs(kind)
        out[f"helps_{kind}"] = None if d is None else bool(d["mean"] > 0 and d["ci"][0] > 0)
    for kind in ("systematic", "format", "target"):
        ds = [vs(kind, b) for b in BASELINES]
        ds = [d for d in ds if d is not None]
        out[f"above_every_baseline_{kind}"] = bool(all(d["mean"] > 0 for d in ds)) if len(ds) == 4 else None
        out[f"significantly_above_two_{kind}"] = sum(d["ci"][0] > 0 for d in ds) >= 2 if len(ds) == 4 else None
    gaps = [kinds[k][config]["gap_closed"] for k in CORRUPTED if config in kinds.get(k, {})]
    gaps = [g for g in gaps if g is not None]
    out["gap_closed_mean"] = float(np.mean(gaps)) if gaps else None
    out["gap_closed_at_least_0.7"] = (out["gap_closed_mean"] >= 0.7) if gaps else None
    au = kinds.get("systematic", {}).get(config, {}).get("weight_auroc")
    out["auroc_systematic_at_least_0.9"] = None if au is None else bool(au >= 0.9)
    return out


def _d(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] ({d['below']}/{d['n']} below)"


def markdown(result: dict, ns) -> str:
    lines = [
        "# Quality benchmark",
        "",
        f"Made by: `{result['command']}`",
        "",
        f"Warm regime: base models trained {ns.base_steps} steps on clean addition (test accuracy by seed: "
        + ", ".join(f"{s}: {a:.3f}" for s, a in sorted(result["base_accuracy"].items()))
        + f"), then {ns.steps} SFT steps at lr {ns.sft_lr}; refreshes from step {ns.first_refresh}, every "
        f"{ns.refresh}. {ns.num_train} train rows, {ns.num_test} test prompts, {ns.seeds} seeds. Accuracy: greedy "
        "exact match on held-out prompts. Paired differences: mean over seeds [95% bootstrap CI] (seeds below 0). Gap "
        "closed: (acc - plain) / (oracle - plain) on seed means. Weight AUROC: final weights, clean vs corrupted rows.",
        "",
    ]
    ns_of = {r["n"] for kinds in result["table"].values() for rows in kinds.values() for r in rows.values()}
    if len(ns_of) > 1:
        lines[-1:-1] = [
            "",
            f"Rows differ in their number of seeds (n = {', '.join(map(str, sorted(ns_of)))}): the later seeds were "
            "run for some configurations only. Each paired difference uses the seeds both of its rows have.",
        ]
    if result.get("icl_base_accuracy"):
        lines[-1:-1] = [
            "",
            f"icl regime: as warm, but each base-training row comes after 0 to {ns.icl_demos} other clean rows "
            "(test accuracy by seed: "
            + ", ".join(f"{s}: {a:.3f}" for s, a in sorted(result["icl_base_accuracy"].items()))
            + ").",
        ]
    for regime, kinds in result["table"].items():
        for kind, rows in kinds.items():
            lines += [f"## {regime} / {kind}", "", "| config | accuracy | vs plain | gap closed | weight AUROC |"]
            lines.append("|---|---|---|---|---|")
            for c, r in rows.items():
                gap = f"{r['gap_closed']:+.2f}" if r["gap_closed"] is not None else "-"
                au = f"{r['weight_auroc']:.2f}" if r["weight_auroc"] is not None else "-"
                acc = f"{r['acc_mean']:.3f} +- {r['acc_std']:.3f} (n={r['n']})"
                lines.append(f"| {c} | {acc} | {_d(r['vs_plain'])} | {gap} | {au} |")
            lines += ["", "| config | " + " | ".join(f"vs {b}" for b in BASELINES) + " |"]
            lines.append("|---|" + "---|" * len(BASELINES))
            for c in drift_configs({regime: {kind: rows}}):
                vb = rows[c].get("vs_baselines") or {}
                lines.append(f"| {c} | " + " | ".join(_d(vb.get(b)) for b in BASELINES) + " |")
            lines.append("")
        lines += targets_table(result["targets"][regime], regime)
    return "\n".join(lines) + "\n"


def targets_table(by_config: dict, regime: str) -> list[str]:
    """One row per DRIFT configuration, one column per target, and how many targets it meets."""
    keys = list(next(iter(by_config.values())).keys())
    short = [
        k.replace("significantly_above_two_", "sig2_").replace("above_every_baseline_", "above_all_") for k in keys
    ]
    lines = [f"## Targets ({regime})", "", "| config | " + " | ".join(short) + " | met |"]
    lines.append("|---|" + "---|" * (len(keys) + 1))
    for c, t in by_config.items():
        cells = [
            f"{t[k]:.2f}" if isinstance(t[k], float) else {True: "yes", False: "no", None: "-"}[t[k]] for k in keys
        ]
        met = sum(v is True for v in t.values())
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {met}/{sum(isinstance(v, bool) for v in t.values())} |")
    lines.append("")
    return lines
