"""The preference-pair scorers of ``DriftDPOTrainer`` as callbacks. Each owns what it computes: ``weights`` (one per
row of the user's ``train_dataset``, or None before the first scoring), ``pair_scores`` and ``history``; the trainer
reads them (``DriftDPOTrainer.pair_weights``) and never has its fields written from outside."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
from transformers import TrainerCallback

from drift_trainer.core.dist import Dist
from drift_trainer.core.features import ProjectedGradients, select_target_modules
from drift_trainer.core.harm import loss_excess_p
from drift_trainer.core.refresher import Refresher
from drift_trainer.core.state import (
    STATE_FILE,
    DriftState,
    atomic_write_text,
    write_examples,
    write_refresh_artifacts,
    write_refresh_result,
)
from drift_trainer.hf.callback import SAMPLER_FILE, refresh_due
from drift_trainer.hf.index import INDEX_COLUMN, generation_context
from drift_trainer.methods.lossdiff import score_and_select, train_validation_model
from drift_trainer.methods.pairs import PAIR_ROWS, PairView, pair_logps

logger = logging.getLogger("drift_trainer")


def user_array(values: np.ndarray, user_index: np.ndarray, n: int, fill: float) -> np.ndarray:
    out = np.full(n, fill, dtype=np.float64)
    out[user_index] = values
    return out


class PairScorer(TrainerCallback):
    """What the preference scorers share: their state as a :class:`DriftState` (``trainer.drift_state``), written
    as ``drift_state.json`` into each checkpoint and restored on resume (:meth:`restore`, called by
    ``DriftDPOTrainer``), and per-scoring artifacts under ``output_dir/drift/`` as for SFT (``refresh-{step}/`` with
    ``scores.parquet``, ``rollouts.jsonl``, ``summary.json``; ``examples.jsonl`` once)."""

    trainer = None

    def state(self) -> DriftState:
        raise NotImplementedError

    def restore(self, state: DriftState) -> None:
        raise NotImplementedError

    def _owned(self) -> bool:
        """Whether this scorer is its trainer's pair scorer (``DriftDPOTrainer``; SFT's ICA keeps its own records)."""
        return self.trainer is not None and getattr(self.trainer, "pair_scorer", None) is self

    def on_save(self, args, state, control, **kwargs):
        if not self._owned():
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt) and state.is_world_process_zero:
            atomic_write_text(os.path.join(ckpt, STATE_FILE), json.dumps(self.state().to_dict()))
            sampler = getattr(self.trainer, "drift_sampler", None)
            if sampler is not None:
                atomic_write_text(os.path.join(ckpt, SAMPLER_FILE), json.dumps(sampler.state_dict()))

    def _artifact_dir(self, step: int) -> str | None:
        """``output_dir/drift/refresh-{step}`` on the main process when artifacts are on (else None); writes
        ``examples.jsonl`` the first time."""
        tr = self.trainer
        if not (self._owned() and tr.args.drift_save_artifacts and tr.is_world_process_zero()):
            return None
        run_dir = os.path.join(tr.args.output_dir, "drift")
        examples = os.path.join(run_dir, "examples.jsonl")
        if not os.path.exists(examples):
            os.makedirs(run_dir, exist_ok=True)
            write_examples(examples, tr.pair_texts())
        return os.path.join(run_dir, f"refresh-{step:06d}")

    def write_scoring(self, step: int, columns: dict, summary: dict) -> None:
        """Artifacts of a scoring without rollouts (ICA, LossDiff-IRM): one row per user pair."""
        out = self._artifact_dir(step)
        if out is not None:
            write_refresh_artifacts(out, columns, [], summary)


class LossDiffCallback(PairScorer):
    """After the warm-up epochs: train theta_val, score LossDiff and IRM, keep the middle bands (weights 1/0).

    ``initial_model``: a copy of the model before training (theta_val starts from it), unless ``validation_model``
    (an already trained theta_val) is given. ``num_pairs``: rows of the user's train set.
    """

    def __init__(self, trainer, validation_dataset, validation_model, initial_model, num_pairs: int):
        self.trainer = trainer
        self.validation_dataset = validation_dataset
        self.validation_model = validation_model
        self.initial_model = initial_model
        self.num_pairs = num_pairs
        self.done = False
        self.weights: np.ndarray | None = None
        self.pair_scores: dict[str, np.ndarray] = {}
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # the selection runs at the first epoch end at or after the warm-up: it must come before the last one
        total = float(state.num_train_epochs or args.num_train_epochs)
        select_at = max(1, math.ceil(args.drift_lossdiff_warmup_epochs - 1e-9))
        if not self.done and select_at + 1e-9 >= total:
            raise ValueError(
                f"LossDiff-IRM selects its pairs at the end of epoch {select_at} (drift_lossdiff_warmup_epochs="
                f"{args.drift_lossdiff_warmup_epochs}), but this run trains {total:g} epochs (num_train_epochs / "
                "max_steps), so the selection would come when training ends and change nothing. Train for more "
                "epochs (the paper: 1 warm-up epoch, then 2 on the selection) or lower drift_lossdiff_warmup_epochs."
            )

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.done or (state.epoch or 0) + 1e-9 < args.drift_lossdiff_warmup_epochs:
            return
        self.done = True
        self.select(state.global_step)

    def _validation_model(self):
        if self.validation_model is not None:
            return self.validation_model
        tr, args = self.trainer, self.trainer.args
        val_rows = list(
            tr._prepare_dataset(self.validation_dataset, tr.processing_class, args, "validation")
            .select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
            .with_format("python")
        )
        model = train_validation_model(
            self.initial_model,
            val_rows,
            tr.reference_logps(val_rows),
            args,
            tr.processing_class.pad_token_id,
            args.drift_lossdiff_val_epochs,
            seed=args.seed,
        )
        self.initial_model = None  # free it
        return model

    def select(self, step: int = 0) -> None:
        tr, args = self.trainer, self.trainer.args
        rows = tr.prepared_rows()
        val_model = self._validation_model()
        policy = tr.accelerator.unwrap_model(tr.model)
        pad = tr.processing_class.pad_token_id
        bs = args.drift_ica_batch_size
        out = score_and_select(policy, val_model, tr.reference_logps, rows, args, pad, bs, dist=Dist())
        ui = np.asarray([r[INDEX_COLUMN] for r in rows], dtype=np.int64)
        n = self.num_pairs
        keep = np.zeros(n, dtype=bool)
        keep[ui] = out["keep"]
        self.weights = keep.astype(np.float64)
        self.pair_scores = {
            "lossdiff": user_array(out["lossdiff"], ui, n, np.nan),
            "irm": user_array(out["irm"], ui, n, np.nan),
            "keep": keep,
        }
        self.history.append({"step": step, "kept": int(keep.sum()), "num_pairs": int(n)})
        logger.info("LossDiff-IRM at step %d kept %d of %d pairs", step, int(keep.sum()), n)
        columns = {
            "index": np.arange(n),
            "weight": self.weights,
            **{k: np.asarray(v) for k, v in self.pair_scores.items()},
        }
        self.write_scoring(step, columns, self.history[-1])

    def state(self) -> DriftState:
        s = self.pair_scores
        return DriftState(
            step=self.history[-1]["step"] if self.history else -1,
            num_refreshes=len(self.history),
            scores=s.get("lossdiff"),
            weights=self.weights,
            history=list(self.history),
            extra={k: s[k] for k in ("irm", "keep") if k in s},
        )

    def restore(self, state: DriftState) -> None:
        """A resumed run keeps the selection made before the checkpoint (and does not select again)."""
        self.history = list(state.history)
        if state.weights is not None:
            self.weights = np.asarray(state.weights)
            self.pair_scores = {"lossdiff": state.scores, **state.extra}
            if "keep" in self.pair_scores:
                self.pair_scores["keep"] = np.asarray(self.pair_scores["keep"]).astype(bool)
            self.done = True
            self.initial_model = None


class PairDriftCallback(PairScorer):
    """DRIFT on preference pairs: the refresh pipeline of SFT with the pairs' feature loss
    ``-(log p(y_w|x) - log p(y_l|x))`` (:data:`~drift_trainer.methods.pairs.PAIR_ROWS`); rollouts, signing, target,
    influence and weighting are the same calls as for SFT."""

    def __init__(self, trainer, query_dataset, reward_funcs, num_pairs: int):
        self.trainer = trainer
        self.query_dataset = query_dataset
        self.reward_funcs = reward_funcs
        self.num_pairs = num_pairs
        self.refresher: Refresher | None = None
        self.weights: np.ndarray | None = None
        self._restored: DriftState | None = None  # from a checkpoint, before the refresher exists

    def state(self) -> DriftState:
        if self.refresher is not None:
            return self.refresher.state
        return self._restored if self._restored is not None else DriftState()

    def restore(self, state: DriftState) -> None:
        self._restored = state
        if state.weights is not None:
            self.weights = np.asarray(state.weights)
        if self.refresher is not None:
            self.refresher.state = state

    def on_train_begin(self, args, state, control, **kwargs):
        tr = self.trainer
        model = tr.accelerator.unwrap_model(tr.model)
        rows = tr.prepared_rows()
        view = PairView(rows, np.asarray([r[INDEX_COLUMN] for r in rows], dtype=np.int64), self.num_pairs)
        projector = ProjectedGradients(
            select_target_modules(model, args.drift_target_modules, args.drift_target_layers),
            args.drift_projection_dim,
            args.drift_projection_seed,
        )
        self.refresher = Refresher(
            args,
            view=view,
            query_dataset=self.query_dataset,
            reward_funcs=self.reward_funcs,
            projector=projector,
            tokenizer=getattr(tr.processing_class, "tokenizer", tr.processing_class),
            seed=int(args.seed),
            progress=args.drift_progress,
            options=args.drift_options(),
            first_step=args.drift_first_step,
            row_format=PAIR_ROWS,
            state=self._restored,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if refresh_due(args, state.global_step):
            self.refresh(state.global_step)

    def refresh(self, step: int) -> None:
        tr = self.trainer
        model = tr.accelerator.unwrap_model(tr.model)
        out = self.refresher.refresh(model, step, lambda: generation_context(tr, model), Dist(), optimizer=tr.optimizer)
        if out.changed:
            self.weights = out.weights
        directory = self._artifact_dir(step)
        if directory is not None:
            write_refresh_result(directory, out.result, out.weights, out.summary)

    @property
    def pair_scores(self) -> dict[str, np.ndarray]:
        state = self.refresher.state if self.refresher is not None else None
        if state is None or state.scores is None:
            return {}
        return {"score": state.scores, "grad_norm": state.grad_norm}

    @property
    def history(self) -> list[dict]:
        return self.refresher.state.history if self.refresher is not None else []


BOUND_FILE = "drift_pair_bound.json"  # in each checkpoint: the pairs drift_pair_bound dropped


def validation_rows(trainer, validation_dataset) -> list[dict]:
    """``validation_dataset`` prepared as TRL prepares the train pairs (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``)."""
    prepared = trainer._prepare_dataset(validation_dataset, trainer.processing_class, trainer.args, "validation")
    return list(prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("python"))


def margins(model, rows, pad_token_id: int, batch_size: int) -> np.ndarray:
    """``log p(chosen|x) - log p(rejected|x)`` of each prepared pair under ``model`` (forward only)."""
    lp = pair_logps(model, rows, pad_token_id, batch_size, Dist())
    return lp.chosen - lp.rejected


class PairBound(TrainerCallback):
    """``drift_pair_bound``: before the first step, the train pairs whose margin under the start model is below every
    validation pair's are dropped for the whole run (``keep``, one 0/1 value per row of the user's train set, None
    before it is measured; :meth:`kept` removes the dropped rows from the prepared train set, so a run trains as on
    a train set without them). Saved into each checkpoint (:data:`BOUND_FILE`) and restored on resume.

    Why the validation pairs' minimum: if train pairs were clean pairs from the validation pairs' distribution, one
    would fall below all ``n`` of them with probability ``1 / (n + 1)``; a flipped pair whose right answer the start
    model already prefers has a negative margin of the size of a clean pair's positive one. The exchangeability
    p-value of as many pairs below (:func:`drift_trainer.core.harm.loss_excess_p` on the negated margins) is logged.
    """

    def __init__(self, trainer, validation_dataset, num_pairs: int):
        self.trainer = trainer
        self.validation_dataset = validation_dataset
        self.num_pairs = num_pairs
        self.keep: np.ndarray | None = None

    def measure(self) -> None:
        """The bound of the trainer's model as it is now (the start model: called before the first step)."""
        tr = self.trainer
        pad, bs = tr.processing_class.pad_token_id, tr.args.drift_ica_batch_size
        model = tr.accelerator.unwrap_model(tr.model)
        rows = tr.prepared_rows()
        train = margins(model, rows, pad, bs)
        refs = margins(model, validation_rows(tr, self.validation_dataset), pad, bs)
        below = train < refs.min()
        keep = np.ones(self.num_pairs, dtype=np.float64)
        keep[np.asarray([r[INDEX_COLUMN] for r in rows], dtype=np.int64)[below]] = 0.0
        self.keep = keep
        p = loss_excess_p(-train, -refs)
        for name, value in (("drift/bound_dropped", float(below.mean())), ("drift/bound_p", p)):
            tr._metrics["train"][name].append(value)  # TRL's DPOTrainer averages these into its next log
        logger.info(
            "drift_pair_bound: %d of %d train pairs have a start-model margin below every one of the %d validation "
            "pairs' (exchangeability p = %.2g); they are dropped for the whole run",
            int(below.sum()),
            len(train),
            len(refs),
            p,
        )

    def kept(self, dataset):
        """``dataset`` (prepared, with the index column) without the dropped pairs."""
        keep = self.keep
        return dataset.filter(lambda index: keep[index] > 0, input_columns=[INDEX_COLUMN])

    def on_save(self, args, state, control, **kwargs):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.keep is not None and os.path.isdir(ckpt) and state.is_world_process_zero:
            dropped = np.flatnonzero(self.keep == 0).tolist()
            atomic_write_text(
                os.path.join(ckpt, BOUND_FILE), json.dumps({"num_pairs": self.num_pairs, "dropped": dropped})
            )

    def restore(self, checkpoint: str) -> bool:
        """The bound saved in ``checkpoint``; False (nothing restored) when it has none."""
        path = os.path.join(checkpoint, BOUND_FILE)
        if not os.path.exists(path):
            return False
        with open(path) as f:
            saved = json.load(f)
        if saved["num_pairs"] != self.num_pairs:
            raise ValueError(
                f"drift_pair_bound: the checkpoint's bound covers {saved['num_pairs']} train pairs, this run has "
                f"{self.num_pairs}; resume with the same train_dataset."
            )
        keep = np.ones(self.num_pairs, dtype=np.float64)
        keep[np.asarray(saved["dropped"], dtype=np.int64)] = 0.0
        self.keep = keep
        return True
