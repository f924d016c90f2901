"""The package's shape: core/ and methods/ stand without the Trainer layer; per-stage parameters match the config."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import numpy as np

import drift_trainer

PACKAGE = pathlib.Path(drift_trainer.__file__).parent
TRAINER_LAYER = ("transformers.trainer", "trl.trainer", "drift_trainer.hf", "drift_trainer.cli")


def test_core_and_methods_import_no_trainer_layer():
    """Importing every module of core/ and methods/ in a fresh interpreter loads no Trainer, no TRL trainer and
    nothing of drift_trainer.hf / drift_trainer.cli."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import drift_trainer.core as c, drift_trainer.methods as m\n"
        "for p in (c, m):\n"
        "    for i in pkgutil.iter_modules(p.__path__):\n"
        "        importlib.import_module(p.__name__ + '.' + i.name)\n"
        f"print(sorted(k for k in sys.modules if k.startswith({TRAINER_LAYER!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_core_and_methods_name_no_trainer_layer_in_imports():
    """No import statement in core/ or methods/ names the Trainer layer (a lazy import inside a function included)."""
    offenders = []
    for sub in ("core", "methods"):
        for path in sorted((PACKAGE / sub).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                bad = [n for n in names if n.startswith(TRAINER_LAYER) or n.endswith(("Trainer", "TrainerCallback"))]
                offenders += [f"{path.name}:{node.lineno} {n}" for n in bad]
    assert offenders == []


def test_stage_parameters_read_every_option_with_the_config_defaults():
    from drift_trainer.core.params import Params, RefreshParams
    from drift_trainer.hf.config import DriftArguments

    assert RefreshParams.of(DriftArguments()) == RefreshParams()
    options = {f.name for f in dataclasses.fields(DriftArguments)}
    for part in dataclasses.fields(RefreshParams):
        cls = part.default_factory if part.default_factory is not dataclasses.MISSING else None
        if cls is None:
            continue
        for f in dataclasses.fields(cls):
            assert cls.ATTRS.get(f.name, f"drift_{f.name}") in options, (cls.__name__, f.name)
    changed = RefreshParams.of(DriftArguments(drift_weighting="prune", drift_damping=0.5, drift_rollout_batch_size=3))
    assert (changed.weighting.weighting, changed.influence.damping, changed.rollouts.batch_size) == ("prune", 0.5, 3)
    assert issubclass(RefreshParams, Params)


def test_scorer_choices_come_from_the_registry():
    import pytest

    from drift_trainer.hf.config import DriftArguments
    from drift_trainer.methods.scorers import SCORERS, Scorer, register

    field = next(f for f in dataclasses.fields(DriftArguments) if f.name == "drift_scorer")
    assert field.metadata["choices"] == list(SCORERS)
    assert all(f"`{name}`" in field.metadata["help"] for name in SCORERS)
    with pytest.raises(ValueError, match="drift_scorer must be one of"):
        DriftArguments(drift_scorer="longest_first").validate_drift()

    class LongestFirst(Scorer):
        name = "longest_first"
        help = "test scorer"

        def scores(self, raw, norms, losses, seed, params):
            return np.asarray(norms, dtype=np.float64)

    register(LongestFirst())
    try:
        DriftArguments(drift_scorer="longest_first").validate_drift()  # accepted once registered
    finally:
        del SCORERS["longest_first"]


def test_method_choices_come_from_the_registry():
    from drift_trainer.hf.config import DriftConfig
    from drift_trainer.hf.method_options import PreferenceArguments
    from drift_trainer.methods import method_choices

    sft = next(f for f in dataclasses.fields(DriftConfig) if f.name == "drift_method")
    dpo = next(f for f in dataclasses.fields(PreferenceArguments) if f.name == "drift_method")
    assert sft.metadata["choices"] == list(method_choices("sft")) == ["drift", "ica"]
    assert dpo.metadata["choices"] == list(method_choices("dpo"))
    assert set(dpo.metadata["choices"]) == {"drift", "ica", "lossdiff_irm", "uniform"}
