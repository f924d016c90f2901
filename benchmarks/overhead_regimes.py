"""Overhead section ``regimes``: DRIFT's end-to-end price in the quality benchmark's own regimes.

The runs of ``benchmarks/quality.py`` (its tiny Llama, data, batch and learning rates; kind ``random40``, seed 0):
``warm`` (its clean base model fine-tuned at ``--sft-lr`` for 200 steps) and ``scratch`` (random init at the high
rate, 1000 steps). Per regime: plain SFT, DRIFT at the library's defaults (a refresh every 100 steps, captured
features), and DRIFT with full rescoring (``drift_capture_features=False``), each also at the quality benchmark's
denser schedule. The time is that of ``trainer.train()`` alone (no evaluation), the repeats interleaved; the ratio is
the median of per-repeat ratios to the plain run of the same repeat  [warm <= 1.10 at the default schedule; worst
case, scratch, <= 1.5].

    PYTHONPATH=. python benchmarks/overhead_regimes.py --quick
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from common import median, offline_setup, run_section
from overhead_e2e import _summary

offline_setup()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402 (the quality benchmark's data, base models and options)

FULL = {"drift_capture_features": False}


def regime_variants(ns) -> dict:
    """name: (regime, drift options or None for plain SFT)."""
    dense = {"drift_first_refresh_step": ns.first_refresh, "drift_refresh_steps": ns.refresh}
    dense_scratch = {"drift_first_refresh_step": ns.scratch_first_refresh, "drift_refresh_steps": ns.refresh}
    return {
        "warm_plain": ("warm", None),
        "warm_drift": ("warm", {}),
        "warm_drift_full": ("warm", FULL),
        "warm_drift_dense": ("warm", dense),
        "warm_drift_dense_full": ("warm", {**dense, **FULL}),
        "scratch_plain": ("scratch", None),
        "scratch_drift": ("scratch", {}),
        "scratch_drift_full": ("scratch", FULL),
        "scratch_drift_dense": ("scratch", dense_scratch),
    }


def regime_run(ns, regime: str, drift: dict | None, seed: int = 0, kind: str = "random40") -> dict:
    """One quality-benchmark run; the wall time of ``train()`` and the refresh summaries."""
    from drift_trainer.cli.demo import ROLLOUT_OPTIONS, _demo_config, build_tiny_llama
    from drift_trainer.cli.toy import build_char_tokenizer
    from drift_trainer.core.rewards import exact_match
    from drift_trainer.hf.sft_trainer import DriftSFTTrainer

    warm = regime == "warm"
    train, queries, test = quality.kind_data(ns, kind, seed)
    with tempfile.TemporaryDirectory() as out:
        tok = build_char_tokenizer(os.path.join(out, "tok"))
        if warm:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(os.path.join(quality.base_job(ns, seed), "run", "final"))
        else:
            model = build_tiny_llama(tok, hidden_size=ns.hidden_size, num_layers=ns.num_layers, num_heads=4, seed=seed)
        opts = {} if drift is None else {**ROLLOUT_OPTIONS, "drift_num_queries": ns.num_queries, **drift}
        args = _demo_config(
            os.path.join(out, "run"),
            ns.steps if warm else ns.scratch_steps,
            ns.batch_size,
            ns.sft_lr if warm else ns.lr,
            0 if warm else None,
            seed,
            False,
            drift is not None,
            opts,
        )
        trainer = DriftSFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            query_dataset=queries if drift is not None else None,
            reward_funcs=exact_match if drift is not None else None,
            processing_class=tok,
        )
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        history = trainer.drift_state.history if drift is not None else []
    return _summary(wall, history, None)


def bench_regimes(cfg) -> dict:
    ns = quality.parse(["--out", quality_out()])
    quality._setup()
    variants = regime_variants(ns)
    if cfg.quick:
        variants = {k: v for k, v in variants.items() if k.startswith("warm") and "dense" not in k}
    repeats = 2 if cfg.quick else 3
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    regime_run(ns, "warm", None)  # warm-up: imports, first-call costs, the base model
    for rep in range(repeats):
        for name, (regime, drift) in variants.items():
            if regime == "scratch" and rep >= 2:
                continue  # the long runs: two repeats
            r = regime_run(ns, regime, drift)
            runs[name].append(r)
            print(
                f"  regimes rep {rep} {name:24s}: {r['wall_s']:.1f} s, {r['refreshes']} refreshes, "
                f"{r['refresh_s']:.2f} s in refreshes, recomputed {r['recomputed']}",
                flush=True,
            )
    table = []
    for name, (regime, drift) in variants.items():
        rs, plain = runs[name], runs[f"{regime}_plain"]
        walls = [r["wall_s"] for r in rs]
        table.append(
            {
                "variant": name,
                "regime": regime,
                "drift": drift,
                "steps": ns.steps if regime == "warm" else ns.scratch_steps,
                "refreshes": rs[-1]["refreshes"],
                "recomputed_per_refresh": rs[-1]["recomputed"],
                "agreement": rs[-1]["agreement"],
                "wall_s": median(walls),
                "ratio_vs_plain": median([w / p["wall_s"] for w, p in zip(walls, plain)]),
                "ratio_internal": median([r["wall_s"] / (r["wall_s"] - r["refresh_s"]) for r in rs]),
                "refresh_s": median([r["refresh_s"] for r in rs]),
                "stages": rs[-1]["timings"],
                "walls": [round(w, 2) for w in walls],
            }
        )
    return {"kind": "random40", "seed": 0, "repeats": repeats, "table": table}


def quality_out() -> str:
    """Where the quality benchmark keeps its base models (trained there on first use)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


if __name__ == "__main__":
    run_section("regimes", bench_regimes, __doc__)
