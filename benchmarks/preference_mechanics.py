"""Checks of the preference papers' mechanics on the task of ``preference.py`` (issue "ICA and LossDiff-IRM that
measurably work").

Run from the repository root::

    PYTHONPATH=. python benchmarks/preference_mechanics.py            # 3 seeds (about 5 minutes on 2 CPU cores)
    PYTHONPATH=. python benchmarks/preference_mechanics.py --quick    # 1 seed, fewer pairs

Per seed, on the seed's start model and noisy train pairs (``preference.Seed``):

1. **LossDiff and IRM against exact influence** (arXiv 2510.13212 reports r = 0.77 and 0.67).
   ``theta`` = the start after one uniform DPO epoch on all train pairs (LossDiff-IRM's warm-up), ``theta_val`` = the
   start trained one epoch on the validation pairs (``methods.lossdiff.train_validation_model``), LossDiff and IRM
   from ``methods.lossdiff.lossdiff_irm_scores``. The influence of pair ``d`` on the validation DPO loss is computed
   exactly for the LM head's weight ``W`` (the other parameters held at ``theta``): with the final hidden states
   cached, the DPO loss is a cheap function of ``W``, so the full Hessian ``H`` of the mean train loss in ``W``
   (3,776 x 3,776) is formed column by column (``torch.func`` jvp of the gradient), and
   ``benefit(d) = g_val^T (H + lambda I)^-1 g_d`` is the first-order *drop* in validation loss from upweighting ``d``
   (``-IF``; ``lambda = max(0, -eig_min) + 0.1 * mean|eig|``, positive definite, with 0.01 and 1.0 in place of 0.1
   as a sensitivity check). The Hessian-free ``g_val^T g_d`` is reported beside it. Restricting the influence to the head is this benchmark's
   choice (the papers do not say which parameters their influence covers).
2. **ICA against its definition** (arXiv 2510.14459): ``methods.ica.ica_scores`` (batched, padded, retrieval by
   model embeddings) against a per-pair recomputation: the k nearest holdout prompts by cosine similarity in numpy,
   the demonstrations written as ``prompt + chosen + EOS``, and ``[lp_ctx(y_w) - lp_ctx(y_l)] - [lp(y_w) - lp(y_l)]``
   summed from one unpadded forward per sequence.

Writes ``benchmarks/results/preference_mechanics.json`` and ``.md`` (with the command).
"""

from __future__ import annotations

import argparse
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


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable")
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable")
    return float(np.corrcoef(ra, rb)[0, 1])


def pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


# ------------------------------------------------------------------------------------------------ exact influence


@torch.no_grad()
def head_inputs(model, rows, pad: int):
    """Per sequence (chosen then rejected of every pair): the final hidden states at the positions that predict the
    response tokens, ``(n, 2, L, h)``, the response tokens ``(n, 2, L)`` and a mask ``(n, 2, L)``."""
    from drift_trainer.core.features import collate_right

    seqs = []
    for r in rows:
        for key in ("chosen_ids", "rejected_ids"):
            ids = r["prompt_ids"] + r[key]
            seqs.append({"input_ids": ids, "labels": [-100] * len(r["prompt_ids"]) + r[key]})
    width = max(len(r["chosen_ids"]) for r in rows) + max(len(r["rejected_ids"]) for r in rows)
    hs, tgt, mask = [], [], []
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for s in range(0, len(seqs), 256):
        batch = collate_right(seqs[s : s + 256], pad)
        h = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        labels = batch["labels"]
        for i in range(len(h)):
            pos = (labels[i, 1:] != -100).nonzero().squeeze(1)  # position t predicts token t+1
            L = len(pos)
            hi = torch.zeros(width, h.shape[-1])
            ti = torch.zeros(width, dtype=torch.long)
            mi = torch.zeros(width)
            hi[:L], ti[:L], mi[:L] = h[i, pos], labels[i, pos + 1], 1.0
            hs.append(hi)
            tgt.append(ti)
            mask.append(mi)
    n = len(rows)
    return (
        torch.stack(hs).reshape(n, 2, width, -1).float(),
        torch.stack(tgt).reshape(n, 2, width),
        torch.stack(mask).reshape(n, 2, width),
    )


def dpo_losses(W, hs, tgt, mask, ref, beta: float):
    """Per-pair sigmoid DPO loss with head weight ``W``: ``softplus(-beta * [(lp_w - ref_w) - (lp_l - ref_l)])``."""
    logp = torch.log_softmax(hs @ W.T, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    lp = (logp * mask).sum(-1)  # (..., 2)
    margin = beta * ((lp[..., 0] - ref[..., 0]) - (lp[..., 1] - ref[..., 1]))
    return torch.nn.functional.softplus(-margin), lp


def exact_influence(model, train_rows, val_rows, ref_train, ref_val, beta: float, pad: int, chunk: int = 128):
    """``benefit (n,)``, ``first_order (n,)`` and facts about ``H`` (see the module docstring)."""
    from torch.func import grad, jvp, vmap

    W = model.get_output_embeddings().weight.detach().float().clone()
    htr, ttr, mtr = head_inputs(model, train_rows, pad)
    hva, tva, mva = head_inputs(model, val_rows, pad)
    rtr, rva = torch.as_tensor(ref_train, dtype=torch.float32), torch.as_tensor(ref_val, dtype=torch.float32)

    def mean_train(w):
        return dpo_losses(w, htr, ttr, mtr, rtr, beta)[0].mean()

    def mean_val(w):
        return dpo_losses(w, hva, tva, mva, rva, beta)[0].mean()

    def one(w, h, t, m, r):
        return dpo_losses(w, h, t, m, r, beta)[0]

    g_val = grad(mean_val)(W).reshape(-1).double()
    g_pairs = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(W, htr, ttr, mtr, rtr).reshape(len(train_rows), -1)
    g_train = grad(mean_train)
    p = W.numel()
    eye = torch.eye(p)
    cols = [
        vmap(lambda v: jvp(g_train, (W,), (v.reshape(W.shape),))[1].reshape(-1))(eye[s : s + chunk])
        for s in range(0, p, chunk)
    ]
    H = torch.cat(cols).double()
    H = 0.5 * (H + H.T)
    evals, evecs = torch.linalg.eigh(H)
    u = evecs.T @ g_val
    scale = float(evals.abs().mean())

    def benefit_at(factor):
        lam = max(0.0, -float(evals.min())) + factor * scale
        return (g_pairs.double() @ (evecs @ (u / (evals + lam)))).numpy(), lam  # g_d^T (H + lambda I)^-1 g_val

    benefit, lam = benefit_at(DAMPING)
    sensitivity = {str(f): benefit_at(f)[0] for f in DAMPING_SENSITIVITY}
    first = (g_pairs.double() @ g_val).numpy()
    lp_head = dpo_losses(W, htr, ttr, mtr, rtr, beta)[1].double().numpy()
    facts = {
        "params": p,
        "eig_min": float(evals.min()),
        "eig_max": float(evals.max()),
        "negative_eigs": int((evals < 0).sum()),
        "damping": lam,
    }
    return benefit, first, facts, lp_head, sensitivity


DAMPING = 0.1  # lambda = max(0, -eig_min) + DAMPING * mean|eig| (0.1 x the mean eigenvalue is the usual heuristic)
DAMPING_SENSITIVITY = (0.01, 1.0)


# ------------------------------------------------------------------------------------------------ ICA by definition


@torch.no_grad()
def summed_logp(model, context_ids, response_ids) -> float:
    ids = torch.tensor([context_ids + response_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(context_ids) - 1, len(context_ids) + len(response_ids) - 1)
    return float(logp[pos, torch.tensor(response_ids)].sum())


def ica_by_definition(model, tok, data, holdout, k: int) -> np.ndarray:
    from drift_trainer.methods.ica import model_embeddings

    ids = lambda t: tok(text=t, add_special_tokens=False)["input_ids"]  # noqa: E731
    emb_c = model_embeddings(model, tok, list(data["prompt"]))
    emb_h = model_embeddings(model, tok, list(holdout["prompt"]))
    a = emb_c / np.linalg.norm(emb_c, axis=1, keepdims=True)
    b = emb_h / np.linalg.norm(emb_h, axis=1, keepdims=True)
    sim = a @ b.T
    out = []
    for i, (p, yw, yl) in enumerate(zip(data["prompt"], data["chosen"], data["rejected"])):
        near = np.argsort(-sim[i], kind="stable")[:k]
        demos = "".join(holdout["prompt"][j] + holdout["chosen"][j] + tok.eos_token for j in near)
        w, l_ = ids(yw) + [tok.eos_token_id], ids(yl) + [tok.eos_token_id]
        ctx, plain = ids(demos) + ids(p), ids(p)
        out.append(
            (summed_logp(model, ctx, w) - summed_logp(model, ctx, l_))
            - (summed_logp(model, plain, w) - summed_logp(model, plain, l_))
        )
    return np.asarray(out)


# ------------------------------------------------------------------------------------------------ one seed


def run_seed(seed: int, tok, cfg: dict, flip: float, n_ica: int) -> dict:
    import preference as bench
    from preference_task import auroc, pair_rows

    from drift_trainer import DriftDPOConfig
    from drift_trainer.methods.ica import ica_scores
    from drift_trainer.methods.lossdiff import lossdiff_irm_scores, train_validation_model
    from drift_trainer.methods.pairs import pair_logps

    t0 = time.perf_counter()
    s = bench.Seed(tok, seed, cfg, flip)
    trainer, _ = bench.train_dpo("uniform", s.train, s, tok, {**cfg, "epochs": 1}, f"mech-warmup-{seed}")
    theta = trainer.model.eval()
    pad = tok.pad_token_id
    train_rows, val_rows = pair_rows(tok, s.train), pair_rows(tok, s.val)
    args = DriftDPOConfig(
        output_dir="/tmp/drift-pref-mech",
        beta=cfg["beta"],
        learning_rate=cfg["lr"],
        per_device_train_batch_size=cfg["batch"],
        use_cpu=True,
        report_to=[],
    )
    ref_tr, ref_va = pair_logps(s.start, train_rows, pad, 64), pair_logps(s.start, val_rows, pad, 64)
    theta_val = train_validation_model(s.start, val_rows, ref_va, args, pad, epochs=1.0, seed=seed)
    pol = pair_logps(theta, train_rows, pad, 64)
    val = pair_logps(theta_val, train_rows, pad, 64)
    lossdiff, irm = lossdiff_irm_scores(args, pol, val, ref_tr)
    ref_train = np.stack([ref_tr.chosen, ref_tr.rejected], 1)
    ref_val = np.stack([ref_va.chosen, ref_va.rejected], 1)
    benefit, first, facts, lp_head, sensitivity = exact_influence(
        theta, train_rows, val_rows, ref_train, ref_val, cfg["beta"], pad
    )
    head_check = float(np.max(np.abs(lp_head - np.stack([pol.chosen, pol.rejected], 1))))
    clean = ~s.flipped
    dist = np.asarray(s.train["distance"])
    order = np.argsort(benefit, kind="stable")
    bands = {}
    for name, idx in zip(("low", "medium", "high"), np.array_split(order, 3)):
        bands[name] = {"flipped_share": float(s.flipped[idx].mean()), "mean_distance": float(dist[idx].mean())}
    out = {
        "seed": seed,
        "pairs": len(train_rows),
        "head_logp_check": head_check,
        "hessian": facts,
        "pearson_lossdiff_benefit": pearson(lossdiff, benefit),
        "spearman_lossdiff_benefit": spearman(lossdiff, benefit),
        "pearson_irm_benefit": pearson(irm, benefit),
        "spearman_irm_benefit": spearman(irm, benefit),
        "pearson_lossdiff_first_order": pearson(lossdiff, first),
        "pearson_irm_first_order": pearson(irm, first),
        "pearson_benefit_first_order": pearson(benefit, first),
        "flip_auroc_benefit": auroc(benefit, clean),
        "flip_auroc_lossdiff": auroc(lossdiff, clean),
        "flip_auroc_irm": auroc(irm, clean),
        "benefit_bands": bands,
        "damping_sensitivity": {
            f: {
                "pearson_lossdiff": pearson(lossdiff, b),
                "pearson_irm": pearson(irm, b),
                "pearson_benefit": pearson(b, benefit),
            }
            for f, b in sensitivity.items()
        },
    }
    # ICA: the library's scores against the definition, on the first n_ica train pairs, at the start model
    sub = s.train.select(range(min(n_ica, len(s.train))))
    for k in (1, 3, 5):
        lib = ica_scores(s.start, tok, sub, s.val, num_demos=k, batch_size=16)
        ref = ica_by_definition(s.start, tok, sub, s.val, k)
        out[f"ica_k{k}_max_abs_diff"] = float(np.max(np.abs(lib - ref)))
        out[f"ica_k{k}_max_abs_score"] = float(np.max(np.abs(ref)))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def write_md(path: str, meta: dict, runs: list[dict]) -> None:
    def col(key):
        return np.array([r[key] for r in runs], dtype=float)

    def ms(key):
        v = col(key)
        return f"{v.mean():+.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:+.3f}"

    L = [
        "# Preference mechanics: LossDiff / IRM against exact influence, ICA against its definition",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Wall time: {meta['wall_seconds']} s. Seeds: {meta['seeds']}. Flipped train "
        f"pairs: {meta['flip']:.0%}. Task and start model: `preference.py`'s (config {json.dumps(meta['config'])}).",
        "",
        "Method: see the docstring of `benchmarks/preference_mechanics.py`. `benefit` = first-order drop of the "
        "validation DPO loss from upweighting a pair, with the exact damped Hessian of the mean train loss in the LM "
        "head's weight at theta (the start after one uniform DPO epoch); `first order` = the same without the Hessian. "
        "Mean ± std over seeds.",
        "",
        "## 1. Correlation with influence (paper: LossDiff r = 0.77, IRM r = 0.67)",
        "",
        "| proxy | Pearson with benefit | Spearman with benefit | Pearson with first order | flip AUROC |",
        "|---|---|---|---|---|",
        f"| LossDiff | {ms('pearson_lossdiff_benefit')} | {ms('spearman_lossdiff_benefit')} | "
        f"{ms('pearson_lossdiff_first_order')} | {ms('flip_auroc_lossdiff')} |",
        f"| IRM | {ms('pearson_irm_benefit')} | {ms('spearman_irm_benefit')} | {ms('pearson_irm_first_order')} | "
        f"{ms('flip_auroc_irm')} |",
        f"| benefit itself | - | - | {ms('pearson_benefit_first_order')} | {ms('flip_auroc_benefit')} |",
        "",
        "Per seed (Hessian facts: parameters, smallest / largest eigenvalue, count of negative ones, damping; the head "
        "check is the largest difference between the cached-hidden-state log-probs and `pair_logps` of theta):",
        "",
        "| seed | r LossDiff | r IRM | eig min | eig max | negative | damping | head check | flipped share of "
        "low / medium / high benefit third |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        h, b = r["hessian"], r["benefit_bands"]
        L.append(
            f"| {r['seed']} | {r['pearson_lossdiff_benefit']:+.3f} | {r['pearson_irm_benefit']:+.3f} | "
            f"{h['eig_min']:.2e} | {h['eig_max']:.2e} | {h['negative_eigs']} | {h['damping']:.2e} | "
            f"{r['head_logp_check']:.1e} | {b['low']['flipped_share']:.2f} / {b['medium']['flipped_share']:.2f} / "
            f"{b['high']['flipped_share']:.2f} |"
        )
    L += [
        "",
        "Damping sensitivity (mean over seeds of the Pearson r with the benefit at another damping factor, and that "
        "benefit's r with the 0.1 one):",
        "",
        "| damping factor | r LossDiff | r IRM | r with benefit at 0.1 |",
        "|---|---|---|---|",
    ]
    for f in runs[0]["damping_sensitivity"]:
        v = [
            [r["damping_sensitivity"][f][k] for r in runs]
            for k in ("pearson_lossdiff", "pearson_irm", "pearson_benefit")
        ]
        L.append(f"| {f} | {np.mean(v[0]):+.3f} | {np.mean(v[1]):+.3f} | {np.mean(v[2]):+.3f} |")
    L += [
        "",
        "## 2. ICA against its definition",
        "",
        "Largest absolute difference between `ica_scores` and the per-pair recomputation, against the largest score:",
        "",
        "| k | max abs diff | max abs score |",
        "|---|---|---|",
    ]
    for k in (1, 3, 5):
        L.append(f"| {k} | {col(f'ica_k{k}_max_abs_diff').max():.2e} | {col(f'ica_k{k}_max_abs_score').max():.3f} |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, fewer pairs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--flip", type=float, default=0.33)
    ap.add_argument("--ica-pairs", type=int, default=48, help="train pairs of the ICA definition check")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    from preference_task import quiet_setup

    quiet_setup()
    import preference as bench

    from drift_trainer.cli.toy import build_char_tokenizer

    cfg = dict(bench.FULL)
    seeds = list(range(a.seeds))
    tag = ""
    if a.quick:
        cfg.update(bench.QUICK)
        seeds, tag = [0], "_quick"
    tok = build_char_tokenizer()
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        runs.append(run_seed(seed, tok, cfg, a.flip, a.ica_pairs))
        print(json.dumps(runs[-1]), flush=True)
    meta = {
        "command": (
            "PYTHONPATH=. python benchmarks/preference_mechanics.py " + " ".join(map(shlex.quote, argv))
        ).strip(),
        "config": cfg,
        "flip": a.flip,
        "seeds": seeds,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"preference_mechanics{tag}.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    write_md(os.path.join(a.out, f"preference_mechanics{tag}.md"), meta, runs)


if __name__ == "__main__":
    main()
