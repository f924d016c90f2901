"""The quality benchmark's bookkeeping: runs of one seed are paired only if they come from one base model."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import quality  # noqa: E402
from quality_stats import base_accuracies  # noqa: E402


def _ns(out):
    return quality.parse(["--out", str(out)])


def _finished(out, name):
    os.makedirs(out / "runs", exist_ok=True)
    (out / "runs" / f"{name}.json").write_text("{}")


def test_check_base_records_a_new_seed_and_accepts_the_same_base(tmp_path):
    ns = _ns(tmp_path)
    quality.check_base(ns, "warm", 3, 0.75)
    assert json.load(open(tmp_path / "base_accuracy.json"))["warm"] == {"3": 0.75}
    _finished(tmp_path, "warm-none-seed3-plain")
    quality.check_base(ns, "warm", 3, 0.75)  # the base the finished runs came from: fine


def test_check_base_refuses_another_base_under_finished_runs(tmp_path):
    ns = _ns(tmp_path)
    quality.check_base(ns, "warm", 8, 0.703)
    _finished(tmp_path, "warm-none-seed8-plain")
    _finished(tmp_path, "warm-none-seed18-plain")  # "-seed18-" is not a run of seed 8
    with pytest.raises(SystemExit, match=r"warm seed 8 was retrained here to test accuracy 0\.723.*0\.703"):
        quality.check_base(ns, "warm", 8, 0.723)
    assert json.load(open(tmp_path / "base_accuracy.json"))["warm"]["8"] == 0.703  # the record is kept
    quality.check_base(ns, "warm", 1, 0.5)  # seed 1 has no finished run
    quality.check_base(ns, "icl", 8, 0.9)  # nor has the icl regime of seed 8


def test_check_base_takes_a_rerun_base_once_the_seeds_runs_are_moved_aside(tmp_path):
    ns = _ns(tmp_path)
    quality.check_base(ns, "warm", 2, 0.6)
    quality.check_base(ns, "warm", 2, 0.8)  # no finished run of seed 2: the new base is recorded
    assert json.load(open(tmp_path / "base_accuracy.json"))["warm"]["2"] == 0.8


def test_aggregation_never_overwrites_the_kept_base_of_a_seed(tmp_path):
    (tmp_path / "base_accuracy.json").write_text(json.dumps({"warm": {"0": 0.86}, "icl": {}}))
    for seed, acc in ((0, 0.73), (1, 0.8)):  # seed 0 retrained to another base; seed 1 not kept yet
        os.makedirs(tmp_path / "base" / f"seed{seed}")
        (tmp_path / "base" / f"seed{seed}" / "base.json").write_text(json.dumps({"test_accuracy": acc}))
    warm, icl = base_accuracies(str(tmp_path), seeds=2)
    assert warm == {0: 0.86, 1: 0.8} and icl == {}


def test_preference_start_options_keep_the_default_configurations_recorded_runs():
    import preference

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    with open(os.path.join(bench, "results", "preference.json")) as f:
        recorded = json.load(f)["meta"]["config_key"]
    assert preference.config_key(preference.run_config(), 0.33) == recorded
    assert preference.config_key(preference.run_config(sft_demos=0), 0.33) == recorded
    icl = preference.run_config(sft_steps=400, sft_demos=3)
    assert (icl["sft_demos"], icl["sft_steps"]) == (3, 400)
    assert preference.config_key(icl, 0.33) != recorded  # its runs go under their own key


def test_preference_refuses_a_retrained_start_that_differs_from_the_recorded_one(monkeypatch):
    import types

    import preference

    recorded = [{"key": "k", "method": "start", "seed": 3, "pref_acc": 0.725, "exact": 0.101}]
    seed = types.SimpleNamespace(seed=3, start=None, test=None)
    cfg = {"beta": 1.0, "width": 2}
    monkeypatch.setattr(preference, "evaluate", lambda *a: {"pref_acc": 0.725, "exact": 0.101})
    preference.check_start(recorded, "k", seed, None, cfg)  # the same start: accepted
    preference.check_start(recorded, "other", seed, None, cfg)  # no recorded start under this key: accepted
    monkeypatch.setattr(preference, "evaluate", lambda *a: {"pref_acc": 0.730, "exact": 0.142})
    with pytest.raises(SystemExit, match="seed 3 was retrained here to pref_acc 0.7300"):
        preference.check_start(recorded, "k", seed, None, cfg)


def test_every_quality_variant_is_a_valid_set_of_drift_options():
    from drift_trainer import DriftConfig

    for name, options in quality.VARIANTS.items():
        args = DriftConfig(output_dir="/tmp/drift-variant-check", use_cpu=True, report_to=[], **options)  # validates
        for key, value in options.items():
            assert getattr(args, key) == value, (name, key)


def test_every_preference_variant_is_a_valid_set_of_options_of_its_method():
    import preference

    from drift_trainer import DriftDPOConfig

    for name, (method, options) in preference.VARIANTS.items():
        args = DriftDPOConfig(
            output_dir="/tmp/drift-variant-check", use_cpu=True, report_to=[], drift_method=method, **options
        )
        for key, value in options.items():
            assert getattr(args, key) == value, (name, key)
