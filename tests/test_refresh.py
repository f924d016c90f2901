"""run_refresh on its own, outside any Trainer."""

import copy

import numpy as np

from drift_trainer.cli.toy import addition_dataset, query_dataset_from
from drift_trainer.core.features import ProjectedGradients, select_target_modules
from drift_trainer.core.refresh import TrainView, run_refresh
from drift_trainer.hf.config import DriftArguments

from .conftest import digit_start_reward


def _rows(tokenizer, n):
    data = addition_dataset(n, seed=4)
    rows = []
    for r in data:
        p = tokenizer(r["prompt"])["input_ids"]
        c = tokenizer(r["completion"])["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return rows


def test_refresh_without_a_pad_token_and_with_a_bare_reward_callable(tokenizer, tiny_model):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    rows = _rows(tokenizer, 10)
    args = DriftArguments(drift_num_queries=4, drift_max_new_tokens=4, drift_progress=False)
    result = run_refresh(
        args=args,
        step=1,
        model=tiny_model,
        tokenizer=no_pad,
        view=TrainView(rows=rows, user_index=np.arange(10), num_examples=10),
        query_dataset=query_dataset_from(addition_dataset(4, seed=1)),
        reward_funcs=digit_start_reward,  # a bare callable, not a list
        projector=ProjectedGradients(select_target_modules(tiny_model), 4),
        progress=False,
    )
    assert result.contrast
    assert result.scored.all() and np.count_nonzero(result.scores) == 10
    assert len(result.rollouts) == 16
