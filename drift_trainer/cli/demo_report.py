"""The demo's comparison table and figure."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from drift_trainer.cli.demo import RunResult


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


def read_refreshes(result: RunResult, root: str, corrupted: np.ndarray) -> None:
    """Per refresh of a run: its step, rollout accuracy, the corrupted rows' weight share and the AUROC of clean
    vs corrupted rows by score."""
    import pandas as pd

    refreshes = sorted(d for d in os.listdir(root) if d.startswith("refresh-")) if os.path.isdir(root) else []
    for d in refreshes:
        with open(os.path.join(root, d, "summary.json")) as f:
            summary = json.load(f)
        frame = pd.read_parquet(os.path.join(root, d, "scores.parquet"))
        w = frame["weight"].to_numpy()
        result.refresh_steps.append(int(summary["step"]))
        result.rollout_accuracy.append(float(summary["metrics"]["drift/rollout_accuracy"]))
        result.corrupted_weight_share.append(float(w[corrupted].sum() / w.sum()))
        # over the rows this refresh scored (with captured features, rows not yet trained may have no score)
        scored = frame["scored"].to_numpy(bool) if "scored" in frame else np.ones(len(frame), dtype=bool)
        both = corrupted[scored].any() and (~corrupted[scored]).any()
        result.auroc.append(auroc(frame["score"].to_numpy()[scored], ~corrupted[scored]) if both else float("nan"))
        mixed = corrupted.any() and (~corrupted).any()
        result.weight_auroc.append(auroc(w, ~corrupted) if mixed else float("nan"))


def _acc_at(r: RunResult, step: int | None) -> str:
    hits = [a for s, a in r.accuracy_curve if s == step]
    return f"{hits[0]:.3f}" if hits else "-"


def curve_mean(r: RunResult) -> float | None:
    """Area under the test-accuracy curve, as the mean of its points (None without a curve)."""
    return sum(a for _, a in r.accuracy_curve) / len(r.accuracy_curve) if r.accuracy_curve else None


def _mean(r: RunResult) -> str:
    m = curve_mean(r)
    return "-" if m is None else f"{m:.3f}"


def format_table(plain: RunResult, drift: RunResult, fraction_corrupted: float) -> str:
    """The demo's markdown table.

    "test accuracy at first refresh" shows where each run stood before DRIFT changed anything: the runs share seed,
    data and init, but not the data order (plain SFT uses the Trainer's RandomSampler, DRIFT its own DriftSampler).
    """
    first = drift.refresh_steps[0] if drift.refresh_steps else None
    lines = [
        f"| run | final test accuracy | mean test accuracy over training | test accuracy at first refresh (step "
        f"{first}) | rollout accuracy by refresh | corrupted share of weight (start -> end) |",
        "|---|---|---|---|---|---|",
    ]
    share_end = drift.corrupted_weight_share[-1] if drift.corrupted_weight_share else fraction_corrupted
    ro = ", ".join(f"{s}: {a:.2f}" for s, a in zip(drift.refresh_steps, drift.rollout_accuracy)) or "no refresh"
    f = fraction_corrupted
    lines.append(
        f"| plain SFT | {plain.final_accuracy:.3f} | {_mean(plain)} | {_acc_at(plain, first)} | - | {f:.3f} -> "
        f"{f:.3f} |"
    )
    lines.append(
        f"| DRIFT | {drift.final_accuracy:.3f} | {_mean(drift)} | {_acc_at(drift, first)} | {ro} | {f:.3f} -> "
        f"{share_end:.3f} |"
    )
    return "\n".join(lines)


def plot(plain: RunResult, drift: RunResult, fraction_corrupted: float, path: str, title: str = "") -> str:
    """Two panels: test accuracy over training; rollout accuracy and corrupted weight share at each refresh."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r, style in ((plain, "--"), (drift, "-")):
        if r.accuracy_curve:
            xs, ys = zip(*r.accuracy_curve)
            ax1.plot(xs, ys, style, marker="o", label=f"{r.name} (final {r.final_accuracy:.2f})")
    for s in drift.refresh_steps:
        ax1.axvline(s, color="grey", alpha=0.2)
    ax1.set_xlabel("step")
    ax1.set_ylabel("test accuracy (greedy, exact match)")
    ax1.set_ylim(0, 1)
    ax1.legend()
    ax1.set_title("held-out accuracy")
    if drift.refresh_steps:
        ax2.plot(drift.refresh_steps, drift.rollout_accuracy, marker="o", label="DRIFT rollout accuracy")
        ax2.plot(drift.refresh_steps, drift.corrupted_weight_share, marker="s", label="corrupted share of weight")
    ax2.axhline(fraction_corrupted, color="red", ls=":", label=f"corrupted fraction ({fraction_corrupted:.2f})")
    ax2.set_xlabel("refresh step")
    ax2.set_ylim(0, 1)
    ax2.legend()
    ax2.set_title("DRIFT refreshes")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
