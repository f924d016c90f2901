"""``drift-trainer demo``: plain SFT against DRIFT on a tiny model and a synthetic task with known corrupted labels.

Both runs start from the same base model (a tiny Llama trained on clean addition, as LLM SFT starts from a pretrained
model; ``--base-steps 0`` starts from random init) and share the data, the seed and the step budget; only
``drift_enabled`` differs. The fine-tuning task is two-digit addition where a share of the training completions is
corrupted (by default ``systematic``: the carry is dropped, a plausible wrong rule). The demo prints a table (final
and mean test accuracy by greedy decoding with exact match, rollout accuracy at each refresh, share of sampling weight
held by the corrupted examples) and writes a PNG plot plus the run artifacts into the output folder it names. DRIFT
runs at the library's defaults except its refresh schedule and rollout sizes, which are those of
``benchmarks/quality.py``'s warm regime.

The helpers here (:func:`run_one`, :func:`evaluate_accuracy`, :func:`make_data`) are also used by
``benchmarks/quality.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from drift_trainer.cli.demo_report import auroc, format_table, plot, read_refreshes
from drift_trainer.cli.toy import (
    Corruption,
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    offline_env,
    query_dataset_from,
)

# A task the tiny model learns within the warm-up (so rollouts are a mix of right and wrong before the first refresh),
# sized to finish in about a minute per run on 2 CPU cores.
# the demo's (and benchmarks/quality.py's) rollout and feature-pass sizes: answers are at most 5 characters
ROLLOUT_OPTIONS = dict(
    drift_num_rollouts=4, drift_rollout_batch_size=256, drift_max_new_tokens=5, drift_feature_batch_size=64
)
DEFAULTS = dict(
    base_steps=800,
    base_lr=2e-3,
    steps=200,
    warmup=40,
    refresh=40,
    num_train=1000,
    num_test=300,
    num_queries=64,
    corruption="systematic",
    fraction=0.5,
    hidden_size=96,
    num_layers=3,
    lr=1e-3,
    batch_size=64,
    seed=0,
    curve_every=20,
)


@dataclass
class RunResult:
    """What one training run produced."""

    name: str
    final_accuracy: float
    seconds: float
    refresh_steps: list[int] = field(default_factory=list)
    rollout_accuracy: list[float] = field(default_factory=list)
    corrupted_weight_share: list[float] = field(default_factory=list)  # share of sampling weight on corrupted rows
    auroc: list[float] = field(default_factory=list)  # of the refresh's scores, clean (positive) vs corrupted
    weight_auroc: list[float] = field(default_factory=list)  # of the weights after the refresh, over every row
    accuracy_curve: list[tuple[int, float]] = field(default_factory=list)
    output_dir: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate_accuracy(model, tokenizer, dataset, max_new_tokens: int = 6, batch_size: int = 128) -> float:
    """Exact-match accuracy of greedy completions of ``dataset['prompt']`` against ``dataset['answer']``."""
    import torch

    from drift_trainer.core.rewards import exact_match
    from drift_trainer.core.rollouts import _cut_at_eos, _left_pad, tokenize_prompt

    prompts = list(dataset["prompt"])
    answers = list(dataset["answer"])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), batch_size):
                ids = [tokenize_prompt(tokenizer, p) for p in prompts[s : s + batch_size]]
                x, mask = _left_pad(ids, pad, device)
                out = model.generate(
                    input_ids=x,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    disable_compile=True,
                )
                seqs = [_cut_at_eos(seq, eos, pad) for seq in out[:, x.shape[1] :].tolist()]
                texts += tokenizer.batch_decode(seqs, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return float(np.mean(exact_match(prompts, texts, answer=answers))) if texts else 0.0


def make_data(corruption: str, fraction: float, num_train: int, num_test: int, num_queries: int, seed: int):
    """``(train, queries, test)``: corrupted train rows, clean validation queries and clean held-out test prompts.

    The three sets come from different seeds; test prompts that also appear in train are dropped.
    """
    train = addition_dataset(num_train, seed=1000 + seed, corruption=Corruption(corruption, fraction))
    queries = query_dataset_from(addition_dataset(num_queries, seed=2000 + seed))
    seen = set(train["prompt"]) | set(queries["prompt"])
    test = addition_dataset(num_test * 2, seed=3000 + seed)
    keep = [i for i, p in enumerate(test["prompt"]) if p not in seen][:num_test]
    return train, queries, query_dataset_from(test.select(keep))


class _Probe:
    """A TrainerCallback that logs test accuracy every ``every`` steps (for the learning-curve plot)."""

    def __new__(cls, *a, **k):
        from transformers import TrainerCallback

        class Probe(TrainerCallback):
            def __init__(self, tokenizer, test, every):
                self.tokenizer, self.test, self.every, self.curve = tokenizer, test, every, []

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if self.every and state.global_step % self.every == 0:
                    self.curve.append((state.global_step, evaluate_accuracy(model, self.tokenizer, self.test)))

        return Probe(*a, **k)


def _demo_config(output_dir, steps, batch_size, lr, warmup_steps, seed, progress, drift, drift_kwargs):
    """The demo's CPU training options (float32, no activation checkpointing: a tiny model on 2 cores)."""
    from drift_trainer.hf.config import DriftConfig

    return DriftConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(50, steps // 10) if warmup_steps is None else warmup_steps,
        weight_decay=0.0,
        seed=seed,
        report_to=[],
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        drift_enabled=drift,
        drift_progress=False,
        **drift_kwargs,
    )


def run_one(
    name: str,
    *,
    train,
    queries,
    test,
    tokenizer,
    output_dir: str,
    steps: int,
    seed: int = 0,
    drift: bool = True,
    hidden_size: int = 96,
    num_layers: int = 3,
    lr: float = 2e-3,
    batch_size: int = 64,
    curve_every: int = 0,
    progress: bool = True,
    init_from: str | None = None,
    warmup_steps: int | None = None,
    save_model: bool = False,
    holdout=None,
    **drift_kwargs,
) -> RunResult:
    """Train a fresh tiny Llama (init from ``seed``, or loaded from ``init_from``) on ``train`` for ``steps`` and
    evaluate it on ``test``.

    ``drift=False`` is plain SFT (``drift_enabled=False``); otherwise ``drift_kwargs`` are ``drift_*`` options.
    ``holdout`` (prompt + completion) is the ``holdout_dataset`` of ``drift_method="ica"``.
    """
    import torch

    from drift_trainer.core.rewards import exact_match
    from drift_trainer.hf.sft_trainer import DriftSFTTrainer

    torch.manual_seed(seed)
    if init_from:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(init_from)
    else:
        model = build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=4, seed=seed)
    args = _demo_config(output_dir, steps, batch_size, lr, warmup_steps, seed, progress, drift, drift_kwargs)
    probe = _Probe(tokenizer, test, curve_every)
    trainer = DriftSFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        query_dataset=queries if drift else None,
        reward_funcs=exact_match if drift else None,
        holdout_dataset=holdout if drift else None,
        processing_class=tokenizer,
        callbacks=[probe],
    )
    start = time.perf_counter()
    trainer.train()
    if save_model:
        trainer.save_model(os.path.join(output_dir, "final"))
    acc = evaluate_accuracy(trainer.model, tokenizer, test)
    result = RunResult(name=name, final_accuracy=acc, seconds=time.perf_counter() - start, output_dir=output_dir)
    result.accuracy_curve = list(probe.curve)
    corrupted = np.asarray(train["corrupted"], dtype=bool)
    if drift and trainer.ica_callback is not None:  # ICA keeps its weights on the callback (one row each)
        weights, mixed = trainer.ica_callback.weights, corrupted.any() and (~corrupted).any()
        result.weight_auroc.append(auroc(np.asarray(weights), ~corrupted) if mixed else float("nan"))
    elif drift:
        read_refreshes(result, os.path.join(output_dir, "drift"), corrupted)
    with open(os.path.join(output_dir, "result.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    return result


def build_parser() -> argparse.ArgumentParser:
    from drift_trainer.methods.scorers import SCORERS

    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="drift-trainer demo",
        description="Train a tiny Llama twice on two-digit addition with corrupted labels (plain SFT, then DRIFT; same "
        "seed, data and budget), print a comparison table and write a plot and the run artifacts.",
    )
    p.add_argument(
        "--output-dir",
        "--output_dir",
        default="drift-demo",
        help="Folder for the plot, table, results and run artifacts.",
    )
    p.add_argument(
        "--base-steps",
        "--base_steps",
        type=int,
        default=d["base_steps"],
        help="Steps of the clean base model both runs start from (warm start, as LLM SFT does; 0: random init).",
    )
    p.add_argument("--base-lr", "--base_lr", type=float, default=d["base_lr"], help="Base model learning rate.")
    p.add_argument("--steps", type=int, default=d["steps"], help="Optimizer steps per run.")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="Step of DRIFT's first refresh.")
    p.add_argument("--refresh", type=int, default=d["refresh"], help="Steps between DRIFT refreshes.")
    p.add_argument("--seed", type=int, default=d["seed"], help="Seed of the model init, data and sampling.")
    p.add_argument(
        "--corruption",
        default=d["corruption"],
        choices=["random", "systematic", "format"],
        help="How corrupted rows are wrong: random numbers, a dropped carry, or the `#<answer>` format.",
    )
    p.add_argument("--fraction", type=float, default=d["fraction"], help="Share of rows drawn for corruption.")
    p.add_argument("--num-train", "--num_train", type=int, default=d["num_train"], help="Training examples.")
    p.add_argument("--num-test", "--num_test", type=int, default=d["num_test"], help="Held-out test prompts.")
    p.add_argument(
        "--num-queries", "--num_queries", type=int, default=d["num_queries"], help="Validation queries per refresh."
    )
    p.add_argument("--hidden-size", "--hidden_size", type=int, default=d["hidden_size"], help="Model width.")
    p.add_argument("--num-layers", "--num_layers", type=int, default=d["num_layers"], help="Model depth.")
    p.add_argument("--batch-size", "--batch_size", type=int, default=d["batch_size"], help="Train batch size.")
    p.add_argument("--lr", type=float, default=d["lr"], help="Learning rate of the two compared runs.")
    p.add_argument("--scorer", default="drift", choices=list(SCORERS), help="drift_scorer of the second run.")
    p.add_argument(
        "--curve-every",
        "--curve_every",
        type=int,
        default=d["curve_every"],
        help="Evaluate test accuracy every N steps (0: off).",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for a tiny model).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    return p


def _quiet(threads: int) -> None:
    """Offline, few logs (the Trainer's own bar shows progress; dataset preparation is instant), ``threads``."""
    offline_env()
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    logging.getLogger("drift_trainer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, threads))


def _write_results(out: str, argv, ns, table: str, frac: float, plain: RunResult, drift: RunResult, total) -> None:
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"`drift-trainer demo {' '.join(argv or [])}`\n\n{table}\n")
    results = {"args": vars(ns), "corrupted_fraction": frac, "plain": plain.to_dict(), "drift": drift.to_dict()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**results, "seconds": total}, f, indent=2)


def _base_model(ns, out: str, test, tokenizer, model: dict) -> str:
    """Train the clean base model both compared runs start from; returns its directory."""
    print(f"[0/2] base model: {ns.base_steps} steps of plain SFT on clean addition (other rows)", flush=True)
    base = run_one(
        "base",
        train=addition_dataset(ns.num_train * 2, seed=9000 + ns.seed),
        queries=None,
        test=test,
        tokenizer=tokenizer,
        output_dir=os.path.join(out, "base"),
        steps=ns.base_steps,
        drift=False,
        lr=ns.base_lr,
        progress=not ns.quiet,
        save_model=True,
        **model,
    )
    print(f"      base test accuracy {base.final_accuracy:.3f} ({base.seconds:.0f}s)", flush=True)
    return os.path.join(out, "base", "final")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    _quiet(ns.threads)
    out = os.path.abspath(ns.output_dir)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    tokenizer = build_char_tokenizer(os.path.join(out, "tokenizer"))
    train, queries, test = make_data(ns.corruption, ns.fraction, ns.num_train, ns.num_test, ns.num_queries, ns.seed)
    corrupted = np.asarray(train["corrupted"], dtype=bool)
    frac = float(corrupted.mean())
    print(
        f"drift-trainer demo: {len(train)} train rows ({corrupted.sum()} corrupted: {ns.corruption}), "
        f"{len(queries)} queries, {len(test)} test prompts; {ns.steps} steps per run; output: {out}",
        flush=True,
    )
    model = dict(hidden_size=ns.hidden_size, num_layers=ns.num_layers, batch_size=ns.batch_size, seed=ns.seed)
    init_from = _base_model(ns, out, test, tokenizer, model) if ns.base_steps > 0 else None
    common = dict(
        train=train,
        queries=queries,
        test=test,
        tokenizer=tokenizer,
        steps=ns.steps,
        lr=ns.lr,
        curve_every=ns.curve_every,
        progress=not ns.quiet,
        init_from=init_from,
        warmup_steps=0 if init_from else None,
        **model,
    )
    print("[1/2] plain SFT (drift_enabled=False)", flush=True)
    plain = run_one("plain SFT", output_dir=os.path.join(out, "plain_sft"), drift=False, **common)
    print(f"      final test accuracy {plain.final_accuracy:.3f} ({plain.seconds:.0f}s)", flush=True)
    print(f"[2/2] DRIFT (drift_scorer={ns.scorer}, first refresh at step {ns.warmup}, every {ns.refresh})", flush=True)
    drift = run_one(
        "DRIFT",
        output_dir=os.path.join(out, "drift"),
        drift=True,
        drift_scorer=ns.scorer,
        drift_first_refresh_step=ns.warmup,
        drift_refresh_steps=ns.refresh,
        drift_num_queries=ns.num_queries,
        **ROLLOUT_OPTIONS,
        **common,
    )
    print(f"      final test accuracy {drift.final_accuracy:.3f} ({drift.seconds:.0f}s)", flush=True)
    table = format_table(plain, drift, frac)
    png = plot(
        plain,
        drift,
        frac,
        os.path.join(out, "demo.png"),
        title=f"{ns.corruption} corruption, {frac:.0%} of rows, seed {ns.seed}",
    )
    total = time.perf_counter() - started
    _write_results(out, argv, ns, table, frac, plain, drift, total)
    print()
    print(table)
    print()
    ahead = drift.final_accuracy - plain.final_accuracy
    print(f"DRIFT - plain SFT: {ahead:+.3f} test accuracy. Total {total:.0f}s.")
    print(
        f"Wrote {png}, {os.path.join(out, 'table.md')}, {os.path.join(out, 'results.json')}, run artifacts under "
        f"{os.path.join(out, 'drift', 'drift')}/refresh-*/"
    )
    return 0
