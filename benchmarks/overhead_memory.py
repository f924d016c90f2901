"""Overhead section 4, ``memory``: feature bytes per example, and peak memory of the operations of a refresh.

Peak memory of a training step, a feature pass, and a feature pass spilling to a memory-mapped file, each in a fresh
subprocess (peak anonymous RSS above the pre-op baseline, sampled every millisecond from /proc/self/status, plus the
ru_maxrss increase). Each probe runs this file again: ``python benchmarks/overhead_memory.py --_probe JSON``.

    PYTHONPATH=. python benchmarks/overhead_memory.py --quick    # this section alone (prints JSON)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from common import (
    batches_of,
    model_of,
    n_params,
    offline_setup,
    run_section,
    text_rows,
    tokenizer,
    train_step,
    trl_default_step,
    trl_defaults,
)

from drift_trainer.core.feature_pass import FeaturePass
from drift_trainer.core.features import ProjectedGradients, select_target_modules

offline_setup()


class PeakSampler:
    """Peak anonymous RSS (RssAnon, /proc/self/status) sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.base = self.anon()
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.anon())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.anon())
        self.maxrss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.maxrss0

    @property
    def delta(self) -> int:
        return self.peak - self.base


def memory_probe(kind: str, model_name: str, n: int, batch_size: int, k: int, memmap_dir: str | None) -> dict:
    """Runs in a fresh subprocess: peak memory of one operation above the baseline after set-up."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = model_of(model_name)
    rows = text_rows(n, 64, seed=0)
    trl = kind.endswith("_trl_defaults")  # as an SFTConfig run by default: checkpointing, clipping, bf16 autocast
    # the default upper half of the blocks at TRL's defaults, every block otherwise
    projector = ProjectedGradients(select_target_modules(model, top_layers=0.5 if trl else None), k)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = batches_of(rows[:batch_size], batch_size)[0]
    step = trl_default_step if trl else train_step
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if trl else contextlib.nullcontext
    with trl_defaults(model) if trl else contextlib.nullcontext():
        model.train()
        step(model, opt, batch)  # optimizer state exists before measuring, as in training
        model.eval()
        with autocast():
            projector.compute(model, batch)
        with PeakSampler() as ps:
            if kind.startswith("train_step"):
                model.train()
                step(model, opt, batch)
            elif kind.startswith("feature_batch"):
                with autocast():
                    projector.compute(model, batch)
            else:
                fp = FeaturePass(projector, tokenizer().pad_token_id, batch_size, memmap_dir=memmap_dir)
                feats, _, _ = fp.run(model, rows)
                checksum = float(np.asarray(feats[:: max(1, n // 50)]).sum())  # touch it
                _ = checksum
    return {
        "kind": kind,
        "peak_anon_delta_bytes": ps.delta,
        "ru_maxrss_delta_bytes": ps.maxrss_delta,
        "feature_dim": projector.dim,
        "examples": n if kind.startswith("feature_pass") else batch_size,
    }


def run_probe(kind: str, model_name: str, n: int, batch_size: int, k: int, memmap_dir: str | None) -> dict:
    """``memory_probe`` in a fresh subprocess (this file run with ``--_probe``); returns its result."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_probe",
        json.dumps([kind, model_name, n, batch_size, k, memmap_dir]),
    ]
    # a fixed mmap threshold and trim threshold make glibc return freed blocks to the OS, so resident memory
    # follows live allocations instead of staying at the high-water mark of earlier (warm-up) calls
    env = {**os.environ, "PYTHONPATH": ".", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def storage_table(k: int) -> dict:
    """Analytic storage for real shapes: modules x k^2 x 4 bytes per example."""
    shapes = {
        "toy tiny (2 layers x 7 Linear)": 14,
        "toy small (4 layers x 7 Linear)": 28,
        "Llama-2-7B all Linear (32 x 7)": 224,
        "Llama-2-7B LoRA q,v (32 x 2 x A,B)": 128,
    }
    return {
        name: {
            "modules": m,
            "bytes_per_example": m * k**2 * 4,
            "gib_per_100k_examples": m * k**2 * 4 * 1e5 / 2**30,
        }
        for name, m in shapes.items()
    }


def bench_memory(cfg) -> dict:
    model_name = "small"
    tmp = tempfile.mkdtemp(prefix="drift-bench-mm-")
    n = cfg.mem_examples
    probes = [("train_step", None), ("feature_batch", None), ("feature_pass", None), ("feature_pass_memmap", tmp)]
    probes += [("train_step_trl_defaults", None), ("feature_batch_trl_defaults", None)]
    results = []
    for kind, mm in probes:
        results.append(run_probe(kind, model_name, n, cfg.batch_size, cfg.projection_dim, mm))
        r = results[-1]
        print(
            f"  memory {kind:20s}: peak anon +{r['peak_anon_delta_bytes'] / 2**20:.1f} MiB "
            f"(ru_maxrss +{r['ru_maxrss_delta_bytes'] / 2**20:.1f} MiB)",
            flush=True,
        )
    model = model_of(model_name)
    dim = ProjectedGradients(select_target_modules(model), cfg.projection_dim).dim
    storage = storage_table(cfg.projection_dim)
    os.rmdir(tmp) if os.path.isdir(tmp) and not os.listdir(tmp) else None
    return {
        "model": model_name,
        "params": n_params(model),
        "feature_dim": dim,
        "bytes_per_example": dim * 4,
        "examples": n,
        "probes": results,
        "storage": storage,
        "measured": "peak RssAnon (anonymous resident memory; memory-mapped file pages are file-backed and not "
        "counted) above the baseline after set-up, sampled every 1 ms in a thread, one fresh "
        "subprocess per probe with 1 torch thread and glibc told to return freed memory "
        "(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), after one warm-up training step "
        "(optimizer state allocated) and one warm-up feature batch; ru_maxrss increase as a cross-check",
    }


def _main(argv=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    a, rest = p.parse_known_args(argv)
    if a._probe:  # one probe, in the fresh process run_probe started: its result is the last line of stdout
        print(json.dumps(memory_probe(*json.loads(a._probe))))
        return
    run_section("memory", bench_memory, __doc__, rest)


if __name__ == "__main__":
    _main()
