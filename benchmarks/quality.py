"""Quality benchmark: DRIFT against baseline scorers on three kinds of corrupted SFT data (see README.md here).

For each seed a *base model* (tiny Llama, random init) is first trained on clean two-digit addition (rows disjoint
from the SFT set) until it half-knows the task, so rollouts are a mix of right and wrong from the first refresh. Then,
for each corruption kind (``random``, ``systematic``, ``format``) and each configuration, the base model is fine-tuned
on the corrupted SFT set for the same budget:

- ``plain``: plain SFT (``drift_enabled=False``) on the corrupted set,
- ``clean``: plain SFT on the clean rows of the set alone (the corrupted rows dropped),
- one run per ``drift_scorer`` (drift, off_policy, cosine, loss, random, uniform, drift_unsigned, drift_raw), with
  the default captured features (``drift_capture_features``),
- ``drift_full``: the drift scorer recomputing every row's feature at every refresh (no capture),
- ``drift_unchecked``: the drift scorer on captured features with the agreement check off.

Reported per kind and configuration: AUROC of the refresh's scores separating clean from corrupted rows at each
refresh, final test accuracy (greedy, exact match, held-out prompts) mean and spread over seeds, and the share of the
gap between ``plain`` and ``clean`` that the configuration closes, ``(acc - plain) / (clean - plain)``.

Runs are independent jobs, each written to ``{out}/runs/*.json`` as it finishes: rerunning skips finished jobs, and
``--aggregate-only`` rebuilds the tables from whatever exists.

    PYTHONPATH=. python benchmarks/quality.py            # full: 3 kinds x 3 seeds x 10 configurations
    PYTHONPATH=. python benchmarks/quality.py --quick    # smoke run: tiny budget, 1 seed, writes to /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("random", "systematic", "format")
SCORERS = ("drift", "off_policy", "cosine", "loss", "random", "uniform", "drift_unsigned", "drift_raw")
# drift_full: the drift scorer with every refresh recomputing every row's feature (drift_capture_features=False);
# drift_unchecked: captured features with the agreement check off (the cache is trusted however stale)
CONFIGS = ("plain", "clean") + SCORERS + ("drift_full", "drift_unchecked")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="Parallel worker processes (1 torch thread each).")
    p.add_argument("--base-steps", type=int, default=800, help="Steps of the clean base-model training per seed.")
    p.add_argument("--steps", type=int, default=200, help="SFT steps per run (from the base model).")
    p.add_argument("--first-refresh", type=int, default=40)
    p.add_argument("--refresh", type=int, default=40)
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.5, help="Share of rows drawn for corruption.")
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--num-queries", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=96)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--quick", action="store_true", help="Smoke run: 1 seed, 2 kinds, 4 configs, tiny budget, /tmp.")
    p.add_argument("--aggregate-only", action="store_true")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.seeds, ns.base_steps, ns.steps, ns.first_refresh, ns.refresh = 1, 60, 20, 10, 10
        ns.num_train, ns.num_test, ns.num_queries, ns.hidden_size, ns.num_layers = 200, 50, 16, 32, 1
        ns.kinds, ns.configs = "systematic,format", "plain,clean,drift,loss"
        if ns.out == p.get_default("out"):
            ns.out = "/tmp/drift-quality-quick"
    return ns


def _setup():
    from drift_trainer.cli.toy import offline_env

    offline_env()
    import logging
    import warnings

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("drift_trainer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _model_kwargs(ns):
    return dict(hidden_size=ns.hidden_size, num_layers=ns.num_layers, lr=ns.lr, batch_size=ns.batch_size)


def base_job(ns, seed: int) -> str:
    """Train (or reuse) the clean base model of ``seed``; returns its directory."""
    _setup()
    from drift_trainer.cli.demo import evaluate_accuracy, make_data, run_one
    from drift_trainer.cli.toy import addition_dataset, build_char_tokenizer

    path = os.path.join(ns.out, "base", f"seed{seed}")
    if os.path.exists(os.path.join(path, "model", "config.json")):
        return path
    tok = build_char_tokenizer(os.path.join(path, "tokenizer"))
    _, _, test = make_data("none", 0.0, ns.num_train, ns.num_test, ns.num_queries, seed)
    base_train = addition_dataset(ns.num_train * 2, seed=9000 + seed)  # clean, other rows than the SFT sets
    r = run_one(
        "base",
        train=base_train,
        queries=None,
        test=test,
        tokenizer=tok,
        output_dir=os.path.join(path, "run"),
        steps=ns.base_steps,
        seed=seed,
        drift=False,
        progress=False,
        save_model=True,
        **_model_kwargs(ns),
    )
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(path, "run", "final"))
    model.save_pretrained(os.path.join(path, "model"))
    with open(os.path.join(path, "base.json"), "w") as f:
        json.dump(
            {
                "seed": seed,
                "test_accuracy": r.final_accuracy,
                "check": evaluate_accuracy(model, tok, test),
                "seconds": r.seconds,
            },
            f,
        )
    return path


def run_job(ns, kind: str, seed: int, config: str) -> dict:
    _setup()
    from drift_trainer.cli.demo import ROLLOUT_OPTIONS, make_data, run_one
    from drift_trainer.cli.toy import build_char_tokenizer

    out_file = os.path.join(ns.out, "runs", f"{kind}-seed{seed}-{config}.json")
    if os.path.exists(out_file):
        with open(out_file) as f:
            return json.load(f)
    base = os.path.join(ns.out, "base", f"seed{seed}")
    tok = build_char_tokenizer(os.path.join(ns.out, "tok", f"{kind}-{seed}-{config}"))
    train, queries, test = make_data(kind, ns.fraction, ns.num_train, ns.num_test, ns.num_queries, seed)
    run_dir = os.path.join(ns.out, "work", f"{kind}-seed{seed}-{config}")
    common = dict(
        queries=queries,
        test=test,
        tokenizer=tok,
        output_dir=run_dir,
        steps=ns.steps,
        seed=seed,
        progress=False,
        init_from=os.path.join(base, "model"),
        warmup_steps=0,
        **_model_kwargs(ns),
    )
    if config == "plain":
        r = run_one(config, train=train, drift=False, **common)
    elif config == "clean":
        keep = [i for i, c in enumerate(train["corrupted"]) if not c]
        r = run_one(config, train=train.select(keep), drift=False, **common)
    else:
        r = run_one(
            config,
            train=train,
            drift=True,
            drift_scorer="drift" if config in ("drift_full", "drift_unchecked") else config,
            drift_capture_features=config != "drift_full",
            drift_capture_check_rows=0 if config == "drift_unchecked" else 32,
            drift_first_refresh_step=ns.first_refresh,
            drift_refresh_steps=ns.refresh,
            drift_num_queries=ns.num_queries,
            **ROLLOUT_OPTIONS,
            drift_save_artifacts=True,
            **common,
        )
    rec = {"kind": kind, "seed": seed, "config": config, **r.to_dict()}
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    with open(out_file, "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def aggregate(ns, command: str) -> dict:
    runs = []
    run_dir = os.path.join(ns.out, "runs")
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        with open(os.path.join(run_dir, name)) as f:
            runs.append(json.load(f))
    bases = {}
    for s in range(ns.seeds):
        p = os.path.join(ns.out, "base", f"seed{s}", "base.json")
        if os.path.exists(p):
            with open(p) as f:
                bases[s] = json.load(f)["test_accuracy"]
    table = {}
    for kind in ns.kinds.split(","):
        by = {c: [r for r in runs if r["kind"] == kind and r["config"] == c] for c in ns.configs.split(",")}
        plain = {r["seed"]: r["final_accuracy"] for r in by.get("plain", [])}
        clean = {r["seed"]: r["final_accuracy"] for r in by.get("clean", [])}
        rows = {}
        for c, rs in by.items():
            if not rs:
                continue
            acc = np.array([r["final_accuracy"] for r in rs])
            au = [r["auroc"] for r in rs if r.get("auroc")]
            au_by_refresh = np.nanmean(np.array(au), axis=0).tolist() if au and len({len(a) for a in au}) == 1 else []
            seeds = [r["seed"] for r in rs if r["seed"] in plain and r["seed"] in clean]
            gap = None
            if seeds:
                p_m = np.mean([plain[s] for s in seeds])
                c_m = np.mean([clean[s] for s in seeds])
                a_m = np.mean([r["final_accuracy"] for r in rs if r["seed"] in seeds])
                gap = float((a_m - p_m) / (c_m - p_m)) if abs(c_m - p_m) > 1e-9 else None
            rows[c] = {
                "n": len(rs),
                "acc_mean": float(acc.mean()),
                "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "acc_min": float(acc.min()),
                "acc_max": float(acc.max()),
                "auroc_by_refresh": au_by_refresh,
                "auroc_mean": float(np.nanmean(au_by_refresh)) if au_by_refresh else None,
                "gap_closed": gap,
                "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
            }
        table[kind] = rows
    result = {
        "command": command,
        "options": vars(ns),
        "base_accuracy": bases,
        "table": table,
        "targets": targets(table),
    }
    with open(os.path.join(ns.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(ns.out, "quality.md"), "w") as f:
        f.write(markdown(result, ns))
    return result


def targets(table: dict) -> dict:
    """The benchmark's targets, each True / False / None (not enough runs)."""
    out = {}
    above_plain = []
    for rows in table.values():
        if "drift" in rows and "plain" in rows:
            above_plain.append(rows["drift"]["acc_mean"] > rows["plain"]["acc_mean"])
    out["drift_above_plain_all_kinds"] = all(above_plain) if len(above_plain) == len(table) and table else None
    for kind in ("systematic", "format"):
        rows = table.get(kind, {})
        base = [c for c in rows if c in SCORERS and c not in ("drift", "drift_unsigned", "drift_raw")]
        if "drift" in rows and base:
            out[f"drift_above_every_baseline_{kind}"] = all(
                rows["drift"]["acc_mean"] > rows[c]["acc_mean"] for c in base
            )
    gaps = [
        rows["drift"]["gap_closed"]
        for rows in table.values()
        if "drift" in rows and rows["drift"]["gap_closed"] is not None
    ]
    out["drift_gap_closed_mean"] = float(np.mean(gaps)) if gaps else None
    out["drift_closes_half_the_gap"] = (out["drift_gap_closed_mean"] >= 0.5) if gaps else None
    return out


def markdown(result: dict, ns) -> str:
    lines = [
        "# Quality benchmark",
        "",
        f"Made by: `{result['command']}`",
        "",
        f"Base models (clean pre-training, {ns.base_steps} steps) test accuracy by seed: "
        + ", ".join(f"{s}: {a:.3f}" for s, a in sorted(result["base_accuracy"].items())),
        "",
        f"SFT: {ns.steps} steps from the base model, {ns.num_train} rows, {ns.fraction:.0%} drawn for corruption, "
        f"refreshes at step {ns.first_refresh} and every {ns.refresh} after; {ns.seeds} seeds. Accuracy: greedy exact "
        "match on held-out prompts, mean +- std over seeds [min, max]. AUROC: scores of clean vs corrupted rows, mean "
        "over seeds, one value per refresh. Gap closed: (acc - plain) / (clean - plain) on seed means.",
        "",
    ]
    for kind, rows in result["table"].items():
        lines += [
            f"## {kind}",
            "",
            "| config | test accuracy | gap closed | AUROC by refresh | s/run |",
            "|---|---|---|---|---|",
        ]
        for c, r in rows.items():
            au = ", ".join(f"{a:.2f}" for a in r["auroc_by_refresh"]) or "-"
            gap = f"{r['gap_closed']:+.2f}" if r["gap_closed"] is not None else "-"
            lines.append(
                f"| {c} | {r['acc_mean']:.3f} +- {r['acc_std']:.3f} [{r['acc_min']:.2f}, {r['acc_max']:.2f}] "
                f"(n={r['n']}) | {gap} | {au} | {r['seconds_mean']:.0f} |"
            )
        lines.append("")
    lines += ["## Targets", ""]
    for k, v in result["targets"].items():
        lines.append(f"- {k}: {v if not isinstance(v, float) else f'{v:.3f}'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ns = parse(argv)
    command = "PYTHONPATH=. python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(ns.out, exist_ok=True)
    if not ns.aggregate_only:
        started = time.perf_counter()
        seeds = list(range(ns.seeds))
        jobs = [(k, s, c) for s in seeds for k in ns.kinds.split(",") for c in ns.configs.split(",")]
        with ProcessPoolExecutor(max_workers=ns.workers) as pool:
            for s, fut in [(s, pool.submit(base_job, ns, s)) for s in seeds]:
                fut.result()
                with open(os.path.join(ns.out, "base", f"seed{s}", "base.json")) as f:
                    print(f"base seed {s}: test accuracy {json.load(f)['test_accuracy']:.3f}", flush=True)
            futs = {pool.submit(run_job, ns, *j): j for j in jobs}
            for i, fut in enumerate(as_completed(futs), 1):
                r = fut.result()
                au = ",".join(f"{a:.2f}" for a in r.get("auroc", []))
                print(
                    f"[{i}/{len(jobs)} {time.perf_counter() - started:.0f}s] {r['kind']} seed {r['seed']} "
                    f"{r['config']}: acc {r['final_accuracy']:.3f} auroc [{au}] ({r['seconds']:.0f}s)",
                    flush=True,
                )
                aggregate(ns, command)
    result = aggregate(ns, command)
    print(open(os.path.join(ns.out, "quality.md")).read())
    return 0 if result["table"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
