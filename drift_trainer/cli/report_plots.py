"""The figures of the DRIFT report (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

import numpy as np

from drift_trainer.core.state import atomic_path

if TYPE_CHECKING:
    from drift_trainer.cli.report import Refresh

POS_COLOR, NEG_COLOR = "#2a9d8f", "#e76f51"


def _latest_with_contrast(refreshes: list[Refresh]) -> Refresh:
    with_contrast = [r for r in refreshes if r.summary.get("contrast", True)]
    return (with_contrast or refreshes)[-1]


def _figure(width=7.0, height=3.6, ncols=1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def _save(fig, out_dir: str, name: str) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return data


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_histogram(ref: Refresh):
    df = ref.scores[ref.scores["scored"]] if "scored" in ref.scores else ref.scores
    fig, (ax,) = _figure()
    pos, neg = df["score"][df["score"] > 0].to_numpy(), df["score"][df["score"] < 0].to_numpy()
    if len(pos) + len(neg) == 0:
        _empty(ax, "no nonzero scores (no contrast in this refresh)")
    else:
        bins = np.histogram_bin_edges(np.concatenate([pos, neg]), bins=40)
        ax.hist(pos, bins=bins, color=POS_COLOR, alpha=0.85, label=f"score > 0: helps ({len(pos)})")
        ax.hist(neg, bins=bins, color=NEG_COLOR, alpha=0.85, label=f"score < 0: hurts ({len(neg)})")
        ax.axvline(0, color="#333", lw=0.8)
        ax.set_xlabel("debiased influence score")
        ax.set_ylabel("examples")
        ax.legend(frameon=False)
    ax.set_title(f"Score distribution (step {ref.step})")
    return fig


def plot_norm_vs_score(ref: Refresh):
    df = ref.scores[ref.scores["scored"]] if "scored" in ref.scores else ref.scores
    fig, axes = _figure(width=11, height=4, ncols=2)
    norm = df["grad_norm"].to_numpy()
    for ax, column, label in zip(axes, ("raw_score", "score"), ("before debiasing (raw)", "after debiasing")):
        if column not in df or len(df) == 0:
            _empty(ax, f"no `{column}` column")
            continue
        y = df[column].to_numpy()
        colors = np.where(df["score"].to_numpy() >= 0, POS_COLOR, NEG_COLOR)
        ax.scatter(norm, y, s=10, c=colors, alpha=0.7, linewidths=0)
        ax.axhline(0, color="#333", lw=0.8)
        r = np.corrcoef(norm, y)[0, 1] if len(y) > 2 and np.std(y) > 0 and np.std(norm) > 0 else float("nan")
        ax.set_title(f"{label}: corr(norm, score) = {r:+.2f}")
        ax.set_xlabel("gradient norm ||phi||")
        ax.set_ylabel(column)
    return fig


def weight_history(refreshes: list[Refresh], top: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps (R,), and the weights (R, top) of the ``top`` best and worst examples of the latest scored refresh."""
    latest = _latest_with_contrast(refreshes).scores
    live = latest[latest["scored"]] if "scored" in latest else latest
    order = live.sort_values("score", ascending=False, kind="stable")["index"].to_numpy()
    best, worst = order[:top], order[::-1][:top]
    steps = np.asarray([r.step for r in refreshes])
    by_index = [r.scores.set_index("index")["weight"] for r in refreshes]
    w_best = np.asarray([[s.get(i, np.nan) for i in best] for s in by_index]).reshape(len(refreshes), len(best))
    w_worst = np.asarray([[s.get(i, np.nan) for i in worst] for s in by_index]).reshape(len(refreshes), len(worst))
    return steps, w_best, w_worst, np.concatenate([best, worst])


def _step_axis(ax, steps) -> None:
    ax.set_xlabel("step")
    if 1 <= len(steps) <= 15:
        ax.set_xticks(list(steps))


def plot_weights(refreshes: list[Refresh], top: int = 10):
    fig, (ax,) = _figure()
    steps, w_best, w_worst, index = weight_history(refreshes, top)
    if len(steps) == 1:  # one refresh (a refine output): the weights themselves, one bar per example
        values = np.concatenate([w_best[0], w_worst[0][::-1]])
        colors = [POS_COLOR] * w_best.shape[1] + [NEG_COLOR] * w_worst.shape[1]
        labels = [str(i) for i in np.concatenate([index[: w_best.shape[1]], index[w_best.shape[1] :][::-1]])]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
        ax.set_xlabel(f"example index (top {w_best.shape[1]} green, bottom {w_worst.shape[1]} red, by score)")
    else:
        marker = "o" if len(steps) < 20 else None
        for j in range(w_best.shape[1]):
            ax.plot(
                steps, w_best[:, j], color=POS_COLOR, alpha=0.7, marker=marker, label=f"top {top}" if j == 0 else None
            )
        for j in range(w_worst.shape[1]):
            ax.plot(
                steps,
                w_worst[:, j],
                color=NEG_COLOR,
                alpha=0.7,
                marker=marker,
                label=f"bottom {top}" if j == 0 else None,
            )
        _step_axis(ax, steps)
        ax.legend(frameon=False)
    ax.axhline(1.0, color="#333", lw=0.8, ls="--")
    ax.set_ylabel("sampling weight (mean 1)")
    ax.set_title(f"Weights of the top and bottom {top} examples (by latest score)")
    return fig


def _metric(refreshes, key) -> np.ndarray:
    return np.asarray([r.summary.get("metrics", {}).get(key, np.nan) for r in refreshes], dtype=np.float64)


def plot_rollouts(refreshes: list[Refresh]):
    fig, (ax,) = _figure()
    steps = [r.step for r in refreshes]
    acc, reward = _metric(refreshes, "drift/rollout_accuracy"), _metric(refreshes, "drift/reward_mean")
    if len(steps) == 1:
        bars = ax.bar(["rollout accuracy", "mean reward"], [acc[0], reward[0]], color=["#264653", "#e9c46a"], width=0.5)
        ax.bar_label(bars, fmt="%.3f")
    else:
        ax.plot(steps, acc, marker="o", ms=7, color="#264653", label="rollout accuracy")
        ax.plot(steps, reward, marker="s", ms=4, ls="--", color="#e9c46a", label="mean reward")
        _step_axis(ax, steps)
        ax.legend(frameon=False)
    finite = np.concatenate([acc, reward])
    finite = finite[np.isfinite(finite)]
    if len(finite) and finite.min() >= 0 and finite.max() <= 1:
        ax.set_ylim(0, 1.05)
    ax.set_title(
        f"On-policy rollouts at each refresh (step {steps[0]})"
        if len(steps) == 1
        else "On-policy rollouts at each refresh"
    )
    return fig


def plot_ess(refreshes: list[Refresh]):
    fig, (ax,) = _figure()
    ess = _metric(refreshes, "drift/ess")
    steps = [r.step for r in refreshes]
    if len(steps) == 1:
        bars = ax.bar([f"step {steps[0]}"], ess, color="#6a4c93", width=0.4)
        ax.bar_label(bars, fmt="%.3f")
    else:
        ax.plot(steps, ess, marker="o", color="#6a4c93")
        _step_axis(ax, steps)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ESS / n")
    ax.set_title("Effective sample size of the weights (1 = uniform)")
    return fig


# ---------------------------------------------------------------------------------------------- tables and page
