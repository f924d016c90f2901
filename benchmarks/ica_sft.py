"""Why SFT ICA fails on the quality benchmark: what its score is made of, clean against corrupted rows.

ICA scores a train row by ``lp_ctx(y) - lp(y)``: the log-probability of its completion after ``k`` holdout
demonstrations, less the one without them (``drift_trainer.methods.ica``). For each kind and seed this reads the
quality benchmark's base model (``results/base/seed*``, or ``--base`` for another folder of them), scores the kind's
train rows against the queries with their answers (the holdout ``benchmarks/quality.py``'s ``ica`` config uses), and
reports the means of ``lp``, ``lp_ctx`` and the score for clean and corrupted rows, with the AUROC of the score for
telling clean (positive) from corrupted rows. Forward passes only: about 10 s per kind and seed on 2 cores.

    PYTHONPATH=. python benchmarks/ica_sft.py                    # writes results/ica_sft.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402 (benchmarks/ is first on sys.path)
from common import RESULTS  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=os.path.join(RESULTS, "base"), help="Folder of seed*/run/final base models.")
    p.add_argument("--kinds", default="random10,random40,systematic,format,target")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-demos", type=int, default=3, help="k, drift_ica_num_demos' default.")
    p.add_argument("--out", default=os.path.join(RESULTS, "ica_sft"), help="Writes OUT.json and OUT.md.")
    return p.parse_args(argv)


def score_parts(model, tok, train, holdout, k: int) -> np.ndarray:
    """``(n, 2)``: each row's ``lp(y)`` and ``lp_ctx(y)``, as :func:`~drift_trainer.methods.ica.ica_scores` forms
    them (same retrieval, same rows)."""
    from drift_trainer.methods.ica import (
        _holdout_pairs,
        ica_rows,
        model_embeddings,
        prompt_text,
        retrieve,
        sequence_logps,
    )

    pairs = _holdout_pairs(holdout)
    emb_c = model_embeddings(model, tok, [prompt_text(tok, p) for p in train["prompt"]])
    emb_h = model_embeddings(model, tok, [prompt_text(tok, p) for p, _ in pairs])
    nearest = retrieve(emb_c, emb_h, k)
    rows = []
    for i, (p, y) in enumerate(zip(train["prompt"], train["completion"])):
        rows.extend(ica_rows(tok, p, y, [pairs[j] for j in nearest[i]]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return sequence_logps(model, rows, pad).reshape(-1, 2)


def main(argv=None) -> int:
    ns = parse(argv)
    qns = quality.parse([])
    quality._setup()
    from transformers import LlamaForCausalLM

    from drift_trainer.cli.demo_report import auroc
    from drift_trainer.cli.toy import build_char_tokenizer
    from drift_trainer.methods.ica import ica_scores

    tok = build_char_tokenizer()
    records = []
    for kind in ns.kinds.split(","):
        for seed in range(ns.seeds):
            train, queries, _ = quality.kind_data(qns, kind, seed)
            holdout = quality.ica_holdout(queries)
            model = LlamaForCausalLM.from_pretrained(os.path.join(ns.base, f"seed{seed}", "run", "final"))
            lp = score_parts(model, tok, train, holdout, ns.num_demos)
            score = lp[:, 1] - lp[:, 0]
            # the library's own scorer gives the same scores (guards this script against drifting from it)
            lib = ica_scores(model, tok, train, holdout, ns.num_demos)
            assert np.allclose(lib, score, atol=1e-6), "ica_sft.py no longer forms ICA's rows as the library does"
            bad = np.asarray(train["corrupted"], dtype=bool)
            rec = {"kind": kind, "seed": seed, "auroc": auroc(score, ~bad)}
            for name, m in (("clean", ~bad), ("corrupted", bad)):
                rec[name] = {"lp": lp[m, 0].mean(), "lp_ctx": lp[m, 1].mean(), "score": score[m].mean()}
            rec["corr_score_loss"] = float(np.corrcoef(score, -lp[:, 0])[0, 1])
            records.append(json.loads(json.dumps(rec, default=float)))
            print(kind, seed, {k: v for k, v in rec.items() if k not in ("kind", "seed")}, flush=True)
    lines = [
        "# SFT ICA: what its score is made of",
        "",
        "Made by: `PYTHONPATH=. python benchmarks/ica_sft.py" + (" " + " ".join(argv) if argv else "") + "`",
        "",
        f"Base models: `{os.path.relpath(ns.base, os.path.dirname(RESULTS))}` (the quality benchmark's warm start). "
        f"k = {ns.num_demos} demonstrations retrieved from the queries with their answers. Means over each kind's "
        "clean and corrupted train rows; AUROC of the score for clean vs corrupted rows; corr: Pearson correlation "
        "of the score with the row's loss (-lp).",
        "",
        "| kind | seed | clean lp | clean lp_ctx | clean score | corrupted lp | corrupted lp_ctx | corrupted score "
        "| AUROC | corr(score, loss) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        c, b = r["clean"], r["corrupted"]
        lines.append(
            f"| {r['kind']} | {r['seed']} | {c['lp']:.2f} | {c['lp_ctx']:.2f} | {c['score']:+.2f} | {b['lp']:.2f} | "
            f"{b['lp_ctx']:.2f} | {b['score']:+.2f} | {r['auroc']:.2f} | {r['corr_score_loss']:+.2f} |"
        )
    with open(ns.out + ".json", "w") as f:
        json.dump({"options": vars(ns), "records": records}, f, indent=1)
    with open(ns.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
