"""What DRIFT knows between refreshes, and the per-refresh artifacts written by rank 0."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

STATE_FILE = "drift_state.json"


@dataclass
class DriftState:
    """Latest refresh results, one entry per example of the user's ``train_dataset`` (by its row index)."""

    step: int = -1  # global step of the latest refresh (-1: none yet)
    num_refreshes: int = 0
    scores: np.ndarray | None = None  # debiased scores of the latest refresh
    smoothed: np.ndarray | None = None  # standardised scores after the EMA, what the weights come from
    weights: np.ndarray | None = None  # sampling / loss weights, mean 1 over scored examples
    grad_norm: np.ndarray | None = None
    rollout_accuracy: float | None = None
    reward_mean: float | None = None
    history: list[dict] = field(default_factory=list)  # one summary dict per refresh (metrics, timings, reasons)
    target: np.ndarray | None = None  # the latest unit target direction (what drift_target_ema smooths)
    extra: dict = field(default_factory=dict)  # further per-example arrays of a scorer (LossDiff-IRM: irm, keep)
    start_accuracy: dict | None = None  # drift_harm_gate: the start model's per-query rollout accuracy
    harm_step: int | None = None  # drift_harm_gate: the step of the refresh that found harm (0: the start model)
    start_loss_p: float | None = None  # drift_harm_gate: the loss test's p-value on the start model

    def to_dict(self) -> dict:
        def arr(a):
            return None if a is None else np.asarray(a, dtype=np.float64).tolist()

        return {
            "step": self.step,
            "num_refreshes": self.num_refreshes,
            "scores": arr(self.scores),
            "smoothed": arr(self.smoothed),
            "weights": arr(self.weights),
            "grad_norm": arr(self.grad_norm),
            "rollout_accuracy": self.rollout_accuracy,
            "reward_mean": self.reward_mean,
            "history": self.history,
            "target": arr(self.target),
            "extra": {k: arr(v) for k, v in self.extra.items()},
            "start_accuracy": None
            if self.start_accuracy is None
            else {str(k): float(v) for k, v in self.start_accuracy.items()},
            "harm_step": self.harm_step,
            "start_loss_p": self.start_loss_p,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DriftState:
        def arr(a):
            return None if a is None else np.asarray(a, dtype=np.float64)

        return cls(
            step=d["step"],
            num_refreshes=d["num_refreshes"],
            scores=arr(d["scores"]),
            smoothed=arr(d["smoothed"]),
            weights=arr(d["weights"]),
            grad_norm=arr(d["grad_norm"]),
            rollout_accuracy=d.get("rollout_accuracy"),
            reward_mean=d.get("reward_mean"),
            history=list(d.get("history", [])),
            target=arr(d.get("target")),
            extra={k: arr(v) for k, v in (d.get("extra") or {}).items()},
            start_accuracy=None
            if d.get("start_accuracy") is None
            else {int(k): float(v) for k, v in d["start_accuracy"].items()},
            harm_step=d.get("harm_step"),
            start_loss_p=d.get("start_loss_p"),
        )


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it portably; set back at once, read once per process
    os.umask(mask)
    return mask


def default_mode(path: str) -> None:
    """Give a file or directory made by ``tempfile`` (0600 / 0700) the mode a plain ``open`` / ``mkdir`` would."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str, directory: bool = False):
    """Yield a temporary sibling of ``path`` (a file path, or a new directory) to write; on success it gets default
    modes and is renamed onto ``path`` (replacing what was there), on failure it is removed. Readers never see a
    half-written ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if directory:
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    else:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        os.close(fd)
    try:
        yield tmp
        default_mode(tmp)
        if directory and os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def score_columns(result, weights) -> dict[str, np.ndarray]:
    """The columns of ``scores.parquet``: one row per user example of a refresh's result."""
    n = result.scores.shape[0]
    return {
        "index": np.arange(n),
        "score": result.scores,
        "weight": np.asarray(weights, dtype=np.float64),
        "grad_norm": result.grad_norm,
        "raw_score": result.raw_scores,
        "loss": result.loss,
        "scored": result.scored,
    }


def rollout_records(result) -> list[dict]:
    """The lines of ``rollouts.jsonl``: each rollout's query, completion text, reward and sign."""
    from drift_trainer.core.rewards import completion_text

    ro = result.rollouts
    return [
        {
            "query_index": ro.query_index[j],
            "query": ro.prompts[j],
            "completion": completion_text(ro.completions[j]),
            "reward": ro.rewards[j],
            "sign": float(result.signs[j]),
        }
        for j in range(len(ro))
    ]


def _write_files(out_dir: str, frame_columns: dict, records: list[dict], summary: dict | None) -> None:
    import pandas as pd

    with atomic_path(os.path.join(out_dir, "scores.parquet")) as tmp:
        pd.DataFrame(frame_columns).to_parquet(tmp, index=False)
    atomic_write_text(
        os.path.join(out_dir, "rollouts.jsonl"),
        "".join(json.dumps(rec, default=_json_default) + "\n" for rec in records),
    )
    if summary is not None:
        write_summary(out_dir, summary)


def write_scores(out_dir: str, result, weights) -> None:
    """Write ``scores.parquet`` and ``rollouts.jsonl`` of a refresh into ``out_dir``, each file atomically."""
    _write_files(out_dir, score_columns(result, weights), rollout_records(result), None)


def write_summary(out_dir: str, summary: dict) -> None:
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2, default=_json_default))


def write_refresh_artifacts(out_dir: str, frame_columns: dict, records: list[dict], summary: dict) -> str:
    """Write ``scores.parquet``, ``rollouts.jsonl`` and ``summary.json`` into ``out_dir`` atomically.

    Everything is written into a temporary sibling directory first and renamed into place, so a crash leaves either
    the complete previous directory or none. Returns ``out_dir``.
    """
    with atomic_path(out_dir, directory=True) as tmp:
        _write_files(tmp, frame_columns, records, summary)
    return out_dir


def write_refresh_result(out_dir: str, result, weights, summary: dict) -> str:
    """:func:`write_refresh_artifacts` of a refresh's result and weights."""
    return write_refresh_artifacts(out_dir, score_columns(result, weights), rollout_records(result), summary)


def write_examples(path: str, texts) -> None:
    """``examples.jsonl``: ``(index, text)`` of each train example (read by the report)."""
    lines = [json.dumps({"index": int(i), "text": t}, ensure_ascii=False, default=str) for i, t in texts]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
