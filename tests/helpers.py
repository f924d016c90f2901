"""Setup shared by the test modules: the tiny DRIFT configs and trainers, the reward functions and the toy data.

Pytest fixtures (the session's char tokenizer, a fresh tiny Llama per test) live in ``conftest.py``; this module is
plain code, imported as ``from tests.helpers import ...``. Nothing here switches off a TRL default: a tiny config runs
bf16 autocast (``use_cpu`` makes it CPU autocast), TRL's gradient checkpointing and whatever eval set a test passes. A
test about one of those options sets it itself and says why.
"""

from __future__ import annotations

import numpy as np

from drift_trainer import DriftConfig, DriftSFTTrainer, DriftTrainingArguments
from drift_trainer.cli.toy import Corruption, addition_dataset, query_dataset_from
from drift_trainer.core.feature_pass import TrainView
from drift_trainer.core.refresh import run_refresh
from drift_trainer.core.rewards import completion_text
from drift_trainer.hf.config import DriftArguments

# ---------------------------------------------------------------------------------------------- reward functions


def digit_start_reward(prompts, completions, **kwargs):
    """1.0 when the completion starts with a digit: gives a random tiny model a mix of right and wrong rollouts."""
    return [float(completion_text(c)[:1].isdigit()) for c in completions]


def digit_first(prompts, completions, **kwargs):
    """1.0 when the completion, stripped, starts with a digit: gives a random model's rollouts some contrast."""
    return [1.0 if str(c).strip()[:1].isdigit() else 0.0 for c in completions]


# ---------------------------------------------------------------------------------------------- data


def addition_data(n=40, conversational=False, num_queries=8):
    """The toy task most tests train on: ``n`` addition rows (30% of answers corrupted at random) and a query set."""
    train = addition_dataset(n, seed=0, corruption=Corruption("random", 0.3), conversational=conversational)
    queries = query_dataset_from(addition_dataset(num_queries, seed=1, conversational=conversational))
    return train, queries


def _prompt_completion_ids(tokenizer, prompt, completion):
    return tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]


def sft_rows(tokenizer, dataset):
    """Plain-text prompt-completion rows as a refresh reads them: ``input_ids`` and ``labels`` (prompt masked)."""
    rows = []
    for prompt, completion in zip(dataset["prompt"], dataset["completion"]):
        p, c = _prompt_completion_ids(tokenizer, prompt, completion)
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return rows


def tokenize_dataset(tokenizer, dataset):
    """A prompt-completion dataset tokenized for a plain ``transformers.Trainer`` (ids, masked labels, attention)."""

    def tok(row):
        p, c = _prompt_completion_ids(tokenizer, row["prompt"], row["completion"])
        return {"input_ids": p + c, "labels": [-100] * len(p) + c, "attention_mask": [1] * (len(p) + len(c))}

    return dataset.map(tok, remove_columns=dataset.column_names)


def train_view(rows):
    """Every row of ``rows`` as the train set a refresh scores."""
    return TrainView(rows=rows, user_index=np.arange(len(rows)), num_examples=len(rows))


# ---------------------------------------------------------------------------------------------- configs


def cpu_args(output_dir, **options):
    """The options every test run shares: on the CPU, no reporting, no checkpoints (unless ``options`` says so)."""
    return {"output_dir": str(output_dir), "use_cpu": True, "report_to": [], "save_strategy": "no", **options}


# batch 4, a refresh every 4 steps over 4 queries with 4-token rollouts, no progress bars
TINY_DRIFT = {
    "per_device_train_batch_size": 4,
    "drift_refresh_steps": 4,
    "drift_num_queries": 4,
    "drift_max_new_tokens": 4,
    "drift_progress": False,
}


def tiny_config(output_dir, **overrides):
    """A DriftConfig sized for CPU tests: tiny batches, short rollouts, no progress bars, no reporting.

    Everything else is TRL's default, as users run it: bf16 autocast (``use_cpu`` makes it CPU autocast) and TRL's
    gradient checkpointing. A test about one of those options overrides it and says why.
    """
    base = cpu_args(
        output_dir,
        **TINY_DRIFT,
        max_steps=12,
        learning_rate=3e-3,
        logging_steps=4,
        drift_num_rollouts=4,
        drift_uniform_mix=0.0,
        drift_score_ema=0.0,
    )
    return DriftConfig(**{**base, **overrides})


def tiny_training_args(output_dir, **overrides):
    """DriftTrainingArguments for a plain ``Trainer`` + ``DriftCallback``: 8 steps, the tiny DRIFT options."""
    return DriftTrainingArguments(**cpu_args(output_dir, **{**TINY_DRIFT, "max_steps": 8, **overrides}))


def drift_args(**options):
    """Validated DriftArguments, for code that runs outside a Trainer (a refresh, the weighting rules)."""
    args = DriftArguments(**options)
    args.validate_drift()
    return args


# ---------------------------------------------------------------------------------------------- trainers and refreshes


def tiny_trainer(model, tokenizer, args, train_dataset, query_dataset=None, reward_funcs=digit_start_reward, **kwargs):
    """A DriftSFTTrainer on the toy task, judged by ``digit_start_reward`` unless ``reward_funcs`` says otherwise."""
    return DriftSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        query_dataset=query_dataset,
        reward_funcs=reward_funcs,
        processing_class=tokenizer,
        **kwargs,
    )


def refresh_once(args, model, tokenizer, view, query_dataset, reward_funcs, projector, **kwargs):
    """One ``run_refresh`` outside any Trainer: at step 1 and without progress bars unless ``kwargs`` says otherwise."""
    return run_refresh(
        **{"step": 1, "progress": False, **kwargs},
        args=args,
        model=model,
        tokenizer=tokenizer,
        view=view,
        query_dataset=query_dataset,
        reward_funcs=reward_funcs,
        projector=projector,
    )


def preference_pairs(n, seed, flip=0.3):
    """Toy addition pairs (`prompt`, `chosen`, `rejected`, `answer`), a share ``flip`` of them with the answers swapped."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "answer": []}
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        right, wrong = str(a + b), str(a + b + rng.randint(1, 5))
        f = rng.random() < flip
        rows["prompt"].append(f"{a}+{b}=")
        rows["chosen"].append(wrong if f else right)
        rows["rejected"].append(right if f else wrong)
        rows["answer"].append(right)
    return Dataset.from_dict(rows)


def run_under_timeout(cmd: list[str], timeout: int) -> None:
    """Run a (torchrun) command with the repository importable and one torch thread per process; fail the test with
    its output if it hangs past ``timeout`` seconds or exits non-zero."""
    import os
    import subprocess

    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} hung for {timeout}s:\n{(exc.stderr or b'')[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def refine_flags(**overrides) -> list[str]:
    """Small, fast ``drift-trainer refine`` options for the tests, as ``--flag value`` pairs (``overrides`` by name)."""
    flags = {
        "drift_num_queries": 4,
        "drift_num_rollouts": 4,
        "drift_max_new_tokens": 3,
        "drift_projection_dim": 4,
        "drift_feature_batch_size": 8,
        "drift_rollout_batch_size": 16,
        "drift_progress": "false",
        "shard_size": 8,
        "seed": 3,
        **overrides,
    }
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]
