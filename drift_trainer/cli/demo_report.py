"""The demo's comparison table and figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drift_trainer.cli.demo import RunResult


def _acc_at(r: RunResult, step: int | None) -> str:
    hits = [a for s, a in r.accuracy_curve if s == step]
    return f"{hits[0]:.3f}" if hits else "-"


def format_table(plain: RunResult, drift: RunResult, fraction_corrupted: float) -> str:
    """The demo's markdown table.

    "test accuracy at first refresh" shows where each run stood before DRIFT changed anything: the runs share seed,
    data and init, but not the data order (plain SFT uses the Trainer's RandomSampler, DRIFT its own DriftSampler).
    """
    first = drift.refresh_steps[0] if drift.refresh_steps else None
    lines = [
        f"| run | final test accuracy | test accuracy at first refresh (step {first}) | rollout accuracy by refresh "
        "| corrupted share of weight (start -> end) |",
        "|---|---|---|---|---|",
    ]
    share_end = drift.corrupted_weight_share[-1] if drift.corrupted_weight_share else fraction_corrupted
    ro = ", ".join(f"{s}: {a:.2f}" for s, a in zip(drift.refresh_steps, drift.rollout_accuracy)) or "no refresh"
    f = fraction_corrupted
    lines.append(f"| plain SFT | {plain.final_accuracy:.3f} | {_acc_at(plain, first)} | - | {f:.3f} -> {f:.3f} |")
    lines.append(
        f"| DRIFT | {drift.final_accuracy:.3f} | {_acc_at(drift, first)} | {ro} | {f:.3f} -> {share_end:.3f} |"
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
