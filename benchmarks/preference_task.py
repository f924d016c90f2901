"""The preference task of ``preference.py``: fixed-width addition with distractors above and below the right sum.

Prompt ``"ab+cd="`` (two operands in ``[0, operand_max]``, zero-padded to two digits), answer the sum zero-padded to
``width`` digits followed by EOS. A pair's rejected answer is ``right + s * d`` with ``s`` in {-1, +1} and ``d`` in
``DISTANCES`` (both signs equally likely, redrawn while the result leaves ``[0, 10**width - 1]``), so "prefer the bigger
(or smaller) number" is no shortcut; ``d`` (the ``distance`` column) is the pair's margin: near distractors (1, 2)
differ in the last digit, far ones (5, 10) often in the tens digit. A share ``flip`` of train pairs swap chosen and
rejected (the label noise, ``flipped`` column).

Prompts are split by a seeded shuffle into train / validation / test prompts (disjoint), so the held-out metrics are
on unseen problems. Everything here is plain Python/torch on a tiny random-init Llama (no hub access).
"""

from __future__ import annotations

import random

import numpy as np
import torch

DISTANCES = (1, 2, 5, 10)


def prompt_split(operand_max: int, seed: int, n_val: int, n_test: int):
    """Disjoint ``(train, val, test)`` lists of ``(a, b)`` operand pairs, a seeded shuffle of all of them."""
    allp = [(a, b) for a in range(operand_max + 1) for b in range(operand_max + 1)]
    random.Random(seed).shuffle(allp)
    return allp[n_val + n_test :], allp[:n_val], allp[n_val : n_val + n_test]


RULES = ("add", "digitwise")


def solve(a: int, b: int, rule: str) -> int:
    """``add``: ``a + b``; ``digitwise``: each digit ``(a_i + b_i) mod 10`` (no carries, a per-position lookup)."""
    if rule == "add":
        return a + b
    if rule == "digitwise":
        return ((a // 10 + b // 10) % 10) * 10 + (a % 10 + b % 10) % 10
    raise ValueError(f"unknown rule {rule!r}; use one of {RULES}")


def fmt_prompt(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}="


def fmt_answer(x: int, width: int) -> str:
    return f"{x:0{width}d}"


def make_pairs(operands, n: int, seed: int, flip: float, width: int, rule: str = "add", distances=DISTANCES):
    """``n`` preference pairs on prompts drawn (with replacement) from ``operands``.

    Columns: ``prompt``, ``chosen``, ``rejected``, ``answer`` (the right sum), ``flipped`` (bool), ``distance``
    (``|rejected - right|`` of the unflipped pair) and ``signed`` (``rejected - right``).
    """
    from datasets import Dataset

    rng = random.Random(seed)
    top = 10**width - 1
    rows = {k: [] for k in ("prompt", "chosen", "rejected", "answer", "flipped", "distance", "signed")}
    for _ in range(n):
        a, b = rng.choice(operands)
        right = solve(a, b, rule)
        while True:
            d, s = rng.choice(distances), rng.choice((-1, 1))
            wrong = right + s * d
            if 0 <= wrong <= top:
                break
        f = rng.random() < flip
        r, w = fmt_answer(right, width), fmt_answer(wrong, width)
        rows["prompt"].append(fmt_prompt(a, b))
        rows["chosen"].append(w if f else r)
        rows["rejected"].append(r if f else w)
        rows["answer"].append(r)
        rows["flipped"].append(bool(f))
        rows["distance"].append(d)
        rows["signed"].append(s * d)
    return Dataset.from_dict(rows)


def sft_start(
    tok,
    operands,
    seed: int,
    steps: int,
    width: int,
    rule: str = "add",
    lr: float = 3e-3,
    batch: int = 32,
    demos: int = 0,
    **model_kw,
):
    """A tiny Llama briefly fine-tuned (plain AdamW loop) on clean sums of the train prompts: the shared start.

    ``demos``: each row comes after 0 to ``demos`` other clean solved problems (``"ab+cd=s"`` + EOS each, unlabelled)
    in the same sequence, so text after other examples is in distribution, as ICA's demonstrations put it (a start
    that has only seen one problem per sequence loses its predictions after the first EOS). 0: one problem per row.
    """
    from drift_trainer.cli.toy import build_tiny_llama
    from drift_trainer.core.features import collate_right, per_example_loss

    torch.manual_seed(seed)
    model = build_tiny_llama(tok, seed=seed, **model_kw)
    rng = random.Random(1000 + seed)
    demo_rng = random.Random(2000 + seed)  # its own stream: demos=0 draws the same problems as before it existed
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = lambda t: tok(text=t, add_special_tokens=False)["input_ids"]  # noqa: E731
    solved = lambda a, b: ids(fmt_prompt(a, b) + fmt_answer(solve(a, b, rule), width)) + [tok.eos_token_id]  # noqa: E731
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            a, b = rng.choice(operands)
            p = ids(fmt_prompt(a, b))
            c = ids(fmt_answer(solve(a, b, rule), width)) + [tok.eos_token_id]
            if demos:
                before = [t for _ in range(demo_rng.randint(0, demos)) for t in solved(*demo_rng.choice(operands))]
                p = before + p
            rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
        loss, _ = per_example_loss(model, collate_right(rows, tok.pad_token_id))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    model.eval()
    return model


def pair_rows(tok, data) -> list[dict]:
    ids = lambda t: tok(text=t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        {"prompt_ids": ids(p), "chosen_ids": ids(c) + [tok.eos_token_id], "rejected_ids": ids(r) + [tok.eos_token_id]}
        for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"])
    ]


@torch.no_grad()
def greedy_exact(model, tok, prompts, answers, width: int) -> float:
    """Greedy exact match: ``width`` digits then EOS. Prompts have one length, so decoding is batched, no padding."""
    model.eval()
    ids = torch.tensor([tok(text=p, add_special_tokens=False)["input_ids"] for p in prompts])
    for _ in range(width + 1):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    want = torch.tensor([tok(text=a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers])
    return float((ids[:, -(width + 1) :] == want).all(dim=1).float().mean())


@torch.no_grad()
def evaluate(model, ref, tok, test, beta: float, width: int, ref_lp=None) -> dict:
    """Held-out metrics on clean pairs ``test``: pref_acc, margin_acc, margin_mean, eval_loss (DPO sigmoid loss with
    this ``beta``), per-distance pref_acc, chosen log-prob, and greedy exact match on the test prompts."""
    from drift_trainer.methods.pairs import pair_logps

    rows = pair_rows(tok, test)
    pol = pair_logps(model, rows, tok.pad_token_id, 64)
    rf = ref_lp if ref_lp is not None else pair_logps(ref, rows, tok.pad_token_id, 64)
    margin = beta * ((pol.chosen - rf.chosen) - (pol.rejected - rf.rejected))
    prompts, answers = [], []
    seen = set()
    for p, a in zip(test["prompt"], test["answer"]):
        if p not in seen:
            seen.add(p)
            prompts.append(p)
            answers.append(a)
    dist = np.asarray(test["distance"])
    pref = pol.chosen > pol.rejected
    out = {
        "pref_acc": float(np.mean(pref)),
        "margin_acc": float(np.mean(margin > 0)),
        "margin_mean": float(margin.mean()),
        "eval_loss": float(np.mean(np.logaddexp(0.0, -margin))),
        "chosen_logp": float(np.mean(pol.chosen)),
        "exact": greedy_exact(model, tok, prompts, answers, width),
    }
    for d in sorted(set(dist.tolist())):
        out[f"pref_acc_d{d}"] = float(np.mean(pref[dist == d]))
    return out


def auroc(score, positive) -> float:
    """AUROC of ``score`` for ``positive`` (ties get average ranks); nan if one class is empty."""
    s, y = np.asarray(score, dtype=float), np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks of ties
        ranks[s == v] = ranks[s == v].mean()
    n1 = y.sum()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def quiet_setup() -> None:
    """One torch thread, offline, no progress bars, warnings or library logging: how every preference script runs."""
    import os
    import warnings

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from drift_trainer.cli.toy import offline_env

    offline_env()
    os.environ["TQDM_DISABLE"] = "1"
    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
