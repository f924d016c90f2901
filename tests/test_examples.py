"""Every script in ``examples/`` runs, on CPU, for a few steps: with TRL's defaults (bf16 autocast), local files in
place of hub datasets, and a tiny local model in place of a hub id."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from drift_trainer.cli.toy import (
    Corruption,
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    query_dataset_from,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
FAST = [
    "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--max_steps", "4",
    "--per_device_train_batch_size", "4", "--drift_refresh_steps", "2", "--drift_num_queries", "4",
    "--drift_max_new_tokens", "4", "--drift_progress", "false",
]  # fmt: skip
TIMEOUT = 240  # seconds per script: a hang fails the test instead of blocking CI


def _run(script: str, args: list[str], cwd) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        cwd=str(cwd), env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny model saved as a hub checkpoint would be, and the data files the scripts read."""
    root = tmp_path_factory.mktemp("examples")
    model_dir = str(root / "model")
    tok = build_char_tokenizer(model_dir)
    build_tiny_llama(tok).save_pretrained(model_dir)
    train = addition_dataset(48, seed=0, corruption=Corruption("systematic", 0.3))
    os.makedirs(root / "data")
    train.to_json(str(root / "data" / "train.jsonl"))
    addition_dataset(8, seed=2).to_json(str(root / "data" / "test.jsonl"))
    query_dataset_from(addition_dataset(8, seed=1)).to_json(str(root / "queries.jsonl"))
    # the 7B script's columns: MetaMathQA (query, response) and GSM8K (question, answer "... #### n")
    train.map(lambda r: {"query": r["prompt"], "response": r["completion"]}, remove_columns=train.column_names).to_json(
        str(root / "metamath.jsonl")
    )
    queries = addition_dataset(8, seed=1)
    queries.map(
        lambda r: {"question": r["prompt"], "answer": f"so #### {r['answer']}"}, remove_columns=queries.column_names
    ).to_json(str(root / "gsm8k.jsonl"))
    return root


def test_every_example_script_is_tested():
    scripts = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    assert scripts == ["plain_trainer_callback.py", "sft_7b_lora_math.py", "trl_sft_script.py"]


def test_sft_7b_lora_math_on_a_tiny_local_model_in_bf16(local):
    out = local / "out-7b"
    _run(
        "sft_7b_lora_math.py",
        ["--model_name_or_path", str(local / "model"), "--train_dataset", str(local / "metamath.jsonl"),
         "--query_dataset", str(local / "gsm8k.jsonl"), "--num_queries", "8", "--lora_r", "4",
         "--output_dir", str(out), "--bf16", "true", *FAST],
        local,
    )  # fmt: skip
    refreshes = sorted(d for d in os.listdir(out / "drift") if d.startswith("refresh-"))
    assert refreshes == ["refresh-000002", "refresh-000004"]
    assert os.path.exists(out / "adapter_model.safetensors")  # LoRA: the adapter is what is saved


def test_plain_trainer_callback_in_bf16(local):
    text = _run("plain_trainer_callback.py", ["--output_dir", str(local / "out-plain"), "--bf16", "true", *FAST], local)
    assert "refreshes: 2" in text


def test_trl_sft_script_from_flags_and_from_yaml(local):
    flags = ["--model_name_or_path", str(local / "model"), "--dataset_name", str(local / "data"),
             "--eval_strategy", "steps", "--eval_steps", "2", "--drift_query_dataset", str(local / "queries.jsonl"),
             "--drift_reward_funcs", "exact_match"]  # fmt: skip
    out = local / "out-trl"
    _run("trl_sft_script.py", [*flags, "--output_dir", str(out), *FAST], local)
    summary = json.loads((out / "drift" / "refresh-000004" / "summary.json").read_text())
    assert summary["options"]["drift_reward_funcs"] == ["exact_match"]
    assert summary["options"]["drift_query_dataset"] == str(local / "queries.jsonl")
    # the same run configured by a YAML file alone (TrlParser's --config), as `trl sft --config` users do
    out_yaml = local / "out-trl-yaml"
    config = local / "sft.yaml"
    pairs = dict(zip(flags[::2], flags[1::2])) | dict(zip(FAST[::2], FAST[1::2]))
    lines = [f"{k.lstrip('-')}: {json.dumps(v)}" for k, v in pairs.items() if k != "--drift_reward_funcs"]
    config.write_text("\n".join([*lines, f"output_dir: {out_yaml}", "drift_reward_funcs: [exact_match]", ""]))
    _run("trl_sft_script.py", ["--config", str(config)], local)
    assert sorted(d for d in os.listdir(out_yaml / "drift") if d.startswith("refresh-")) == [
        "refresh-000002",
        "refresh-000004",
    ]
