"""Helpers shared by the benchmarks: the toy tokenizer and models, tokenized data, a training step, a reward, the
offline environment, the quiet CPU trainer options, and the configuration and command line of the overhead sections.

Import it as ``common`` (the benchmarks run as scripts, with ``benchmarks/`` first on ``sys.path``). Importing it
has no side effects beyond putting the repository root on ``sys.path``; the overhead sections call
:func:`offline_setup` when they are imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drift_trainer.cli.toy import (  # noqa: E402
    ALPHABET,
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    offline_env,
)
from drift_trainer.core.features import collate_right  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_TOK = None


def offline_setup() -> None:
    """No hub access, no warnings, no ``datasets`` progress bars (what the overhead benchmark runs under)."""
    offline_env()
    warnings.filterwarnings("ignore")
    import datasets  # after the offline environment is set

    datasets.disable_progress_bars()


def quiet_cpu_args() -> dict:
    """Trainer options every benchmark run shares: CPU, no reports, no checkpoints, no progress bars."""
    return {"use_cpu": True, "report_to": [], "save_strategy": "no", "disable_tqdm": True, "drift_progress": False}


def tokenizer():
    global _TOK
    if _TOK is None:
        _TOK = build_char_tokenizer()
    return _TOK


# ---------------------------------------------------------------------------------------------------------- data


def sft_rows(data) -> list[dict]:
    """Tokenized prompt/completion rows (``12+34=`` -> ``46</s>``), the prompt masked out of the labels."""
    tok = tokenizer()
    rows = []
    for p, c in zip(data["prompt"], data["completion"]):
        prompt = tok(p, add_special_tokens=False)["input_ids"]
        full = prompt + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    return rows


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    """Tokenized addition examples (``12+34=`` -> ``46</s>``), prompt masked: 8-10 tokens each."""
    return sft_rows(addition_dataset(n, seed=seed))


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


# ---------------------------------------------------------------------------------------------------------- models


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


def trl_default_step(model, opt, batch, device_type: str = "cpu") -> None:
    """One training step as ``SFTConfig``'s defaults run it (the model's activation checkpointing on, see
    :func:`trl_defaults`): the forward under bf16 autocast, backward, gradients clipped to norm 1.0, AdamW step."""
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def trl_defaults(model):
    """Activation checkpointing on, as ``Trainer`` turns it on for ``SFTConfig``'s default, for the enclosed steps."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=None)
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


def sft_step(model, opt, batch, capture=None, idx=None, step: int = 0) -> None:
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


def first_digit_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion starts with the answer's first digit (a TRL-convention reward). A tiny model learns
    this within a few hundred steps, so refreshes have contrast (exact match stays at 0 that early)."""
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(float(text.strip()[:1] == str(a)[:1]))
    return out


# ---------------------------------------------------------------------------------------------------------- numbers


def median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def fmt(x, d=2):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


# ---------------------------------------------------------------------------------------------------------- cases


CASES = [("tiny", "addition", 0), ("small", "text", 64), ("medium", "text", 128)]  # (model, data, max length)


def cases_of(cfg) -> list[tuple[str, str, int]]:
    """The model sizes a section runs on: all three, or the two smaller in a quick run."""
    return CASES[:2] if cfg.quick else CASES


def load_case(model_name: str, data: str, length: int, n: int, seed: int = 0):
    """The seeded model and ``n`` rows of a case: ``addition`` rows, or random text of up to ``length`` tokens."""
    torch.manual_seed(0)
    model = model_of(model_name)
    rows = addition_rows(n, seed=seed) if data == "addition" else text_rows(n, length, seed=seed)
    return model, rows


def case_head(model_name: str, model, data: str, length: int) -> dict:
    """The first columns of a case's result row: model name, parameter count, data."""
    return {"model": model_name, "params": n_params(model), "data": data if data == "addition" else f"text<= {length}"}


# ---------------------------------------------------------------------------------------------------------- config


def overhead_config(quick: bool) -> argparse.Namespace:
    """Sizes and repeats of every overhead section (``quick``: the smoke run)."""
    q = quick
    return argparse.Namespace(
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


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--quick`` and ``--threads``, shared by overhead.py and the sections run on their own."""
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: stable timings on a shared machine; 0 keeps torch's default)",
    )


def run_section(name: str, fn, doc: str, argv=None):
    """Command line of a section module run on its own: runs ``fn`` and prints its result as JSON (also written to
    ``--out DIR`` as ``overhead_NAME.json`` when given; ``benchmarks/overhead.py --sections NAME`` writes the usual
    report instead)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_run_options(p)
    p.add_argument("--out", default=None, help=f"directory for overhead_{name}.json (default: print only)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = fn(overhead_config(a.quick))
    text = json.dumps(res, indent=1, default=float)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"overhead_{name}.json"), "w") as f:
            f.write(text + "\n")
    return res
