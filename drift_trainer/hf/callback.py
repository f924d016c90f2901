"""DriftCallback: runs a refresh on schedule inside any ``transformers.Trainer``.

A callback is handed the model, the dataloader and the optimizer, never the trainer, yet ZeRO-3 generation needs the
DeepSpeed engine (``trainer.model_wrapped``) and logging needs ``trainer.log``. So the trainer is taken through one
documented step, as TRL's own callbacks do::

    trainer = Trainer(model=model, args=DriftTrainingArguments(...), train_dataset=train)
    DriftCallback(query_dataset=queries, reward_funcs=exact_match).attach(trainer)
    trainer.train()

``DriftSFTTrainer`` does this for you.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from transformers import TrainerCallback

from drift_trainer.cli.datafiles import example_text, load_dataset_from
from drift_trainer.core.capture import FeatureCache, TrainCapture
from drift_trainer.core.features import ProjectedGradients, select_target_modules
from drift_trainer.core.refresh import Dist, TrainView, new_weights, refresh_summary, run_refresh
from drift_trainer.core.rewards import check_reward_funcs, completion_text, resolve_reward_funcs
from drift_trainer.core.rollouts import check_query_dataset, check_query_format, dataset_format, generation_context
from drift_trainer.core.sampler import DriftSampler
from drift_trainer.core.state import STATE_FILE, DriftState, atomic_path, atomic_write_text, write_refresh_artifacts
from drift_trainer.hf.config import DriftArguments, drift_arguments_from
from drift_trainer.methods.scorers import check_scorer_inputs

logger = logging.getLogger("drift_trainer")
INDEX_COLUMN = "drift_index"
SAMPLER_FILE = "drift_sampler.json"
FEATURES_FILE = "drift_features.npz"
STALE_CHECKS_TO_STOP = 2  # consecutive failed agreement checks after which capture turns itself off
NO_CONTRAST_WARN_AFTER = 3  # refreshes in a row without contrast after which DRIFT warns that it is doing nothing


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
    """

    def __init__(
        self, query_dataset=None, reward_funcs=None, args: DriftArguments | None = None, trainer=None, tokenizer=None
    ):
        self.query_dataset = query_dataset
        self.tokenizer = tokenizer
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        self._own_args = args
        self.args: DriftArguments | None = None
        self.trainer = None
        self.drift_state = DriftState()
        self.sampler: DriftSampler | None = None
        self.view: TrainView | None = None
        self.projector: ProjectedGradients | None = None
        self.capture: TrainCapture | None = None  # set when the trainer feeds it (DriftSFTTrainer)
        self._row_of_user: np.ndarray | None = None  # user-dataset index -> train row, for the capture
        self.fused_lm_head = False
        self.loss_weights = None  # per user example, used by DriftSFTTrainer in `loss` mode
        self._loaded_checkpoint: str | None = None
        self._train_format: str | None = None  # "conversational", "text" or "tokenized" (see dataset_format)
        self._no_contrast_run = 0  # refreshes in a row without contrast
        self._warned_no_contrast = False
        if trainer is not None:
            self.attach(trainer)

    # ------------------------------------------------------------------ setup
    def resolve_args(self, trainer_args) -> DriftArguments:
        source = self._own_args
        if source is None:
            source = trainer_args if hasattr(trainer_args, "drift_enabled") else DriftArguments()
        return drift_arguments_from(source)

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
        query row, see :func:`~drift_trainer.rewards.check_reward_funcs`)."""
        if not drift_args.drift_enabled:
            return
        self.load_inputs(drift_args)
        check_query_dataset(self.query_dataset)
        check_scorer_inputs(drift_args, self.query_dataset)
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
        """Bind to ``trainer`` (adding this callback to it if needed) and validate the inputs. Returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.args = self.resolve_args(trainer.args)
        self.validate(self.args, trainer.train_dataset, trainer.args)
        if self.args.drift_enabled and self.tokenizer is None:
            tokenizer = getattr(trainer, "processing_class", None)
            self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
            if self.tokenizer is None:
                raise ValueError(
                    "DRIFT needs a tokenizer to sample rollouts: pass processing_class=tokenizer to the Trainer, or "
                    "DriftCallback(..., tokenizer=tokenizer)."
                )
        if self.args.drift_enabled:
            check_query_format(self.query_dataset, self._train_format, self.tokenizer)
        if self.args.drift_enabled and self.args.drift_reweight_mode == "loss" and not hasattr(trainer, "drift_state"):
            raise ValueError(
                "drift_reweight_mode='loss' needs DriftSFTTrainer (a plain Trainer's loss cannot be reweighted from a "
                "callback). Use drift_reweight_mode='sampler', or DriftSFTTrainer."
            )
        return self

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
        n_rows = len(dataset)
        if hasattr(dataset, "column_names") and INDEX_COLUMN in dataset.column_names:
            user_index = np.asarray(dataset[INDEX_COLUMN], dtype=np.int64)
        else:
            user_index = np.arange(n_rows)
        rows = dataset
        if hasattr(dataset, "select_columns"):
            keep = [
                c for c in ("input_ids", "labels", "completion_mask", "assistant_masks") if c in dataset.column_names
            ]
            if "input_ids" not in keep:
                raise ValueError(
                    "DRIFT scores tokenized examples: the trainer's train_dataset has no `input_ids` column "
                    f"(columns: {dataset.column_names}). Tokenize it first, or use DriftSFTTrainer."
                )
            rows = dataset.select_columns(keep).with_format("python")
        total = int(num_examples if num_examples is not None else (user_index.max() + 1 if n_rows else 0))
        return TrainView(rows=rows, user_index=user_index, num_examples=total)

    def make_sampler(self, num_rows: int, trainer_args) -> DriftSampler:
        seed = trainer_args.data_seed if trainer_args.data_seed is not None else trainer_args.seed
        self.sampler = DriftSampler(num_rows, seed=seed)
        return self.sampler

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._require_trainer()
        if not self.enabled:
            return
        trainer = self.trainer
        self.view = self.build_view(trainer.train_dataset, getattr(trainer, "_drift_num_examples", None))
        self._row_of_user = None
        if self.args.drift_reweight_mode == "sampler" and self.sampler is None:
            sampler = self.make_sampler(len(trainer.train_dataset), args)
            if train_dataloader is None or not hasattr(train_dataloader, "set_sampler"):
                raise RuntimeError("DriftCallback could not reach the train dataloader to install its sampler.")
            train_dataloader.set_sampler(sampler)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else model
        self.projector = ProjectedGradients(
            select_target_modules(unwrapped, self.args.drift_target_modules),
            self.args.drift_projection_dim,
            self.args.drift_projection_seed,
        )
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        if self.args.drift_capture_features and getattr(trainer, "_drift_can_capture", False):
            cache = FeatureCache(
                len(self.view),
                self.projector.dim,
                self.args.drift_feature_memmap_dir,
                self.args.drift_feature_memory_mb,
            )
            self.capture = TrainCapture(self.projector, cache)
            if self._loaded_checkpoint is not None:
                self._load_features(self._loaded_checkpoint)
        if state.global_step > 0 and self._loaded_checkpoint is None:
            candidate = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(candidate):
                self.load_checkpoint(candidate)

    def on_train_end(self, args, state, control, **kwargs):
        history = self.drift_state.history
        if self.enabled and history and not any(h.get("contrast") for h in history):
            # fewer refreshes than NO_CONTRAST_WARN_AFTER, none with contrast: DRIFT did nothing this run
            self._warn_no_contrast(float(self.drift_state.rollout_accuracy or 0.0))
        if self.capture is not None:
            self.capture.flush(write=True)
            self.capture.remove()

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
        first = self.args.drift_first_step
        return step >= first and (step - first) % self.args.drift_refresh_steps == 0

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
        self.capture.flush(write=True)
        arrays = self.capture.cache.state_arrays()
        arrays["rows_trained"] = np.asarray([self.capture.rows_captured + self.capture.rows_skipped])
        arrays["last_refresh_step"] = np.asarray([self.capture.last_refresh_step])
        arrays["stale_checks"] = np.asarray([self.capture.stale_checks, int(self.capture.disabled)])
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
        """Restore ``drift_state`` and the sampler from a checkpoint directory written by :meth:`save_checkpoint`."""
        path = os.path.join(directory, STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self.drift_state = DriftState.from_dict(json.load(f))
            if self.args is not None and self.args.drift_reweight_mode == "loss":
                self.loss_weights = self.drift_state.weights
        sampler_path = os.path.join(directory, SAMPLER_FILE)
        if self.sampler is not None and os.path.exists(sampler_path):
            with open(sampler_path) as f:
                self.sampler.load_state_dict(json.load(f))
        self._loaded_checkpoint = directory
        if self.capture is not None:
            self._load_features(directory)

    def _load_features(self, directory: str) -> None:
        path = self.features_path(directory)
        if os.path.exists(path):
            with np.load(path) as arrays:
                self.capture.cache.load_arrays(arrays)
                self.capture.rows_captured, self.capture.rows_skipped = int(arrays["rows_trained"][0]), 0
                self.capture.last_refresh_step = int(arrays["last_refresh_step"][0])
                self.capture.stale_checks, disabled = (int(v) for v in arrays["stale_checks"])
                if disabled:  # capture had turned itself off (or could not run) before the checkpoint
                    self.capture.disable()

    # ------------------------------------------------------------------ the refresh
    def refresh(self, step: int, is_main: bool = True) -> None:
        """Run one refresh now (every rank must call it) and swap in the new weights."""
        self._require_trainer()
        trainer, args = self.trainer, self.args
        dist = Dist()
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = self.tokenizer
        started = time.perf_counter()
        result = run_refresh(
            args=args,
            step=step,
            model=model,
            tokenizer=tokenizer,
            view=self.view,
            query_dataset=self.query_dataset,
            reward_funcs=self.reward_funcs,
            projector=self.projector,
            generation_context=lambda: generation_context(trainer, model),
            fused_lm_head=self.fused_lm_head,
            dist=dist,
            refresh_index=self.drift_state.num_refreshes,
            seed=int(trainer.args.seed),
            progress=args.drift_progress,
            capture=self.capture if self.capture is not None and not self.capture.disabled else None,
        )
        engine = getattr(trainer, "model_wrapped", None)
        if hasattr(engine, "empty_partition_cache"):
            engine.empty_partition_cache()
        previous = self.drift_state
        reason = None
        self._no_contrast_run = 0 if result.contrast else self._no_contrast_run + 1
        if not result.contrast:
            reason = (
                "no contrast: every judged rollout got the same verdict "
                f"(rollout accuracy {result.rollout_accuracy:.3f}); previous weights kept"
            )
            logger.warning("DRIFT refresh at step %d: %s", step, reason)
            if self._no_contrast_run >= NO_CONTRAST_WARN_AFTER:
                self._warn_no_contrast(result.rollout_accuracy)
            smoothed = previous.smoothed
            weights = previous.weights if previous.weights is not None else np.ones(result.scores.shape[0])
        else:
            weighting_started = time.perf_counter()
            smoothed, weights = new_weights(result, previous.smoothed, previous.weights, args)
            weights = dist.broadcast(weights)  # identical on every rank, bit for bit
            result.timings["weights"] = time.perf_counter() - weighting_started
        if self.capture is not None and result.capture_agreement is not None:
            self.capture.stale_checks = self.capture.stale_checks + 1 if result.capture_full else 0
            if result.capture_full:
                logger.warning(
                    "DRIFT refresh at step %d: cached features no longer agree with the model (mean cosine %.3f < "
                    "drift_capture_min_agreement=%.2f), so every row was recomputed.",
                    step,
                    result.capture_agreement,
                    args.drift_capture_min_agreement,
                )
            if self.capture.stale_checks >= STALE_CHECKS_TO_STOP:
                # the model keeps moving too fast for the cache (e.g. a high learning rate): stop paying for capture
                self.capture.disable()
                logger.warning(
                    "DRIFT: %d refreshes in a row found the captured features stale; feature capture is off for the "
                    "rest of this run and every refresh recomputes every row (as with drift_capture_features=False).",
                    STALE_CHECKS_TO_STOP,
                )
        metrics = refresh_summary(result, weights, args)
        metrics["drift/refresh_seconds"] = time.perf_counter() - started
        self._apply(weights, changed=result.contrast)
        summary = {
            "step": step,
            "refresh": previous.num_refreshes,
            "metrics": metrics,
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
            "num_examples": int(result.scores.shape[0]),
            "num_scored": int(result.scored.sum()),
            "num_recomputed": int(result.num_recomputed if result.num_recomputed >= 0 else result.scored.sum()),
            "capture_agreement": result.capture_agreement,
            "capture_full_rescoring": result.capture_full,
            "capture_on": self.capture is not None and not self.capture.disabled,
            "num_masked": result.num_masked,
            "num_rollouts": len(result.rollouts),
            "contrast": result.contrast,
            "reason": reason,
            "weights_changed": bool(result.contrast),
            "options": args.drift_options(),
        }
        self.drift_state = DriftState(
            step=step,
            num_refreshes=previous.num_refreshes + 1,
            scores=result.scores,
            smoothed=smoothed,
            weights=np.asarray(weights),
            grad_norm=result.grad_norm,
            rollout_accuracy=metrics["drift/rollout_accuracy"],
            reward_mean=metrics["drift/reward_mean"],
            history=previous.history + [summary],
        )
        if is_main and args.drift_save_artifacts:
            if previous.num_refreshes == 0:
                self._write_examples()
            self._write_artifacts(step, result, weights, summary)
        log_metrics(trainer, metrics)

    def _warn_no_contrast(self, accuracy: float) -> None:
        """Warn once that DRIFT has kept uniform (or stale) weights for several refreshes, with the likely cause."""
        if self._warned_no_contrast:
            return
        self._warned_no_contrast = True
        args = self.args
        if accuracy <= 0.0:
            cause = (
                "every rollout was judged wrong. Likely: the first refresh comes before the model can answer (raise "
                f"drift_first_refresh_step, now {args.drift_first_step}); drift_max_new_tokens={args.drift_max_new_tokens} "
                "cuts rollouts before the answer; the queries are formatted unlike the train rows (chat messages vs "
                "plain text, a different prompt template); or the reward never matches (check drift/rollouts.jsonl "
                "and the reward's reference column)"
            )
        elif accuracy >= 1.0:
            cause = (
                "every rollout was judged right: the model already solves these queries. Use harder or more varied "
                "queries, raise drift_temperature, or turn DRIFT off for this task"
            )
        else:
            cause = (
                f"each query's rollouts agreed with each other (rollout accuracy {accuracy:.2f}): raise "
                f"drift_num_rollouts (now {args.drift_num_rollouts}) or drift_temperature (now "
                f"{args.drift_temperature}), or set drift_no_contrast='keep' to let all-right / all-wrong queries count"
            )
        logger.warning(
            "DRIFT has changed no weights for %d refresh(es) in a row (the train data is drawn as in plain SFT): %s.",
            self._no_contrast_run,
            cause,
        )

    def _apply(self, weights: np.ndarray, changed: bool) -> None:
        if not changed:
            return
        if self.args.drift_reweight_mode == "loss":
            self.loss_weights = np.asarray(weights)
        elif self.sampler is not None:
            self.sampler.update(np.asarray(weights)[self.view.user_index])

    def _write_examples(self) -> None:
        """``{output_dir}/drift/examples.jsonl``: index and readable text of each scored row (read by the report)."""
        dataset = self.trainer.train_dataset
        text_columns = {"prompt", "completion", "messages", "text"} & set(getattr(dataset, "column_names", []))
        lines = []
        for row_i, user_i in enumerate(self.view.user_index.tolist()):
            row = dataset[row_i]
            if text_columns:
                text = example_text({k: row[k] for k in text_columns})
            else:
                text = self.tokenizer.decode(list(row["input_ids"]), skip_special_tokens=False)
            lines.append(json.dumps({"index": int(user_i), "text": text}, ensure_ascii=False, default=str))
        path = os.path.join(self.trainer.args.output_dir, "drift", "examples.jsonl")
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    def _write_artifacts(self, step, result, weights, summary) -> None:
        out_dir = os.path.join(self.trainer.args.output_dir, "drift", f"refresh-{step:06d}")
        n = result.scores.shape[0]
        columns = {
            "index": np.arange(n),
            "score": result.scores,
            "weight": np.asarray(weights, dtype=np.float64),
            "grad_norm": result.grad_norm,
            "raw_score": result.raw_scores,
            "loss": result.loss,
            "scored": result.scored,
        }
        ro = result.rollouts
        records = [
            {
                "query_index": ro.query_index[j],
                "query": ro.prompts[j],
                "completion": completion_text(ro.completions[j]),
                "reward": ro.rewards[j],
                "sign": float(result.signs[j]),
            }
            for j in range(len(ro))
        ]
        write_refresh_artifacts(out_dir, columns, records, summary)
