"""DRIFT overhead benchmark: feature throughput, exactness, end-to-end wall time, memory, cost growth.

Run from the repository root::

    PYTHONPATH=. python benchmarks/overhead.py            # full run (about 15-20 minutes on 2 CPU cores)
    PYTHONPATH=. python benchmarks/overhead.py --quick    # smoke run (about 1-2 minutes)
    PYTHONPATH=. python benchmarks/overhead.py --sections throughput,exact

It prints a table and writes ``benchmarks/results/overhead.json`` and ``benchmarks/results/overhead.md`` (with the
exact command). Every ratio is measured side by side in one process with the repeats interleaved (A, B, A, B, ...),
and reported as the median of the per-repeat ratios, so a noisy shared machine moves both sides alike.

Sections (targets in brackets):

1. ``throughput``: examples/s of the feature pass (``ProjectedGradients.compute`` on the very batches training sees,
   and ``FeaturePass.run``, which sorts by length) over examples/s of a training step (forward + backward + AdamW
   step) of the same model, batch size and sequences  [>= 1.0].
2. ``exact``: hook features against exact per-example gradients (a loop of single-example backward passes, then the
   same projection) and against ``torch.func`` (``functional_call`` + ``grad`` + ``vmap``)  [>= 10x faster; same
   scores: max relative error reported].
3. ``e2e``: wall time of ``DriftSFTTrainer.train()`` at the default schedule over the same run with
   ``drift_enabled=False``  [<= 1.15], and how it moves with ``drift_refresh_steps``, the train-set size,
   ``drift_rescore_budget``, ``drift_capture_features=False`` (full rescoring) and ``drift_max_train_examples``.
   ``capture``: the per-step cost of capturing features in the training backward, on three model sizes.
4. ``memory``: feature bytes per example; peak memory of a training step, a feature pass, and a feature pass spilling
   to a memory-mapped file, each in a fresh subprocess (peak anonymous RSS above the pre-op baseline, sampled every
   millisecond from /proc/self/status, plus the ru_maxrss increase).
5. ``growth``: time of one refresh against train-set size, projection size and model size, with fitted slopes.
6. ``block``: the fast paths against full rescoring along one training trajectory: captured features (the default)
   and block rescoring (``drift_max_train_examples``): time per refresh, and the correlation of their scores,
   smoothed scores and weights with full rescoring (for captured features, split by the age of the feature).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drift_trainer.cli.toy import (
    ALPHABET,
    Corruption,
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    offline_env,
    query_dataset_from,
)
from drift_trainer.core.capture import FeatureCache, TrainCapture
from drift_trainer.core.features import ProjectedGradients, collate_right, per_example_loss, select_target_modules
from drift_trainer.core.refresh import FeaturePass, TrainView, new_weights, run_refresh

offline_env()
warnings.filterwarnings("ignore")
import datasets  # noqa: E402 (after the offline environment is set)

datasets.disable_progress_bars()
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        _TOK = build_char_tokenizer()
    return _TOK


# ---------------------------------------------------------------------------------------------------------- data


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    """Tokenized addition examples (``12+34=`` -> ``46</s>``), prompt masked: 8-10 tokens each."""
    tok = tokenizer()
    data = addition_dataset(n, seed=seed)
    rows = []
    for p, c in zip(data["prompt"], data["completion"]):
        prompt = tok(p, add_special_tokens=False)["input_ids"]
        full = prompt + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    return rows


def text_rows(n: int, length: int, seed: int = 0) -> list[dict]:
    """Random character strings of ``length/2 .. length`` tokens, the second half labelled (longer sequences)."""
    tok = tokenizer()
    rng = np.random.default_rng(seed)
    ids = [tok.convert_tokens_to_ids(c) for c in ALPHABET]
    rows = []
    for _ in range(n):
        m = int(rng.integers(length // 2, length + 1))
        seq = [ids[j] for j in rng.integers(0, len(ids), m)]
        half = m // 2
        rows.append({"input_ids": seq, "labels": [-100] * half + seq[half:]})
    return rows


MODELS = {  # name: (hidden, layers, heads)
    "tiny": (64, 2, 4),
    "small": (128, 4, 4),
    "medium": (256, 4, 8),
}


def model_of(name: str, seed: int = 0):
    hidden, layers, heads = MODELS[name]
    return build_tiny_llama(tokenizer(), hidden_size=hidden, num_layers=layers, num_heads=heads, seed=seed)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def batches_of(rows, batch_size, seed=0):
    """Training-style batches: a seeded shuffle, padded to each batch's longest row."""
    order = np.random.default_rng(seed).permutation(len(rows))
    pad = tokenizer().pad_token_id
    return [collate_right([rows[i] for i in order[s : s + batch_size]], pad) for s in range(0, len(rows), batch_size)]


def train_step(model, opt, batch):
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    )
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def first_digit_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion starts with the answer's first digit (a TRL-convention reward). A tiny model learns
    this within a few hundred steps, so refreshes have contrast (exact match stays at 0 that early)."""
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(float(text.strip()[:1] == str(a)[:1]))
    return out


def median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------------------- 1


def bench_throughput(cfg) -> list[dict]:
    """Feature pass vs training step, examples/s, same model, batches and sequences."""
    out = []
    cases = [("tiny", "addition", 0), ("small", "text", 64), ("medium", "text", 128)]
    if cfg.quick:
        cases = cases[:2]
    for model_name, data, length in cases:
        torch.manual_seed(0)
        model = model_of(model_name)
        n = cfg.tp_examples
        rows = addition_rows(n) if data == "addition" else text_rows(n, length)
        batches = batches_of(rows, cfg.batch_size)
        projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
        fpass = FeaturePass(projector, tokenizer().pad_token_id, cfg.batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()
        train_step(model, opt, batches[0])  # warm-up (allocates the optimizer state)
        model.eval()
        projector.compute(model, batches[0])
        model.train()
        t_train, t_feat, t_pass = [], [], []
        for _ in range(cfg.repeats):
            tt = tf = 0.0
            for b in batches:  # interleaved batch by batch: both sides see the same machine load
                model.train()
                s = time.perf_counter()
                train_step(model, opt, b)
                tt += time.perf_counter() - s
                model.eval()  # as FeaturePass does
                s = time.perf_counter()
                projector.compute(model, b)
                tf += time.perf_counter() - s
            t_train.append(tt)
            t_feat.append(tf)
            s = time.perf_counter()
            fpass.run(model, rows)
            t_pass.append(time.perf_counter() - s)
        r_compute = [tt / tf for tt, tf in zip(t_train, t_feat)]
        r_pass = [tt / tp for tt, tp in zip(t_train, t_pass)]
        out.append(
            {
                "model": model_name,
                "params": n_params(model),
                "data": data if data == "addition" else f"text<= {length}",
                "mean_tokens": float(np.mean([len(r["input_ids"]) for r in rows])),
                "examples": n,
                "batch_size": cfg.batch_size,
                "projection_dim": cfg.projection_dim,
                "feature_dim": projector.dim,
                "train_ex_per_s": n / median(t_train),
                "features_ex_per_s": n / median(t_feat),
                "feature_pass_ex_per_s": n / median(t_pass),
                "ratio_compute": median(r_compute),
                "ratio_feature_pass": median(r_pass),
                "ratio_compute_per_repeat": [round(r, 3) for r in r_compute],
            }
        )
        print(
            f"  throughput {model_name:6s} {out[-1]['data']:10s}: train {out[-1]['train_ex_per_s']:.0f} ex/s, "
            f"features {out[-1]['features_ex_per_s']:.0f} ex/s (x{out[-1]['ratio_compute']:.2f}), "
            f"FeaturePass {out[-1]['feature_pass_ex_per_s']:.0f} ex/s (x{out[-1]['ratio_feature_pass']:.2f})",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------------------------------------------- 2


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


def bench_exact(cfg) -> list[dict]:
    from trl.trainer.utils import add_fused_lm_head

    out = []
    cases = [("tiny", "addition", 0), ("small", "text", 64)]
    for model_name, data, length in cases:
        torch.manual_seed(0)
        model = model_of(model_name).eval()
        n = cfg.exact_examples
        rows = addition_rows(n, seed=3) if data == "addition" else text_rows(n, length, seed=3)
        batches = batches_of(rows, cfg.batch_size, seed=1)
        # rows in batch order, so every method sees the same examples in the same order
        order = np.random.default_rng(1).permutation(n)
        rows_in_order = [rows[i] for i in order]
        projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
        projector.compute(model, batches[0])
        direction = np.random.default_rng(0).standard_normal(projector.dim)
        add_fused_lm_head(model)  # for the training passes below (the other paths call the model's own forward)
        capture = TrainCapture(projector, FeatureCache(n, projector.dim))
        starts = np.cumsum([0] + [len(b["input_ids"]) for b in batches])

        def training_pass(use, batches=batches, capture=capture, starts=starts, model=model):
            # forward + backward of the SFT loss on every batch, no optimizer step (the model stays the one scored)
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

        training_pass(True)
        training_pass(False)
        t = {"hook": [], "loop": [], "vmap": [], "train": [], "train_capture": []}
        feats = {}
        for _ in range(cfg.repeats):
            s = time.perf_counter()
            training_pass(False)
            t["train"].append(time.perf_counter() - s)
            s = time.perf_counter()
            training_pass(True)
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
        row = {
            "model": model_name,
            "params": n_params(model),
            "data": data if data == "addition" else f"text<= {length}",
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
        out.append(row)
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
    return out


# ---------------------------------------------------------------------------------------------------------- 3


_WARM: dict = {}


def warm_state(cfg, model: str = "tiny", seed: int = 0) -> dict:
    """Weights of a toy model after ``cfg.warm_steps`` steps of plain SFT on clean addition (other rows than the
    runs'), at lr 3e-3: a model that knows the task's format, to fine-tune from gently (computed once)."""
    if (model, seed) not in _WARM:
        train = addition_dataset(2000, seed=seed + 5000)
        r = e2e_run(cfg, 0, None, seed=seed, steps=cfg.warm_steps, train=train, model=model)
        _WARM[model, seed] = r["state"]
    return _WARM[model, seed]


def e2e_run(
    cfg,
    n_train: int,
    drift: dict | None,
    seed: int = 0,
    lr: float = 3e-3,
    init: dict | None = None,
    steps: int | None = None,
    train=None,
    model: str = "tiny",
) -> dict:
    """One ``DriftSFTTrainer`` run; returns the wall time of ``train()`` and the refresh timings. ``init``: a state
    dict to start from (default: random init)."""
    from transformers import PrinterCallback

    from drift_trainer import DriftConfig, DriftSFTTrainer

    tok = tokenizer()
    torch.manual_seed(seed)
    model = model_of(model, seed=seed)
    if init is not None:
        model.load_state_dict(init)
    if train is None:
        train = addition_dataset(n_train, seed=seed, corruption=Corruption("systematic", 0.3))
    queries = query_dataset_from(addition_dataset(64, seed=seed + 1))
    with tempfile.TemporaryDirectory() as out_dir:
        args = DriftConfig(
            output_dir=out_dir,
            max_steps=steps or cfg.e2e_steps,
            per_device_train_batch_size=cfg.e2e_batch_size,
            learning_rate=lr,
            lr_scheduler_type="constant",
            report_to=[],
            logging_steps=10_000,
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            seed=seed,
            dataloader_num_workers=0,
            drift_enabled=drift is not None,
            drift_progress=False,
            **(drift or {}),
        )
        trainer = DriftSFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            query_dataset=queries,
            reward_funcs=first_digit_reward,
            processing_class=tok,
        )
        trainer.remove_callback(PrinterCallback)
        s = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - s
        history = trainer.drift_state.history if drift is not None else []
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()} if init is None else None
    timings: dict[str, float] = {}
    for h in history:
        for k, v in h["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    return {
        "state": state,
        "wall_s": wall,
        "refreshes": len(history),
        "refresh_s": sum(timings.values()),
        "timings": timings,
        "recomputed": [h.get("num_recomputed") for h in history],
        "agreement": [h.get("capture_agreement") for h in history],
        "full": [h.get("capture_full_rescoring") for h in history],
        "rollout_accuracy": [h["metrics"]["drift/rollout_accuracy"] for h in history],
        "contrast": [h["contrast"] for h in history],
    }


def bench_e2e(cfg) -> dict:
    steps = cfg.e2e_steps
    n0 = cfg.e2e_train
    full = {"drift_capture_features": False}  # every refresh recomputes every row (the pre-capture default)
    hi, lo = 3e-3, 2e-4  # the toy's usual rate (the model moves ~10% per step) and a gentler one
    unchecked = {"drift_capture_check_rows": 0}  # captured features trusted however stale (no agreement check)
    variants = {  # name: (train size, drift options or None for plain SFT, learning rate)
        "plain": (n0, None, hi),
        "default": (n0, {}, hi),
        "full_rescoring": (n0, full, hi),
        "unchecked": (n0, unchecked, hi),
        "unchecked_budget_0": (n0, {**unchecked, "drift_rescore_budget": 0.0}, hi),
        "refresh_25": (n0, {"drift_refresh_steps": 25}, hi),
        "refresh_25_full": (n0, {"drift_refresh_steps": 25, **full}, hi),
        "refresh_25_unchecked": (n0, {"drift_refresh_steps": 25, **unchecked}, hi),
        f"train_{4 * n0}": (4 * n0, {}, hi),
        f"train_{4 * n0}_full": (4 * n0, full, hi),
        f"train_{4 * n0}_full_block_{n0}": (4 * n0, {"drift_max_train_examples": n0, **full}, hi),
        f"train_{4 * n0}_unchecked": (4 * n0, unchecked, hi),
        "plain_lr2e-4": (n0, None, lo),
        "default_lr2e-4": (n0, {}, lo),
        "full_rescoring_lr2e-4": (n0, full, lo),
        "unchecked_lr2e-4": (n0, unchecked, lo),
        # from a model that already knows the format, fine-tuned gently (the regime of LLM fine-tuning: weights move
        # ~0.1% per step): the agreement check passes and the cache is used
        "warm_plain_lr2e-5": (n0, None, "warm"),
        "warm_default_lr2e-5": (n0, {}, "warm"),
        "warm_full_rescoring_lr2e-5": (n0, full, "warm"),
        # the same on the 2.7M-parameter toy: more compute per hook call
        "warm_medium_plain_lr2e-5": (n0, None, "warm_medium"),
        "warm_medium_default_lr2e-5": (n0, {}, "warm_medium"),
        "warm_medium_full_rescoring_lr2e-5": (n0, full, "warm_medium"),
    }
    if cfg.quick:
        variants = {
            k: variants[k] for k in ("plain", "default", "unchecked", "warm_plain_lr2e-5", "warm_default_lr2e-5")
        }
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    e2e_run(cfg, 64, None)  # warm-up: imports, first-call costs
    for rep in range(cfg.e2e_repeats):
        for name, (n, drift, lr) in variants.items():
            warm = isinstance(lr, str)
            model = "medium" if lr == "warm_medium" else "tiny"
            init = warm_state(cfg, model) if warm else None
            runs[name].append(e2e_run(cfg, n, drift, seed=0, lr=2e-5 if warm else lr, init=init, model=model))
            r = runs[name][-1]
            print(
                f"  e2e rep {rep} {name:22s}: {r['wall_s']:.1f} s, {r['refreshes']} refreshes, "
                f"{r['refresh_s']:.1f} s in refreshes { ({k: round(v, 2) for k, v in r['timings'].items()}) }, "
                f"recomputed {r['recomputed']}, agreement {[None if a is None else round(a, 3) for a in r['agreement']]}",
                flush=True,
            )
    table = []
    for name, (n, drift, lr) in variants.items():
        walls = [r["wall_s"] for r in runs[name]]
        ref = {hi: "plain", lo: "plain_lr2e-4", "warm": "warm_plain_lr2e-5", "warm_medium": "warm_medium_plain_lr2e-5"}
        plain = [r["wall_s"] for r in runs[ref[lr]]]
        table.append(
            {
                "variant": name,
                "learning_rate": 2e-5 if isinstance(lr, str) else lr,
                "warm_start": isinstance(lr, str),
                "model": "medium" if lr == "warm_medium" else "tiny",
                "train_examples": n,
                "steps": steps,
                "drift_refresh_steps": (drift or {}).get("drift_refresh_steps", 100) if drift is not None else None,
                "drift_max_train_examples": (drift or {}).get("drift_max_train_examples"),
                "capture": None if drift is None else drift.get("drift_capture_features", True),
                "rescore_budget": None if drift is None else drift.get("drift_rescore_budget", 0.1),
                "recomputed_per_refresh": runs[name][-1]["recomputed"],
                "agreement": runs[name][-1]["agreement"],
                "full_fallback": runs[name][-1]["full"],
                "wall_s": median(walls),
                "ratio_vs_plain": median([w / p for w, p in zip(walls, plain)]),
                # within one run: its wall time over its wall time minus the refreshes (immune to load between runs)
                "ratio_internal": median([r["wall_s"] / (r["wall_s"] - r["refresh_s"]) for r in runs[name]]),
                "walls": [round(w, 2) for w in walls],
                "plain_walls": [round(p, 2) for p in plain],
                "refreshes": runs[name][0]["refreshes"],
                "refresh_s": median([r["refresh_s"] for r in runs[name]]),
                "timings": runs[name][-1]["timings"],
                "rollout_accuracy": runs[name][-1]["rollout_accuracy"],
                "contrast": runs[name][-1]["contrast"],
            }
        )
    return {"steps": steps, "batch_size": cfg.e2e_batch_size, "repeats": cfg.e2e_repeats, "table": table}


def _sft_step(model, opt, batch, capture=None, idx=None, step: int = 0) -> None:
    """One SFT step as SFTTrainer computes it (token-mean NLL from the fused LM head), features captured by
    ``capture`` (one ``TrainCapture``, a list of them, or None)."""
    captures = [] if capture is None else capture if isinstance(capture, list) else [capture]
    for c in captures:
        c.arm(idx, step)
    out = model(**batch, fused_lm_head=True, use_cache=False)
    for c in captures:
        c.watch(out.log_probs, out.label_mask)
    loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for c in captures:
        c.flush()


def bench_capture(cfg) -> list[dict]:
    """Cost of capturing features in the training backward: a training step (SFT token-mean loss through TRL's fused
    LM head, as SFTTrainer computes it) with and without the capture hooks, interleaved batch by batch."""
    from trl.trainer.utils import add_fused_lm_head

    out = []
    cases = [("tiny", "addition", 0), ("small", "text", 64), ("medium", "text", 128)]
    if cfg.quick:
        cases = cases[:2]
    pad = tokenizer().pad_token_id
    for model_name, data, length in cases:
        torch.manual_seed(0)
        model = model_of(model_name)
        add_fused_lm_head(model)
        rows = addition_rows(cfg.tp_examples) if data == "addition" else text_rows(cfg.tp_examples, length)
        projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
        capture = TrainCapture(projector, FeatureCache(len(rows), projector.dim))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, len(rows), cfg.e2e_batch_size) for _ in range(cfg.capture_steps)]
        model.train()

        def step(idx, use, model=model, opt=opt, capture=capture, rows=rows):
            _sft_step(model, opt, collate_right([rows[i] for i in idx], pad), capture if use else None, idx)

        for idx in batches[:5]:  # warm-up
            step(idx, True)
            step(idx, False)
        times = {True: [], False: []}
        for _ in range(cfg.repeats):
            for use in (False, True):
                s = time.perf_counter()
                for idx in batches:
                    step(idx, use)
                times[use].append(time.perf_counter() - s)
        capture.remove()
        ratios = [c / p for c, p in zip(times[True], times[False])]
        out.append(
            {
                "model": model_name,
                "params": n_params(model),
                "data": data if data == "addition" else f"text<= {length}",
                "batch_size": cfg.e2e_batch_size,
                "steps": len(batches),
                "target_modules": len(projector.modules),
                "plain_ms_per_step": 1000 * median(times[False]) / len(batches),
                "capture_ms_per_step": 1000 * median(times[True]) / len(batches),
                "ratio": median(ratios),
                "ratio_per_repeat": [round(r, 3) for r in ratios],
            }
        )
        print(
            f"  capture {model_name:6s}: plain {out[-1]['plain_ms_per_step']:.2f} ms/step, with capture "
            f"{out[-1]['capture_ms_per_step']:.2f} ms/step, ratio {out[-1]['ratio']:.3f}",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------------------------------------------- 4


class PeakSampler:
    """Peak anonymous RSS (RssAnon, /proc/self/status) sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.base = self.anon()
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.anon())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.anon())
        self.maxrss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.maxrss0

    @property
    def delta(self) -> int:
        return self.peak - self.base


def memory_probe(kind: str, model_name: str, n: int, batch_size: int, k: int, memmap_dir: str | None) -> dict:
    """Runs in a fresh subprocess: peak memory of one operation above the baseline after set-up."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = model_of(model_name)
    rows = text_rows(n, 64, seed=0)
    projector = ProjectedGradients(select_target_modules(model), k)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = batches_of(rows[:batch_size], batch_size)[0]
    model.train()
    train_step(model, opt, batch)  # optimizer state exists before measuring, as in training
    model.eval()
    projector.compute(model, batch)
    with PeakSampler() as ps:
        if kind == "train_step":
            model.train()
            train_step(model, opt, batch)
        elif kind == "feature_batch":
            projector.compute(model, batch)
        else:
            fp = FeaturePass(projector, tokenizer().pad_token_id, batch_size, memmap_dir=memmap_dir)
            feats, _, _ = fp.run(model, rows)
            checksum = float(np.asarray(feats[:: max(1, n // 50)]).sum())  # touch it
            _ = checksum
    return {
        "kind": kind,
        "peak_anon_delta_bytes": ps.delta,
        "ru_maxrss_delta_bytes": ps.maxrss_delta,
        "feature_dim": projector.dim,
        "examples": n if kind.startswith("feature_pass") else batch_size,
    }


def bench_memory(cfg) -> dict:
    model_name = "small"
    tmp = tempfile.mkdtemp(prefix="drift-bench-mm-")
    n = cfg.mem_examples
    probes = [("train_step", None), ("feature_batch", None), ("feature_pass", None), ("feature_pass_memmap", tmp)]
    results = []
    for kind, mm in probes:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_probe",
            json.dumps([kind, model_name, n, cfg.batch_size, cfg.projection_dim, mm]),
        ]
        # a fixed mmap threshold and trim threshold make glibc return freed blocks to the OS, so resident memory
        # follows live allocations instead of staying at the high-water mark of earlier (warm-up) calls
        env = {**os.environ, "PYTHONPATH": ".", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"  memory {kind:20s}: peak anon +{r['peak_anon_delta_bytes'] / 2**20:.1f} MiB "
            f"(ru_maxrss +{r['ru_maxrss_delta_bytes'] / 2**20:.1f} MiB)",
            flush=True,
        )
    model = model_of(model_name)
    dim = ProjectedGradients(select_target_modules(model), cfg.projection_dim).dim
    # analytic storage for real shapes: modules x k^2 x 4 bytes per example
    shapes = {
        "toy tiny (2 layers x 7 Linear)": 14,
        "toy small (4 layers x 7 Linear)": 28,
        "Llama-2-7B all Linear (32 x 7)": 224,
        "Llama-2-7B LoRA q,v (32 x 2 x A,B)": 128,
    }
    storage = {
        name: {
            "modules": m,
            "bytes_per_example": m * cfg.projection_dim**2 * 4,
            "gib_per_100k_examples": m * cfg.projection_dim**2 * 4 * 1e5 / 2**30,
        }
        for name, m in shapes.items()
    }
    os.rmdir(tmp) if os.path.isdir(tmp) and not os.listdir(tmp) else None
    return {
        "model": model_name,
        "params": n_params(model),
        "feature_dim": dim,
        "bytes_per_example": dim * 4,
        "examples": n,
        "probes": results,
        "storage": storage,
        "measured": "peak RssAnon (anonymous resident memory; memory-mapped file pages are file-backed and not "
        "counted) above the baseline after set-up, sampled every 1 ms in a thread, one fresh "
        "subprocess per probe with 1 torch thread and glibc told to return freed memory "
        "(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), after one warm-up training step "
        "(optimizer state allocated) and one warm-up feature batch; ru_maxrss increase as a cross-check",
    }


# ---------------------------------------------------------------------------------------------------------- 5


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


# ---------------------------------------------------------------------------------------------------------- 6


def bench_block(cfg) -> dict:
    """Fast paths vs full rescoring along shared training trajectories (one per learning rate; isolates staleness)."""
    return {"trajectories": [_fast_path_trajectory(cfg, lr) for lr in cfg.block_lrs]}


def _spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties), without scipy."""
    import pandas as pd

    return float(np.corrcoef(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())[0, 1])


def _fast_path_trajectory(cfg, lr: float) -> dict:
    """One training trajectory; at each refresh the full path and the fast paths score the same model with the same
    rollouts: block rescoring (``drift_max_train_examples``), captured features as by default (budget 0.1, agreement
    check at 0.9), and captured features with the check off (what the cache alone gives)."""
    from trl.trainer.utils import add_fused_lm_head

    from drift_trainer.hf.config import DriftArguments

    tok = tokenizer()
    torch.manual_seed(0)
    model = model_of("tiny")
    add_fused_lm_head(model)  # as SFTTrainer does: the loss is built from fused per-token log-probabilities
    data = addition_dataset(cfg.block_train, seed=0, corruption=Corruption("systematic", 0.3))
    rows = []
    for p, c in zip(data["prompt"], data["completion"]):
        prompt = tok(p, add_special_tokens=False)["input_ids"]
        full = prompt + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    queries = query_dataset_from(addition_dataset(64, seed=1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    block = len(rows) // cfg.block_fraction
    common = dict(drift_num_queries=32, drift_num_rollouts=4, drift_max_new_tokens=8, drift_progress=False)
    paths = {
        "full": DriftArguments(**common, drift_capture_features=False),
        "block": DriftArguments(**common, drift_capture_features=False, drift_max_train_examples=block),
        "capture": DriftArguments(**common),
        "capture_unchecked": DriftArguments(**common, drift_capture_check_rows=0),
    }
    projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
    # one cache per capture path (a refresh writes its recomputed rows into its own cache), both fed by the training
    captures = {
        name: TrainCapture(projector, FeatureCache(len(rows), projector.dim)) for name in paths if "capture" in name
    }
    view = TrainView(rows=rows, user_index=np.arange(len(rows)), num_examples=len(rows))
    step = [0]

    def train(steps):  # the SFT loss (token mean) with features captured in its backward, as DriftSFTTrainer does
        model.train()
        for _ in range(steps):
            idx = rng.integers(0, len(rows), cfg.e2e_batch_size)
            batch = collate_right([rows[i] for i in idx], tok.pad_token_id)
            _sft_step(model, opt, batch, list(captures.values()), idx, step[0])
            step[0] += 1

    state = {name: (None, None) for name in paths}
    train(cfg.block_warmup)
    log = []
    corrupted = np.asarray(data["corrupted"])
    for r in range(cfg.block_refreshes):
        if r:
            train(cfg.block_every)
        rec = {"refresh": r, "step": step[0]}
        scores = {}
        for name, a in paths.items():
            s = time.perf_counter()
            res = run_refresh(
                args=a,
                step=step[0],
                model=model,
                tokenizer=tok,
                view=view,
                query_dataset=queries,
                reward_funcs=[first_digit_reward],
                projector=projector,
                refresh_index=r,
                seed=0,
                progress=False,
                capture=captures.get(name),
            )
            rec[f"{name}_s"] = time.perf_counter() - s
            rec["contrast"] = res.contrast
            rec["rollout_accuracy"] = res.rollout_accuracy
            scores[name] = (res.scores, res.scored)
            rec[f"{name}_scored"] = int(res.scored.sum())
            rec[f"{name}_recomputed"] = res.num_recomputed if res.num_recomputed >= 0 else int(res.scored.sum())
            if name in captures:
                rec[f"{name}_agreement"] = res.capture_agreement
                rec[f"{name}_fallback"] = res.capture_full
            if res.contrast:
                state[name] = new_weights(res, *state[name], a)
        zf, wf = state["full"]
        rec["corrupted_mean_weight_full"] = float(wf[corrupted].mean()) if wf is not None else None
        sf, okf = scores["full"]
        for name in paths:
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
        # the cache alone, by the age of the feature: rows trained since the previous refresh vs older ones
        cache = captures["capture_unchecked"].cache
        age = step[0] - cache.step
        sc, okc = scores["capture_unchecked"]
        both = okf & okc
        for label, sel in (("fresh", both & (age <= cfg.block_every)), ("old", both & (age > cfg.block_every))):
            rec[f"n_{label}"] = int(sel.sum())
            if sel.sum() > 2:
                rec[f"pearson_scores_{label}"] = float(np.corrcoef(sf[sel], sc[sel])[0, 1])
        log.append(rec)
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
    for c in captures.values():
        c.remove()
    return {
        "learning_rate": lr,
        "train_examples": len(rows),
        "drift_max_train_examples": block,
        "warmup_steps": cfg.block_warmup,
        "steps_between": cfg.block_every,
        "batch_size": cfg.e2e_batch_size,
        "refreshes": log,
    }


# ---------------------------------------------------------------------------------------------------------- report


def fmt(x, d=2):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def markdown(res: dict, command: str) -> str:
    L = [
        "# DRIFT overhead benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {res['machine']}. Wall time: {res['total_s']:.0f} s. Ratios are medians of per-repeat ratios, "
        "the two sides interleaved in one process.",
        "",
    ]
    if "throughput" in res:
        L += [
            "## 1. Feature throughput vs training (target >= 1.0)",
            "",
            "| model | params | data (mean tokens) | batch | feature dim | train ex/s | features ex/s | ratio | "
            "FeaturePass ex/s | ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["throughput"]:
            L.append(
                f"| {r['model']} | {r['params']:,} | {r['data']} ({r['mean_tokens']:.0f}) | {r['batch_size']} | "
                f"{r['feature_dim']} | {r['train_ex_per_s']:.0f} | {r['features_ex_per_s']:.0f} | "
                f"**{r['ratio_compute']:.2f}** | {r['feature_pass_ex_per_s']:.0f} | {r['ratio_feature_pass']:.2f} |"
            )
        L += [
            "",
            "Training = forward + backward + AdamW step on the same padded batches; features = "
            "`ProjectedGradients.compute` on those batches (eval mode, one forward + one `autograd.grad`); "
            "FeaturePass = `FeaturePass.run` over the same rows (length-sorted batches, results stored).",
            "",
        ]
    if "exact" in res:
        L += [
            "## 2. Against exact per-example gradients (target >= 10x, same scores)",
            "",
            "| model | examples | hook ex/s | loop ex/s | vmap ex/s | x vs loop | x vs vmap | max rel feature err "
            "(loop / vmap) | max rel score err (loop / vmap) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["exact"]:
            L.append(
                f"| {r['model']} | {r['examples']} | {r['hook_ex_per_s']:.0f} | {r['loop_ex_per_s']:.0f} | "
                f"{r['vmap_ex_per_s']:.0f} | **{r['speedup_vs_loop']:.1f}** | **{r['speedup_vs_vmap']:.1f}** | "
                f"{r['vs_loop']['max_rel_feature_error']:.1e} / {r['vs_vmap']['max_rel_feature_error']:.1e} | "
                f"{r['vs_loop']['max_rel_score_error']:.1e} / {r['vs_vmap']['max_rel_score_error']:.1e} |"
            )
        L += [
            "",
            "Feature error: max over examples of ||phi_hook - phi_exact|| / ||phi_exact||. Score error: max "
            "|s_hook - s_exact| / max |s_exact| for normalised scores s = <phi, d>/||phi|| against a random "
            "direction d. Loop: one forward + `autograd.grad` on the target weights per example (unpadded), then "
            "P_out G P_in^T. vmap: `torch.func.vmap(grad(functional_call))` over the batch (no attention mask: "
            "exact for right padding under causal attention).",
            "",
        ]
        if all("capture_marginal_ms_per_example" in r for r in res["exact"]):
            L += [
                "Captured in training (`drift_capture_features`): the same features filed by the capture hooks "
                "during forward + backward passes of the SFT loss over the same batches (no optimizer step, so the "
                "model is the one the other paths score). Its cost is the marginal time over those passes without "
                "capture, which training pays anyway:",
                "",
                "| model | marginal ms / example | x vs loop | x vs vmap | max rel feature err vs loop | max rel score "
                "err vs loop |",
                "|---|---|---|---|---|---|",
            ]
            for r in res["exact"]:
                c = r["capture_vs_loop"]
                L.append(
                    f"| {r['model']} | {r['capture_marginal_ms_per_example']:.3f} | "
                    f"**{fmt(r['capture_speedup_vs_loop'], 1)}** | **{fmt(r['capture_speedup_vs_vmap'], 1)}** | "
                    f"{c['max_rel_feature_error']:.1e} | {c['max_rel_score_error']:.1e} |"
                )
            L.append("")
    if "e2e" in res:
        e = res["e2e"]
        L += [
            "## 3. End to end: DriftSFTTrainer vs drift_enabled=False (target <= 1.15 at the default schedule)",
            "",
            f"Tiny Llama, {e['steps']} steps, batch {e['batch_size']}, {e['repeats']} interleaved repeats, at two "
            "constant learning rates (each DRIFT run paired with the plain run at its rate); all other options at "
            "their defaults (32 queries x 4 rollouts, max 64 new tokens, projection 16, artifacts written, capture "
            "with budget 0.1 and a 32-row agreement check at 0.9). The check's mean cosine per refresh is listed; "
            "'(full)' marks a refresh where it fell below 0.9 and every row was recomputed. `unchecked`: the check "
            "off (`drift_capture_check_rows=0`), the cache trusted however stale: the speed of the fast path alone "
            "(its fidelity is section 6). `warm_*`: from a model first trained "
            f"{res['config'].get('warm_steps', 600)} steps (lr 3e-3) on other, clean addition rows, then fine-tuned "
            "at lr 2e-5, where weights move about 0.1% per step as in LLM fine-tuning; `warm_medium_*` the same on the "
            "2.7M-parameter `medium` toy.",
            "",
            "| variant | lr | train examples | refresh every | capture | rescore budget | max train ex. | refreshes | "
            "rows recomputed per refresh | check agreement per refresh | train() s | refresh s | ratio vs plain run | "
            "ratio within run | stage seconds (last repeat) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in e["table"]:
            st = ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
            rec = r.get("recomputed_per_refresh") or []
            agree = ", ".join(
                "-" if a is None else f"{a:.2f}{' (full)' if f else ''}"
                for a, f in zip(r.get("agreement") or [], r.get("full_fallback") or [])
            )
            L.append(
                f"| {r['variant']} | {r.get('learning_rate', 3e-3):g} | {r['train_examples']} | "
                f"{fmt(r['drift_refresh_steps'])} | {fmt(r.get('capture'))} | "
                f"{fmt(r.get('rescore_budget') if r.get('capture') else None)} | "
                f"{fmt(r['drift_max_train_examples'])} | {r['refreshes']} | "
                f"{', '.join(str(x) for x in rec) or '-'} | {agree or '-'} | {r['wall_s']:.1f} | "
                f"{r['refresh_s']:.1f} | **{r['ratio_vs_plain']:.3f}** | **{r['ratio_internal']:.3f}** | {st} |"
            )
        L += [
            "",
            "Ratio vs plain run: median over repeats of DRIFT train() time / the adjacent plain run's. Ratio "
            "within run: a DRIFT run's train() time / (that time minus its refreshes), which other jobs' load on a "
            "shared machine moves far less; it leaves out DRIFT's per-step costs outside refreshes (sampler, index "
            "column, and the feature capture in every training backward), which the paired ratio includes. "
            "Capture: features of "
            "the trained rows are captured in the training backward and a refresh recomputes only "
            "`drift_rescore_budget` x the rows trained since the previous refresh (stalest first); without capture "
            "every refresh recomputes every row (or a `drift_max_train_examples` block).",
        ]
        L.append("")
    if "capture" in res:
        L += [
            "## 3b. Capturing features in the training backward",
            "",
            "A training step (SFT token-mean loss through TRL's fused LM head, AdamW) with and without the capture "
            "hooks (`drift_capture_features`), interleaved, same batches; batch "
            f"{res['capture'][0]['batch_size']}.",
            "",
            "| model | params | data | target modules | plain ms/step | with capture ms/step | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["capture"]:
            L.append(
                f"| {r['model']} | {r['params']:,} | {r['data']} | {r['target_modules']} | "
                f"{r['plain_ms_per_step']:.2f} | {r['capture_ms_per_step']:.2f} | **{r['ratio']:.3f}** |"
            )
        L.append("")
    if "memory" in res:
        m = res["memory"]
        L += [
            "## 4. Memory",
            "",
            f"Feature storage: float32, {m['feature_dim']} features = "
            f"**{m['bytes_per_example']:,} bytes per example** on the `{m['model']}` toy model "
            "(modules x k^2 x 4 bytes).",
            "",
            "| shape | target modules | bytes / example (k=16) | GiB per 100k examples |",
            "|---|---|---|---|",
        ]
        for name, s in m["storage"].items():
            L.append(f"| {name} | {s['modules']} | {s['bytes_per_example']:,} | {s['gib_per_100k_examples']:.2f} |")
        L += [
            "",
            f"Peak memory ({m['measured']}); feature passes over {m['examples']} examples:",
            "",
            "| operation | peak anon RSS above baseline (MiB) | ru_maxrss increase (MiB) |",
            "|---|---|---|",
        ]
        for p in m["probes"]:
            L.append(
                f"| {p['kind']} | {p['peak_anon_delta_bytes'] / 2**20:.1f} | {p['ru_maxrss_delta_bytes'] / 2**20:.1f} |"
            )
        L.append("")
    if "growth" in res:
        g = res["growth"]
        ts = g["train_size"]
        L += [
            "## 5. Cost growth (one refresh; best of repeats)",
            "",
            "| train examples | " + " | ".join(map(str, ts["x"])) + " |",
            "|---" * (len(ts["x"]) + 1) + "|",
            "| refresh s | " + " | ".join(f"{v:.3f}" for v in ts["refresh_s"]) + " |",
            "| features + influence s | " + " | ".join(f"{v:.3f}" for v in ts["features_influence_s"]) + " |",
            "",
            f"Fit (features + influence): {ts['fit_features']['slope_s_per_unit'] * 1e3:.3f} ms per example, "
            f"intercept {ts['fit_features']['intercept_s']:.3f} s, R^2 {ts['fit_features']['r2']:.4f}, log-log "
            f"exponent {ts['fit_features']['loglog_exponent']:.2f} (1 = linear). Whole refresh: "
            f"{ts['fit_refresh']['slope_s_per_unit'] * 1e3:.3f} ms per example + "
            f"{ts['fit_refresh']['intercept_s']:.2f} s (rollouts), R^2 {ts['fit_refresh']['r2']:.4f}.",
            "",
        ]
        p = g["projection"]
        L += [
            f"Projection size ({g['examples_fixed']} examples, tiny model): "
            + ", ".join(
                f"k={k} (dim {d}): {v:.3f} s" for k, d, v in zip(p["x"], p["feature_dim"], p["features_influence_s"])
            )
            + f"; fit vs feature dim: log-log exponent {p['fit_vs_dim']['loglog_exponent']:.2f}.",
            "",
        ]
        mm = g["model"]
        L += [
            f"Model size ({g['examples_fixed']} examples): "
            + ", ".join(
                f"{n} ({pp:,} params): {v:.3f} s" for n, pp, v in zip(mm["x"], mm["params"], mm["features_influence_s"])
            )
            + f"; log-log exponent vs params {mm['fit_vs_params']['loglog_exponent']:.2f}.",
            "",
        ]
    if "block" in res and "trajectories" in res["block"]:
        L += [
            "## 6. Fast paths vs full rescoring: captured features and block rescoring",
            "",
            "One shared training trajectory per learning rate (the SFT token-mean loss through the fused LM head, "
            "AdamW, constant rate, capture hooks recording each trained row's feature). At each refresh four paths "
            "score the same model with the same rollouts, each keeping its own smoothed scores and weights: **full** "
            "(every row recomputed: the reference), **block** (`drift_max_train_examples`, no capture), "
            "**capture** (the default: cached features, stale rows within `drift_rescore_budget`=0.1 x rows "
            "trained since the previous refresh, and the 32-row agreement check that falls back to full rescoring "
            "below a mean cosine of 0.9) and **unchecked** (the same cache with the check off: what cached features "
            "alone give). Pearson/Spearman are against the full path; 'scores' are this refresh's own scores over "
            "the rows both paths scored, 'smoothed' and 'weights' what each path's weights come from.",
            "",
        ]
        for t in res["block"]["trajectories"]:
            L += [
                f"### learning rate {t['learning_rate']:g}",
                "",
                f"{t['train_examples']} train examples, {t['warmup_steps']} warm-up steps, then {t['steps_between']} "
                f"steps of batch {t['batch_size']} between refreshes; blocks of {t['drift_max_train_examples']}.",
                "",
                "| refresh | step | rollout acc. | path | s | rows recomputed / scored | check agreement | pearson "
                "scores | pearson smoothed | spearman smoothed | pearson weights | mean weight of corrupted (full: "
                "this path) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in t["refreshes"]:
                for name in ("full", "block", "capture", "capture_unchecked"):
                    agree = r.get(f"{name}_agreement")
                    agree_s = (
                        "-" if agree is None else f"{agree:.3f}" + (" (full)" if r.get(f"{name}_fallback") else "")
                    )
                    scores_s = fmt(r.get(f"{name}_pearson_scores"), 3)
                    if name == "capture_unchecked" and "pearson_scores_fresh" in r:
                        scores_s += (
                            f" (rows trained since the last refresh: {fmt(r.get('pearson_scores_fresh'), 3)}, n="
                            f"{r['n_fresh']}; older: {fmt(r.get('pearson_scores_old'), 3)}, n={r['n_old']})"
                        )
                    L.append(
                        f"| {r['refresh']} | {r['step']} | {r['rollout_accuracy']:.2f} | "
                        f"{name.replace('capture_unchecked', 'unchecked')} | {r[f'{name}_s']:.2f} | "
                        f"{r[f'{name}_recomputed']} / {r[f'{name}_scored']} | {agree_s} | "
                        f"{'-' if name == 'full' else scores_s} | {fmt(r.get(f'{name}_pearson_smoothed'), 3)} | "
                        f"{fmt(r.get(f'{name}_spearman_smoothed'), 3)} | {fmt(r.get(f'{name}_pearson_weights'), 3)} | "
                        f"{fmt(r.get('corrupted_mean_weight_full') if name == 'full' else r.get(f'{name}_corrupted_mean_weight'), 3)} |"
                    )
            L.append("")
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    p.add_argument("--sections", default="throughput,exact,capture,e2e,memory,growth,block")
    p.add_argument("--out", default=RESULTS, help="directory for overhead.json and overhead.md")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: stable timings on a shared machine; 0 keeps torch's default)",
    )
    p.add_argument("--merge", action="store_true", help="update the sections run now in an existing overhead.json")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._probe:
        print(json.dumps(memory_probe(*json.loads(a._probe))))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    q = a.quick
    cfg = argparse.Namespace(
        quick=q,
        repeats=2 if q else 3,
        batch_size=16,
        projection_dim=16,
        tp_examples=128 if q else 256,
        exact_examples=32 if q else 64,
        e2e_steps=100 if q else 300,
        e2e_batch_size=8,
        e2e_train=500 if q else 1000,
        e2e_repeats=1 if q else 2,
        mem_examples=1000 if q else 3000,
        growth_sizes=[250, 500, 1000] if q else [250, 500, 1000, 2000, 4000],
        growth_fixed_n=500,
        growth_ks=[8, 16, 32] if q else [8, 16, 32, 64],
        block_train=1000 if q else 2000,
        block_fraction=4,
        block_warmup=150 if q else 300,
        block_every=25,
        block_refreshes=3 if q else 6,
        block_lrs=[3e-3, 2e-4, 2e-5],
        warm_steps=300 if q else 600,
        capture_steps=40 if q else 100,
    )
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    command = "PYTHONPATH=. python " + " ".join(
        shlex.quote(x) for x in ["benchmarks/overhead.py", *(argv or sys.argv[1:])]
    )
    previous = {}
    if a.merge and os.path.exists(os.path.join(a.out, "overhead.json")):
        with open(os.path.join(a.out, "overhead.json")) as f:
            previous = json.load(f)
    res = {
        "command": command,
        "config": vars(cfg),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, python {platform.python_version()}",
    }
    start = time.perf_counter()
    fns = {
        "throughput": bench_throughput,
        "exact": bench_exact,
        "capture": bench_capture,
        "e2e": bench_e2e,
        "memory": bench_memory,
        "growth": bench_growth,
        "block": bench_block,
    }
    for s in sections:
        print(f"[{s}]", flush=True)
        t = time.perf_counter()
        res[s] = fns[s](cfg)
        res.setdefault("section_s", {})[s] = time.perf_counter() - t
    res["total_s"] = time.perf_counter() - start
    if previous:
        merged = {**previous, **{k: v for k, v in res.items() if k in fns}}
        merged["commands"] = [*previous.get("commands", [previous.get("command")]), command]
        merged["section_s"] = {**previous.get("section_s", {}), **res["section_s"]}
        merged["total_s"] = sum(merged["section_s"].values())
        merged["machine"] = res["machine"]
        res = merged
        command = " && ".join(res["commands"])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "overhead.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    md = markdown(res, command)
    with open(os.path.join(a.out, "overhead.md"), "w") as f:
        f.write(md + "\n")
    print()
    print(md)


if __name__ == "__main__":
    main()
