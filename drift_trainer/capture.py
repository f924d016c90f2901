"""Features captured during the ordinary training backward, so a refresh rescores only what is stale.

The training backward already runs every target module's output gradient past its input activations: projecting both
as :class:`~drift_trainer.features.ProjectedGradients` does gives each trained row's feature for two small matmuls per
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

from .features import ProjectedGradients

logger = logging.getLogger("drift_trainer")


class FeatureCache:
    """Latest feature of every train row, the global step it was computed at (-1: none) and its loss and token
    count. ``features`` comes from :func:`~drift_trainer.refresh.feature_storage` (memory-mapped when large)."""

    def __init__(self, num_rows: int, dim: int, memmap_dir: str | None = None, max_memory_mb: float | None = None):
        from .refresh import feature_storage

        self.features = feature_storage(num_rows, dim, memmap_dir, max_memory_mb)
        self.step = np.full(num_rows, -1, dtype=np.int64)
        self.loss = np.full(num_rows, np.nan)
        self.num_tokens = np.zeros(num_rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.step)

    def put(self, rows: np.ndarray, features: np.ndarray, loss: np.ndarray, num_tokens: np.ndarray, step: int) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.features[rows] = features
        self.loss[rows] = loss
        self.num_tokens[rows] = num_tokens
        self.step[rows] = int(step)

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
        self.put(rows, arrays["features"], arrays["loss"], arrays["num_tokens"], 0)
        self.step[rows] = arrays["step"]


@dataclass
class _Record:
    """One micro-batch being captured."""

    rows: np.ndarray  # (B,) train-row positions
    step: int
    blocks: list = field(default_factory=list)  # per module: (B, k, k) accumulated in its output-gradient hooks
    scale: torch.Tensor | None = None  # (B,) c_i n_i, set by the log-probability hook (runs first in the backward)
    valid: torch.Tensor | None = None  # (B,) rows whose gradient is a constant per token
    loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    hooks_fired: int = 0


class TrainCapture:
    """Forward hooks on the target modules that, while armed, project each trained row's gradient into ``cache``.

    Use: ``arm(rows, step)`` before the training forward of a micro-batch, ``watch(outputs)`` after it (registers the
    log-probability hook that reads the per-row loss scale), and ``flush()`` once its backward has run
    (``DriftSFTTrainer.training_step`` does; so do the next ``arm`` and every refresh). ``remove()`` takes the hooks
    off.
    """

    def __init__(self, projector: ProjectedGradients, cache: FeatureCache):
        self.projector = projector
        self.cache = cache
        self.rows_captured = 0  # rows written since the counter was last reset (a refresh resets it)
        self.rows_skipped = 0
        self.last_refresh_step = 0  # features from before this step are stale
        self._pending: list[_Record] = []
        self._armed: _Record | None = None
        self._projected: dict = {}
        self.disabled = False  # the loss does not go through log-probabilities: nothing can be captured
        self._handles = [m.register_forward_hook(self._forward_hook(i)) for i, m in enumerate(projector.modules)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._armed = None

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, i: int):
        def hook(module, inputs, output):
            rec = self._armed
            if rec is None or not torch.is_grad_enabled() or not getattr(output, "requires_grad", False):
                return
            if output.shape[0] != len(rec.rows):  # not the armed micro-batch's forward
                return
            x, p = inputs[0], self.projector.p_in[i]
            key = (id(x), id(p))
            if key not in self._projected:  # modules fed the same tensor (q/k/v) share one projection
                self._projected[key] = (x, x.detach().float() @ p.T)
            a = self._projected[key][1]
            p_out = self.projector.p_out[i]

            def grad_hook(g, rec=rec, a=a, p_out=p_out, i=i):
                rec.hooks_fired += 1
                if rec.scale is None:
                    return  # the loss does not go through the watched log-probabilities
                block = torch.einsum("btk,btl->bkl", g.float() @ p_out.T, a)
                if rec.blocks[i] is None:
                    rec.blocks[i] = block
                else:
                    rec.blocks[i] = rec.blocks[i] + block

            output.register_hook(grad_hook)

        return hook

    # ------------------------------------------------------------------ per micro-batch
    def arm(self, rows, step: int, device) -> None:
        """Capture the next training forward/backward of the train rows ``rows`` (positions in the train set)."""
        self.flush()
        if self.disabled:
            return
        self.projector._to(device)
        self._projected = {}
        rows = np.asarray(rows, dtype=np.int64)
        self._armed = _Record(rows=rows, step=int(step), blocks=[None] * len(self.projector.modules))
        self._pending.append(self._armed)

    def watch(self, outputs) -> None:
        """After the training forward: hook the log-probabilities the loss is built from (TRL's fused LM head)."""
        rec = self._armed
        if rec is None:
            return
        log_probs = getattr(outputs, "log_probs", None)
        mask = getattr(outputs, "label_mask", None)
        if log_probs is None or mask is None or not log_probs.requires_grad:
            self._pending.remove(rec)
            self.remove()
            self.disabled = True
            logger.warning(
                "DRIFT cannot capture features during training: the loss does not use the model's fused "
                "log-probabilities (e.g. compute_loss_func or label smoothing). Every refresh recomputes every row's "
                "feature instead, as with drift_capture_features=False."
            )
            return
        mask = mask.bool()
        ntok = mask.sum(1)
        rec.num_tokens = ntok.detach().cpu()
        rec.loss = (-(log_probs.detach().float() * mask).sum(1) / ntok.clamp(min=1)).cpu()

        def lp_hook(g):
            c = -g.detach().float()
            m = mask.to(c.dtype)
            mean = (c * m).sum(1) / ntok.clamp(min=1)
            spread = ((c - mean[:, None]).abs() * m).amax(1)
            ok = (ntok > 0) & torch.isfinite(mean) & (mean.abs() > 0) & (spread <= 1e-3 * mean.abs())
            rec.valid = ok
            rec.scale = torch.where(ok, mean * ntok, torch.ones_like(mean))

        log_probs.register_hook(lp_hook)

    def flush(self) -> None:
        """Write the features of every micro-batch whose backward has run into the cache."""
        self._armed = None
        self._projected = {}
        pending, self._pending = self._pending, []
        for rec in pending:
            if rec.scale is None or rec.hooks_fired == 0:
                self.rows_skipped += len(rec.rows)
                continue
            bsz = len(rec.rows)
            k = self.projector.k
            device = rec.scale.device
            blocks = [b if b is not None else torch.zeros(bsz, k, k, device=device) for b in rec.blocks]
            feats = torch.cat([b.reshape(bsz, -1) for b in blocks], dim=1) / rec.scale[:, None]
            valid = rec.valid & torch.isfinite(feats).all(1)
            # fully masked rows (no labelled token) are stored as zero features: scored 0, counted as masked
            masked = rec.num_tokens.to(device) == 0
            keep = (valid | masked).cpu().numpy()
            feats = torch.where(masked[:, None], torch.zeros_like(feats), feats)
            self.rows_skipped += int((~keep).sum())
            if keep.any():
                self.cache.put(
                    rec.rows[keep],
                    feats.detach().cpu().numpy()[keep],
                    rec.loss.numpy()[keep],
                    rec.num_tokens.numpy()[keep],
                    rec.step,
                )
                self.rows_captured += int(keep.sum())
