"""The ``drift-trainer`` command: ``sft``, ``demo``, ``refine`` and ``report``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "sft": (
        "drift_trainer.cli.sft",
        "TRL's `trl sft` with DRIFT: TRL's SFT script arguments plus every --drift_* flag.",
    ),
    "demo": (
        "drift_trainer.cli.demo",
        "Train a tiny model twice (plain SFT and DRIFT) on a synthetic task and compare.",
    ),
    "refine": ("drift_trainer.cli.refine", "Score a dataset once with a checkpoint and write a refined copy."),
    "report": ("drift_trainer.cli.report", "Plots and an HTML page from a run's DRIFT artifacts."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="drift-trainer", description="On-policy data refinement for SFT (DRIFT).")
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[ns.command][0])
    return int(module.main(argv[1:]) or 0)
