"""DRIFT overhead benchmark: feature throughput, exactness, end-to-end wall time, memory, cost growth.

Run from the repository root::

    PYTHONPATH=. python benchmarks/overhead.py            # full run (about 15-20 minutes on 2 CPU cores)
    PYTHONPATH=. python benchmarks/overhead.py --quick    # smoke run (about 1-2 minutes)
    PYTHONPATH=. python benchmarks/overhead.py --sections throughput,exact

It prints a table and writes ``benchmarks/results/overhead.json`` and ``benchmarks/results/overhead.md`` (with the
exact command; ``--out DIR`` writes them elsewhere). Every ratio is measured side by side in one process with the
repeats interleaved (A, B, A, B, ...), and reported as the median of the per-repeat ratios, so a noisy shared machine
moves both sides alike.

Sections, one module each (its docstring says what it measures; targets in brackets):

1. ``throughput`` (``overhead_throughput.py``): feature pass over training step, examples/s  [>= 2.0].
2. ``exact`` (``overhead_exact.py``): hook features against exact per-example gradients (loop, ``torch.func``)
   [>= 10x faster; same scores].
3. ``e2e`` and ``capture`` (``overhead_e2e.py``): ``DriftSFTTrainer.train()`` over the same run with
   ``drift_enabled=False``  [<= 1.15], and the per-step cost of capturing features in the training backward;
   ``regimes`` (``overhead_regimes.py``): the same in the quality benchmark's warm and scratch regimes
   [warm <= 1.10, scratch <= 1.5].
4. ``memory`` (``overhead_memory.py``): feature bytes per example; peak memory of each operation in a fresh process.
5. ``growth`` (``overhead_growth.py``): time of one refresh against train-set, projection and model size, and
   of the default path's refresh at a fixed interval [slope about 0].
6. ``block`` (``overhead_block.py``): captured features and block rescoring against full rescoring.

The report is ``overhead_report.py``; shared helpers and the sizes of each section are in ``common.py``. A section
module also runs on its own (``python benchmarks/overhead_exact.py --quick``: prints its JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch
from common import RESULTS, add_run_options, overhead_config
from overhead_block import bench_block
from overhead_e2e import bench_capture, bench_e2e
from overhead_exact import bench_exact
from overhead_growth import bench_growth
from overhead_memory import bench_memory, memory_probe
from overhead_regimes import bench_regimes
from overhead_report import markdown
from overhead_throughput import bench_throughput


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere): ratios depend on it."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown CPU"


SECTIONS = {
    "throughput": bench_throughput,
    "exact": bench_exact,
    "capture": bench_capture,
    "e2e": bench_e2e,
    "regimes": bench_regimes,
    "memory": bench_memory,
    "growth": bench_growth,
    "block": bench_block,
}


def _merge(previous: dict, res: dict, command: str) -> tuple[dict, str]:
    """The sections run now laid over an existing ``overhead.json``; returns it and the commands that made it."""
    merged = {**previous, **{k: v for k, v in res.items() if k in SECTIONS}}
    merged["commands"] = [*previous.get("commands", [previous.get("command")]), command]
    merged["section_s"] = {**previous.get("section_s", {}), **res["section_s"]}
    merged["total_s"] = sum(merged["section_s"].values())
    # the machine of each section (sections from earlier runs keep theirs: a merge may run on another host)
    before = previous.get("section_machine") or {k: previous.get("machine") for k in previous if k in SECTIONS}
    merged["section_machine"] = {**before, **{k: res["machine"] for k in res if k in SECTIONS}}
    hosts: dict[str, list[str]] = {}
    for k, m in merged["section_machine"].items():
        hosts.setdefault(m, []).append(k)
    merged["machine"] = (
        res["machine"] if len(hosts) == 1 else "; ".join(f"{m} (sections: {', '.join(ks)})" for m, ks in hosts.items())
    )
    return merged, " && ".join(merged["commands"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(p)
    p.add_argument("--sections", default="throughput,exact,capture,e2e,regimes,memory,growth,block")
    p.add_argument("--out", default=RESULTS, help="directory for overhead.json and overhead.md")
    p.add_argument("--merge", action="store_true", help="update the sections run now in an existing overhead.json")
    p.add_argument("--_probe", help=argparse.SUPPRESS)  # as overhead_memory.py --_probe (one memory probe)
    a = p.parse_args(argv)
    if a._probe:
        print(json.dumps(memory_probe(*json.loads(a._probe))))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = overhead_config(a.quick)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    command = "PYTHONPATH=. python " + " ".join(
        shlex.quote(x) for x in ["benchmarks/overhead.py", *(argv or sys.argv[1:])]
    )
    previous = {}
    if a.merge and os.path.exists(os.path.join(a.out, "overhead.json")):
        with open(os.path.join(a.out, "overhead.json")) as f:
            previous = json.load(f)
    res = {
        "command": command,
        "config": vars(cfg),
        "machine": f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, python {platform.python_version()}",
    }
    start = time.perf_counter()
    for s in sections:
        print(f"[{s}]", flush=True)
        t = time.perf_counter()
        res[s] = SECTIONS[s](cfg)
        res.setdefault("section_s", {})[s] = time.perf_counter() - t
    res["total_s"] = time.perf_counter() - start
    if previous:
        res, command = _merge(previous, res, command)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "overhead.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    md = markdown(res, command)
    with open(os.path.join(a.out, "overhead.md"), "w") as f:
        f.write(md + "\n")
    print()
    print(md)


if __name__ == "__main__":
    main()
