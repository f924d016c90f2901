"""DriftCallback: runs a refresh on schedule inside any ``transformers.Trainer``.

A callback is handed the model, the dataloader and the optimizer, never the trainer, yet ZeRO-3 generation needs the
DeepSpeed engine (``trainer.model_wrapped``) and logging needs ``trainer.log``. So the trainer is taken through one
documented step, as TRL's own callbacks do::

    trainer = Trainer(model=model, args=DriftTrainingArguments(...), train_dataset=train)
    DriftCallback(query_dataset=queries, reward_funcs=exact_match).attach(trainer)
    trainer.train()

``DriftSFTTrainer`` does this for you. The callback keeps the schedule, the logging and the checkpoints; the refresh
state machine is a :class:`~drift_trainer.core.refresher.Refresher`. Resuming has one path: :meth:`attach` routes
the checkpoint directory the Trainer restores its optimizer from (``_load_optimizer_and_scheduler``, the only place a
Trainer names it) to :meth:`DriftCallback.load_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from transformers import TrainerCallback

from drift_trainer.cli.datafiles import example_text, load_dataset_from
from drift_trainer.core.capture import FeatureCache, TrainCapture
from drift_trainer.core.dist import Dist
from drift_trainer.core.feature_pass import TrainView
from drift_trainer.core.features import ProjectedGradients, select_target_modules
from drift_trainer.core.refresh import BOUND_FIX, BOUND_WHO
from drift_trainer.core.refresher import Refresher
from drift_trainer.core.rewards import check_reward_funcs, resolve_reward_funcs
from drift_trainer.core.rollouts import check_query_dataset, check_query_format, dataset_format
from drift_trainer.core.sampler import DriftSampler
from drift_trainer.core.state import (
    STATE_FILE,
    DriftState,
    atomic_path,
    atomic_write_text,
    write_examples,
    write_refresh_result,
)
from drift_trainer.hf.config import DriftArguments, drift_arguments_from
from drift_trainer.hf.index import check_train_dataset, generation_context, log_metrics
from drift_trainer.methods.scorers import get_scorer, has_reference, require_reference

logger = logging.getLogger("drift_trainer")
SAMPLER_FILE = "drift_sampler.json"
FEATURES_FILE = "drift_features.npz"


def refresh_due(args, step: int) -> bool:
    """A refresh runs at ``drift_first_step`` and every ``drift_refresh_steps`` steps after it."""
    return next_refresh_step(args, step) == step


def next_refresh_step(args, step: int) -> int:
    """The first refresh step at or after ``step``."""
    first, every = args.drift_first_step, args.drift_refresh_steps
    return first if step <= first else first + -(-(step - first) // every) * every


def capture_window_steps(args, num_rows: int, rows_per_step: int) -> int | None:
    """Training steps before each refresh during which features are captured (``drift_capture_window`` epochs of
    ``num_rows`` at ``rows_per_step``, at least 1); None: every step."""
    window = args.drift_capture_window
    if window is None:
        return None
    return max(1, int(np.ceil(float(window) * num_rows / max(int(rows_per_step), 1) - 1e-9)))


def resolve_drift_args(own_args, trainer_args) -> DriftArguments:
    """The DRIFT options: ``own_args`` when given, else the trainer's args when they carry ``drift_*`` fields, else
    the defaults."""
    source = own_args
    if source is None:
        source = trainer_args if hasattr(trainer_args, "drift_enabled") else DriftArguments()
    return drift_arguments_from(source)


class DriftCallback(TrainerCallback):
    """Refreshes the train-data weights every ``drift_refresh_steps`` steps (see the module docstring).

    Args:
        query_dataset: validation queries, a ``datasets.Dataset`` with a ``prompt`` column (text or messages) plus the
            columns the reward functions need.
        reward_funcs: a callable ``f(prompts, completions, **columns) -> list[float]``, a built-in name
            (``"exact_match"``, ``"math_answer"``), or a list of them (rewards are summed).
        args: a ``DriftArguments`` (or any object with ``drift_*`` fields). Default: the trainer's own args when they
            carry ``drift_*`` fields, else ``DriftArguments()`` defaults.
        trainer: attach at once (same as calling :meth:`attach`).
        tokenizer: tokenizes the queries and decodes rollouts. Default: the trainer's ``processing_class``.
        num_examples: rows of the user's train set (default: one more than the largest ``drift_index``).
        capture_features: the trainer feeds features captured in its backward (``DriftSFTTrainer``).
        applies_loss_weights: the trainer scales each example's loss by :attr:`loss_weights`
            (``drift_reweight_mode="loss"``; ``DriftSFTTrainer``).
        fused_lm_head: the model returns TRL's fused per-token log-probabilities (``SFTTrainer`` patches it so).
    """

    def __init__(
        self,
        query_dataset=None,
        reward_funcs=None,
        args: DriftArguments | None = None,
        trainer=None,
        tokenizer=None,
        *,
        num_examples: int | None = None,
        capture_features: bool = False,
        applies_loss_weights: bool = False,
        fused_lm_head: bool = False,
    ):
        self.query_dataset = query_dataset
        self.tokenizer = tokenizer
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        self._own_args = args
        self.num_examples = num_examples
        self.capture_features = capture_features
        self.applies_loss_weights = applies_loss_weights
        self.fused_lm_head = fused_lm_head
        self.args: DriftArguments | None = None
        self.trainer = None
        self.refresher: Refresher | None = None
        self._state = DriftState()  # until the refresher exists (a checkpoint loads before training begins)
        self.sampler: DriftSampler | None = None
        self.view: TrainView | None = None
        self.projector: ProjectedGradients | None = None
        self.capture: TrainCapture | None = None
        self._capture_window: int | None = None  # steps before each refresh with capture on (None: every step)
        self._row_of_user: np.ndarray | None = None  # user-dataset index -> train row, for the capture
        self.loss_weights = None  # per user example, read by DriftSFTTrainer in `loss` mode
        self._loaded_checkpoint: str | None = None
        self._train_format: str | None = None  # "conversational", "text" or "tokenized" (see dataset_format)
        if trainer is not None:
            self.attach(trainer)

    @property
    def drift_state(self) -> DriftState:
        """Latest refresh: ``step``, ``scores``, ``weights`` (one per train example), ``history``."""
        return self.refresher.state if self.refresher is not None else self._state

    @drift_state.setter
    def drift_state(self, state: DriftState) -> None:
        self._state = state
        if self.refresher is not None:
            self.refresher.state = state

    # ------------------------------------------------------------------ setup
    def resolve_args(self, trainer_args) -> DriftArguments:
        return resolve_drift_args(self._own_args, trainer_args)

    def load_inputs(self, drift_args: DriftArguments) -> None:
        """Fill in what the constructor was not given from ``drift_query_dataset`` / ``drift_query_split`` and
        ``drift_reward_funcs`` (so a script gains DRIFT from flags or YAML alone). Objects passed in win."""
        if self.query_dataset is None and drift_args.drift_query_dataset:
            self.query_dataset = load_dataset_from(
                drift_args.drift_query_dataset, drift_args.drift_query_split, what="drift_query_dataset"
            )
        if not self.reward_funcs and drift_args.drift_reward_funcs:
            self.reward_funcs = resolve_reward_funcs(drift_args.drift_reward_funcs)

    def validate(self, drift_args: DriftArguments, train_dataset, trainer_args=None) -> None:
        """Check every input DRIFT needs; raises before training starts (reward functions are called once on a
        query row, see :func:`~drift_trainer.core.rewards.check_reward_funcs`)."""
        if not drift_args.drift_enabled:
            return
        self.load_inputs(drift_args)
        check_query_dataset(self.query_dataset)
        get_scorer(drift_args.drift_scorer).check_queries(self.query_dataset)
        if drift_args.drift_reference_bound:
            require_reference(self.query_dataset, BOUND_WHO, BOUND_FIX)
        if not self.reward_funcs:
            raise ValueError(
                "DRIFT is enabled but no reward function was given: pass reward_funcs=exact_match (or 'math_answer', "
                "or your own f(prompts, completions, **columns) -> list[float]), or --drift_reward_funcs NAME, or set "
                "drift_enabled=False."
            )
        check_train_dataset(train_dataset)
        check_reward_funcs(self.reward_funcs, self.query_dataset)
        if self._train_format is None:  # the user's rows (DriftSFTTrainer validates before TRL tokenizes them)
            self._train_format = dataset_format(train_dataset)
        if trainer_args is not None:
            if getattr(trainer_args, "packing", False) or getattr(trainer_args, "padding_free", False):
                raise ValueError(
                    "DRIFT scores each train example, but packing / padding_free merges examples into one row. "
                    "Set packing=False and padding_free=False, or drift_enabled=False."
                )

    def attach(self, trainer) -> DriftCallback:
        """Bind to ``trainer`` (adding this callback to it if needed), validate the inputs and route the trainer's
        checkpoint restore to :meth:`load_checkpoint`. Returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.args = self.resolve_args(trainer.args)
        self.validate(self.args, trainer.train_dataset, trainer.args)
        if not self.args.drift_enabled:
            return self
        if self.tokenizer is None:
            tokenizer = getattr(trainer, "processing_class", None)
            self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
            if self.tokenizer is None:
                raise ValueError(
                    "DRIFT needs a tokenizer to sample rollouts: pass processing_class=tokenizer to the Trainer, or "
                    "DriftCallback(..., tokenizer=tokenizer)."
                )
        check_query_format(self.query_dataset, self._train_format, self.tokenizer)
        if self.args.drift_reweight_mode == "loss" and not self.applies_loss_weights:
            raise ValueError(
                "drift_reweight_mode='loss' needs DriftSFTTrainer (a plain Trainer's loss cannot be reweighted from a "
                "callback). Use drift_reweight_mode='sampler', or DriftSFTTrainer."
            )
        sharded = {"DeepSpeed": getattr(trainer, "is_deepspeed_enabled", False)}
        sharded["FSDP"] = getattr(trainer, "is_fsdp_enabled", False)
        engine = next((name for name, on in sharded.items() if on), None)
        if self.args.drift_preconditioner == "adam" and engine is not None:
            raise ValueError(
                f"drift_preconditioner='adam' reads the optimizer's per-weight Adam second moments, which {engine} "
                "keeps sharded across ranks. Use drift_preconditioner='identity', 'fisher' or 'kronecker' "
                f"under {engine}."
            )
        self._route_checkpoint_restore(trainer)
        return self

    def _route_checkpoint_restore(self, trainer) -> None:
        restore = trainer._load_optimizer_and_scheduler
        if getattr(restore, "drift_callback", None) is self:
            return

        def load_optimizer_and_scheduler(checkpoint):
            restore(checkpoint)
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)

        load_optimizer_and_scheduler.drift_callback = self
        trainer._load_optimizer_and_scheduler = load_optimizer_and_scheduler

    def _require_trainer(self):
        if self.trainer is None:
            raise RuntimeError(
                "DriftCallback is not attached to a trainer: call DriftCallback(...).attach(trainer) instead of "
                "trainer.add_callback(DriftCallback(...))."
            )

    @property
    def enabled(self) -> bool:
        return self.args is not None and self.args.drift_enabled

    def build_view(self, dataset, num_examples: int | None = None) -> TrainView:
        return TrainView.from_dataset(dataset, num_examples)

    def make_sampler(self, num_rows: int, trainer_args) -> DriftSampler:
        seed = trainer_args.data_seed if trainer_args.data_seed is not None else trainer_args.seed
        mode = self.args.drift_sampling if self.args is not None else "systematic"
        self.sampler = DriftSampler(num_rows, seed=seed, mode=mode)
        return self.sampler

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._require_trainer()
        if not self.enabled:
            return
        trainer = self.trainer
        self.view = self.build_view(trainer.train_dataset, self.num_examples)
        self._row_of_user = None
        if self.args.drift_reweight_mode == "sampler" and self.sampler is None:
            sampler = self.make_sampler(len(trainer.train_dataset), args)
            if train_dataloader is None or not hasattr(train_dataloader, "set_sampler"):
                raise RuntimeError("DriftCallback could not reach the train dataloader to install its sampler.")
            train_dataloader.set_sampler(sampler)
            if self._loaded_checkpoint is not None:  # a plain Trainer builds no sampler before it restores
                self._load_sampler(self._loaded_checkpoint)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else model
        self.projector = ProjectedGradients(
            select_target_modules(unwrapped, self.args.drift_target_modules, self.args.drift_target_layers),
            self.args.drift_projection_dim,
            self.args.drift_projection_seed,
        )
        self._start_capture()
        self.refresher = Refresher(
            self.args,
            view=self.view,
            query_dataset=self.query_dataset,
            reward_funcs=self.reward_funcs,
            projector=self.projector,
            tokenizer=self.tokenizer,
            fused_lm_head=self.fused_lm_head,
            seed=int(trainer.args.seed),
            progress=self.args.drift_progress,
            options=self.args.drift_options(),
            first_step=self.args.drift_first_step,
            capture=self.capture,
            state=self._state,
        )
        fresh = int(state.global_step or 0) == 0 and self.refresher.state.num_refreshes == 0
        if self.args.drift_harm_gate and not has_reference(self.query_dataset):
            logger.warning(
                "drift_harm_gate: the query dataset has no `answer` column, so of the gate's two tests only the "
                "validation accuracy one can find harm (weights stay 1 until it does). Add the queries' reference "
                "answers as `answer`, or set drift_harm_gate=False to reweight from the first refresh."
            )
        if self.args.drift_harm_gate and self.refresher.state.start_accuracy is None:
            if fresh:  # the start model's validation accuracy, what drift_harm_gate compares each refresh with
                self.refresher.measure_start(unwrapped, lambda: generation_context(trainer, unwrapped), Dist())
            else:
                logger.warning(
                    "drift_harm_gate: this run resumes from a checkpoint without the start model's validation "
                    "accuracy, so only the loss test of the gate can find harm."
                )

    def _start_capture(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        if not (self.args.drift_capture_features and self.capture_features):
            return
        a, targs = self.args, self.trainer.args
        cache = FeatureCache(len(self.view), self.projector.dim, a.drift_feature_memmap_dir, a.drift_feature_memory_mb)
        self.capture = TrainCapture(self.projector, cache)
        rows_per_step = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size
        self._capture_window = capture_window_steps(a, len(self.view), rows_per_step)
        if self._loaded_checkpoint is not None:
            self._load_features(self._loaded_checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        if self.enabled and self.refresher is not None:
            self.refresher.finish()
        if self.capture is not None:
            self.capture.flush(write=True)
            self.capture.remove()

    def capture_due(self, global_step: int) -> bool:
        """Whether the training step after ``global_step`` completed steps is inside the capture window before the
        next refresh (``drift_capture_window``)."""
        if self.capture is None or self.capture.disabled:
            return False
        if self._capture_window is None:
            return True
        step = int(global_step) + 1
        return next_refresh_step(self.args, step) - step < self._capture_window

    def capture_rows(self, user_index) -> np.ndarray:
        """Train-row positions of the user-dataset indices ``user_index`` (as the collator's ``drift_index``)."""
        if self._row_of_user is None:
            self._row_of_user = np.full(self.view.num_examples, -1, dtype=np.int64)
            self._row_of_user[self.view.user_index] = np.arange(len(self.view))
        return self._row_of_user[np.asarray(user_index, dtype=np.int64)]

    def on_epoch_begin(self, args, state, control, **kwargs):
        # accelerate does not reach the sampler's set_epoch on a resumed epoch with several ranks: do it here
        if self.sampler is not None:
            self.sampler.set_epoch(int(state.epoch or 0))

    def is_due(self, step: int) -> bool:
        return refresh_due(self.args, step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.enabled and self.is_due(state.global_step):
            should_log = control.should_log  # trainer.log() resets it, which would drop this step's loss log
            self.refresh(state.global_step, is_main=state.is_world_process_zero)
            control.should_log = should_log

    def on_save(self, args, state, control, **kwargs):
        if not self.enabled:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(ckpt):
            return
        if state.is_world_process_zero:
            self.save_checkpoint(ckpt)
        self.save_features(ckpt)  # every rank holds the features of the rows it trained

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> None:
        """Write ``drift_state.json`` and the sampler's state into a checkpoint directory."""
        atomic_write_text(os.path.join(directory, STATE_FILE), json.dumps(self.drift_state.to_dict()))
        if self.sampler is not None:
            atomic_write_text(os.path.join(directory, SAMPLER_FILE), json.dumps(self.sampler.state_dict()))

    def features_path(self, directory: str) -> str:
        dist = Dist()
        name = FEATURES_FILE if dist.world_size == 1 else FEATURES_FILE.replace(".npz", f".rank{dist.rank}.npz")
        return os.path.join(directory, name)

    def save_features(self, directory: str) -> None:
        """Write this rank's captured features (``drift_features.npz``) into a checkpoint, unless larger than
        ``drift_feature_memory_mb`` (then a resumed run recomputes them as stale rows)."""
        if self.capture is None:
            return
        arrays = self.capture.checkpoint_arrays()
        size_mb = arrays["features"].nbytes / 2**20
        if size_mb > self.args.drift_feature_memory_mb:
            logger.warning(
                "DRIFT feature cache (%.0f MiB) is larger than drift_feature_memory_mb: not saved in the checkpoint; "
                "a resumed run recomputes the features it does not capture again.",
                size_mb,
            )
            return
        with atomic_path(self.features_path(directory)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def load_checkpoint(self, directory: str) -> None:
        """Restore ``drift_state``, the sampler and the captured features from a checkpoint directory written by
        :meth:`save_checkpoint` (the trainer calls it with the checkpoint it resumes from; see :meth:`attach`)."""
        if not self.enabled:
            return
        path = os.path.join(directory, STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self.drift_state = DriftState.from_dict(json.load(f))
            if self.args.drift_reweight_mode == "loss":
                self.loss_weights = self.drift_state.weights
        self._loaded_checkpoint = directory
        self._load_sampler(directory)
        if self.capture is not None:
            self._load_features(directory)

    def _load_sampler(self, directory: str) -> None:
        path = os.path.join(directory, SAMPLER_FILE)
        if self.sampler is not None and os.path.exists(path):
            with open(path) as f:
                self.sampler.load_state_dict(json.load(f))

    def _load_features(self, directory: str) -> None:
        path = self.features_path(directory)
        if os.path.exists(path):
            with np.load(path) as arrays:
                self.capture.restore(arrays)

    # ------------------------------------------------------------------ the refresh
    def refresh(self, step: int, is_main: bool = True) -> None:
        """Run one refresh now (every rank must call it) and swap in the new weights."""
        self._require_trainer()
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        first = self.drift_state.num_refreshes == 0
        out = self.refresher.refresh(
            model, step, lambda: generation_context(trainer, model), Dist(), optimizer=trainer.optimizer
        )
        engine = getattr(trainer, "model_wrapped", None)
        if hasattr(engine, "empty_partition_cache"):
            engine.empty_partition_cache()
        if out.changed:
            if self.args.drift_reweight_mode == "loss":
                self.loss_weights = out.weights
            elif self.sampler is not None:
                self.sampler.update(out.weights[self.view.user_index])
        if is_main and self.args.drift_save_artifacts:
            run_dir = os.path.join(trainer.args.output_dir, "drift")
            if first:
                write_examples(os.path.join(run_dir, "examples.jsonl"), self._example_texts())
            write_refresh_result(os.path.join(run_dir, f"refresh-{step:06d}"), out.result, out.weights, out.summary)
        log_metrics(trainer, out.metrics)

    def _example_texts(self):
        """``(user index, readable text)`` of each scored row (for ``examples.jsonl``, read by the report)."""
        dataset = self.trainer.train_dataset
        text_columns = sorted({"prompt", "completion", "messages", "text"} & set(getattr(dataset, "column_names", [])))
        users = self.view.user_index.tolist()
        if hasattr(dataset, "select_columns"):  # a datasets.Dataset: read the columns once, not row by row
            table = dataset.select_columns(text_columns or ["input_ids"])[: len(users)]
            if text_columns:
                texts = (example_text({k: table[k][i] for k in text_columns}) for i in range(len(users)))
            else:
                texts = self.tokenizer.batch_decode([list(x) for x in table["input_ids"]], skip_special_tokens=False)
            yield from zip(users, texts)
            return
        for row_i, user_i in enumerate(users):
            row = dataset[row_i]
            if text_columns:
                yield user_i, example_text({k: row[k] for k in text_columns})
            else:
                yield user_i, self.tokenizer.decode(list(row["input_ids"]), skip_special_tokens=False)
