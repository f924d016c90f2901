"""``drift-trainer sft``: TRL's ``trl sft`` with DRIFT.

The same script arguments (``ScriptArguments``, ``ModelConfig``, ``DatasetMixtureConfig``), the same ``--config``
YAML, the same training code: TRL's own ``trl.scripts.sft.main``, run with ``DriftConfig`` in place of ``SFTConfig``
(so every ``drift_*`` flag parses) and ``DriftSFTTrainer`` in place of ``SFTTrainer``. The query set and rewards come
from ``--drift_query_dataset`` / ``--drift_reward_funcs``::

    drift-trainer sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --output_dir out \\
        --drift_query_dataset queries.jsonl --drift_reward_funcs math_answer

Several processes: ``accelerate launch [--config_file ...] -m drift_trainer.sft ...`` (or ``torchrun -m``).
"""

from __future__ import annotations

import contextlib
import sys


def make_parser(prog: str = "drift-trainer sft"):
    """TRL's SFT parser with ``DriftConfig`` as the training config."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from drift_trainer.hf.config import DriftConfig

    return TrlParser((ScriptArguments, DriftConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


@contextlib.contextmanager
def drift_in_trl_scripts():
    """While inside, ``from trl import SFTTrainer`` (as TRL's scripts do when they run) gives ``DriftSFTTrainer``.

    TRL's ``sft.main`` imports the trainer class at call time; this swaps the one module attribute it reads for the
    duration of the call and restores it after, so nothing else in the process sees the swap afterwards.
    """
    import trl

    from drift_trainer.hf.sft_trainer import DriftSFTTrainer

    original = trl.SFTTrainer
    trl.SFTTrainer = DriftSFTTrainer
    try:
        yield
    finally:
        trl.SFTTrainer = original


def main(argv: list[str] | None = None) -> int:
    from trl.scripts import sft as trl_sft

    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
        list(sys.argv[1:] if argv is None else argv)
    )
    with drift_in_trl_scripts():
        trl_sft.main(script_args, training_args, model_args, dataset_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
