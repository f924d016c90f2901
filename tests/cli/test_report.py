"""Tests of ``drift-trainer report``: every plot and table on the page, from a training run and from synthetic
artifacts with known values."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import numpy as np

from drift_trainer.cli import report
from drift_trainer.cli.toy import build_char_tokenizer, build_tiny_llama, offline_env
from drift_trainer.core.state import write_refresh_artifacts
from tests.helpers import TINY_DRIFT, addition_data, cpu_args, digit_first, tiny_trainer

offline_env()
HEADINGS = [
    "Score distribution",
    "Gradient norm vs score",
    "Weights across refreshes",
    "Rollout accuracy and reward",
    "Effective sample size",
    "Top 20 examples",
    "Bottom 20 examples",
    "Timings per refresh stage",
]
PNGS = [
    "scores_histogram.png",
    "grad_norm_vs_score.png",
    "weights_across_refreshes.png",
    "rollouts.png",
    "effective_sample_size.png",
]


def _synthetic_run(root, n=50, steps=(10, 20, 30), no_contrast_step=30):
    rng = np.random.default_rng(0)
    drift = root / "drift"
    for k, step in enumerate(steps):
        norm = rng.uniform(0.5, 3.0, n)
        score = rng.normal(size=n)
        contrast = step != no_contrast_step
        columns = {
            "index": np.arange(n),
            "score": score if contrast else np.zeros(n),
            "weight": np.exp(score) / np.exp(score).mean(),
            "grad_norm": norm,
            "raw_score": score * norm,
            "loss": rng.uniform(1, 3, n),
            "scored": np.ones(n, dtype=bool),
        }
        summary = {
            "step": step,
            "refresh": k,
            "contrast": contrast,
            "metrics": {
                "drift/rollout_accuracy": 0.2 * (k + 1),
                "drift/reward_mean": 0.1 * (k + 1),
                "drift/ess": 0.9 - 0.1 * k,
            },
            "timings": {"rollouts": 1.0 + k, "features": 2.0, "influence": 0.01},
            "num_examples": n,
            "num_scored": n,
            "num_rollouts": 8,
        }
        write_refresh_artifacts(
            str(drift / f"refresh-{step:06d}"),
            columns,
            [{"query": "1+1=", "completion": "2", "reward": 1.0, "sign": 1.0}],
            summary,
        )
    return drift


def _check_page(path, n_refresh_rows):
    html = Path(path).read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 5 and html.count("<img") == 5
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"  # embedded, self-contained
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in html
    for name in PNGS:
        assert os.path.getsize(os.path.join(os.path.dirname(path), name)) > 1000
    tables = re.findall(r"<table.*?</table>", html, flags=re.DOTALL)
    assert len(tables) == 4  # overview, top, bottom, timings
    timing_rows = re.findall(r"<tr>", tables[3])
    assert len(timing_rows) == 1 + n_refresh_rows  # header + one row per refresh
    return html, tables


def test_synthetic_artifacts(tmp_path):
    drift = _synthetic_run(tmp_path)
    texts = [{"index": i, "text": f"example <{i}> text"} for i in range(50)]
    (drift / "examples.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    assert report.main([str(tmp_path)]) == 0
    html, tables = _check_page(tmp_path / "report" / "report.html", 3)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(drift / "refresh-000010").st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert os.stat(drift / "refresh-000010" / "summary.json").st_mode & 0o777 == 0o666 & ~umask
    # top / bottom tables come from step 20: the latest refresh with contrast (step 30 had none)
    refreshes = report.find_refreshes(str(tmp_path))
    latest = refreshes[1].scores
    top_expected = latest.sort_values("score", ascending=False)["index"].tolist()[:20]
    bottom_expected = latest.sort_values("score")["index"].tolist()[:20]
    for table, expected in ((tables[1], top_expected), (tables[2], bottom_expected)):
        rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td>", table)
        assert [int(i) for _, i in rows] == expected
        assert f"example &lt;{expected[0]}&gt; text" in table  # text shown, HTML-escaped
    assert "steps [30]" in html and "latest refresh with contrast" in html
    assert "rollouts (s)" in tables[3] and "features (s)" in tables[3]
    steps, w_best, w_worst, index = report.weight_history(refreshes, top=10)
    assert steps.tolist() == [10, 20, 30] and w_best.shape == (3, 10)
    np.testing.assert_allclose(w_best[1], latest.set_index("index").loc[index[:10], "weight"])
    assert w_best[1].min() >= w_worst[1].max()  # weights follow the scores at step 20


def test_training_run_artifacts(tmp_path):
    """A real DriftSFTTrainer run's artifacts, with the text from --train_file."""
    from drift_trainer import DriftConfig

    tok = build_char_tokenizer()
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2)
    train, queries = addition_data(24)
    # the tiny DRIFT options with batch 8, a refresh every 2 steps and 3-token rollouts
    drift = {**TINY_DRIFT, "per_device_train_batch_size": 8, "drift_refresh_steps": 2, "drift_max_new_tokens": 3}
    options = dict(max_steps=4, learning_rate=3e-3, drift_num_rollouts=4, drift_projection_dim=4, disable_tqdm=True)
    args = DriftConfig(**cpu_args(tmp_path / "run", **drift, **options))
    trainer = tiny_trainer(model, tok, args, train, queries, reward_funcs=digit_first)
    trainer.train()
    # examples.jsonl (read column-wise) holds each train row's text, as row-by-row reading gives it
    from drift_trainer.cli.datafiles import example_text

    ds, users = trainer.train_dataset, trainer.drift_callback.view.user_index.tolist()
    cols = sorted({"prompt", "completion", "messages", "text"} & set(ds.column_names))
    expected = [
        example_text({k: ds[i][k] for k in cols}) if cols else tok.decode(ds[i]["input_ids"], skip_special_tokens=False)
        for i in range(len(users))
    ]
    lines = (tmp_path / "run" / "drift" / "examples.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == users and [json.loads(x)["text"] for x in lines] == expected
    train_file = tmp_path / "train.jsonl"
    train.to_json(str(train_file))
    out = tmp_path / "page"
    assert report.main([str(tmp_path / "run"), "--out", str(out), "--train-file", str(train_file)]) == 0
    html, tables = _check_page(out / "report.html", len(trainer.drift_state.history))
    assert trainer.drift_state.history and "training run" in tables[0]
    assert "(no text)" not in html
    assert all(f"{row['prompt']} \u2192 {row['completion']}" in html for row in train)  # top 20 + bottom 20 of 24


def test_without_text_and_errors(tmp_path, capsys):
    _synthetic_run(tmp_path, steps=(5,), no_contrast_step=None)
    assert report.main([str(tmp_path / "drift"), "--out", str(tmp_path / "r")]) == 0  # the drift/ dir itself
    html, _ = _check_page(tmp_path / "r" / "report.html", 1)
    assert html.count("(no text)") == 40 and "--train_file" in html
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert "No DRIFT artifacts" in err and str(empty) in err
    os.remove(tmp_path / "drift" / "refresh-000005" / "summary.json")
    assert report.main([str(tmp_path)]) == 1
    assert "has no summary.json" in capsys.readouterr().err
