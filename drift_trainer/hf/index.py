"""The trainer side of the contract: train rows carry their user-dataset index, and generation under ZeRO-3.

Both DRIFT trainers (SFT and DPO) call :func:`with_index` on the user's train set before TRL prepares it, and
:func:`prepare_index` once TRL has built its collator: then every train batch carries ``drift_index``, the row of
the user's ``train_dataset`` each example came from (rows without it, an eval set for instance, pass through).
"""

from __future__ import annotations

import contextlib

import torch

INDEX_COLUMN = "drift_index"


def log_metrics(trainer, metrics: dict) -> None:
    """Log ``metrics`` at the trainer's current step to every ``report_to`` integration and ``state.log_history``.

    Goes through ``transformers.Trainer.log`` itself, not a subclass's override: TRL's trainers override ``log`` to
    merge in (and clear) their buffered training metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``), which
    would move those series' points onto DRIFT's row and leave the next loss row without them.
    """
    from transformers import Trainer

    if isinstance(trainer, Trainer):
        Trainer.log(trainer, dict(metrics))
    elif hasattr(trainer, "log"):
        trainer.log(dict(metrics))


def check_train_dataset(train_dataset) -> None:
    """Reject train sets DRIFT cannot index; anything but a ``datasets.Dataset`` gets the ``TypeError`` plain
    ``SFTTrainer`` raises for it (with the conversion to use)."""
    from datasets import Dataset, IterableDataset

    if train_dataset is None:
        raise ValueError("DRIFT needs a train_dataset to score; got None.")
    if not isinstance(train_dataset, (Dataset, IterableDataset)):
        hint = {
            "DataFrame": "datasets.Dataset.from_pandas(df)",
            "list": "datasets.Dataset.from_list(rows)",
            "dict": "datasets.Dataset.from_dict(columns)",
        }.get(type(train_dataset).__name__, "datasets.Dataset.from_list / from_dict / from_pandas")
        raise TypeError(
            f"`train_dataset` must be a `Dataset` or `IterableDataset`, got `{type(train_dataset).__name__}`. "
            f"Convert it with {hint}."
        )
    if isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__"):
        raise ValueError(
            "DRIFT does not support an IterableDataset (streaming) train_dataset: it scores and reweights every "
            "example by index. Load it as a map-style datasets.Dataset (streaming=False), or set drift_enabled=False."
        )


def with_index(dataset):
    """``dataset`` with a ``drift_index`` column (its row numbers), unless it already has one."""
    if INDEX_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))


class IndexCollator:
    """Wrap a collator so each batch of train rows also carries the user-dataset index of its rows (``drift_index``).

    Rows without the column (an eval set, a prediction set: only the train set is indexed) pass through unchanged.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        if not examples or INDEX_COLUMN not in examples[0]:
            return self.inner(examples)
        index = [int(ex[INDEX_COLUMN]) for ex in examples]
        batch = self.inner([{k: v for k, v in ex.items() if k != INDEX_COLUMN} for ex in examples])
        batch[INDEX_COLUMN] = torch.tensor(index, dtype=torch.long)
        return batch


def prepare_index(trainer) -> None:
    """Make ``trainer``'s train batches carry ``drift_index``: its collator passes the column on, and the column is
    among the signature columns ``remove_unused_columns`` keeps (set now, so TRL's own choice is kept and extended)."""
    if not isinstance(trainer.data_collator, IndexCollator):
        trainer.data_collator = IndexCollator(trainer.data_collator)
    trainer._set_signature_columns_if_needed()
    if INDEX_COLUMN not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, INDEX_COLUMN]


@contextlib.contextmanager
def generation_context(trainer, model):
    """Yield a model ready for ``generate``: under DeepSpeed ZeRO-3 through TRL's helper (which gathers the weights
    once and removes the per-module hooks), under FSDP2 with every parameter group held unsharded for the duration
    (:func:`~drift_trainer.core.dist.fsdp2_unsharded`), otherwise the model itself."""
    accelerator = getattr(trainer, "accelerator", None) if trainer is not None else None
    if accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as unwrapped:
            yield unwrapped
        return
    from drift_trainer.core.dist import fsdp2_unsharded

    with fsdp2_unsharded(model) as full:
        yield full
