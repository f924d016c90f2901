"""DRIFT overhead on a GPU: a ~0.5B Qwen2-shaped model built from a config (random init), bf16, in one run.

What ``benchmarks/overhead.py`` measures on CPU toys, at the size LLM fine-tuning starts at (Qwen2.5-0.5B's shape:
24 blocks of width 896, 14 query / 2 key-value heads, MLP 4864, vocabulary 151,936, tied embeddings; 494M parameters):

1. ``throughput``: a training step (bf16 autocast, AdamW; and at TRL's defaults: with activation checkpointing and
   gradients clipped to 1.0) against ``FeaturePass.run`` over the same rows, with every Linear as target and with the
   upper half only (``drift_target_layers=0.5``)  [>= 2.0].
2. ``capture``: a training step with and without the capture hooks (``drift_capture_features``).
3. ``e2e``: ``DriftSFTTrainer.train()`` (``bf16=True``, TRL's defaults otherwise) against the same run with
   ``drift_enabled=False``, at the default schedule, with captured features and with full rescoring; the rollouts'
   share of a refresh and their cost per generated token. A random-init model answers nothing right, so the runs judge
   rollouts by the parity of their length (``parity_reward``): contrast at every refresh, so every stage is paid.

Every ratio is side by side in one process, repeats interleaved. Writes ``overhead_gpu.json`` / ``overhead_gpu.md``
(``--out``). ``benchmarks/gpu.sh`` runs it (about 5 minutes on one H200); ``--shape tiny`` runs the same code on a
toy in about a minute, on CPU too (a smoke test).

    PYTHONPATH=. python benchmarks/overhead_gpu.py --shape tiny --device cpu --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import sft_rows, trl_default_step, trl_defaults  # noqa: E402 (benchmarks/ is first on sys.path when run as a script)

from drift_trainer.cli.toy import addition_dataset, build_char_tokenizer, offline_env, query_dataset_from  # noqa: E402

SHAPES = {
    "qwen05b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_model(shape: str, tok, device: str, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **SHAPES[shape],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def long_addition(n: int, context: int, seed: int):
    """Addition rows behind a random context of ``context/2 .. context`` characters: LLM-like lengths."""
    data = addition_dataset(n, seed=seed)
    rng = np.random.default_rng(seed + 99)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))

    def prefix(row):
        m = int(rng.integers(context // 2, context + 1))
        return {"prompt": "".join(rng.choice(letters, m)) + " " + row["prompt"]}

    return data.map(prefix)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def bench_throughput(ns, tok) -> dict:
    from drift_trainer.core.feature_pass import FeaturePass
    from drift_trainer.core.features import ProjectedGradients, collate_right, select_target_modules

    model = build_model(ns.shape, tok, ns.device)
    rows = sft_rows(long_addition(ns.tp_rows, ns.context, seed=1))
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    batches = [
        collate_right([rows[i] for i in order[s : s + ns.batch_size]], tok.pad_token_id, ns.device)
        for s in range(0, len(rows), ns.batch_size)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    every = ProjectedGradients(select_target_modules(model), 16)
    top = ProjectedGradients(select_target_modules(model, top_layers=0.5), 16)
    passes = {
        "every": FeaturePass(every, tok.pad_token_id, ns.batch_size),
        "top_half": FeaturePass(top, tok.pad_token_id, ns.batch_size),
    }

    def train_all():
        model.train()
        for b in batches:
            with autocast(ns.device):
                loss = model(**b, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def train_all_trl_defaults():
        """The training steps as an ``SFTConfig`` run takes them by default: checkpointing, clipping."""
        with trl_defaults(model):
            model.train()
            for b in batches:
                trl_default_step(model, opt, b, torch.device(ns.device).type)

    def timed(fn):
        sync(ns.device)
        s = time.perf_counter()
        fn()
        sync(ns.device)
        return time.perf_counter() - s

    times = {"train": [], "train_trl_defaults": [], "every": [], "top_half": []}
    for rep in range(ns.repeats + 1):  # the first repeat warms up
        t = {"train": timed(train_all), "train_trl_defaults": timed(train_all_trl_defaults)}
        for name, fp in passes.items():
            with autocast(ns.device):
                t[name] = timed(lambda fp=fp: fp.run(model, rows))
        if rep:
            for k, v in t.items():
                times[k].append(v)
    n = len(rows)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "rows": n,
        "mean_tokens": float(np.mean([len(r["input_ids"]) for r in rows])),
        "batch_size": ns.batch_size,
        "modules": len(every.modules),
        "top_half_modules": len(top.modules),
        "train_ex_per_s": n / med["train"],
        "feature_pass_ex_per_s": n / med["every"],
        "top_half_ex_per_s": n / med["top_half"],
        "ratio_every": float(np.median([a / b for a, b in zip(times["train"], times["every"])])),
        "ratio_top_half": float(np.median([a / b for a, b in zip(times["train"], times["top_half"])])),
        "train_trl_defaults_ex_per_s": n / med["train_trl_defaults"],
        "ratio_top_half_trl_defaults": float(
            np.median([a / b for a, b in zip(times["train_trl_defaults"], times["top_half"])])
        ),
    }


def bench_capture(ns, tok) -> dict:
    from trl.trainer.utils import add_fused_lm_head

    from drift_trainer.core.capture import FeatureCache, TrainCapture
    from drift_trainer.core.features import ProjectedGradients, collate_right, select_target_modules

    model = build_model(ns.shape, tok, ns.device)
    add_fused_lm_head(model)
    rows = sft_rows(long_addition(ns.tp_rows, ns.context, seed=2))
    projector = ProjectedGradients(select_target_modules(model), 16)
    capture = TrainCapture(projector, FeatureCache(len(rows), projector.dim))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(rows), ns.batch_size) for _ in range(ns.capture_steps)]
    model.train()

    def steps(use: bool) -> float:
        sync(ns.device)
        s = time.perf_counter()
        for idx in batches:
            batch = collate_right([rows[i] for i in idx], tok.pad_token_id, ns.device)
            if use:
                capture.arm(idx, 0)
            with autocast(ns.device):
                out = model(**batch, fused_lm_head=True, use_cache=False)
            if use:
                capture.watch(out.log_probs, out.label_mask)
            loss = -out.log_probs.float().sum() / out.label_mask.sum().clamp(min=1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if use:
                capture.flush()
        capture.flush(write=True)
        sync(ns.device)
        return time.perf_counter() - s

    steps(True)
    steps(False)  # warm-up
    ratios = [steps(True) / steps(False) for _ in range(ns.repeats)]
    capture.remove()
    return {"steps": len(batches), "batch_size": ns.batch_size, "ratio": float(np.median(ratios)), "ratios": ratios}


def parity_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for a completion of even length: a judge a random-init model gets right about half the time."""
    return [float(len(c) % 2 == 0) for c in completions]


def e2e_run(ns, tok, drift: dict | None) -> dict:
    from transformers import PrinterCallback

    from drift_trainer import DriftConfig, DriftSFTTrainer

    model = build_model(ns.shape, tok, ns.device)
    train = long_addition(ns.e2e_rows, ns.context, seed=3)
    queries = query_dataset_from(long_addition(64, ns.context, seed=4))
    with tempfile.TemporaryDirectory() as out:
        args = DriftConfig(
            output_dir=out,
            max_steps=ns.e2e_steps,
            per_device_train_batch_size=ns.batch_size,
            learning_rate=1e-5,
            logging_steps=10_000,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            bf16=True,
            use_cpu=ns.device == "cpu",
            drift_enabled=drift is not None,
            drift_progress=False,
            drift_max_new_tokens=ns.max_new_tokens,
            **({"drift_refresh_steps": ns.refresh_steps} if ns.refresh_steps else {}),
            **(drift or {}),
        )
        trainer = DriftSFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            query_dataset=queries,
            reward_funcs=parity_reward,
            processing_class=tok,
        )
        trainer.remove_callback(PrinterCallback)
        sync(ns.device)
        s = time.perf_counter()
        trainer.train()
        sync(ns.device)
        wall = time.perf_counter() - s
        history = trainer.drift_state.history if drift is not None else []
    return {
        "wall_s": wall,
        "refreshes": len(history),
        "refresh_s": sum(h["metrics"]["drift/refresh_seconds"] for h in history),
        "rollouts_s": sum(h["timings"].get("rollouts", 0.0) for h in history),
        "rollout_tokens": sum(h.get("rollout_tokens", 0) for h in history),
        "rollout_decoded": sum(h.get("rollout_decoded", 0) for h in history),
        "recomputed": [h.get("num_recomputed") for h in history],
        "stages": {k: round(sum(h["timings"].get(k, 0.0) for h in history), 3) for k in history[0]["timings"]}
        if history
        else {},
    }


def bench_e2e(ns, tok) -> dict:
    variants = {"plain": None, "drift": {}, "drift_full": {"drift_capture_features": False}}
    runs = {k: [] for k in variants}
    e2e_run(ns, tok, None)  # warm-up: first-call costs (kernels, allocator), not counted
    for _ in range(ns.e2e_repeats):
        for name, drift in variants.items():
            runs[name].append(e2e_run(ns, tok, drift))
            print(f"  e2e {name}: {runs[name][-1]['wall_s']:.1f} s", flush=True)
    table = []
    for name in variants:
        rs = runs[name]
        ratio = float(np.median([r["wall_s"] / p["wall_s"] for r, p in zip(rs, runs["plain"])]))
        last = rs[-1]
        table.append(
            {
                "variant": name,
                "wall_s": float(np.median([r["wall_s"] for r in rs])),
                "ratio_vs_plain": ratio,
                "refreshes": last["refreshes"],
                "refresh_s": last["refresh_s"],
                "rollout_share": last["rollouts_s"] / last["refresh_s"] if last["refresh_s"] else None,
                "ms_per_generated_token": 1000 * last["rollouts_s"] / last["rollout_tokens"]
                if last["rollout_tokens"]
                else None,
                "decoded_per_generated": last["rollout_decoded"] / last["rollout_tokens"]
                if last["rollout_tokens"]
                else None,
                "recomputed": last["recomputed"],
                "stages": last["stages"],
            }
        )
    return {"steps": ns.e2e_steps, "rows": ns.e2e_rows, "batch_size": ns.batch_size, "table": table}


def markdown(res: dict) -> str:
    tp, cap, e2e = res["throughput"], res["capture"], res["e2e"]
    lines = [
        "# DRIFT overhead on a GPU",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']}. Model: `{res['shape']}` ({res['params']:,} parameters), bf16 autocast. "
        f"Wall time: {res['total_s']:.0f} s.",
        "",
        "## 1. Feature pass vs training step (target >= 2.0)",
        "",
        "| rows | mean tokens | batch | train ex/s | FeaturePass ex/s (every Linear) | ratio | upper half ex/s | ratio | "
        "train ex/s at TRL's defaults | upper half ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {tp['rows']} | {tp['mean_tokens']:.0f} | {tp['batch_size']} | {tp['train_ex_per_s']:.1f} | "
        f"{tp['feature_pass_ex_per_s']:.1f} ({tp['modules']} modules) | **{tp['ratio_every']:.2f}** | "
        f"{tp['top_half_ex_per_s']:.1f} ({tp['top_half_modules']} modules) | **{tp['ratio_top_half']:.2f}** | "
        f"{tp['train_trl_defaults_ex_per_s']:.1f} | **{tp['ratio_top_half_trl_defaults']:.2f}** |",
        "",
        "Training: bf16 autocast, AdamW; at TRL's defaults also activation checkpointing (enabled as `Trainer` "
        "enables it) and gradients clipped to 1.0, as an `SFTConfig` run takes its steps by default.",
        "",
        "## 2. Capture in the training backward",
        "",
        f"{cap['steps']} steps of batch {cap['batch_size']}: with capture / without = **{cap['ratio']:.3f}**.",
        "",
        f"## 3. End to end ({e2e['steps']} steps of batch {e2e['batch_size']} over {e2e['rows']} rows)",
        "",
        "| variant | train() s | ratio vs plain | refreshes | refresh s | rollouts' share | ms / generated token | "
        "decoded / generated | rows recomputed | stages (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in e2e["table"]:

        def f(x, d=2):
            return "-" if x is None else f"{x:.{d}f}"

        lines.append(
            f"| {r['variant']} | {r['wall_s']:.1f} | **{r['ratio_vs_plain']:.3f}** | {r['refreshes']} | "
            f"{r['refresh_s']:.1f} | {f(r['rollout_share'])} | {f(r['ms_per_generated_token'])} | "
            f"{f(r['decoded_per_generated'])} | {r['recomputed']} | {r['stages']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="qwen05b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--context", type=int, default=400, help="characters of random context before each prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tp-rows", type=int, default=256)
    p.add_argument("--capture-steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e-rows", type=int, default=2000)
    p.add_argument("--e2e-steps", type=int, default=200)
    p.add_argument("--e2e-repeats", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--refresh-steps", type=int, default=None, help="default: the library's drift_refresh_steps")
    ns = p.parse_args(argv)
    if ns.shape == "tiny":  # the smoke test: the same code, small sizes
        ns.context, ns.tp_rows, ns.capture_steps, ns.repeats = 60, 32, 4, 1
        ns.e2e_rows, ns.e2e_steps, ns.e2e_repeats, ns.max_new_tokens, ns.refresh_steps = 64, 20, 1, 8, 10
    offline_env()
    import transformers

    transformers.logging.set_verbosity_error()
    tok = build_char_tokenizer()
    command = "PYTHONPATH=. python benchmarks/overhead_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if ns.device.startswith("cuda") else platform.processor() or "cpu"
    res = {
        "command": command.strip(),
        "shape": ns.shape,
        "params": sum(p.numel() for p in build_model(ns.shape, tok, "cpu").parameters()),
        "machine": f"{device_name}, torch {torch.__version__}",
    }
    for name, fn in (("throughput", bench_throughput), ("capture", bench_capture), ("e2e", bench_e2e)):
        t = time.perf_counter()
        res[name] = fn(ns, tok)
        print(f"[{name}] {time.perf_counter() - t:.0f} s: {json.dumps(res[name], default=float)[:400]}", flush=True)
    res["total_s"] = time.perf_counter() - started
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "overhead_gpu.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    md = markdown(res)
    with open(os.path.join(ns.out, "overhead_gpu.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
