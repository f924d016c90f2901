"""Where features live: in memory or in a memory-mapped file, and how statistics stream over them."""

from __future__ import annotations

import os
import tempfile

import numpy as np


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


def row_chunks(n: int, dim: int, target_bytes: int = 64 * 2**20):
    """Slices of at most ``target_bytes`` of float64 rows, so statistics of (memory-mapped) features stream."""
    step = max(1, target_bytes // max(8 * dim, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))
