"""Overhead section 3, ``e2e`` and ``capture``: what DRIFT adds to a whole training run.

``e2e``: wall time of ``DriftSFTTrainer.train()`` at the default schedule over the same run with
``drift_enabled=False`` [target <= 1.15], and how it moves with ``drift_refresh_steps``, the train-set size,
``drift_rescore_budget``, ``drift_capture_features=False`` (full rescoring) and ``drift_max_train_examples``, at two
constant learning rates and from a warm start (a model that knows the task's format, fine-tuned gently).

``capture``: the per-step cost of capturing features in the training backward, on three model sizes.

    PYTHONPATH=. python benchmarks/overhead_e2e.py --quick                # both sections alone (prints JSON)
    PYTHONPATH=. python benchmarks/overhead_e2e.py --quick --only capture
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import (
    case_head,
    cases_of,
    first_digit_reward,
    load_case,
    median,
    model_of,
    offline_setup,
    quiet_cpu_args,
    run_section,
    sft_step,
    tokenizer,
)

from drift_trainer.cli.toy import Corruption, addition_dataset, query_dataset_from
from drift_trainer.core.capture import FeatureCache, TrainCapture
from drift_trainer.core.features import ProjectedGradients, collate_right, select_target_modules

offline_setup()

_WARM: dict = {}


def warm_state(cfg, model: str = "tiny", seed: int = 0) -> dict:
    """Weights of a toy model after ``cfg.warm_steps`` steps of plain SFT on clean addition (other rows than the
    runs'), at lr 3e-3: a model that knows the task's format, to fine-tune from gently (computed once)."""
    if (model, seed) not in _WARM:
        train = addition_dataset(2000, seed=seed + 5000)
        r = e2e_run(cfg, 0, None, seed=seed, steps=cfg.warm_steps, train=train, model=model)
        _WARM[model, seed] = r["state"]
    return _WARM[model, seed]


def _summary(wall: float, history: list[dict], state) -> dict:
    """A run's wall time, refresh count and timings, and per refresh what it recomputed and how it agreed."""
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
        "steps": [h["step"] for h in history],
        "refresh_stage_s": [h["timings"] for h in history],
        "rollout_tokens": [h.get("rollout_tokens", 0) for h in history],
        "rollout_decoded": [h.get("rollout_decoded", 0) for h in history],
        "rollout_accuracy": [h["metrics"]["drift/rollout_accuracy"] for h in history],
        "contrast": [h["contrast"] for h in history],
    }


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
            logging_steps=10_000,
            bf16=False,
            seed=seed,
            dataloader_num_workers=0,
            drift_enabled=drift is not None,
            **quiet_cpu_args(),
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
    return _summary(wall, history, state)


HI, LO = 3e-3, 2e-4  # the toy's usual rate (the model moves ~10% per step) and a gentler one
# the plain run each variant is paired with, by its learning rate (or warm start)
PLAIN_OF = {HI: "plain", LO: "plain_lr2e-4", "warm": "warm_plain_lr2e-5", "warm_medium": "warm_medium_plain_lr2e-5"}


def e2e_variants(cfg) -> dict:
    """name: (train size, drift options or None for plain SFT, learning rate or a warm start)."""
    n0 = cfg.e2e_train
    full = {"drift_capture_features": False}  # every refresh recomputes every row (the pre-capture default)
    hi, lo = HI, LO
    unchecked = {"drift_capture_check_rows": 0}  # captured features trusted however stale (no agreement check)
    fallback = {"drift_capture_min_agreement": 0.9, "drift_capture_window": None}  # the earlier capture default
    variants = {
        "plain": (n0, None, hi),
        "default": (n0, {}, hi),
        "full_rescoring": (n0, full, hi),
        "fallback": (n0, fallback, hi),
        "unchecked": (n0, unchecked, hi),
        "unchecked_budget_0": (n0, {**unchecked, "drift_rescore_budget": 0.0}, hi),
        "refresh_25": (n0, {"drift_refresh_steps": 25}, hi),
        "refresh_25_full": (n0, {"drift_refresh_steps": 25, **full}, hi),
        "refresh_25_unchecked": (n0, {"drift_refresh_steps": 25, **unchecked}, hi),
        f"train_{4 * n0}": (4 * n0, {}, hi),
        f"train_{16 * n0}": (16 * n0, {}, hi),
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
    return variants


def _run_variants(cfg, variants: dict) -> dict[str, list[dict]]:
    """Every variant once per repeat, the repeats interleaved (A, B, ..., A, B, ...)."""
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
    return runs


def _table_row(name: str, n: int, drift: dict | None, lr, steps: int, runs: list[dict], plain: list[float]) -> dict:
    walls = [r["wall_s"] for r in runs]
    return {
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
        "recomputed_per_refresh": runs[-1]["recomputed"],
        "agreement": runs[-1]["agreement"],
        "full_fallback": runs[-1]["full"],
        "wall_s": median(walls),
        "ratio_vs_plain": median([w / p for w, p in zip(walls, plain)]),
        # within one run: its wall time over its wall time minus the refreshes (immune to load between runs)
        "ratio_internal": median([r["wall_s"] / (r["wall_s"] - r["refresh_s"]) for r in runs]),
        "walls": [round(w, 2) for w in walls],
        "plain_walls": [round(p, 2) for p in plain],
        "refreshes": runs[0]["refreshes"],
        "refresh_s": median([r["refresh_s"] for r in runs]),
        "timings": runs[-1]["timings"],
        "rollout_accuracy": runs[-1]["rollout_accuracy"],
        "contrast": runs[-1]["contrast"],
    }


def bench_e2e(cfg) -> dict:
    steps = cfg.e2e_steps
    variants = e2e_variants(cfg)
    runs = _run_variants(cfg, variants)
    table = []
    for name, (n, drift, lr) in variants.items():
        plain = [r["wall_s"] for r in runs[PLAIN_OF[lr]]]
        table.append(_table_row(name, n, drift, lr, steps, runs[name], plain))
    return {"steps": steps, "batch_size": cfg.e2e_batch_size, "repeats": cfg.e2e_repeats, "table": table}


def _capture_times(cfg, model, opt, capture, rows, batches) -> dict[bool, list[float]]:
    """Seconds per repeat of all ``batches`` without (False) and with (True) the capture hooks."""
    pad = tokenizer().pad_token_id

    def step(idx, use):
        sft_step(model, opt, collate_right([rows[i] for i in idx], pad), capture if use else None, idx)

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
    return times


def bench_capture(cfg) -> list[dict]:
    """Cost of capturing features in the training backward: a training step (SFT token-mean loss through TRL's fused
    LM head, as SFTTrainer computes it) with and without the capture hooks, interleaved batch by batch."""
    from trl.trainer.utils import add_fused_lm_head

    out = []
    for model_name, data, length in cases_of(cfg):
        model, rows = load_case(model_name, data, length, cfg.tp_examples)
        add_fused_lm_head(model)
        projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
        capture = TrainCapture(projector, FeatureCache(len(rows), projector.dim))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, len(rows), cfg.e2e_batch_size) for _ in range(cfg.capture_steps)]
        model.train()
        times = _capture_times(cfg, model, opt, capture, rows, batches)
        capture.remove()
        ratios = [c / p for c, p in zip(times[True], times[False])]
        out.append(
            {
                **case_head(model_name, model, data, length),
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


def _main(argv=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--only", choices=("e2e", "capture"), default=None)
    a, rest = p.parse_known_args(argv)
    if a.only != "capture":
        run_section("e2e", bench_e2e, __doc__, rest)
    if a.only != "e2e":
        run_section("capture", bench_capture, __doc__, rest)


if __name__ == "__main__":
    _main()
