"""Features of many rows: the train rows DRIFT scores (:class:`TrainView`) and the batched pass over them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from drift_trainer.core.features import ProjectedGradients, collate_right, example_labels
from drift_trainer.core.storage import feature_storage


@dataclass
class TrainView:
    """The train rows DRIFT scores: tokenized rows and, for each, its index in the user's ``train_dataset``."""

    rows: object  # indexable: rows[i] -> dict with input_ids and labels / completion_mask / assistant_masks
    user_index: np.ndarray  # (n_rows,) int
    num_examples: int  # rows in the user's train_dataset (weights are over these)

    def __len__(self) -> int:
        return len(self.user_index)

    @classmethod
    def from_dataset(cls, dataset, num_examples: int | None = None, index_column: str = "drift_index") -> TrainView:
        """The view of a tokenized ``datasets.Dataset`` (or a list of rows): its ``index_column`` maps rows to user
        examples (default: row ``i`` is example ``i``); ``num_examples`` defaults to the largest index + 1."""
        n_rows = len(dataset)
        if hasattr(dataset, "column_names") and index_column in dataset.column_names:
            user_index = np.asarray(dataset[index_column], dtype=np.int64)
        else:
            user_index = np.arange(n_rows)
        rows = dataset
        if hasattr(dataset, "select_columns"):
            keep = [
                c for c in ("input_ids", "labels", "completion_mask", "assistant_masks") if c in dataset.column_names
            ]
            if "input_ids" not in keep:
                raise ValueError(
                    "DRIFT scores tokenized examples: the trainer's train_dataset has no `input_ids` column "
                    f"(columns: {dataset.column_names}). Tokenize it first, or use DriftSFTTrainer."
                )
            rows = dataset.select_columns(keep).with_format("python")
        total = int(num_examples if num_examples is not None else (user_index.max() + 1 if n_rows else 0))
        return cls(rows=rows, user_index=user_index, num_examples=total)

    def fetch(self, indices: np.ndarray) -> list[dict]:
        """Rows ``indices`` as ``{"input_ids", "labels"}`` dicts (one batched read for a ``datasets.Dataset``)."""
        source = (
            self.rows.select(indices.tolist()) if hasattr(self.rows, "select") else (self.rows[int(i)] for i in indices)
        )
        out = []
        for r in source:
            r = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
            out.append({"input_ids": list(r["input_ids"]), "labels": example_labels(r)})
        return out


@dataclass
class TrainFeatures:
    """This rank's train features for one refresh, and which rows they are (from a feature pass, or from the
    features captured in training: :meth:`~drift_trainer.core.capture.TrainCapture.features_for_refresh`)."""

    rows: np.ndarray  # train-row positions this rank scores
    phi: object  # their features, (len(rows), dim), possibly memory-mapped
    loss: np.ndarray
    ntok: np.ndarray
    per_rank: int  # most rows any rank scores (for the gather)
    subset: np.ndarray  # rows this refresh scored or tried to (all ranks)
    num_recomputed: int = -1  # rows whose features were computed (-1: every scored row)
    agreement: float | None = None  # captured features: mean cosine of cached vs recomputed check rows
    full: bool = False  # captured features: the check failed and every row was recomputed
    stale: np.ndarray | None = None  # captured features: (n_rows,) bool, the feature is from before the last refresh


def progress_bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def refresh_subset(n_rows: int, max_examples: int | None, refresh_index: int, seed: int) -> np.ndarray:
    """Rows a refresh scores: all of them, or (``max_examples``) the next block of a seeded split of the rows into
    ``ceil(n_rows / max_examples)`` blocks, in turn, so every row is rescored once per cycle."""
    if max_examples is None or max_examples >= n_rows:
        return np.arange(n_rows)
    n_blocks = -(-n_rows // int(max_examples))
    perm = np.random.default_rng([int(seed), 31337]).permutation(n_rows)
    return np.sort(np.array_split(perm, n_blocks)[refresh_index % n_blocks])


@dataclass(frozen=True)
class RowFormat:
    """How a feature pass batches rows and which loss its features are gradients of.

    ``collate(rows, pad_token_id, device) -> batch``, ``length(row) -> int`` (for length-sorted batches) and
    ``loss_fn(model, batch, fused_lm_head) -> (loss (E,), num_tokens (E,))`` (None: each row's mean token loss).
    The default is a language-modelling row (``input_ids``, ``labels``); preference pairs bring their own.
    """

    collate: Callable = collate_right
    length: Callable = lambda row: len(row["input_ids"])  # noqa: E731 - a default field value
    loss_fn: Callable | None = None


LM_ROWS = RowFormat()


@dataclass
class FeaturePass:
    """Features of many rows, in length-sorted batches, optionally sharded over ranks with equal batch counts.

    ``memmap_dir`` / ``max_memory_mb``: where the features of :meth:`run` live (see :func:`feature_storage`).
    ``row_format``: how rows are batched and which loss is differentiated (default: language-modelling rows).
    """

    projector: ProjectedGradients
    pad_token_id: int
    batch_size: int
    fused_lm_head: bool = False
    memmap_dir: str | None = None
    max_memory_mb: float | None = None
    row_format: RowFormat = LM_ROWS

    def run(self, model, rows: list[dict], num_batches: int | None = None, progress=None):
        """``(features (n, dim), loss (n,), num_tokens (n,))`` for ``rows`` (dicts with input_ids and labels).

        ``num_batches``: run at least this many forwards (extra ones repeat the last batch, results discarded).
        ``features`` is float32, a ``np.memmap`` when it spills (see :func:`feature_storage`).
        """
        n = len(rows)
        order = np.argsort([self.row_format.length(r) for r in rows], kind="stable")  # shortest first: little padding
        batches = [order[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        total = max(len(batches), num_batches or 0) if batches else 0
        feats = feature_storage(n, self.projector.dim, self.memmap_dir, self.max_memory_mb)
        loss = torch.zeros(n)
        ntok = torch.zeros(n, dtype=torch.long)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # no dropout; activation checkpointing layers do not checkpoint in eval mode
        try:
            for b in range(total):
                idx = batches[min(b, len(batches) - 1)]  # spare forwards (b >= len(batches)) repeat the last batch
                batch = self.row_format.collate([rows[i] for i in idx], self.pad_token_id, device)
                out = self.projector.compute(model, batch, self.fused_lm_head, self.row_format.loss_fn)
                if progress is not None:
                    progress.update(len(idx) if b < len(batches) else 0)
                if b < len(batches):
                    t = torch.as_tensor(idx)
                    feats[idx] = out.features.numpy()
                    loss[t], ntok[t] = out.loss, out.num_tokens
        finally:
            model.train(was_training)
        return feats, loss.numpy(), ntok.numpy()
