"""`drift-trainer sft`: TRL's SFT script run with DRIFT from its flags."""

from drift_trainer.cli.toy import addition_dataset, build_tiny_llama
from tests.helpers import addition_data


def test_drift_trainer_sft_command(tmp_path, tokenizer, capsys):
    """`drift-trainer sft` is TRL's SFT script with DRIFT: its arguments, its main, DRIFT's flags."""
    import trl

    from drift_trainer.cli import main

    model_dir = tmp_path / "model"
    build_tiny_llama(tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    train, queries = addition_data()
    (tmp_path / "data").mkdir()
    train.to_json(str(tmp_path / "data" / "train.jsonl"))
    addition_dataset(8, seed=5).to_json(str(tmp_path / "data" / "test.jsonl"))
    queries.to_json(str(tmp_path / "q.jsonl"))
    sft_trainer = trl.SFTTrainer
    argv = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "2",
            "--report_to", "none", "--save_strategy", "no", "--drift_refresh_steps", "2",
            "--drift_query_dataset", str(tmp_path / "q.jsonl"), "--drift_reward_funcs", "exact_match",
            "--drift_max_new_tokens", "4", "--drift_progress", "false"]  # fmt: skip
    assert main(argv) == 0
    assert trl.SFTTrainer is sft_trainer  # the swap is undone
    assert "Training completed" in capsys.readouterr().out
    refreshes = sorted(p.name for p in (tmp_path / "out" / "drift").iterdir() if p.name.startswith("refresh-"))
    assert refreshes == ["refresh-000002", "refresh-000004"]
    assert (tmp_path / "out" / "model.safetensors").exists()
