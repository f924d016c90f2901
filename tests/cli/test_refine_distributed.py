"""``drift-trainer refine`` on 2 CPU ranks (gloo) under ``torchrun``: a full model per rank, and ``--fsdp`` (torch's
FSDP2 ``fully_shard``) with and without a LoRA adapter, and a resumed ``--fsdp`` run.

The train set has 20 rows in shards of 8 (8, 8, 4 rows; rank 0 owns shards 0 and 2, rank 1 shard 1), so the ranks'
feature forwards differ and under ``--fsdp`` a rank that made fewer would hang its peer; every launch runs under a
timeout. Scores must equal the single-process run's to 1e-5 of the largest (seen: 0), every row must be scored
exactly once, and ``summary.json`` must record that the parameters were DTensor shards (so a run that silently kept a
full model per rank cannot pass).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from drift_trainer.cli import refine
from drift_trainer.cli.toy import Corruption, addition_dataset, build_char_tokenizer, build_tiny_llama, offline_env
from tests.helpers import digit_first, refine_flags, run_under_timeout

pytestmark = pytest.mark.slow
offline_env()
TIMEOUT = 300
N_TRAIN = 20
COLUMNS = ["index", "score", "raw_score", "grad_norm", "loss", "weight", "scored"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("refine2")
    model_dir = str(root / "model")
    tok = build_char_tokenizer(model_dir)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2)
    model.save_pretrained(model_dir)
    lora = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    )
    lora.save_pretrained(str(root / "adapter"))
    addition_dataset(N_TRAIN, seed=0, corruption=Corruption("random", 0.3)).to_json(str(root / "train.jsonl"))
    addition_dataset(6, seed=1).select_columns(["prompt", "answer"]).to_json(str(root / "queries.jsonl"))
    return root


def _args(root, out, adapter=False, *extra):
    model = ["--model", str(root / "model")]
    if adapter:
        model = [
            "--model",
            str(root / "adapter"),
            "--base_model",
            str(root / "model"),
            "--tokenizer",
            str(root / "model"),
        ]
    return [
        *model,
        "--train_file",
        str(root / "train.jsonl"),
        "--query_file",
        str(root / "queries.jsonl"),
        "--reward",
        f"{digit_first.__module__}:digit_first",
        "--output_dir",
        str(out),
        *refine_flags(drift_rollout_batch_size=4),  # 4 rollout calls, 2 per rank
        "--no_report",
        *extra,
    ]


def _two_ranks(argv):
    port = str(29700 + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    run_under_timeout(cmd + ["-m", "drift_trainer.cli", "refine", *argv], TIMEOUT)


@pytest.fixture(scope="module")
def single(data):
    """The single-process reference runs: the full model and the LoRA adapter."""
    outs = {}
    for adapter in (False, True):
        outs[adapter] = data / f"single-{adapter}"
        assert refine.main(_args(data, outs[adapter], adapter)) == 0
    return outs


def _assert_same_scores(reference, out, fsdp: bool):
    a, b = pd.read_parquet(reference / "scores.parquet"), pd.read_parquet(out / "scores.parquet")
    assert sorted(b["index"]) == list(range(N_TRAIN)) and b["scored"].all()  # every row scored exactly once
    assert b["grad_norm"].gt(0).all()
    for column in COLUMNS[1:-1]:
        scale = max(float(a[column].abs().max()), 1e-9)
        np.testing.assert_allclose(b[column], a[column], rtol=0, atol=1e-5 * scale, err_msg=column)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["fsdp"] is fsdp  # DTensor parameters, read from the model itself
    return summary


def _assert_same_rollouts(reference, out):
    """The ranks shared the rollout calls and gathered exactly the single process's rollouts."""
    assert (out / "rollouts.jsonl").read_text() == (reference / "rollouts.jsonl").read_text()


def test_two_ranks_with_a_full_model_each_score_like_one(data, single):
    out = data / "ddp"
    _two_ranks(_args(data, out))
    _assert_same_scores(single[False], out, False)
    _assert_same_rollouts(single[False], out)


def test_fsdp_lora_scores_like_one(data, single):
    out = data / "fsdp-lora"
    _two_ranks(_args(data, out, True, "--fsdp"))
    _assert_same_scores(single[True], out, True)
    _assert_same_rollouts(single[True], out)


def test_fsdp_scores_like_one_and_resumes_with_a_rank_that_has_nothing_left(data, single):
    """Then the resume: rank 0's shards (0 and 2) stay on disk, rank 1's is removed, so rank 0 has no shard left to
    compute and must still run its share of rank 1's sharded forwards."""
    out = data / "fsdp"
    _two_ranks(_args(data, out, False, "--fsdp", "--keep_work"))
    _assert_same_scores(single[False], out, True)
    _assert_same_rollouts(single[False], out)
    os.remove(out / "work" / "shard-00001.npz")
    for name in ("scores.parquet", "summary.json"):
        os.remove(out / name)
    _two_ranks(_args(data, out, False, "--fsdp"))
    summary = _assert_same_scores(single[False], out, True)
    assert summary["shards"]["resumed"] == 2 and summary["shards"]["computed"] == 1
    assert not (out / "work").exists()


def test_fsdp_needs_several_processes(data, capsys):
    assert refine.main(_args(data, data / "one-fsdp", False, "--fsdp")) != 0
    assert "--fsdp shards the model over several processes" in capsys.readouterr().err
