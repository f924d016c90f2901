"""DriftSampler: a lazy, deterministic, reweightable train sampler.

Every draw is a pure function of (seed, epoch, position, weights in force at that position), so

- ``update(weights)`` takes effect at the next position drawn, mid-epoch (after the dataloader's look-ahead);
- every rank yields the same stream (accelerate shards the batches of that one stream);
- a resumed run replays exactly: the sampler records at which position of which epoch each weight version took
  effect, and ``state_dict()`` carries that schedule and every version's weights.

While the weights are uniform it yields the permutation ``torch.randperm(n, generator=seed + epoch)``: exactly the
order accelerate's ``SeedableRandomSampler`` gives a plain run with the same seed, so DRIFT with uniform weights
trains on exactly the batches plain SFT would. Once weighted,
position ``p`` draws ``searchsorted(cumsum(w), u_p * sum(w))`` with ``u_p`` from a generator seeded by
(seed, epoch, chunk of p): with replacement, chunk by chunk (``mode="replacement"``). With ``mode="systematic"`` a
weight version that takes effect at position ``p`` fills the rest of the epoch, ``m = n - p`` positions, by systematic
sampling (``m`` evenly spaced points on ``cumsum(w)`` from one seeded offset), shuffled: row ``i`` is drawn
``floor`` or ``ceil`` of ``m w_i / sum(w)`` times, so at mean-1 weights a weight-1 row is seen once per epoch, as in
plain SFT. ``mode="ordered"`` keeps plain SFT's order instead: each row's count for the whole epoch is its share of
the weight, ``n w_i / sum(w)``; the rows' counts still owed for the rest of the epoch (less what was already drawn in
it) are systematically sampled along the epoch's permutation, the rows not yet reached first, and each row is yielded
in its place, so where the weights are near 1 the batches stay plain SFT's batches. ``len()`` never changes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

CHUNK = 1024
MODES = ("replacement", "systematic", "ordered")


class DriftSampler(Sampler[int]):
    """Sampler over ``num_samples`` rows drawn by per-row ``weights`` that may change while it is being iterated."""

    def __init__(self, num_samples: int, seed: int = 0, weights: np.ndarray | None = None, mode: str = "replacement"):
        if num_samples < 1:
            raise ValueError(f"DriftSampler needs at least one row; got num_samples={num_samples}.")
        if mode not in MODES:
            raise ValueError(f"DriftSampler mode must be one of {MODES}; got {mode!r} (drift_sampling).")
        self.mode = mode
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.versions: list[np.ndarray | None] = [None]  # None = uniform (permutation)
        self.schedule: dict[int, list[tuple[int, int]]] = {}  # epoch -> [(position, version)]
        self._pending: int | None = None
        self._position = 0
        self._iterating: int | None = None
        if weights is not None:
            self.update(weights)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def version(self) -> int:
        """The newest weight version (0: uniform)."""
        return len(self.versions) - 1

    def _start_version(self, epoch: int) -> int:
        """The version in force when ``epoch`` starts: the last one recorded in an earlier epoch."""
        earlier = [e for e in self.schedule if e < epoch and self.schedule[e]]
        return self.schedule[max(earlier)][-1][1] if earlier else 0

    @property
    def weights(self) -> np.ndarray:
        """The latest weights (ones while uniform)."""
        w = self.versions[self.version]
        return np.ones(self.num_samples) if w is None else w

    def update(self, weights) -> int:
        """Use ``weights`` (one non-negative float per row) from the next position drawn. Returns the new version.

        During an iteration the change is recorded at the next position of the current epoch; between iterations it
        applies from position 0 of the next one.
        """
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != self.num_samples:
            raise ValueError(f"DriftSampler.update got {w.shape[0]} weights for {self.num_samples} rows.")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("DriftSampler weights must be finite, non-negative and not all zero.")
        self.versions.append(None if np.all(w == w[0]) else w.copy())  # equal weights: the plain permutation
        version = len(self.versions) - 1
        if self._iterating is not None:
            self.schedule.setdefault(self._iterating, []).append((self._position + 1, version))
        else:
            self._pending = version
        return version

    def _generator(self, *parts: int) -> torch.Generator:
        mixed = np.random.SeedSequence([self.seed, *parts]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if self._pending is not None:
            entries = self.schedule.setdefault(epoch, [])
            entries[:] = [e for e in entries if e[0] > 0]
            entries.insert(0, (0, self._pending))
            self._pending = None
        recorded = self.schedule.setdefault(epoch, [])  # live: update() appends while we iterate
        version = self._start_version(epoch)
        perm = cdf = u = block = None
        start = r = 0
        # this epoch's draws so far: only mode="ordered" owes rows what they have not yet been drawn
        drawn = np.zeros(self.num_samples, dtype=np.int64) if self.mode == "ordered" else None
        self._iterating = epoch
        try:
            for pos in range(self.num_samples):
                self._position = pos
                changed = False
                while r < len(recorded) and recorded[r][0] <= pos:
                    version, r, changed = recorded[r][1], r + 1, True
                w = self.versions[version]
                if perm is None and (w is None or self.mode == "ordered"):
                    gen = torch.Generator().manual_seed(self.seed + epoch)  # as SeedableRandomSampler
                    perm = torch.randperm(self.num_samples, generator=gen).numpy()
                if w is None:
                    row = int(perm[pos])
                    if drawn is not None:
                        drawn[row] += 1
                    yield row
                    continue
                if cdf is None or changed:
                    cdf = np.cumsum(w)
                    start = pos
                    if self.mode == "systematic":
                        block = self._systematic(cdf, epoch, pos)
                    elif self.mode == "ordered":
                        block = self._ordered(w, perm, drawn, epoch, pos)
                    else:
                        block = None
                if block is not None:
                    row = int(block[pos - start])
                    if drawn is not None:
                        drawn[row] += 1
                    yield row
                    continue
                chunk, offset = divmod(pos, CHUNK)
                if offset == 0 or u is None:
                    u = torch.rand(CHUNK, generator=self._generator(epoch, chunk), dtype=torch.float64).numpy()
                yield int(min(np.searchsorted(cdf, u[offset] * cdf[-1], side="right"), self.num_samples - 1))
        finally:
            if self._iterating == epoch:
                self._iterating = None

    def _systematic(self, cdf: np.ndarray, epoch: int, start: int) -> np.ndarray:
        """Rows for positions ``start..n-1``: ``m`` evenly spaced points on ``cdf`` from a seeded offset, shuffled."""
        m = self.num_samples - start
        gen = self._generator(epoch, start, 1)
        offset = float(torch.rand(1, generator=gen, dtype=torch.float64))
        points = (offset + np.arange(m)) / m * cdf[-1]
        rows = np.minimum(np.searchsorted(cdf, points, side="right"), self.num_samples - 1)
        return rows[torch.randperm(m, generator=gen).numpy()]

    def _ordered(self, w: np.ndarray, perm: np.ndarray, drawn: np.ndarray, epoch: int, start: int) -> np.ndarray:
        """Rows for positions ``start..n-1`` in the permutation's order: each row's epoch count ``n w_i / sum(w)``
        less its draws so far, rescaled to the ``m`` positions left, systematically sampled along ``perm[start:]``
        then ``perm[:start]`` (rows not yet reached first)."""
        n = self.num_samples
        m = n - start
        owed = np.maximum(n * w / w.sum() - drawn, 0.0)
        if owed.sum() <= 0:  # everything owed was drawn already: the rest of the epoch by weight alone
            owed = np.asarray(w, dtype=np.float64).copy()
        order = np.concatenate([perm[start:], perm[:start]])
        cdf = np.cumsum(owed[order]) * (m / owed.sum())
        offset = float(torch.rand(1, generator=self._generator(epoch, start, 2), dtype=torch.float64))
        # at whole owed counts the offset never moves a count; it only places the fractional ones
        counts = np.diff(np.floor(np.concatenate([[0.0], cdf]) + 1.0 - offset - 1e-9).astype(np.int64))
        counts = np.maximum(counts, 0)
        rows = np.repeat(order, counts)
        if len(rows) < m:  # rounding at the end: pad with the last rows in order
            rows = np.concatenate([rows, order[: m - len(rows)]])
        return rows[:m]

    def state_dict(self) -> dict:
        """Everything needed to replay the stream: seed, epoch, every weight version and when each took effect."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "epoch": self.epoch,
            "versions": [None if w is None else w.tolist() for w in self.versions],
            "schedule": {str(e): [list(x) for x in v] for e, v in self.schedule.items()},
            "pending": self._pending,
            "mode": self.mode,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"Sampler state is for {state['num_samples']} rows but this train set has {self.num_samples}: "
                "resume with the same train_dataset."
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.versions = [None if w is None else np.asarray(w, dtype=np.float64) for w in state["versions"]]
        self.schedule = {int(e): [tuple(x) for x in v] for e, v in state["schedule"].items()}
        self._pending = state.get("pending")
        self.mode = state.get("mode", "replacement")
