"""Preference benchmark: uniform DPO against ICA, LossDiff-IRM and DRIFT on a synthetic task with flipped pairs.

Run from the repository root::

    PYTHONPATH=. python benchmarks/preference.py            # full run: 3 seeds (about 10-15 minutes on 2 CPU cores)
    PYTHONPATH=. python benchmarks/preference.py --quick    # smoke run: 1 seed, fewer steps

Task: one-digit addition ``"a+b="``. A pair's chosen response is the right sum and its rejected one a wrong sum, except
for a share of *flipped* pairs (chosen and rejected swapped: the label noise). A tiny Llama is first fine-tuned briefly
on a few clean examples (the same start for every method of a seed, and DPO's reference), then trained with DPO
(``loss_type="sigmoid"``) by ``DriftDPOTrainer`` under each ``drift_method``. Held-out clean pairs measure:

- ``pref_acc``: share of held-out pairs where the policy gives the right answer the higher log-probability;
- ``margin_acc``: share where the implicit reward margin ``beta * [log(pi/pi_ref)(y_w) - log(pi/pi_ref)(y_l)]`` is
  positive (what DPO optimises);
- ``exact``: greedy exact-match accuracy on the held-out prompts;
- ``flip_auroc``: how well the method's weights tell clean from flipped train pairs (AUROC of weight, clean = 1;
  0.5 = blind; for LossDiff-IRM, of the 0/1 keep mask).

Writes ``benchmarks/results/preference.json`` and ``benchmarks/results/preference.md`` (with the command).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shlex
import sys
import time

import numpy as np
import torch

METHODS = ("uniform", "ica", "lossdiff_irm", "drift")
HERE = os.path.dirname(os.path.abspath(__file__))


def pairs(n: int, seed: int, flip: float):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "answer": [], "flipped": []}
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        right = a + b
        wrong = right
        while wrong == right:
            wrong = max(0, right + rng.choice([-2, -1, 1, 2]))
        f = rng.random() < flip
        rows["prompt"].append(f"{a}+{b}=")
        rows["chosen"].append(str(wrong if f else right))
        rows["rejected"].append(str(right if f else wrong))
        rows["answer"].append(str(right))
        rows["flipped"].append(f)
    return Dataset.from_dict(rows)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    s, y = np.asarray(score, dtype=float), np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks of ties
        ranks[s == v] = ranks[s == v].mean()
    n1 = y.sum()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def sft_start(tok, seed: int, steps: int):
    """A tiny Llama briefly fine-tuned on clean one-digit sums (a plain loop; the start every method shares)."""
    from drift_trainer.cli.toy import build_tiny_llama
    from drift_trainer.core.features import collate_right, per_example_loss

    torch.manual_seed(seed)
    model = build_tiny_llama(tok, seed=seed)
    rng = random.Random(1000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(32):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            p = tok(text=f"{a}+{b}=", add_special_tokens=False)["input_ids"]
            c = tok(text=f"{a + b}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
        loss, _ = per_example_loss(model, collate_right(rows, tok.pad_token_id))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model, ref, tok, test, beta: float) -> dict:
    from drift_trainer.methods.pairs import pair_logps

    rows = []
    for p, c, r in zip(test["prompt"], test["chosen"], test["rejected"]):
        ids = lambda t: tok(text=t, add_special_tokens=False)["input_ids"]  # noqa: E731
        rows.append(
            {
                "prompt_ids": ids(p),
                "chosen_ids": ids(c) + [tok.eos_token_id],
                "rejected_ids": ids(r) + [tok.eos_token_id],
            }
        )
    pol = pair_logps(model, rows, tok.pad_token_id, 64)
    rf = pair_logps(ref, rows, tok.pad_token_id, 64)
    margin = beta * ((pol.chosen - rf.chosen) - (pol.rejected - rf.rejected))
    # greedy exact match
    model.eval()
    prompts = sorted(set(test["prompt"]))
    answer = dict(zip(test["prompt"], test["answer"]))
    hits = 0
    for p in prompts:
        ids = torch.tensor([tok(text=p, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        hits += tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == answer[p]
    return {
        "pref_acc": float(np.mean(pol.chosen > pol.rejected)),
        "margin_acc": float(np.mean(margin > 0)),
        "margin_mean": float(margin.mean()),
        "exact": hits / len(prompts),
    }


def run_one(method, seed, start, tok, train, holdout, test, cfg) -> dict:
    from common import quiet_cpu_args  # here, not at the top: after main has set up the environment

    from drift_trainer import DriftDPOConfig, DriftDPOTrainer

    model, ref = copy.deepcopy(start), copy.deepcopy(start)
    args = DriftDPOConfig(
        output_dir=f"/tmp/drift-pref-bench/{method}-{seed}",
        bf16=False,
        seed=seed,
        num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=16,
        learning_rate=cfg["lr"],
        beta=cfg["beta"],
        logging_steps=10,
        drift_method=method,
        drift_lossdiff_warmup_epochs=1.0,
        drift_refresh_steps=cfg["refresh"],
        drift_first_refresh_step=cfg["refresh"],
        drift_num_queries=16,
        drift_num_rollouts=4,
        drift_max_new_tokens=3,
        drift_no_contrast="keep",
        **quiet_cpu_args(),
    )
    trainer = DriftDPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=train,
        processing_class=tok,
        holdout_dataset=holdout,
        validation_dataset=holdout,
        query_dataset=holdout.select_columns(["prompt", "answer"]),
        reward_funcs="exact_match",
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    out = {"method": method, "seed": seed, "seconds": round(seconds, 1)}
    out.update(evaluate(trainer.model, ref, tok, test, cfg["beta"]))
    w = trainer.pair_weights
    flipped = np.asarray(train["flipped"])
    if w is not None:
        out["flip_auroc"] = auroc(w, ~flipped)
        out["kept_or_weight_mean"] = float(np.mean(w))
        if method == "lossdiff_irm":
            kept = w > 0
            out["flipped_share_kept"] = float(flipped[kept].mean()) if kept.any() else float("nan")
    out["flipped_share_all"] = float(flipped.mean())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, fewer pairs and epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--flip", type=float, default=0.35, help="share of flipped train pairs")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--sft-steps", type=int, default=None, help="steps of the shared SFT start (default 30)")
    ap.add_argument("--lr", type=float, default=None, help="DPO learning rate (default 1e-3)")
    ap.add_argument("--tag", default="", help="suffix of the result files (preference{tag}.json / .md)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from drift_trainer.cli.toy import build_char_tokenizer, offline_env

    offline_env()
    os.environ["TQDM_DISABLE"] = "1"
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cfg = {"n_train": 768, "epochs": 3, "lr": 1e-3, "beta": 0.1, "refresh": 24, "sft_steps": 30}
    if a.sft_steps is not None:
        cfg["sft_steps"] = a.sft_steps
    if a.lr is not None:
        cfg["lr"] = a.lr
    seeds = list(range(a.seeds))
    if a.quick:
        cfg.update(n_train=96, epochs=2, refresh=4, sft_steps=10)
        seeds = [0]
    methods = a.methods.split(",")
    tok = build_char_tokenizer()
    results = []
    t0 = time.perf_counter()
    for seed in seeds:
        train = pairs(cfg["n_train"], 10 + seed, a.flip)
        holdout = pairs(32, 100 + seed, 0.0)
        test = pairs(200, 1000 + seed, 0.0)
        start = sft_start(tok, seed, cfg["sft_steps"])
        base = evaluate(start, start, tok, test, cfg["beta"])
        results.append({"method": "start (SFT only)", "seed": seed, **base})
        print(json.dumps(results[-1]), flush=True)
        for m in methods:
            results.append(run_one(m, seed, start, tok, train, holdout, test, cfg))
            print(json.dumps(results[-1]), flush=True)
    wall = time.perf_counter() - t0
    command = "PYTHONPATH=. python benchmarks/preference.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    os.makedirs(a.out, exist_ok=True)
    meta = {
        "command": command.strip(),
        "config": cfg,
        "flip": a.flip,
        "seeds": seeds,
        "wall_seconds": round(wall, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    with open(os.path.join(a.out, f"preference{a.tag}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    write_md(os.path.join(a.out, f"preference{a.tag}.md"), meta, results)


def _fmt(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not vals:
        return "-"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def write_md(path, meta, results):
    names = ["start (SFT only)"] + [m for m in METHODS if any(r["method"] == m for r in results)]
    keys = ["pref_acc", "margin_acc", "exact", "flip_auroc", "kept_or_weight_mean", "seconds"]
    lines = [
        "# Preference benchmark: uniform DPO vs ICA, LossDiff-IRM and DRIFT",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Wall time: {meta['wall_seconds']} s. Seeds: {meta['seeds']}. "
        f"Flipped train pairs: {meta['flip']:.0%}. Config: {json.dumps(meta['config'])}.",
        "",
        "Task: one-digit addition pairs (chosen = right sum, rejected = wrong sum; flipped pairs swap them), tiny "
        "Llama briefly fine-tuned on clean sums (shared start and DPO reference), then DPO (sigmoid, beta 0.1) "
        "with `DriftDPOTrainer(drift_method=...)`. Held-out clean pairs: `pref_acc` = policy prefers the right "
        "answer; `margin_acc` = implicit reward margin > 0; `exact` = greedy exact match on held-out prompts; "
        "`flip_auroc` = AUROC of the method's weights for clean vs flipped train pairs. Mean ± std over seeds.",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name in names:
        rs = [r for r in results if r["method"] == name]
        lines.append(f"| {name} | " + " | ".join(_fmt([r.get(k) for r in rs]) for k in keys) + " |")
    lines += [
        "",
        "Per seed:",
        "",
        "| method | seed | pref_acc | margin_acc | exact | flip_auroc |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        fa = r.get("flip_auroc")
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['pref_acc']:.3f} | {r['margin_acc']:.3f} | {r['exact']:.3f} | "
            f"{'-' if fa is None else f'{fa:.3f}'} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
