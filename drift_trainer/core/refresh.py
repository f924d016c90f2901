"""One refresh: rollouts -> signing -> features -> influence -> weights, with a timing table.

The pipeline is independent of the Trainer: ``DriftCallback`` runs it on schedule during training, and the ``refine``
command runs it once on a checkpoint. Ranks split the train rows (each rank's shard padded to equal batch counts, since
a forward under ZeRO-3 is a collective); only ``G``, the preconditioner and the scores cross ranks.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from drift_trainer.core.features import ProjectedGradients, collate_right, example_labels, length_sorted_batches
from drift_trainer.core.influence import precondition
from drift_trainer.core.rewards import resolve_reward_funcs
from drift_trainer.core.rollouts import Rollouts, generate_rollouts, sample_queries
from drift_trainer.core.signing import sign_rollouts
from drift_trainer.core.weighting import effective_sample_size, scores_to_weights, standardize
from drift_trainer.methods.scorers import scorer_of, scorer_scores, scorer_signs, scorer_target, uses_preconditioner


class Dist:
    """The few collectives a refresh needs, over ``torch.distributed`` when it is initialised (else identities)."""

    def __init__(self):
        import torch.distributed as td

        self.td = td if td.is_available() and td.is_initialized() else None
        self.world_size = self.td.get_world_size() if self.td else 1
        self.rank = self.td.get_rank() if self.td else 0
        self.device = torch.device("cpu")
        if self.td is not None and self.td.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def all_reduce_sum(self, x: np.ndarray) -> np.ndarray:
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        self.td.all_reduce(t)
        return t.cpu().numpy()

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        """Concatenate equal-length arrays from every rank along axis 0 (rank order)."""
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self.td.all_gather(parts, t)
        return torch.cat(parts).cpu().numpy()

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.td is None:
            return [obj]
        out = [None] * self.world_size
        self.td.all_gather_object(out, obj)
        return out

    def all_reduce_max(self, x: np.ndarray) -> np.ndarray:
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        self.td.all_reduce(t, op=self.td.ReduceOp.MAX)
        return t.cpu().numpy()

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        self.td.broadcast(t, src=0)
        return t.cpu().numpy()


@dataclass
class TrainView:
    """The train rows DRIFT scores: tokenized rows and, for each, its index in the user's ``train_dataset``."""

    rows: object  # indexable: rows[i] -> dict with input_ids and labels / completion_mask / assistant_masks
    user_index: np.ndarray  # (n_rows,) int
    num_examples: int  # rows in the user's train_dataset (weights are over these)

    def __len__(self) -> int:
        return len(self.user_index)

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
class RefreshResult:
    step: int
    scores: np.ndarray  # (num_examples,) debiased; 0 where not scored
    raw_scores: np.ndarray
    grad_norm: np.ndarray
    loss: np.ndarray  # mean completion-token loss of each example (nan where not scored)
    scored: np.ndarray  # bool: has a feature (not dropped by preparation, not fully masked)
    rollouts: Rollouts
    signs: np.ndarray
    contrast: bool
    timings: dict[str, float] = field(default_factory=dict)
    num_masked: int = 0
    num_recomputed: int = -1  # rows whose features this refresh computed (-1: every scored row)
    capture_agreement: float | None = None  # captured features: mean cosine of cached vs recomputed check rows
    capture_full: bool = False  # captured features: the check failed, every row was recomputed

    @property
    def rollout_accuracy(self) -> float:
        return float(np.mean(np.asarray(self.rollouts.rewards) >= self._threshold)) if len(self.rollouts) else 0.0

    _threshold: float = 0.5


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def progress_bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def feature_storage(n: int, dim: int, memmap_dir: str | None = None, max_memory_mb: float | None = None) -> np.ndarray:
    """A zeroed float32 ``(n, dim)`` array for features: in memory, or a memory-mapped file when ``memmap_dir`` is
    given or the array would exceed ``max_memory_mb`` (then in the system temp dir).

    The file is unlinked as soon as it is mapped, so it never outlives the array (POSIX); its pages are written back
    to disk under memory pressure instead of growing the process.
    """
    nbytes = int(n) * int(dim) * 4
    spill = memmap_dir is not None or (max_memory_mb is not None and nbytes > max_memory_mb * 2**20)
    if not spill or n == 0:
        return np.zeros((n, dim), dtype=np.float32)
    directory = memmap_dir if memmap_dir is not None else tempfile.gettempdir()
    os.makedirs(directory, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="drift-features-", suffix=".f32", dir=directory)
    try:
        arr = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, dim))
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:  # pragma: no cover - Windows keeps mapped files; the temp dir's cleanup takes it
            pass
    return arr


def _row_chunks(n: int, dim: int, target_bytes: int = 64 * 2**20):
    """Slices of at most ``target_bytes`` of float64 rows, so statistics of (memory-mapped) features stream."""
    step = max(1, target_bytes // max(8 * dim, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def refresh_subset(n_rows: int, max_examples: int | None, refresh_index: int, seed: int) -> np.ndarray:
    """Rows a refresh scores: all of them, or (``max_examples``) the next block of a seeded split of the rows into
    ``ceil(n_rows / max_examples)`` blocks, in turn, so every row is rescored once per cycle."""
    if max_examples is None or max_examples >= n_rows:
        return np.arange(n_rows)
    n_blocks = -(-n_rows // int(max_examples))
    perm = np.random.default_rng([int(seed), 31337]).permutation(n_rows)
    return np.sort(np.array_split(perm, n_blocks)[refresh_index % n_blocks])


class FeaturePass:
    """Features of many rows, in length-sorted batches, optionally sharded over ranks with equal batch counts.

    ``memmap_dir`` / ``max_memory_mb``: where the features of :meth:`run` live (see :func:`feature_storage`).
    """

    def __init__(
        self,
        projector: ProjectedGradients,
        pad_token_id: int,
        batch_size: int,
        fused_lm_head: bool = False,
        memmap_dir: str | None = None,
        max_memory_mb: float | None = None,
    ):
        self.projector = projector
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.fused_lm_head = fused_lm_head
        self.memmap_dir = memmap_dir
        self.max_memory_mb = max_memory_mb

    def run(self, model, rows: list[dict], num_batches: int | None = None, progress=None):
        """``(features (n, dim), loss (n,), num_tokens (n,))`` for ``rows`` (dicts with input_ids and labels).

        ``num_batches``: run at least this many forwards (extra ones repeat the last batch, results discarded).
        ``features`` is float32, a ``np.memmap`` when it spills (see :func:`feature_storage`).
        """
        n = len(rows)
        batches = length_sorted_batches(rows, self.batch_size)
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
                batch = collate_right([rows[i] for i in idx], self.pad_token_id, device)
                out = self.projector.compute(model, batch, fused_lm_head=self.fused_lm_head)
                if progress is not None:
                    progress.update(len(idx) if b < len(batches) else 0)
                if b < len(batches):
                    t = torch.as_tensor(idx)
                    feats[idx] = out.features.numpy()
                    loss[t], ntok[t] = out.loss, out.num_tokens
        finally:
            model.train(was_training)
        return feats, loss.numpy(), ntok.numpy()


def shard(n: int, rank: int, world_size: int) -> tuple[np.ndarray, int]:
    """Rows of this rank (strided) and the per-rank count every rank pads to."""
    mine = np.arange(rank, n, world_size)
    per_rank = (n + world_size - 1) // world_size
    return mine, per_rank


def run_refresh(
    *,
    args,
    step: int,
    model,
    tokenizer,
    view: TrainView,
    query_dataset,
    reward_funcs,
    projector: ProjectedGradients,
    generation_context=None,
    fused_lm_head: bool = False,
    dist: Dist | None = None,
    refresh_index: int = 0,
    seed: int = 0,
    progress: bool = True,
    capture=None,
) -> RefreshResult:
    """Run one refresh and return scores over the user's train examples (identical on every rank).

    ``generation_context``: a callable returning a context manager that yields the model to ``generate`` with (under
    ZeRO-3, TRL's gathered-weights context); default: ``model`` itself. ``capture``: a
    :class:`~drift_trainer.capture.TrainCapture` whose cache holds features captured during training; then only the
    stalest rows within ``drift_rescore_budget`` are recomputed and every row with a feature is scored.
    """
    dist = dist or Dist()
    if capture is not None:
        capture.flush(write=True)  # file the last training backward's features, disarm before this refresh's passes
    reward_funcs = resolve_reward_funcs(reward_funcs)
    show = progress and dist.rank == 0
    timings: dict[str, float] = {}
    # 1. rollouts: ranks share the generate calls (each seeded by its index) and gather, so all hold the same rollouts
    query_rows = sample_queries(query_dataset, args.drift_num_queries, seed + 7919 * (refresh_index + 1))
    n_batches = -(-len(query_rows) * args.drift_num_rollouts // args.drift_rollout_batch_size)
    n_calls = -(-n_batches // dist.world_size)  # generate calls per rank
    with _timed(timings, "rollouts"), progress_bar(show, n_calls, "drift rollouts") as bar:
        gen_ctx = generation_context() if generation_context is not None else nullcontext(model)
        with gen_ctx as gen_model:
            rollouts = generate_rollouts(
                gen_model,
                tokenizer,
                query_dataset,
                query_rows,
                args,
                reward_funcs,
                seed=seed + 104729 * (refresh_index + 1),
                progress=bar,
                dist=dist,
            )
    with _timed(timings, "signing"):
        signs, contrast = sign_rollouts(rollouts.rewards, rollouts.query_index, args)
        signs, contrast = scorer_signs(args, rollouts.rewards, signs, contrast)  # drift_scorer (scorers.py)
    if not contrast:
        # nothing to attribute towards: the caller keeps its previous weights, so skip the (costly) feature passes
        n = view.num_examples
        zeros = np.zeros(n)
        result = RefreshResult(
            step,
            zeros,
            zeros.copy(),
            zeros.copy(),
            np.full(n, np.nan),
            np.zeros(n, dtype=bool),
            rollouts,
            signs,
            contrast,
            timings,
            num_masked=0,
        )
        result._threshold = args.drift_reward_threshold
        return result
    fp = FeaturePass(
        projector,
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0),
        args.drift_feature_batch_size,
        fused_lm_head,
        memmap_dir=getattr(args, "drift_feature_memmap_dir", None),
        max_memory_mb=getattr(args, "drift_feature_memory_mb", None),
    )
    # 2. rollout (or reference-answer) features (every rank, identical) -> G
    with _timed(timings, "rollout_features"):
        target = scorer_target(
            args,
            feature_pass=fp,
            model=model,
            tokenizer=tokenizer,
            query_dataset=query_dataset,
            query_rows=query_rows,
            rollouts=rollouts,
            signs=signs,
            contrast=contrast,
            dim=projector.dim,
        )
    # 3. train features: all rows (or this refresh's block of drift_max_train_examples), sharded; or, with features
    # captured during training, only the stalest rows within drift_rescore_budget
    n_rows = len(view)
    if capture is None:
        subset = refresh_subset(n_rows, getattr(args, "drift_max_train_examples", None), refresh_index, seed)
        mine_pos, per_rank = shard(len(subset), dist.rank, dist.world_size)
        mine = subset[mine_pos]
        rows = view.fetch(mine)
        n_batches = -(-per_rank // args.drift_feature_batch_size)
        with _timed(timings, "features"), progress_bar(show, len(rows), "drift features") as bar:
            phi, loss, ntok = fp.run(model, rows, num_batches=n_batches, progress=bar)
        num_recomputed, capture_agreement, capture_full = -1, None, False
    else:
        with _timed(timings, "features"):
            cf = capture.features_for_refresh(fp, model, view, args, dist, step, seed + 7 * refresh_index, show)
        mine, phi, loss, ntok, per_rank, subset = cf.rows, cf.features, cf.loss, cf.num_tokens, cf.per_rank, cf.subset
        num_recomputed, capture_agreement, capture_full = cf.num_recomputed, cf.agreement, cf.full
    # 4. influence: preconditioner (all-reduced), raw scores and norms gathered
    with _timed(timings, "influence"):
        # statistics stream over row chunks: no float64 copy of the whole (possibly memory-mapped) feature matrix
        direction = target
        if uses_preconditioner(args):
            f_local = np.zeros((projector.dim, projector.dim))
            for sl in _row_chunks(len(phi), projector.dim):
                chunk = np.asarray(phi[sl], dtype=np.float64)
                f_local += chunk.T @ chunk
            f_sum = dist.all_reduce_sum(f_local)
            count = dist.all_reduce_sum(np.asarray([float(len(phi))]))[0]
            direction = precondition(target, "fisher", f_sum / max(count, 1.0), args.drift_damping)
        raw_local = np.zeros(len(phi))
        norm_local = np.zeros(len(phi))
        for sl in _row_chunks(len(phi), projector.dim):
            chunk = np.asarray(phi[sl], dtype=np.float64)
            raw_local[sl] = chunk @ direction
            norm_local[sl] = np.linalg.norm(chunk, axis=1)
        del phi
        pack = np.full((per_rank, 5), np.nan)
        pack[: len(mine), 0] = mine
        pack[: len(mine), 1] = raw_local
        pack[: len(mine), 2] = norm_local
        pack[: len(mine), 3] = loss
        pack[: len(mine), 4] = ntok
        gathered = dist.all_gather(pack)
        gathered = gathered[~np.isnan(gathered[:, 0])]
        row_ids = gathered[:, 0].astype(np.int64)
        raw = np.zeros(n_rows)
        norms = np.zeros(n_rows)
        losses = np.full(n_rows, np.nan)
        tokens = np.zeros(n_rows)
        raw[row_ids], norms[row_ids], losses[row_ids], tokens[row_ids] = gathered[:, 1:].T
        scores_rows = scorer_scores(args, raw, norms, losses, seed + 15485863 * (refresh_index + 1))
    # map rows -> user examples
    n = view.num_examples
    out = {k: np.zeros(n) for k in ("scores", "raw", "norm")}
    loss_user = np.full(n, np.nan)
    scored = np.zeros(n, dtype=bool)
    ui = view.user_index
    out["scores"][ui], out["raw"][ui], out["norm"][ui], loss_user[ui] = scores_rows, raw, norms, losses
    scored[ui] = tokens > 0
    for k in ("scores", "raw", "norm"):
        out[k][~scored] = 0.0
    in_block = np.zeros(
        n, dtype=bool
    )  # rows this refresh scored or tried to (all rows unless drift_max_train_examples)
    in_block[ui[subset]] = True
    dropped = np.ones(n, dtype=bool)  # user examples SFT preparation dropped (no row at all)
    dropped[ui] = False
    result = RefreshResult(
        step=step,
        scores=out["scores"],
        raw_scores=out["raw"],
        grad_norm=out["norm"],
        loss=loss_user,
        scored=scored,
        rollouts=rollouts,
        signs=signs,
        contrast=contrast,
        timings=timings,
        num_masked=int((in_block & ~scored).sum() + dropped.sum()),
        num_recomputed=num_recomputed,
        capture_agreement=capture_agreement,
        capture_full=capture_full,
    )
    result._threshold = args.drift_reward_threshold
    return result


def new_weights(result: RefreshResult, previous_smoothed: np.ndarray | None, previous_weights, args):
    """Smoothed standardised scores and the new weights (unscored examples keep their previous weight)."""
    if scorer_of(args) == "uniform":  # the no-reweighting baseline: weights stay exactly 1
        return np.zeros_like(result.scores), np.ones_like(result.scores)
    z = standardize(result.scores, result.scored)
    known = result.scored
    partial = getattr(args, "drift_max_train_examples", None) is not None or result.num_recomputed >= 0
    if previous_smoothed is not None and partial:
        # block rescoring / captured features: examples this refresh did not score keep their previous smoothed score
        # and still count
        previous_smoothed = np.asarray(previous_smoothed, dtype=np.float64)
        known = result.scored | (previous_smoothed != 0)
        ema = args.drift_score_ema
        z = np.where(result.scored, ema * previous_smoothed + (1 - ema) * z, previous_smoothed)
        weights = scores_to_weights(z, args, known)
        if previous_weights is not None:
            weights = np.where(known, weights, previous_weights)
        return z, weights
    if previous_smoothed is not None and args.drift_score_ema > 0:
        z = np.where(result.scored, args.drift_score_ema * previous_smoothed + (1 - args.drift_score_ema) * z, 0.0)
    weights = scores_to_weights(z, args, result.scored)
    if previous_weights is not None:
        weights = np.where(result.scored, weights, previous_weights)
    return z, weights


def refresh_summary(result: RefreshResult, weights: np.ndarray, args) -> dict:
    """Metrics of a refresh, keyed as they are logged (``drift/*``)."""
    rewards = np.asarray(result.rollouts.rewards, dtype=np.float64)
    return {
        "drift/rollout_accuracy": result.rollout_accuracy,
        "drift/reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "drift/ess": effective_sample_size(weights),
        "drift/frac_positive": float((result.scores[result.scored] > 0).mean()) if result.scored.any() else 0.0,
        "drift/weight_max": float(weights.max()),
        "drift/refresh_seconds": float(sum(result.timings.values())),
        **({"drift/capture_agreement": result.capture_agreement} if result.capture_agreement is not None else {}),
    }
