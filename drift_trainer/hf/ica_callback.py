"""ICACallback: computes ICA weights inside a Trainer (the scores themselves are :mod:`drift_trainer.methods.ica`)."""

from __future__ import annotations

import numpy as np

from drift_trainer.core.dist import Dist
from drift_trainer.core.state import DriftState
from drift_trainer.hf.pair_callbacks import PairScorer
from drift_trainer.methods.ica import EmbeddingFn, _holdout_pairs, ica_scores, ica_weights


class ICACallback(PairScorer):
    """Computes ICA weights at the start of training (and every ``drift_ica_refresh_steps`` steps if set).

    ``dataset`` is the user's train set (raw text columns, one row per user index); the weights land in
    :attr:`weights` (numpy, one per row, the rule's own scale) and :attr:`scores`. The owning trainer reads them.
    """

    def __init__(self, trainer, dataset, holdout_dataset, args, embedding_fn: EmbeddingFn | None = None):
        if holdout_dataset is None:
            raise ValueError(
                "drift_method='ica' needs a holdout_dataset (prompt + completion, or prompt + chosen): the examples "
                "retrieved as in-context demonstrations."
            )
        _holdout_pairs(holdout_dataset)
        self.trainer = trainer
        self.dataset = dataset
        self.holdout_dataset = holdout_dataset
        self.args = args
        self.embedding_fn = embedding_fn
        self.scores: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.history: list[dict] = []

    def compute(self, step: int = 0) -> np.ndarray:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        self.scores = ica_scores(
            model,
            tokenizer,
            self.dataset,
            self.holdout_dataset,
            self.args.drift_ica_num_demos,
            self.embedding_fn,
            self.args.drift_ica_batch_size,
            dist=Dist(),
        )
        self.weights = ica_weights(self.scores, self.args)
        self.history.append(
            {"step": step, "score_mean": float(self.scores.mean()), "weight_mean": float(self.weights.mean())}
        )
        if hasattr(trainer, "pair_texts"):  # DriftDPOTrainer (the SFT trainer keeps its own records)
            n = len(self.scores)
            self.write_scoring(
                step, {"index": np.arange(n), "score": self.scores, "weight": self.weights}, self.history[-1]
            )
        return self.weights

    def state(self) -> DriftState:
        return DriftState(
            step=self.history[-1]["step"] if self.history else -1,
            num_refreshes=len(self.history),
            scores=self.scores,
            weights=self.weights,
            history=list(self.history),
        )

    def restore(self, state: DriftState) -> None:
        """A resumed run keeps the weights computed before the checkpoint (not recomputed at its start)."""
        self.history = list(state.history)
        if state.weights is not None:
            self.scores, self.weights = np.asarray(state.scores), np.asarray(state.weights)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.weights is None:
            self.compute(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        every = self.args.drift_ica_refresh_steps
        if every and state.global_step % int(every) == 0:
            self.compute(state.global_step)

    @property
    def pair_scores(self) -> dict[str, np.ndarray]:
        return {} if self.scores is None else {"score": self.scores}
