"""Does ICA see flipped pairs once the start model reads text after other examples? (preference task, no DPO)

ICA scores a pair by how much holdout demonstrations placed before its prompt raise the chosen answer over the
rejected one. On ``preference.py``'s task its weights rank flipped pairs *above* clean ones (flip AUROC 0.41), and the
start there has only seen one problem per sequence. This check scores the train pairs of each seed with ICA (k = 3,
the default) on two starts, with no training after it:

- ``single``: the benchmark's start (``--sft-steps`` 200 SFT steps, one problem per row);
- ``demos``: each SFT row after 0 to ``--demos`` other solved problems (``preference.py --sft-demos``), so text after
  demonstrations is in distribution; ``--demo-steps`` SFT steps (longer rows learn slower: at 200 steps this start
  barely learns the task, at 400 it is still a little weaker than ``single`` on held-out pairs; see the table).

Reported per seed and start: the start's held-out pref_acc and greedy exact match, and the AUROC of the ICA scores
for clean (positive) against flipped pairs (0.5: blind; below 0.5: inverted).

    PYTHONPATH=. python benchmarks/preference_ica_start.py             # 8 seeds, about 6 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from preference import FULL, Seed  # noqa: E402
from preference_task import auroc, evaluate, quiet_setup  # noqa: E402
from quality_stats import bootstrap_ci  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--flip", type=float, default=0.33)
    ap.add_argument("--sft-steps", type=int, default=FULL["sft_steps"])
    ap.add_argument("--demos", type=int, default=3)
    ap.add_argument("--demo-steps", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    quiet_setup()
    import torch

    from drift_trainer.cli.toy import build_char_tokenizer
    from drift_trainer.methods.ica import ica_scores

    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    starts = {"single": {"sft_steps": a.sft_steps}, "demos": {"sft_steps": a.demo_steps, "sft_demos": a.demos}}
    rows = []
    t0 = time.perf_counter()
    for seed in range(a.seeds):
        for name, over in starts.items():
            s = Seed(tok, seed, {**FULL, **over}, a.flip)
            ev = evaluate(s.start, s.start, tok, s.test, FULL["beta"], FULL["width"])
            sc = ica_scores(s.start, tok, s.train, s.val, 3)
            rows.append(
                {
                    "seed": seed,
                    "start": name,
                    "pref_acc": ev["pref_acc"],
                    "exact": ev["exact"],
                    "ica_flip_auroc": auroc(sc, ~s.flipped),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["start"], r["seed"]): r for r in rows}
    summary = {}
    for name in starts:
        au = np.array([by[(name, s)]["ica_flip_auroc"] for s in range(a.seeds)])
        lo, hi = bootstrap_ci(au - 0.5)
        summary[name] = {
            "auroc_mean": float(au.mean()),
            "auroc_ci": [float(lo + 0.5), float(hi + 0.5)],
            "pref_acc_mean": float(np.mean([by[(name, s)]["pref_acc"] for s in range(a.seeds)])),
            "exact_mean": float(np.mean([by[(name, s)]["exact"] for s in range(a.seeds)])),
        }
    d = np.array([by[("demos", s)]["ica_flip_auroc"] - by[("single", s)]["ica_flip_auroc"] for s in range(a.seeds)])
    lo, hi = bootstrap_ci(d)
    command = "PYTHONPATH=. python benchmarks/preference_ica_start.py " + " ".join(argv or sys.argv[1:])
    meta = {"command": command.strip(), "args": vars(a), "seconds": round(time.perf_counter() - t0, 1)}
    out = {"meta": meta, "rows": rows, "summary": summary, "demos_minus_single": [float(d.mean()), lo, hi]}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "preference_ica_start.json"), "w") as f:
        json.dump(out, f, indent=1)
    L = [
        "# ICA's flip AUROC on the preference task's start, with and without demonstrations in its SFT",
        "",
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s). Flipped train pairs {a.flip:.0%}; ICA k = 3; no DPO.",
        "",
        f"`single`: the benchmark's start ({a.sft_steps} SFT steps, one problem per row). `demos`: each SFT row after 0 "
        f"to {a.demos} other solved problems, {a.demo_steps} steps. AUROC: ICA scores of clean (positive) against "
        "flipped train pairs.",
        "",
        "| seed | start | pref_acc | exact | ICA flip AUROC |",
        "|---|---|---|---|---|",
    ]
    L += [
        f"| {r['seed']} | {r['start']} | {r['pref_acc']:.3f} | {r['exact']:.3f} | {r['ica_flip_auroc']:.3f} |"
        for r in rows
    ]
    L += ["", "| start | mean pref_acc | mean exact | ICA flip AUROC mean [95% CI] |", "|---|---|---|---|"]
    for name, m in summary.items():
        L.append(
            f"| {name} | {m['pref_acc_mean']:.3f} | {m['exact_mean']:.3f} | {m['auroc_mean']:.3f} "
            f"[{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}] |"
        )
    L += ["", f"Paired, demos minus single: AUROC {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}].", ""]
    with open(os.path.join(a.out, "preference_ica_start.md"), "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
