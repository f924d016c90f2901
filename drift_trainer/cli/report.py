"""``drift-trainer report RUN_DIR``: plots and a self-contained HTML page from DRIFT artifacts.

``RUN_DIR`` is a training run's ``output_dir`` (its refreshes are ``RUN_DIR/drift/refresh-*/``), that ``drift/``
directory itself, or the output directory of ``drift-trainer refine`` (one refresh: ``scores.parquet`` and
``summary.json`` at its top). Writes ``report.html`` (every plot embedded as a base64 PNG, so the one file can be
mailed or attached) and the PNGs beside it, into ``--out`` (default ``RUN_DIR/report/``).

The page: a score histogram split by the sign of the contribution; gradient norm against the score before
(``raw_score``) and after debiasing; the weights of the top and bottom examples across refreshes; rollout accuracy and
mean reward over refreshes; effective sample size over refreshes; the top and bottom examples with their text; and the
timing table of each refresh's stages.

Example text: ``--train_file`` (the train set, any format ``refine`` reads), else an ``examples.jsonl`` (lines
``{"index": i, "text": ...}``) in ``RUN_DIR`` or ``RUN_DIR/drift/``. ``refine`` writes one; for a training run, write
it yourself or pass ``--train_file``. Without either, the tables show indices only.
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from drift_trainer.cli.report_plots import (
    _latest_with_contrast,
    _save,
    plot_ess,
    plot_histogram,
    plot_norm_vs_score,
    plot_rollouts,
    plot_weights,
    weight_history,
)
from drift_trainer.core.state import atomic_write_text


@dataclass
class Refresh:
    path: str
    step: int
    scores: object  # pandas.DataFrame of scores.parquet
    summary: dict


def find_refreshes(run_dir: str) -> list[Refresh]:
    """The refreshes of a training run or a refine output, in step order; a clear error when there are none."""
    import pandas as pd

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such directory. Pass a training run's output_dir or a refine output.")
    if os.path.exists(os.path.join(run_dir, "scores.parquet")):
        dirs = [run_dir]
    else:
        dirs = sorted(glob.glob(os.path.join(run_dir, "drift", "refresh-*"))) or sorted(
            glob.glob(os.path.join(run_dir, "refresh-*"))
        )
    dirs = [d for d in dirs if os.path.isdir(d) and not os.path.basename(d).startswith(".")]
    if not dirs:
        raise ValueError(
            f"No DRIFT artifacts in {run_dir}: expected {run_dir}/drift/refresh-*/scores.parquet (a training run with "
            "drift_save_artifacts=True) or scores.parquet + summary.json (a `drift-trainer refine` output)."
        )
    out = []
    for d in dirs:
        for name in ("scores.parquet", "summary.json"):
            if not os.path.exists(os.path.join(d, name)):
                raise ValueError(f"{d} has no {name}: the artifacts are incomplete (was the run interrupted?).")
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
        out.append(Refresh(d, int(summary.get("step", 0)), pd.read_parquet(os.path.join(d, "scores.parquet")), summary))
    return sorted(out, key=lambda r: r.step)


def load_texts(run_dir: str, train_file: str | None = None) -> dict[int, str] | None:
    """Example texts by index, from ``train_file`` or an ``examples.jsonl`` (see the module docstring)."""
    if train_file:
        from drift_trainer.cli.datafiles import example_text, read_table

        return {i: example_text(r) for i, r in enumerate(read_table(train_file).rows)}
    for path in (os.path.join(run_dir, "examples.jsonl"), os.path.join(run_dir, "drift", "examples.jsonl")):
        if os.path.exists(path):
            texts = {}
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        texts[int(rec["index"])] = str(rec.get("text", ""))
            return texts
    return None


# ---------------------------------------------------------------------------------------------- plots


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if np.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def examples_table(ref: Refresh, texts: dict[int, str] | None, n: int, best: bool) -> str:
    df = ref.scores[ref.scores["scored"]] if "scored" in ref.scores else ref.scores
    df = df.sort_values("score", ascending=not best, kind="stable").head(n)
    rows = []
    for rank, rec in enumerate(df.to_dict("records"), 1):
        idx = int(rec["index"])
        text = texts.get(idx) if texts is not None else None
        cell = f"<pre>{html.escape(text[:600])}</pre>" if text is not None else '<span class="muted">(no text)</span>'
        rows.append(
            [
                rank,
                idx,
                _fmt(rec["score"]),
                _fmt(rec["weight"]),
                _fmt(rec.get("grad_norm", np.nan)),
                _fmt(rec.get("loss", np.nan)),
                cell,
            ]
        )
    return _table(["#", "index", "score", "weight", "grad norm", "loss", "text"], rows, "examples")


def timings_table(refreshes: list[Refresh]) -> str:
    stages: list[str] = []
    for r in refreshes:
        for k in r.summary.get("timings", {}):
            if k not in stages:
                stages.append(k)
    rows = []
    for r in refreshes:
        t = r.summary.get("timings", {})
        rows.append([r.step] + [_fmt(float(t[s])) if s in t else "" for s in stages] + [_fmt(float(sum(t.values())))])
    return _table(["step"] + [f"{s} (s)" for s in stages] + ["total (s)"], rows, "timings")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#222}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:right} th{background:#f4f4f4} td:last-child{text-align:left}
table.examples td:last-child{max-width:640px} pre{margin:0;white-space:pre-wrap;word-break:break-word;font-size:12px}
img{max-width:100%;border:1px solid #eee} .muted{color:#888} .grid{display:flex;flex-wrap:wrap;gap:16px}
.grid>div{flex:1 1 600px} .note{color:#555;font-size:13px}
"""


def write_report(run_dir: str, out_dir: str | None = None, train_file: str | None = None, top: int = 20) -> str:
    """Write ``report.html`` and its PNGs into ``out_dir`` (default ``run_dir/report``); returns the HTML path."""
    refreshes = find_refreshes(run_dir)
    texts = load_texts(run_dir, train_file)
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    latest = _latest_with_contrast(refreshes)
    images = {}
    for name, fig in (
        ("scores_histogram.png", plot_histogram(latest)),
        ("grad_norm_vs_score.png", plot_norm_vs_score(latest)),
        ("weights_across_refreshes.png", plot_weights(refreshes)),
        ("rollouts.png", plot_rollouts(refreshes)),
        ("effective_sample_size.png", plot_ess(refreshes)),
    ):
        images[name] = base64.b64encode(_save(fig, out_dir, name)).decode()

    def img(name, alt):
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{images[name]}">'

    overview = _overview(run_dir, refreshes, latest) + _notes(refreshes, latest, texts)
    page = _page(overview, img, latest, texts, refreshes, top)
    path = os.path.join(out_dir, "report.html")
    atomic_write_text(path, page)
    return path


def _overview(run_dir: str, refreshes: list[Refresh], latest: Refresh) -> str:
    s = latest.summary
    m = s.get("metrics", {})
    kind = "refine output" if s.get("kind") == "refine" else "training run"
    return _table(
        [
            "source",
            "refreshes",
            "latest step",
            "examples",
            "scored",
            "rollouts",
            "rollout accuracy",
            "ESS",
            "positive share",
            "max weight",
        ],
        [
            [
                html.escape(f"{kind}: {os.path.abspath(run_dir)}"),
                len(refreshes),
                latest.step,
                s.get("num_examples", ""),
                s.get("num_scored", ""),
                s.get("num_rollouts", ""),
                _fmt(m.get("drift/rollout_accuracy", np.nan)),
                _fmt(m.get("drift/ess", np.nan)),
                _fmt(m.get("drift/frac_positive", np.nan)),
                _fmt(m.get("drift/weight_max", np.nan)),
            ]
        ],
    )


def _notes(refreshes: list[Refresh], latest: Refresh, texts) -> str:
    skipped = [r.step for r in refreshes if not r.summary.get("contrast", True)]
    notes = []
    if skipped:
        notes.append(f"Refreshes without contrast (weights kept): steps {skipped}.")
    if latest is not refreshes[-1]:
        notes.append(f"Scores and examples are from step {latest.step}, the latest refresh with contrast.")
    if texts is None:
        notes.append("No example text: pass --train_file or put an examples.jsonl in the run directory.")
    return "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


def _page(overview: str, img, latest: Refresh, texts, refreshes: list[Refresh], top: int) -> str:
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>DRIFT report</title><style>{CSS}</style></head><body>
<h1>DRIFT report</h1>
{overview}
<h2>Score distribution</h2>
<p class="note">Debiased influence of each scored example on the signed on-policy target: above 0 it makes correct
rollouts likelier (and wrong ones less likely), below 0 the reverse.</p>
{img("scores_histogram.png", "score histogram")}
<h2>Gradient norm vs score</h2>
<p class="note">Debiasing should remove the dependence of the score on the gradient norm.</p>
{img("grad_norm_vs_score.png", "gradient norm vs score")}
<h2>Weights across refreshes</h2>
{img("weights_across_refreshes.png", "weights across refreshes")}
<div class="grid"><div><h2>Rollout accuracy and reward</h2>{img("rollouts.png", "rollout accuracy")}</div>
<div><h2>Effective sample size</h2>{img("effective_sample_size.png", "effective sample size")}</div></div>
<h2>Top {top} examples</h2>
{examples_table(latest, texts, top, best=True)}
<h2>Bottom {top} examples</h2>
{examples_table(latest, texts, top, best=False)}
<h2>Timings per refresh stage</h2>
{timings_table(refreshes)}
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drift-trainer report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's output_dir, its drift/ directory, or a refine output")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--train_file", "--train-file", default=None, help="train set, for the example texts")
    parser.add_argument("--top", type=int, default=20, help="examples in the top and bottom tables (default 20)")
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        path = write_report(ns.run_dir, ns.out, ns.train_file, ns.top)
    except (ValueError, FileNotFoundError) as exc:
        print(f"drift-trainer report: error: {exc}", file=sys.stderr)
        return 1
    print(f"drift-trainer report: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
__all__ = ["Refresh", "find_refreshes", "load_texts", "main", "weight_history", "write_report"]
