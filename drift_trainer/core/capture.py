"""Features captured during the ordinary training backward, so a refresh rescores only what is stale.

The training backward already runs every target module's output gradient past its input activations: projecting both
as :class:`~drift_trainer.core.features.ProjectedGradients` does gives each trained row's feature for two small matmuls per
module, with no extra forward or backward. What the training loss adds is a per-row scale: its gradient reaching row
``i``'s token log-probabilities is ``-c_i`` at each of its ``n_i`` labelled tokens (``c_i`` folds in the token-mean
normalisation, gradient accumulation, a mixed-precision loss scale, DeepSpeed's scaling and any per-example loss
weight). A hook on those log-probabilities reads ``c_i``, and ``captured_i / (c_i n_i)`` is exactly the feature of
row ``i``'s mean token loss that a feature pass computes (at the weights of that training step).

A row whose log-probability gradient is not one constant over its tokens (a loss other than plain NLL, e.g. DFT) or
is zero (loss weight 0) or not finite (an fp16 overflow step) is not captured; neither is anything when the loss does
not go through ``log_probs`` (``compute_loss_func``, label smoothing). A refresh recomputes such rows as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from drift_trainer.core.dist import shard
from drift_trainer.core.feature_pass import TrainFeatures, progress_bar
from drift_trainer.core.features import ProjectedGradients, float32_math
from drift_trainer.core.params import CaptureParams
from drift_trainer.core.storage import feature_storage

logger = logging.getLogger("drift_trainer")
WRITE_EVERY = 16  # captured micro-batches buffered before one bulk write into the cache


class FeatureCache:
    """Latest feature of every train row, the global step it was computed at (-1: none) and its loss and token
    count. ``features`` comes from :func:`~drift_trainer.core.storage.feature_storage` (memory-mapped when large)."""

    def __init__(self, num_rows: int, dim: int, memmap_dir: str | None = None, max_memory_mb: float | None = None):
        self.features = feature_storage(num_rows, dim, memmap_dir, max_memory_mb)
        self.step = np.full(num_rows, -1, dtype=np.int64)
        self.loss = np.full(num_rows, np.nan)
        self.num_tokens = np.zeros(num_rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.step)

    def put(self, rows: np.ndarray, features: np.ndarray, loss: np.ndarray, num_tokens: np.ndarray, step) -> None:
        """Store rows' features (``step``: one global step, or one per row)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.features[rows] = features
        self.loss[rows] = loss
        self.num_tokens[rows] = num_tokens
        self.step[rows] = np.asarray(step, dtype=np.int64)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The captured rows only (for a checkpoint)."""
        rows = np.flatnonzero(self.step >= 0)
        return {
            "rows": rows,
            "features": np.asarray(self.features[rows], dtype=np.float32),
            "step": self.step[rows],
            "loss": self.loss[rows],
            "num_tokens": self.num_tokens[rows],
        }

    def load_arrays(self, arrays) -> None:
        rows = np.asarray(arrays["rows"], dtype=np.int64)
        if len(rows) and (rows.max() >= len(self) or arrays["features"].shape[1] != self.features.shape[1]):
            raise ValueError(
                "The checkpoint's DRIFT feature cache does not match this run (different train set or projection): "
                "delete drift_features.npz from the checkpoint to recompute the features."
            )
        self.step[:] = -1
        self.put(rows, arrays["features"], arrays["loss"], arrays["num_tokens"], arrays["step"])


class _CachedRows:
    """Rows ``index`` of a feature cache, read a slice at a time (``len`` and ``[slice]`` like an array)."""

    def __init__(self, features, index: np.ndarray):
        self.features, self.index = features, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, sl):
        return self.features[self.index[sl]]


def rescore_budget(rows_trained: int, budget: float) -> int:
    """Rows a refresh recomputes under ``drift_rescore_budget``: ``ceil(budget x rows trained since the last
    refresh)``."""
    return int(np.ceil(float(budget) * max(int(rows_trained), 0) - 1e-9))


def stale_order(step_of_row: np.ndarray, seed: int) -> np.ndarray:
    """Rows stalest first: never captured (step -1) first, then by the step their feature is from; ties in a seeded
    random order (the same on every rank)."""
    tiebreak = np.random.default_rng([int(seed), 4099]).permutation(len(step_of_row))
    return tiebreak[np.argsort(step_of_row[tiebreak], kind="stable")]


def _recompute(fp, model, view, dist, cache, mine: np.ndarray, spare: np.ndarray, step: int, desc: str, show: bool):
    """Features of this rank's rows ``mine`` into ``cache`` (at ``step``); every rank runs the same number of forwards
    (a rank with fewer rows repeats a spare one: forwards are collectives under ZeRO-3). Returns the features."""
    per_rank = int(dist.all_reduce_max(np.asarray([float(len(mine))]))[0])
    if per_rank == 0:
        return np.zeros((0, cache.features.shape[1]), dtype=np.float32)
    rows = view.fetch(mine if len(mine) else spare[:1])
    with progress_bar(show, len(mine), desc) as bar:
        phi, loss, ntok = fp.run(model, rows, num_batches=-(-per_rank // fp.batch_size), progress=bar)
    phi = np.asarray(phi[: len(mine)])
    if len(mine):
        cache.put(mine, phi, loss[: len(mine)], ntok[: len(mine)], step)
    return phi


@dataclass
class _Record:
    """One micro-batch being captured."""

    rows: np.ndarray  # (B,) train-row positions
    step: int
    inputs: dict = field(default_factory=dict)  # projected-input key -> (B, T, k) projected input (P_in a)
    grads: list = field(default_factory=list)  # (module, input key, (B, T, k) projected output gradient P_out d)
    scale: torch.Tensor | None = None  # (B,) c_i n_i, set by the log-probability hook (runs first in the backward)
    valid: torch.Tensor | None = None  # (B,) rows whose gradient is a constant per token
    loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


class TrainCapture:
    """Forward hooks on the target modules that, while armed, project each trained row's gradient into ``cache``.

    Use: ``arm(rows, step)`` before the training forward of a micro-batch, ``watch(log_probs, mask)`` after it (registers the
    log-probability hook that reads the per-row loss scale), ``flush()`` once its backward has run
    (``DriftSFTTrainer.training_step`` does; so does the next ``arm``), and ``flush(write=True)`` before reading the
    cache (every refresh and checkpoint does). ``remove()`` takes the hooks off.
    """

    def __init__(self, projector: ProjectedGradients, cache: FeatureCache):
        self.projector = projector
        self.cache = cache
        self.rows_captured = 0  # rows written since the counter was last reset (a refresh resets it)
        self.rows_skipped = 0
        self.last_refresh_step = 0  # features from before this step are stale
        self.stale_checks = 0  # consecutive refreshes whose agreement check failed
        self._pending: list[_Record] = []
        self._ready: list = []  # (record, raw features) waiting to be written to the cache
        self._armed: _Record | None = None
        self._alive: list = []
        self.disabled = False  # the loss does not go through log-probabilities: nothing can be captured
        self._handles = [m.register_forward_hook(self._forward_hook(i)) for i, m in enumerate(projector.modules)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._armed = None

    def disable(self) -> None:
        """Stop capturing for good (hooks off); refreshes then recompute every row."""
        self.remove()
        self.disabled = True

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """The cache and counters as arrays for a checkpoint (read back by :meth:`restore`)."""
        self.flush(write=True)
        arrays = self.cache.state_arrays()
        arrays["rows_trained"] = np.asarray([self.rows_captured + self.rows_skipped])
        arrays["last_refresh_step"] = np.asarray([self.last_refresh_step])
        arrays["stale_checks"] = np.asarray([self.stale_checks, int(self.disabled)])
        return arrays

    def restore(self, arrays) -> None:
        """Continue from :meth:`checkpoint_arrays` (a resumed run)."""
        self.cache.load_arrays(arrays)
        self.rows_captured, self.rows_skipped = int(arrays["rows_trained"][0]), 0
        self.last_refresh_step = int(arrays["last_refresh_step"][0])
        self.stale_checks, disabled = (int(v) for v in arrays["stale_checks"])
        if disabled:  # capture had turned itself off (or could not run) before the checkpoint
            self.disable()

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, i: int):
        projector = self.projector
        group = projector.input_group(i)  # modules sharing one P_in (one input width) share a group

        def hook(module, inputs, output):
            rec = self._armed
            if rec is None or not torch.is_grad_enabled() or not getattr(output, "requires_grad", False):
                return
            if output.shape[0] != len(rec.rows):  # not the armed micro-batch's forward
                return
            x = inputs[0]
            key = (id(x), group)
            if key not in rec.inputs:  # modules fed the same tensor (q/k/v) share one projection
                rec.inputs[key] = projector.project_input(x, i)  # (B, T, k) float32, whatever the autocast
                self._alive.append(x)  # hold x so its id is not reused while this record is open
            grads = rec.grads

            def grad_hook(g):
                if rec.scale is not None:  # else the loss does not go through the watched log-probabilities
                    grads.append((i, key, projector.project_output_grad(g, i)))

            output.register_hook(grad_hook)

        return hook

    # ------------------------------------------------------------------ per micro-batch
    def arm(self, rows, step: int) -> None:
        """Capture the next training forward/backward of the train rows ``rows`` (positions in the train set)."""
        self.flush()
        if self.disabled:
            return
        rows = np.asarray(rows, dtype=np.int64)
        self._armed = _Record(rows=rows, step=int(step))
        self._pending.append(self._armed)

    def watch(self, log_probs: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """After the training forward: hook the per-token log-probabilities ``(B, T)`` the loss is built from (TRL's
        fused LM head) and their ``label_mask``; None when the loss did not use them (capture then turns off)."""
        rec = self._armed
        if rec is None:
            return
        if log_probs is None or mask is None or not log_probs.requires_grad:
            self._pending.remove(rec)
            self.disable()
            logger.warning(
                "DRIFT cannot capture features during training: the loss does not use the model's fused "
                "log-probabilities (e.g. compute_loss_func or label smoothing). Every refresh recomputes every row's "
                "feature instead, as with drift_capture_features=False."
            )
            return
        mask = mask.bool()
        ntok = mask.sum(1)
        rec.num_tokens = ntok.detach()  # kept on the device: moved to the host once per bulk write
        rec.loss = -(log_probs.detach().float() * mask).sum(1) / ntok.clamp(min=1)

        def lp_hook(g):
            c = -g.detach().float()
            m = mask.to(c.dtype)
            mean = (c * m).sum(1) / ntok.clamp(min=1)
            spread = ((c - mean[:, None]).abs() * m).amax(1)
            ok = (ntok > 0) & torch.isfinite(mean) & (mean.abs() > 0) & (spread <= 1e-3 * mean.abs())
            rec.valid = ok
            rec.scale = torch.where(ok, mean * ntok, torch.ones_like(mean))

        log_probs.register_hook(lp_hook)

    def flush(self, write: bool = False) -> None:
        """File every micro-batch whose backward has run: its features are computed now and reach the cache in bulk,
        every ``WRITE_EVERY`` micro-batches and whenever ``write`` (a refresh, a checkpoint, the end of training)."""
        self._armed = None
        self._alive = []
        pending, self._pending = self._pending, []
        for rec in pending:
            if rec.scale is None or not rec.grads:
                self.rows_skipped += len(rec.rows)
                continue
            self._ready.append((rec, self._features(rec)))
        if self._ready and (write or len(self._ready) >= WRITE_EVERY):
            self._write()

    def _write(self) -> None:
        ready, self._ready = self._ready, []
        recs = [rec for rec, _ in ready]
        feats = torch.cat([f for _, f in ready]) / torch.cat([rec.scale for rec in recs])[:, None]
        valid = (torch.cat([rec.valid for rec in recs]) & torch.isfinite(feats).all(1)).cpu().numpy()
        ntok = torch.cat([rec.num_tokens for rec in recs]).cpu().numpy()
        # fully masked rows (no labelled token: no loss, no gradient) keep their zero feature: scored 0, counted masked
        keep = valid | (ntok == 0)
        self.rows_skipped += int((~keep).sum())
        self.rows_captured += int(keep.sum())
        if keep.any():
            # in training order: a row trained twice in the buffer keeps its newest feature (the last write wins)
            self.cache.put(
                np.concatenate([rec.rows for rec in recs])[keep],
                feats.cpu().numpy()[keep],
                torch.cat([rec.loss for rec in recs]).cpu().numpy()[keep],
                ntok[keep],
                np.concatenate([np.full(len(rec.rows), rec.step) for rec in recs])[keep],
            )

    def _features(self, rec: _Record) -> torch.Tensor:
        """``(B, modules * k * k)``: each module's ``sum_t (P_out d_t)(P_in a_t)^T``, one batched matmul per shared
        input (the projected output gradients of q/k/v side by side against their common projected input)."""
        k = self.projector.k
        n_mod = len(self.projector.modules)
        by_input: dict = {}
        for i, key, d in sorted(rec.grads, key=lambda item: item[0]):
            by_input.setdefault(key, []).append((i, d))
        bsz = len(rec.rows)
        parts, order = [], []
        for key, items in by_input.items():
            d = torch.cat([g for _, g in items], dim=2) if len(items) > 1 else items[0][1]  # (B, T, m k)
            with float32_math(d.device):  # both operands are float32 projections: keep the product float32
                parts.append(torch.bmm(d.transpose(1, 2), rec.inputs[key]).reshape(bsz, -1))
            order.extend(i for i, _ in items)
        if order == list(range(n_mod)):  # every module once, groups in module order: the usual case
            return torch.cat(parts, dim=1)
        blocks = torch.zeros(bsz, n_mod, k * k, device=parts[0].device)
        index = torch.tensor(order, device=blocks.device)
        blocks.index_add_(1, index, torch.cat(parts, dim=1).view(bsz, len(order), k * k))  # repeats add up
        return blocks.reshape(bsz, -1)

    # ------------------------------------------------------------------ at a refresh
    def features_for_refresh(self, fp, model, view, params, dist, step, seed, show) -> TrainFeatures:
        """Measure how far cached features still agree with the model, recompute the stalest rows within the budget
        (or every row when the agreement is below ``drift_capture_min_agreement``) into ``self.cache``, then hand each
        rank the rows whose latest feature it holds (a row trained on several ranks is scored once, by the rank that
        saw it last). A row is stale when its feature is from before the previous refresh; the agreement is measured
        on a sample of stale rows (of any cached rows when none is stale) and returned with the stale rows, whose
        scores the caller shrinks by it."""
        params = CaptureParams.of(params)
        cache = self.cache
        self.flush(write=True)
        trained = dist.all_reduce_sum(np.asarray([float(self.rows_captured + self.rows_skipped)]))[0]
        self.rows_captured = self.rows_skipped = 0
        ws, rank = dist.world_size, dist.rank

        def latest() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            # (step, owner) of every row's newest feature across ranks in one all-reduce: step * ws + (ws - 1 - rank)
            key = dist.all_reduce_max(
                np.where(cache.step >= 0, cache.step.astype(np.float64) * ws + (ws - 1 - rank), -1.0)
            )
            step_of_row = np.where(key >= 0, np.floor(key / ws), -1).astype(np.int64)
            owner = np.where(key >= 0, ws - 1 - np.mod(key, ws), -1).astype(np.int64)
            return key, step_of_row, owner

        key, step_of_row, owner = latest()
        # 1. agreement: recompute a seeded sample of stale cached rows (on the rank holding each) and compare
        agreement = None
        cached = np.flatnonzero(step_of_row >= 0)
        stale_rows = cached[step_of_row[cached] < self.last_refresh_step]
        pool = stale_rows if len(stale_rows) else cached
        n_check = min(int(params.capture_check_rows), len(pool))
        sample = np.zeros(0, dtype=np.int64)
        if n_check > 0:
            sample = np.sort(np.random.default_rng([int(seed), 8191]).choice(pool, n_check, replace=False))
            mine = sample[owner[sample] == rank]
            before = np.asarray(cache.features[mine], dtype=np.float64)
            after = _recompute(fp, model, view, dist, cache, mine, sample, step, "drift features (check)", show)
            na, nb = np.linalg.norm(after, axis=1), np.linalg.norm(before, axis=1)
            live = (na > 0) & (nb > 0)
            cos = (after[live] * before[live]).sum(1) / (na[live] * nb[live])
            total = dist.all_reduce_sum(np.asarray([cos.sum(), float(live.sum())]))
            agreement = float(total[0] / total[1]) if total[1] > 0 else None
            step_of_row[sample] = step
        # 2. recompute: the stalest rows within the budget (stalest first, so over several refreshes every row is
        # recomputed in turn), or every other row when the cache agrees less than drift_capture_min_agreement
        full = agreement is not None and agreement < params.capture_min_agreement
        if full:
            recompute = np.setdiff1d(np.arange(len(cache)), sample)
        else:
            # stale: never captured, or captured before the previous refresh (rows trained since are fresh)
            order = stale_order(step_of_row, seed)
            order = order[step_of_row[order] < self.last_refresh_step]
            recompute = np.sort(order[: rescore_budget(trained, params.rescore_budget)])
        mine_pos, _ = shard(len(recompute), rank, ws)
        _recompute(
            fp, model, view, dist, cache, recompute[mine_pos], recompute, step, "drift features (stale rows)", show
        )
        key, step_of_row, owner = latest()
        owned = np.flatnonzero(owner == rank)
        stale = (step_of_row >= 0) & (step_of_row < self.last_refresh_step)  # still stale after the recompute
        self.last_refresh_step = int(step)
        return TrainFeatures(
            rows=owned,
            phi=_CachedRows(cache.features, owned),
            loss=cache.loss[owned],
            ntok=cache.num_tokens[owned],
            per_rank=int(dist.all_reduce_max(np.asarray([float(len(owned))]))[0]),
            subset=np.flatnonzero(key >= 0),
            num_recomputed=len(recompute) + len(sample),
            agreement=agreement,
            full=full,
            stale=stale,
        )
