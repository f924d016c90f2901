"""End-to-end tests of ``drift-trainer refine`` on a tiny random Llama saved to disk."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from drift_trainer.cli import main as cli_main, refine
from drift_trainer.cli.toy import (
    Corruption,
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    offline_env,
)
from tests.helpers import digit_first, refine_flags

offline_env()
N_TRAIN = 20
FAST = refine_flags()
REWARD = f"{digit_first.__module__}:digit_first"


def always_zero(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def broken(prompts, completions, **kwargs):
    return [float(kwargs["no_such_column"][0])] * len(completions)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    model_dir = str(root / "model")
    tok = build_char_tokenizer(model_dir)
    build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(model_dir)
    train = addition_dataset(N_TRAIN, seed=0, corruption=Corruption("random", 0.3))
    train.to_json(str(root / "train.jsonl"))
    queries = addition_dataset(6, seed=1).select_columns(["prompt", "answer"]).rename_column("answer", "target")
    queries.to_json(str(root / "queries.jsonl"))
    return {
        "root": root,
        "model": model_dir,
        "train": str(root / "train.jsonl"),
        "queries": str(root / "queries.jsonl"),
        "tokenizer": tok,
    }


def _args(data, out, train=None, *extra, reward=REWARD):
    return [
        "--model",
        data["model"],
        "--train_file",
        train or data["train"],
        "--query_file",
        data["queries"],
        "--answer_column",
        "target",
        "--reward",
        reward,
        "--output_dir",
        str(out),
        *FAST,
        *extra,
    ]


def _run(argv):
    assert refine.main(argv) == 0


@pytest.fixture(scope="module")
def base_run(data):
    out = data["root"] / "base"
    _run(_args(data, out, None, "--keep_work"))
    return out


def test_weight_mode_outputs(data, base_run):
    scores = pd.read_parquet(base_run / "scores.parquet")
    assert list(scores.columns) == ["index", "score", "weight", "grad_norm", "raw_score", "loss", "scored"]
    assert scores["index"].tolist() == list(range(N_TRAIN))
    assert scores["scored"].all() and (scores["grad_norm"] > 0).all() and np.isfinite(scores["loss"]).all()
    assert scores["weight"].mean() == pytest.approx(1.0)
    assert scores["score"].std() > 0

    # the default score: normalize debiasing (raw / norm) plus the loss hybrid, z(influence) + z(-loss)
    def z(x):
        x = np.asarray(x, dtype=np.float64)
        return (x - x.mean()) / x.std()

    influence = scores["raw_score"] / scores["grad_norm"]
    np.testing.assert_allclose(scores["score"], z(influence) + z(-scores["loss"]), rtol=1e-6, atol=1e-9)
    with open(data["train"]) as f:
        original = [json.loads(line) for line in f]
    with open(base_run / "refined.jsonl") as f:
        refined = [json.loads(line) for line in f]
    assert len(refined) == N_TRAIN
    for o, r, w in zip(original, refined, scores["weight"]):
        assert r.pop("weight") == pytest.approx(w)
        assert r == o  # every other field as it was read
    with open(base_run / "rollouts.jsonl") as f:
        rollouts = [json.loads(line) for line in f]
    assert len(rollouts) == 4 * 4 and {"query", "completion", "reward", "sign"} <= set(rollouts[0])
    assert {r["reward"] for r in rollouts} == {0.0, 1.0}  # contrast
    summary = json.loads((base_run / "summary.json").read_text())
    assert summary["kind"] == "refine" and summary["contrast"] and summary["num_scored"] == N_TRAIN
    assert {"rollouts", "rollout_features", "features", "influence"} <= set(summary["timings"])
    assert summary["shards"] == {"total": 3, "resumed": 0, "computed": 3, "shard_size": 8}
    assert summary["options"]["drift_projection_dim"] == 4
    html = (base_run / "report" / "report.html").read_text()
    assert html.count("<img") == 5
    examples = [json.loads(line) for line in (base_run / "examples.jsonl").read_text().splitlines()]
    assert examples[0]["text"].startswith(original[0]["prompt"])
    assert not [p for p in os.listdir(base_run) if p.startswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("summary.json", "rollouts.jsonl", "refined.jsonl", "examples.jsonl", "report/report.html"):
        assert os.stat(base_run / name).st_mode & 0o777 == 0o666 & ~umask, name  # not tempfile's 0600


def test_matches_run_refresh(data, base_run):
    """refine is one refresh: same scores as refresh.run_refresh on the same model, rows and seed."""
    from datasets import Dataset

    from drift_trainer.cli.datafiles import read_table, tokenize_rows, train_kind
    from drift_trainer.core.feature_pass import TrainView
    from drift_trainer.core.features import ProjectedGradients, select_target_modules
    from drift_trainer.core.refresh import run_refresh
    from drift_trainer.core.rewards import resolve_reward_funcs

    ra, da = refine.parse_args(_args(data, data["root"] / "unused"))
    model, tok = refine.load_model_and_tokenizer(ra, __import__("torch").device("cpu"))
    table = read_table(data["train"])
    rows, index = tokenize_rows(table, tok, train_kind(table.columns, data["train"]))
    queries = refine.load_queries(ra)
    proj = ProjectedGradients(select_target_modules(model, "auto"), da.drift_projection_dim, da.drift_projection_seed)
    result = run_refresh(
        args=da,
        step=0,
        model=model,
        tokenizer=tok,
        view=TrainView(rows, index, len(table.rows)),
        query_dataset=Dataset.from_list(queries.to_list()),
        reward_funcs=resolve_reward_funcs(REWARD),
        projector=proj,
        seed=ra.seed,
        progress=False,
    )
    scores = pd.read_parquet(base_run / "scores.parquet")
    np.testing.assert_allclose(scores["score"], result.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores["grad_norm"], result.grad_norm, rtol=1e-4)


def test_tokenization_matches_sft_trainer(data):
    """Train rows are tokenized (ids and masked labels) exactly as TRL's SFTTrainer prepares them."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from drift_trainer.cli.datafiles import TableFile, tokenize_rows, train_kind

    tok = data["tokenizer"]
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2)
    plain = addition_dataset(4, seed=5)
    chat = addition_dataset(4, seed=6, conversational=True)
    cases = {
        "prompt_completion": plain.select_columns(["prompt", "completion"]).to_list(),
        "conversational": chat.select_columns(["prompt", "completion"]).to_list(),
        "messages": [{"messages": r["prompt"] + r["completion"]} for r in chat.to_list()],
        "text": [{"text": r["prompt"] + r["completion"]} for r in plain.to_list()],
    }
    for name, rows in cases.items():
        args = SFTConfig(output_dir=str(data["root"] / "sft"), report_to=[], use_cpu=True, dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        expected = trainer.train_dataset
        table = TableFile(name, "jsonl", rows)
        got, index = tokenize_rows(table, tok, train_kind(table.columns, name))
        assert index.tolist() == list(range(len(rows)))
        assert [g["input_ids"] for g in got] == expected["input_ids"], name
        assert [g["labels"] for g in got] == expected["labels"], name
        assert any(-100 in g["labels"] for g in got) == (name in ("prompt_completion", "conversational")), name


_WRITE_SHARD = refine.write_shard


def after_each_shard(monkeypatch, hook):
    """Call ``hook(s)`` right after refine writes feature shard ``s`` (a hook that raises is a crash there)."""

    def write_then_hook(work, s, arrays):
        _WRITE_SHARD(work, s, arrays)
        hook(s)

    monkeypatch.setattr(refine, "write_shard", write_then_hook)


def test_resume_after_interruption(data, base_run, monkeypatch):
    out = data["root"] / "resumed"
    written = []

    def crash_after_two(s):
        written.append(s)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")

    after_each_shard(monkeypatch, crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        refine.main(_args(data, out))
    work = out / "work"
    assert sorted(os.listdir(work)) == [
        "meta.json",
        "rollouts.json",
        "shard-00000.npz",
        "shard-00001.npz",
        "target.npz",
        "timings.json",
    ]
    assert not (out / "scores.parquet").exists() and not (out / "summary.json").exists()

    def no_generation(*a, **k):
        raise AssertionError("rollouts must be read back, not sampled again")

    written.clear()
    after_each_shard(monkeypatch, written.append)
    monkeypatch.setattr("drift_trainer.core.pipeline.generate_rollouts", no_generation)
    _run(_args(data, out))
    assert written == [2]  # only the missing shard was computed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["resumed"] == 2 and summary["shards"]["computed"] == 1
    assert not work.exists()  # removed after success (no --keep_work)
    a, b = pd.read_parquet(base_run / "scores.parquet"), pd.read_parquet(out / "scores.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_resume_refuses_other_inputs(data, monkeypatch, capsys):
    out = data["root"] / "mismatch"

    def crash(s):
        raise KeyboardInterrupt()

    after_each_shard(monkeypatch, crash)
    with pytest.raises(KeyboardInterrupt):
        refine.main(_args(data, out))
    before = json.loads((out / "work" / "meta.json").read_text())["hash"]
    assert refine.main(_args(data, out, None, "--drift_debias", "none")) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out / "work") in err
    written = []
    after_each_shard(monkeypatch, lambda s: (written.append(s), crash(s)))
    with pytest.raises(KeyboardInterrupt):
        refine.main(_args(data, out, None, "--drift_debias", "none", "--overwrite"))
    assert written == [0]  # started over: shard 0 computed again
    assert json.loads((out / "work" / "meta.json").read_text())["hash"] != before


def test_filter_mode_parquet_conversational(data):
    rows = addition_dataset(12, seed=2, conversational=True).to_list()
    path = data["root"] / "chat.parquet"
    pd.DataFrame(rows).to_parquet(path)
    out = data["root"] / "filtered"
    _run(_args(data, out, str(path), "--mode", "filter", "--keep_fraction", "0.5", "--no_report"))
    scores = pd.read_parquet(out / "scores.parquet")
    refined = pd.read_parquet(out / "refined.parquet")
    top = sorted(scores.sort_values("score", ascending=False)["index"][:6])
    assert list(refined.columns) == list(pd.read_parquet(path).columns)  # no weight column in filter mode
    assert len(refined) == 6
    kept_prompts = [p[0]["content"] for p in refined["prompt"]]
    assert kept_prompts == [rows[i]["prompt"][0]["content"] for i in top]  # top half, original order
    assert not (out / "report").exists()


def test_disk_format_and_peft_adapter(data):
    from datasets import Dataset, load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(data["model"])
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    from drift_trainer.core.features import select_target_modules

    names = [n for n, _ in select_target_modules(lora, "auto")]  # regression: lora_A is a ModuleDict (no .get)
    assert len(names) == 4 and all(".lora_A.default" in n or ".lora_B.default" in n for n in names)
    adapter = str(data["root"] / "adapter")
    lora.save_pretrained(adapter)
    assert os.path.exists(os.path.join(adapter, "adapter_config.json"))
    text = Dataset.from_list(
        [{"text": r["prompt"] + r["completion"], "id": i} for i, r in enumerate(addition_dataset(10, seed=4).to_list())]
    )
    disk = str(data["root"] / "text_ds")
    text.save_to_disk(disk)
    out = data["root"] / "peft"
    argv = _args(data, out, disk, "--no_report", "--weight_column", "drift_weight")
    argv[argv.index("--model") + 1] = adapter
    _run(argv + ["--tokenizer", data["model"]])
    refined = load_from_disk(str(out / "refined"))
    assert refined.column_names == ["text", "id", "drift_weight"] and len(refined) == 10
    scores = pd.read_parquet(out / "scores.parquet")
    assert (scores["grad_norm"] > 0).all()  # LoRA features are live (adapter loaded trainable)
    np.testing.assert_allclose(refined["drift_weight"], scores["weight"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "/nonexistent/model"}, "save_pretrained"),
        ({"--model": "__empty__"}, "neither config.json nor adapter_config.json"),
        ({"--model": "__badmodel__"}, "Cannot load a causal LM"),
        ({"--train_file": "__badcols__"}, "needs `prompt` and `completion`"),
        ({"--answer_column": "solution"}, "--answer_column"),
        ({"--reward": f"{__name__}:broken"}, "failed on the first batch"),
        ({"--reward": "no_such_reward"}, "Unknown reward"),
        ({"--reward": f"{__name__}:always_zero"}, "No contrast"),
        ({"--train_file": "__txt__"}, "Cannot tell the format"),
    ],
)
def test_clear_errors(data, capsys, tmp_path, change, message):
    root = data["root"]
    (root / "empty").mkdir(exist_ok=True)
    (root / "badmodel").mkdir(exist_ok=True)
    (root / "badmodel" / "config.json").write_text("{not json")
    (root / "badcols.jsonl").write_text('{"question": "1+1=", "response": "2"}\n')
    (root / "train.txt").write_text("1+1=2\n")
    special = {
        "__empty__": str(root / "empty"),
        "__badmodel__": str(root / "badmodel"),
        "__badcols__": str(root / "badcols.jsonl"),
        "__txt__": str(root / "train.txt"),
    }
    argv = _args(data, tmp_path / "out")
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = special.get(value, value)
    assert refine.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    bad = next(iter(change.values()))
    if bad in special:
        assert special[bad] in err  # names the file


def test_filter_needs_a_rule(data, capsys):
    assert refine.main(_args(data, data["root"] / "x", None, "--mode", "filter")) == 1
    assert "--keep_fraction" in capsys.readouterr().err


def test_cli_dispatch_and_flags_in_sync(data, capsys):
    from dataclasses import fields

    from drift_trainer.cli.refine_inputs import TRAINING_ONLY
    from drift_trainer.hf.config import DriftArguments

    with pytest.raises(SystemExit):
        cli_main(["refine", "--help"])
    help_text = capsys.readouterr().out
    for f in fields(DriftArguments):  # every option that takes effect on one scoring pass, and only those
        assert (f"--{f.name} " in help_text) == (f.name not in TRAINING_ONLY), f.name


def test_select_rows_rules():
    scores = np.array([0.5, -1.0, 0.0, 2.0, 1.0])
    weights = np.array([1.2, 0.3, 1.0, 2.0, 0.9])
    scored = np.array([True, True, False, True, True])  # row 2 has no trained token: always kept
    ra = refine.RefineArguments(
        model="m", train_file="t", query_file="q", output_dir="o", mode="filter", keep_fraction=0.5
    )
    assert refine.select_rows(ra, scores, weights, scored).tolist() == [False, False, True, True, True]
    ra.keep_fraction, ra.min_weight = None, 1.0
    assert refine.select_rows(ra, scores, weights, scored).tolist() == [True, False, True, True, False]
    ra.mode, ra.min_weight = "weight", None
    assert refine.select_rows(ra, scores, weights, scored).all()


def test_bf16_model(data, base_run):
    """A model loaded in bfloat16 (`--dtype bfloat16`): features are still projected and stored in float32, and the
    per-example gradient norms and losses stay within bf16 rounding of the float32 run's."""
    out = data["root"] / "bf16"
    _run(_args(data, out, None, "--dtype", "bfloat16"))
    got, ref = pd.read_parquet(out / "scores.parquet"), pd.read_parquet(base_run / "scores.parquet")
    assert got["scored"].all() and np.isfinite(got["score"]).all()
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=5e-2)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-2)


def test_refine_honours_drift_scorer(data, base_run):
    """`--drift_scorer loss` scores every row as -loss (so it ranks rows by loss), unlike the default `drift`."""
    out = data["root"] / "loss_scorer"
    _run(_args(data, out, None, "--drift_scorer", "loss", "--no_report"))
    by_loss = pd.read_parquet(out / "scores.parquet")
    by_drift = pd.read_parquet(base_run / "scores.parquet")
    np.testing.assert_allclose(by_loss["score"], -by_loss["loss"], rtol=1e-12)
    order = np.argsort(-by_loss["score"].to_numpy(), kind="stable")
    assert (order == np.argsort(by_loss["loss"].to_numpy(), kind="stable")).all()
    np.testing.assert_allclose(by_loss["loss"], by_drift["loss"], rtol=1e-5)  # same model, same rows
    ranks = [np.argsort(np.argsort(s.to_numpy())) for s in (by_loss["score"], by_drift["score"])]
    assert abs(np.corrcoef(*ranks)[0, 1]) < 0.95  # not DRIFT's ranking
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["drift_scorer"] == "loss"


def test_help_lists_only_flags_that_take_effect(capsys):
    from drift_trainer.cli.refine_inputs import TRAINING_ONLY

    with pytest.raises(SystemExit):
        refine.parse_args(["--help"])
    text = capsys.readouterr().out
    assert [name for name in TRAINING_ONLY if f"--{name} " in text] == []
    for name in ("drift_scorer", "drift_weighting", "drift_preconditioner", "drift_signing", "drift_feature_memory_mb"):
        assert f"--{name}" in text


def test_adam_preconditioner_is_refused_naming_the_alternatives(data, tmp_path):
    with pytest.raises(ValueError, match="--drift_preconditioner adam .* identity, fisher or kronecker"):
        refine.parse_args(_args(data, tmp_path / "o", None, "--drift_preconditioner", "adam"))


def test_kronecker_preconditioner_scores_every_row(data, tmp_path):
    out = tmp_path / "kron"
    assert cli_main(["refine", *_args(data, out, None, "--drift_preconditioner", "kronecker")]) == 0
    scores = pd.read_parquet(out / "scores.parquet")
    assert scores["scored"].all() and np.isfinite(scores["score"]).all() and scores["score"].std() > 0
