"""`drift-trainer demo` end to end with tiny settings: table, plot and artifacts; the AUROC it reports."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch

from drift_trainer import cli
from drift_trainer.cli.demo_report import auroc


def test_demo_writes_table_plot_and_artifacts(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--output-dir",
        str(out),
        "--base-steps",
        "8",
        "--steps",
        "24",
        "--warmup",
        "8",
        "--refresh",
        "8",
        "--num-train",
        "96",
        "--num-test",
        "16",
        "--num-queries",
        "8",
        "--hidden-size",
        "32",
        "--num-layers",
        "1",
        "--batch-size",
        "16",
        "--curve-every",
        "12",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| plain SFT |" in printed and "| DRIFT |" in printed
    assert "rollout accuracy by refresh" in printed
    with open(out / "demo.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| DRIFT |" in (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())
    drift, plain = results["drift"], results["plain"]
    assert drift["refresh_steps"] == [8, 16, 24]
    assert len(drift["rollout_accuracy"]) == 3 and all(0.0 <= a <= 1.0 for a in drift["rollout_accuracy"])
    assert 0.0 <= plain["final_accuracy"] <= 1.0 and 0.0 <= drift["final_accuracy"] <= 1.0
    assert [s for s, _ in plain["accuracy_curve"]] == [12, 24]
    frac = results["corrupted_fraction"]
    assert 0.0 < frac < 1.0
    # the corrupted share printed for the start is the corrupted fraction of the train set
    assert f"{frac:.3f} ->" in printed
    # per-refresh artifacts of the DRIFT run
    for step in (8, 16, 24):
        d = out / "drift" / "drift" / f"refresh-{step:06d}"
        frame = pd.read_parquet(d / "scores.parquet")
        assert len(frame) == 96 and {"index", "score", "weight", "grad_norm"} <= set(frame.columns)
        assert os.path.getsize(d / "rollouts.jsonl") > 0
        assert json.loads((d / "summary.json").read_text())["step"] == step
    # plain SFT wrote no DRIFT artifacts
    assert not (out / "plain_sft" / "drift").exists()
    # both runs started from the warm-started base model
    assert (out / "base" / "final" / "config.json").exists() and "mean test accuracy over training" in printed


def test_demo_rejects_bad_option(capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["demo", "--corruption", "nonsense"])


def test_auroc():
    assert auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.1, 0.2], [False, False, True, True]) == 0.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert np.isnan(auroc([1, 2], [True, True]))
    torch.manual_seed(0)


def test_demo_flags_take_underscores_too_and_check_the_scorer(capsys):
    import pytest

    from drift_trainer.cli.demo import build_parser

    ns = build_parser().parse_args(["--output_dir", "out", "--num_train", "5", "--num-test", "7"])
    assert (ns.output_dir, ns.num_train, ns.num_test) == ("out", 5, 7)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--scorer", "influence"])
    assert "invalid choice: 'influence'" in capsys.readouterr().err


def test_run_one_takes_an_ica_holdout_and_reports_the_weight_auroc(tmp_path):
    """The quality benchmark's `ica` configuration: run_one hands the holdout to DriftSFTTrainer and reads the
    weights off the ICA callback (it writes no refresh folders)."""
    from drift_trainer.cli.demo import make_data, run_one
    from drift_trainer.cli.toy import build_char_tokenizer

    tok = build_char_tokenizer(str(tmp_path / "tok"))
    train, queries, test = make_data("random", 0.4, 48, 8, 8, seed=0)
    holdout = queries.map(lambda row: {"completion": row["answer"]})
    r = run_one(
        "ica",
        train=train,
        queries=queries,
        test=test,
        tokenizer=tok,
        output_dir=str(tmp_path / "run"),
        steps=2,
        hidden_size=32,
        num_layers=1,
        batch_size=8,
        progress=False,
        holdout=holdout,
        drift_method="ica",
    )
    assert len(r.weight_auroc) == 1 and 0.0 <= r.weight_auroc[0] <= 1.0
    assert not os.path.exists(tmp_path / "run" / "drift" / "refresh-000000")
    assert json.load(open(tmp_path / "run" / "result.json"))["weight_auroc"] == r.weight_auroc
