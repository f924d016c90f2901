"""DriftArguments, DriftConfig and DriftTrainingArguments: help texts, validation messages, command-line parsing."""

import dataclasses

import pytest
from transformers import HfArgumentParser

from drift_trainer import DriftArguments, DriftConfig, DriftTrainingArguments


def test_every_drift_field_has_help():
    for f in dataclasses.fields(DriftArguments):
        assert f.name.startswith("drift_")
        assert len(f.metadata.get("help", "")) > 20, f.name


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("drift_signing", "sign", "drift_signing must be one of 'correctness', 'advantage'"),
        ("drift_debias", "x", "drift_debias must be one of"),
        ("drift_preconditioner", "kfac", "drift_preconditioner"),
        ("drift_weighting", "top", "drift_weighting"),
        ("drift_reweight_mode", "x", "drift_reweight_mode"),
        ("drift_refresh_steps", 0, "drift_refresh_steps must be a positive integer"),
        ("drift_num_rollouts", 0, "drift_num_rollouts"),
        ("drift_temperature", 0.0, "drift_temperature must be in"),
        ("drift_top_p", 1.5, "drift_top_p"),
        ("drift_uniform_mix", 1.2, "drift_uniform_mix"),
        ("drift_prune_fraction", 1.0, "prunes every example"),
        ("drift_weight_clip", 0.5, "drift_weight_clip"),
        ("drift_damping", 0.0, "drift_damping"),
        ("drift_first_refresh_step", 0, "drift_first_refresh_step"),
        ("drift_loss_mix", -0.5, "drift_loss_mix"),
        ("drift_target_ema", 1.0, "drift_target_ema"),
        ("drift_contrast_rollouts", -1, "drift_contrast_rollouts"),
        ("drift_harm_alpha", 0.0, "drift_harm_alpha must be in"),
        ("drift_harm_alpha", 1.0, "drift_harm_alpha must be in"),
        ("drift_harm_max_rank", 0, "drift_harm_max_rank must be a power of two"),
        ("drift_harm_max_rank", 6, "drift_harm_max_rank must be a power of two"),
    ],
)
def test_bad_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DriftConfig(output_dir=str(tmp_path), **{field: value})


def test_truncate_bounds(tmp_path):
    with pytest.raises(ValueError, match="drift_truncate_low and drift_truncate_high"):
        DriftTrainingArguments(output_dir=str(tmp_path), drift_truncate_low=90, drift_truncate_high=10)


def test_command_line_flags_parse(tmp_path):
    parser = HfArgumentParser(DriftConfig)
    (cfg,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",  # TRL's bf16 default needs it on a machine without a GPU
            "true",
            "--drift_refresh_steps",
            "50",
            "--drift_signing",
            "advantage",
            "--drift_enabled",
            "false",
            "--drift_first_refresh_step",
            "20",
        ]
    )
    assert cfg.drift_refresh_steps == 50 and cfg.drift_signing == "advantage" and cfg.drift_enabled is False
    assert cfg.drift_first_step == 20
    (targs,) = HfArgumentParser(DriftTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--drift_weighting", "prune"]
    )
    assert targs.drift_weighting == "prune" and targs.drift_first_step == targs.drift_refresh_steps
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--use_cpu", "true", "--drift_debias", "bogus"]
        )


def test_trl_parser(tmp_path):
    from trl import TrlParser

    (cfg,) = TrlParser(DriftConfig).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--drift_num_queries", "7"]
    )
    assert cfg.drift_num_queries == 7


def test_options_validate_and_parse(tmp_path):
    with pytest.raises(ValueError, match="drift_max_train_examples"):
        DriftArguments(drift_max_train_examples=0).validate_drift()
    with pytest.raises(ValueError, match="drift_feature_memory_mb"):
        DriftArguments(drift_feature_memory_mb=0).validate_drift()
    with pytest.raises(ValueError, match="drift_max_train_examples"):
        DriftConfig(output_dir=str(tmp_path), use_cpu=True, drift_max_train_examples=-3)
    (parsed,) = HfArgumentParser(DriftArguments).parse_args_into_dataclasses(
        [
            "--drift_max_train_examples",
            "100",
            "--drift_feature_memmap_dir",
            str(tmp_path),
            "--drift_feature_memory_mb",
            "12.5",
        ]
    )
    assert parsed.drift_max_train_examples == 100
    assert parsed.drift_feature_memmap_dir == str(tmp_path)
    assert parsed.drift_feature_memory_mb == 12.5
    assert DriftArguments().drift_max_train_examples is None and DriftArguments().drift_feature_memmap_dir is None


def test_config_rejects_bad_method():
    with pytest.raises(ValueError, match="drift_method"):
        DriftConfig(output_dir="x", use_cpu=True, drift_method="lossdiff")
    with pytest.raises(ValueError, match="drift_ica_weighting"):
        DriftConfig(output_dir="x", use_cpu=True, drift_method="ica", drift_ica_weighting="exp")


@pytest.mark.parametrize("name", ["drift_reference_bound", "drift_harm_gate"])
def test_loss_reference_options_are_refused_for_preference_pairs(tmp_path, name):
    from drift_trainer import DriftDPOConfig

    with pytest.raises(ValueError, match=f"{name}=False for DriftDPOTrainer"):
        DriftDPOConfig(output_dir=str(tmp_path), **{name: True})
