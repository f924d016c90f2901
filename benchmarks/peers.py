"""Peers: per-example projected-gradient throughput of drift-trainer next to dattri-llm and bergson, in one process.

Every tool computes the gradient of each example's mean completion-token NLL with respect to every ``nn.Linear``
except the LM head, projected double-sided (a ``k x k`` block per module, ``k = 16``), on the same tiny Llama
(``common.model_of``), the same rows (``common.text_rows(n, 64)``), batch size 16, CPU, 1 torch thread:

- ``drift compute``: ``ProjectedGradients.compute`` on training-style (shuffled) batches, as ``overhead_throughput``;
- ``drift FeaturePass``: ``FeaturePass.run`` (length-sorted batches), the reference of the ratio column;
- ``dattri-llm``: ``HookManager`` + ``CaptureCallback`` with ``HookManagerConfig(linear_io=<the same modules>,
  capture_style="materialized", projection_kwargs={"__default__": {"style": "logra", "proj_dim": 16, ...}})`` (LoGRA:
  both factors projected to 16, dattri's CPU ``random_project``), a plain loop of forward + ``loss.sum().backward()``
  over the same length-sorted batches;
- ``bergson``: ``InMemoryCollector`` + ``CollectorComputer.run_with_collector_hooks`` with ``GradientProcessor(
  projection_dim=16, projection_type="normal")`` and ``IndexConfig(projection_dim=16, loss_reduction="mean")`` over the
  same length-sorted batches (bergson's own forward/backward and padding).

Repeats are interleaved (each repeat runs every tool once, in a rotating order), and the median is reported. Accuracy:
on the first ``--check`` rows, the Gram matrix of each tool's features is compared with that of exact per-example
gradients (one ``autograd.grad`` per example): Pearson correlation of the inner products (upper triangle with the
diagonal) and of the cosines (off-diagonal), and the same against drift-trainer's FeaturePass features.

The peers are installed outside the main environment, so they can never change its torch / transformers::

    pip install --no-deps --target /work/.peers dattri-llm==0.1.0 dattri==0.3.0 bergson==2.5.1 \\
        jaxtyping wadler_lindig natsort petname simple_parsing docstring_parser ml_dtypes pretty_midi

and this script appends that folder (``$DRIFT_PEERS_DIR``, default ``/work/.peers``) to the END of ``sys.path``, so the
main environment's packages (torch first) win. A peer that fails to import or run is reported with its error.

    PYTHONPATH=. python benchmarks/peers.py            # writes benchmarks/results/peers.{json,md}
    PYTHONPATH=. python benchmarks/peers.py --quick    # smoke run (prints only unless --out is given)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TQDM_DISABLE", "1")  # bergson's CollectorComputer wraps its loop in tqdm

PEERS_DIR = os.environ.get("DRIFT_PEERS_DIR", "/work/.peers")
if os.path.isdir(PEERS_DIR) and PEERS_DIR not in sys.path:
    sys.path.append(PEERS_DIR)  # last: the main environment's torch / transformers win

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, fmt, median, model_of, offline_setup, text_rows, tokenizer  # noqa: E402

from drift_trainer.core.feature_pass import FeaturePass  # noqa: E402
from drift_trainer.core.features import (  # noqa: E402
    ProjectedGradients,
    collate_right,
    length_sorted_batches,
    per_example_loss,
    select_target_modules,
)

offline_setup()

K = 16
BATCH = 16


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _error_text(e: BaseException, lines: int = 6) -> str:
    """The exception's own first lines, then the innermost frames of its traceback."""
    head = "\n".join(f"{type(e).__name__}: {e}".splitlines()[:lines])
    tail = "".join(traceback.format_tb(e.__traceback__)[-2:]).rstrip()
    return f"{head}\n{tail}"


# ------------------------------------------------------------------------------------------------------------ tools
# Each tool: ``run(model, rows) -> features (n, dim) float32``, rows in their original order, modules in
# ``select_target_modules`` order (so features of different tools line up module by module).


class DriftCompute:
    name, dist, api = "drift-trainer compute", "drift-trainer", "ProjectedGradients.compute (shuffled batches)"

    def __init__(self, model, rows):
        self.projector = ProjectedGradients(select_target_modules(model), K)
        order = np.random.default_rng(0).permutation(len(rows))  # as common.batches_of
        self.batches = [order[s : s + BATCH] for s in range(0, len(rows), BATCH)]
        self.projection = f"k={K} per factor, Gaussian/sqrt(k), P_in shared by input width; {self.projector.dim} dims"
        self.dim = self.projector.dim

    def run(self, model, rows):
        pad = tokenizer().pad_token_id
        out = np.zeros((len(rows), self.projector.dim), np.float32)
        model.eval()
        for idx in self.batches:
            out[idx] = self.projector.compute(model, collate_right([rows[i] for i in idx], pad)).features.numpy()
        return out


class DriftPass(DriftCompute):
    name, api = "drift-trainer FeaturePass", "FeaturePass.run (length-sorted)"

    def __init__(self, model, rows):
        super().__init__(model, rows)
        self.fpass = FeaturePass(self.projector, tokenizer().pad_token_id, BATCH)

    def run(self, model, rows):
        return np.asarray(self.fpass.run(model, rows)[0])


class Dattri:
    name, dist = "dattri-llm", "dattri-llm"
    api = "HookManager(linear_io, logra proj, materialized) + CaptureCallback; forward + loss.backward()"

    def __init__(self, model, rows):
        from dattri_llm import HookManagerConfig

        self.names = [n for n, _ in select_target_modules(model)]
        self.config = HookManagerConfig(
            linear_io=["^" + re.escape(n) + "$" for n in self.names],
            capture_style="materialized",
            projection_kwargs={
                "__default__": {
                    "style": "logra",
                    "proj_dim": K,
                    "proj_max_batch_size": BATCH,
                    "proj_type": "normal",
                    "proj_seed": 0,
                }
            },
        )
        self.batches = length_sorted_batches(rows, BATCH)
        self.projection = (
            f"logra proj_dim={K} per factor (dattri random_project, normal); {len(self.names) * K * K} dims"
        )
        self.dim = len(self.names) * K * K

    def run(self, model, rows):
        from dattri_llm import CaptureCallback, HookManager

        pad = tokenizer().pad_token_id
        out = np.zeros((len(rows), self.dim), np.float32)
        cap = CaptureCallback()
        model.eval()
        with HookManager(model, config=self.config, callbacks=[cap]).collect(deregister_on_exit=True):
            for idx in self.batches:
                batch = collate_right([rows[i] for i in idx], pad)
                cap.record = None
                loss, _ = per_example_loss(model, batch)
                loss.sum().backward()
                model.zero_grad(set_to_none=True)
                g = cap.record.gradient.materialize()
                out[idx] = torch.cat([g.data[n].reshape(len(idx), -1) for n in self.names], 1).float().numpy()
        return out


class Bergson:
    name, dist = "bergson", "bergson"
    api = "InMemoryCollector + CollectorComputer.run_with_collector_hooks (GradientProcessor projection)"

    def __init__(self, model, rows):
        from bergson import GradientProcessor, IndexConfig
        from datasets import Dataset

        self.names = [n for n, _ in select_target_modules(model)]
        self.tmp = tempfile.mkdtemp(prefix="drift-peers-bergson-")
        self.cfg = IndexConfig(
            run_path=os.path.join(self.tmp, "run"),
            projection_dim=K,
            projection_type="normal",
            loss_reduction="mean",
        )
        os.makedirs(self.cfg.partial_run_path, exist_ok=True)  # it saves a counter there
        self.processor = GradientProcessor(projection_dim=K, projection_type="normal")  # reused: matrices cached
        self.data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        self.batches = [[int(i) for i in b] for b in length_sorted_batches(rows, BATCH)]
        self.projection = (
            f"projection_dim={K} per module, double-sided, normal, jl scale; {len(self.names) * K * K} dims"
        )
        self.dim = len(self.names) * K * K

    def run(self, model, rows):
        from bergson import CollectorComputer, InMemoryCollector

        model.eval()
        base = model.base_model
        prefix = next(n for n, m in model.named_modules() if m is base)
        col = InMemoryCollector(model=base, cfg=self.cfg, processor=self.processor, data=self.data)
        CollectorComputer(
            model=model, data=self.data, collector=col, batches=self.batches, cfg=self.cfg
        ).run_with_collector_hooks(desc="bergson")
        strip = len(prefix) + 1 if prefix else 0
        grads = {n[strip:]: None for n in self.names}
        missing = [n for n in grads if n not in col.gradients]
        if missing:
            raise KeyError(f"bergson collected no gradient for {missing[:3]} (has {list(col.gradients)[:3]})")
        return torch.cat([col.gradients[n].float() for n in grads], 1).numpy()


TOOLS = [DriftCompute, DriftPass, Dattri, Bergson]


# ------------------------------------------------------------------------------------------------------- accuracy


def exact_gradients(model, rows) -> np.ndarray:
    """Exact per-example gradients of the target modules' weights, one backward per example."""
    mods = [m for _, m in select_target_modules(model)]
    pad = tokenizer().pad_token_id
    out = []
    model.eval()
    for r in rows:
        loss, _ = per_example_loss(model, collate_right([r], pad))
        gs = torch.autograd.grad(loss.sum(), [m.weight for m in mods])
        out.append(torch.cat([g.reshape(-1) for g in gs]).double().numpy())
    return np.stack(out)


def gram_agreement(f: np.ndarray, ref: np.ndarray) -> dict:
    """Pearson correlation of the inner products (i <= j) and of the cosines (i < j) of two feature sets, and the
    median ratio of their per-example norms (about 1 when both differentiate the same, equally scaled loss)."""
    f, ref = f.astype(np.float64), ref.astype(np.float64)
    a, b = f @ f.T, ref @ ref.T
    iu, iu1 = np.triu_indices(len(f)), np.triu_indices(len(f), 1)

    def cos(g):
        d = np.sqrt(np.clip(np.diag(g), 1e-300, None))
        return g / d[:, None] / d[None, :]

    return {
        "inner_corr": float(np.corrcoef(a[iu], b[iu])[0, 1]),
        "cosine_corr": float(np.corrcoef(cos(a)[iu1], cos(b)[iu1])[0, 1]),
        "norm_ratio": float(np.median(np.sqrt(np.diag(a) / np.clip(np.diag(b), 1e-300, None)))),  # scale check
    }


# ---------------------------------------------------------------------------------------------------------- bench


def bench_model(model_name: str, n: int, repeats: int, check: int) -> list[dict]:
    torch.manual_seed(0)
    model = model_of(model_name)
    model.eval()
    rows = text_rows(n, 64)
    exact = exact_gradients(model, rows[:check])
    tools, results = [], []
    for cls in TOOLS:
        res = {"model": model_name, "tool": cls.name, "version": _version(cls.dist), "api": cls.api}
        try:
            tool = cls(model, rows)
            res.update(projection=tool.projection, feature_dim=tool.dim)
            feats = tool.run(model, rows)  # warm-up, and the features the accuracy check reads
            assert feats.shape == (n, tool.dim), f"features {feats.shape}, expected {(n, tool.dim)}"
            res["_feats"] = feats[:check]
            tools.append((tool, res))
        except Exception as e:  # a peer that cannot install / import / run: reported, not fatal
            res["error"] = _error_text(e)
            print(f"  {model_name} {cls.name}: FAILED\n    " + res["error"].replace("\n", "\n    "), flush=True)
        results.append(res)
    times = {id(r): [] for _, r in tools}
    for rep in range(repeats):  # interleaved, rotating order: every tool sees the same machine load
        for j in range(len(tools)):
            tool, res = tools[(j + rep) % len(tools)]
            if "error" in res:
                continue
            try:
                s = time.perf_counter()
                tool.run(model, rows)
                times[id(res)].append(time.perf_counter() - s)
            except Exception as e:
                res["error"] = _error_text(e)
    ref = next((r.get("_feats") for r in results if r["tool"] == DriftPass.name and "_feats" in r), None)
    base = None
    for res in results:
        t = times.get(id(res))
        if t:
            res["seconds_per_repeat"] = [round(x, 4) for x in t]
            res["ex_per_s"] = n / median(t)
            if res["tool"] == DriftPass.name:
                base = res["ex_per_s"]
        feats = res.pop("_feats", None)
        if feats is not None:
            res["vs_exact"] = gram_agreement(feats, exact)
            if ref is not None:
                res["vs_drift_pass"] = gram_agreement(feats, ref)
    for res in results:
        if base and "ex_per_s" in res:
            res["ratio_vs_drift_pass"] = res["ex_per_s"] / base
        res.update(examples=n, batch_size=BATCH, repeats=repeats, check_examples=check)
        print(
            f"  {model_name:5s} {res['tool']:26s} {fmt(res.get('ex_per_s'), 0):>6s} ex/s  "
            f"x{fmt(res.get('ratio_vs_drift_pass'))}  "
            f"r(exact) {fmt(res.get('vs_exact', {}).get('inner_corr'), 3)}",
            flush=True,
        )
    return results


def markdown(out: dict) -> str:
    lines = [
        "# Peers: per-example projected-gradient throughput",
        "",
        "```bash",
        out["command"],
        "```",
        "",
        f"CPU, torch {out['torch']} ({out['threads']} thread), transformers {out['transformers']}; "
        f"{out['examples']} rows of `text_rows(n, 64)`, batch {BATCH}, k={K}, {out['repeats']} interleaved repeats "
        f"(median). Peers from `{out['peers_dir']}`. Every tool: gradient of each example's mean completion-token NLL, "
        "all `nn.Linear` but `lm_head`, double-sided projection to a 16 x 16 block per module.",
        "",
        "Accuracy on the first "
        f"{out['check_examples']} rows: Pearson r of the Gram matrix entries (inner products, i <= j; cosines, i < j) "
        "against exact per-example gradients and against drift-trainer's FeaturePass features; norm ratio: median "
        "per-example ||feature|| / ||exact gradient|| (about 1: same loss, same scale).",
        "",
        "| model | tool | version | API | projection | ex/s | x FeaturePass | r inner (exact) | r cos (exact) "
        "| norm ratio (exact) | r inner (drift) | r cos (drift) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["results"]:
        ve, vd = r.get("vs_exact", {}), r.get("vs_drift_pass", {})
        lines.append(
            f"| {r['model']} | {r['tool']} | {r.get('version') or '-'} | {r['api']} | {r.get('projection', '-')} "
            f"| {fmt(r.get('ex_per_s'), 0)} | {fmt(r.get('ratio_vs_drift_pass'))} "
            f"| {fmt(ve.get('inner_corr'), 3)} | {fmt(ve.get('cosine_corr'), 3)} | {fmt(ve.get('norm_ratio'), 3)} "
            f"| {fmt(vd.get('inner_corr'), 3)} | {fmt(vd.get('cosine_corr'), 3)} |"
        )
    errs = [r for r in out["results"] if "error" in r]
    if errs:
        lines += ["", "## Errors", ""]
        for r in errs:
            lines += [f"{r['model']} / {r['tool']}:", "", "```", r["error"], "```", ""]
    if out.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in out["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Projections are matched in shape (16 x 16 per module, 7,168 dims on `small`), not in values: each tool draws its "
    "own random matrices (drift: Gaussian, one `P_in` per input width; dattri-llm: dattri's CPU `random_project`, "
    "normal; bergson: normal, one pair per module), so their features agree with each other only up to projection "
    "noise; the r (exact) columns are the like-for-like accuracy comparison.",
    "drift-trainer differentiates towards the captured module outputs (`autograd.grad`, no weight `.grad`); both "
    "peers run a full `loss.backward()` (weight gradients computed, then zeroed) as their APIs expect.",
    "bergson runs its own forward/backward (`fwd_bwd_factory`: no attention mask, right padding, per-example mean "
    "loss with `loss_reduction='mean'`) and builds its collector once per pass; dattri-llm's `HookManager` is built "
    "(hooks registered) once per pass and also content-hashes each batch's inputs (its sample ids).",
    "dattri-llm and bergson get the length-sorted batches FeaturePass uses; drift compute gets the shuffled "
    "training-style batches of `overhead_throughput` (more padding).",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="128 rows, 2 repeats (default 256, 5), small only; prints unless --out is given",
    )
    p.add_argument("--models", default=None, help="comma-separated (default: small,tiny; quick: small)")
    p.add_argument("--examples", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--check", type=int, default=16, help="rows of the accuracy check (exact per-example loop)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", default=None, help=f"directory for peers.json / peers.md (default: {RESULTS}, not in quick)"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.disable(logging.INFO)  # bergson logs every pass at INFO
    models = (a.models or ("small" if a.quick else "small,tiny")).split(",")
    n = a.examples or (128 if a.quick else 256)
    repeats = a.repeats or (2 if a.quick else 5)
    results = []
    for m in models:
        results += bench_model(m, n, repeats, min(a.check, n))
    import transformers

    out = {
        "command": (
            "PYTHONPATH=. python benchmarks/peers.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
        ).rstrip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "peers_dir": PEERS_DIR,
        "peer_versions": {d: _version(d) for d in ("dattri-llm", "dattri", "bergson")},
        "examples": n,
        "repeats": repeats,
        "check_examples": min(a.check, n),
        "projection_dim": K,
        "batch_size": BATCH,
        "results": results,
        "notes": NOTES,
    }
    text = json.dumps(out, indent=1, default=float)
    out_dir = a.out or (None if a.quick else RESULTS)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "peers.json"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out_dir, "peers.md"), "w") as f:
            f.write(markdown(out))
        print(f"wrote {out_dir}/peers.json and peers.md")
    else:
        print(markdown(out))
    return out


if __name__ == "__main__":
    main()
