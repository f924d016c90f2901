"""``drift-trainer demo``: plain SFT against DRIFT on a tiny model and a synthetic task with known corrupted labels.

Both runs share the model init, the data, the seed and the step budget; only ``drift_enabled`` differs. The task is
two-digit addition where a share of the training completions is corrupted (by default ``systematic``: the carry is
dropped, a plausible wrong rule). The demo prints a table (final test accuracy by greedy decoding with exact match,
rollout accuracy at each refresh, share of sampling weight held by the corrupted examples) and writes a PNG plot plus
the run artifacts into the output folder it names.

The helpers here (:func:`run_one`, :func:`evaluate_accuracy`, :func:`auroc`) are also used by
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

from .toy import Corruption, addition_dataset, build_char_tokenizer, build_tiny_llama, offline_env, query_dataset_from

# A task the tiny model learns within the warm-up (so rollouts are a mix of right and wrong before the first refresh),
# sized to finish in about a minute per run on 2 CPU cores.
DEFAULTS = dict(
    steps=900,
    warmup=300,
    refresh=100,
    num_train=2000,
    num_test=300,
    num_queries=64,
    corruption="systematic",
    fraction=0.4,
    hidden_size=128,
    num_layers=2,
    lr=3e-3,
    batch_size=32,
    seed=0,
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
    accuracy_curve: list[tuple[int, float]] = field(default_factory=list)
    output_dir: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` (True) from the rest, ties counted half.

    1.0: every positive scores above every negative; 0.5: chance; nan if a class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate_accuracy(model, tokenizer, dataset, max_new_tokens: int = 6, batch_size: int = 128) -> float:
    """Exact-match accuracy of greedy completions of ``dataset['prompt']`` against ``dataset['answer']``."""
    import torch

    from .rewards import exact_match
    from .rollouts import _cut_at_eos, _left_pad, tokenize_prompt

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
    hidden_size: int = 128,
    num_layers: int = 2,
    lr: float = 3e-3,
    batch_size: int = 32,
    curve_every: int = 0,
    progress: bool = True,
    **drift_kwargs,
) -> RunResult:
    """Train a fresh tiny Llama (init from ``seed``) on ``train`` for ``steps`` and evaluate it on ``test``.

    ``drift=False`` is plain SFT (``drift_enabled=False``); otherwise ``drift_kwargs`` are ``drift_*`` options.
    """
    import pandas as pd
    import torch

    from .config import DriftConfig
    from .rewards import exact_match
    from .trainer import DriftSFTTrainer

    torch.manual_seed(seed)
    model = build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=4, seed=seed)
    args = DriftConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(50, steps // 10),
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
    probe = _Probe(tokenizer, test, curve_every)
    trainer = DriftSFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        query_dataset=queries if drift else None,
        reward_funcs=exact_match if drift else None,
        processing_class=tokenizer,
        callbacks=[probe],
    )
    start = time.perf_counter()
    trainer.train()
    acc = evaluate_accuracy(trainer.model, tokenizer, test)
    result = RunResult(name=name, final_accuracy=acc, seconds=time.perf_counter() - start, output_dir=output_dir)
    result.accuracy_curve = list(probe.curve)
    corrupted = np.asarray(train["corrupted"], dtype=bool)
    if drift:
        root = os.path.join(output_dir, "drift")
        for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            with open(os.path.join(root, d, "summary.json")) as f:
                summary = json.load(f)
            frame = pd.read_parquet(os.path.join(root, d, "scores.parquet"))
            w = frame["weight"].to_numpy()
            result.refresh_steps.append(int(summary["step"]))
            result.rollout_accuracy.append(float(summary["metrics"]["drift/rollout_accuracy"]))
            result.corrupted_weight_share.append(float(w[corrupted].sum() / w.sum()))
            result.auroc.append(auroc(frame["score"].to_numpy(), ~corrupted) if corrupted.any() else float("nan"))
    with open(os.path.join(output_dir, "result.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    return result
