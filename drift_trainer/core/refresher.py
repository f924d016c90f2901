"""The refresh state machine, free of any Trainer: what a refresh changes and what DRIFT remembers between them.

:class:`Refresher` runs :func:`~drift_trainer.core.refresh.run_refresh` and then applies the rules that span
refreshes: a refresh without contrast keeps the previous weights (and several in a row warn, with the likely cause);
captured features that keep failing the agreement check turn capture off; the new weights are smoothed against the
previous ones and broadcast from rank 0; :class:`~drift_trainer.core.state.DriftState` and the summary are updated.
``DriftCallback`` keeps the schedule, the logging and the checkpoints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from drift_trainer.core import pipeline
from drift_trainer.core.dist import Dist
from drift_trainer.core.harm import accuracy_drop_p, loss_excess_p, per_query_accuracy
from drift_trainer.core.params import RefreshParams
from drift_trainer.core.refresh import (
    RefreshResult,
    harm_losses,
    new_weights,
    refresh_summary,
    run_refresh,
    summary_record,
)
from drift_trainer.core.state import DriftState
from drift_trainer.methods.scorers import has_reference

logger = logging.getLogger("drift_trainer")
STALE_CHECKS_TO_STOP = 2  # consecutive failed agreement checks after which capture turns itself off
NO_CONTRAST_WARN_AFTER = 3  # refreshes in a row without contrast after which DRIFT warns that it is doing nothing


@dataclass
class RefreshOutcome:
    """What one refresh produced: its result, the weights now in force and whether they changed."""

    result: RefreshResult
    weights: np.ndarray
    changed: bool
    metrics: dict
    summary: dict


class Refresher:
    """Runs refreshes over one train view and keeps the :class:`DriftState` between them.

    Args:
        params: a :class:`RefreshParams` (or a config with ``drift_*`` fields).
        view, query_dataset, reward_funcs, projector, tokenizer: what every refresh scores with.
        fused_lm_head: the model returns TRL's fused per-token log-probabilities.
        seed: the run's seed (every stage seed derives from it and the refresh index).
        options: recorded in each summary (the ``drift_*`` options as a dict).
        first_step: the step of the first refresh (named by the no-contrast warning).
        capture: a :class:`~drift_trainer.core.capture.TrainCapture` feeding features from training, or None.
        state: the state to continue from (a resumed run).
        row_format: how train rows are batched and differentiated (default: language-modelling rows; see
            :class:`~drift_trainer.core.feature_pass.RowFormat`).
    """

    def __init__(
        self,
        params,
        *,
        view,
        query_dataset,
        reward_funcs,
        projector,
        tokenizer,
        fused_lm_head: bool = False,
        seed: int = 0,
        progress: bool = True,
        options: dict | None = None,
        first_step: int = 100,
        capture=None,
        state: DriftState | None = None,
        row_format=None,
    ):
        self.params = RefreshParams.of(params)
        self.view, self.query_dataset, self.reward_funcs = view, query_dataset, reward_funcs
        self.projector, self.tokenizer, self.fused_lm_head = projector, tokenizer, fused_lm_head
        self.seed, self.progress, self.options = int(seed), progress, dict(options or {})
        self.first_step = int(first_step)
        self.capture = capture
        self.row_format = row_format
        self.state = state if state is not None else DriftState()
        self.no_contrast_run = 0  # refreshes in a row without contrast
        self.warned_no_contrast = False

    def refresh(
        self, model, step: int, generation_context=None, dist: Dist | None = None, optimizer=None
    ) -> RefreshOutcome:
        """Run one refresh now (every rank must call it); returns the weights to apply and the summary.
        ``optimizer``: the training optimizer (read by the ``adam`` preconditioner)."""
        dist = dist or Dist()
        started = time.perf_counter()
        capture = self.capture if self.capture is not None and not self.capture.disabled else None
        params = self.params
        if params.weighting.harm_gate and self.state.harm_step is not None:  # open for good: no evidence to measure
            params = replace(params, weighting=replace(params.weighting, harm_gate=False))
        result = run_refresh(
            args=params,
            step=step,
            model=model,
            tokenizer=self.tokenizer,
            view=self.view,
            query_dataset=self.query_dataset,
            reward_funcs=self.reward_funcs,
            projector=self.projector,
            generation_context=generation_context,
            fused_lm_head=self.fused_lm_head,
            dist=dist,
            refresh_index=self.state.num_refreshes,
            seed=self.seed,
            progress=self.progress,
            capture=capture,
            row_format=self.row_format,
            previous_target=self.state.target,
            optimizer=optimizer,
        )
        previous = self.state
        smoothed, weights, reason = self._weights(result, previous, dist, step)
        harm_step, harm, held = previous.harm_step, {}, False
        if self.params.weighting.harm_gate and harm_step is None:
            harm = self.harm_evidence(result, previous)
            if min(harm.values()) < self.params.weighting.harm_alpha:
                harm_step = step
                logger.info("DRIFT refresh at step %d: harm found (%s); reweighting from now on", step, harm)
            else:  # nothing to fix yet: plain SFT's weights (and batches)
                weights = np.ones_like(np.asarray(weights, dtype=np.float64))
                held = True
        self._check_capture(result, step)
        metrics = refresh_summary(result, weights)
        if self.params.weighting.harm_gate:
            metrics.update({f"drift/harm_p_{k}": v for k, v in harm.items()})
            if previous.start_loss_p is not None:
                metrics["drift/harm_p_loss_start"] = previous.start_loss_p
            metrics["drift/harm_found"] = float(harm_step is not None)
        metrics["drift/refresh_seconds"] = time.perf_counter() - started
        summary = summary_record(
            result,
            metrics,
            self.options,
            refresh=previous.num_refreshes,
            num_recomputed=int(result.num_recomputed if result.num_recomputed >= 0 else result.scored.sum()),
            capture_agreement=result.capture_agreement,
            capture_full_rescoring=result.capture_full,
            capture_on=self.capture is not None and not self.capture.disabled,
            reason=reason,
            weights_changed=bool(result.contrast) and not held,  # a shut gate keeps them at 1
        )
        self.state = DriftState(
            step=step,
            num_refreshes=previous.num_refreshes + 1,
            scores=result.scores,
            smoothed=smoothed,
            weights=np.asarray(weights),
            grad_norm=result.grad_norm,
            rollout_accuracy=metrics["drift/rollout_accuracy"],
            reward_mean=metrics["drift/reward_mean"],
            history=previous.history + [summary],
            target=result.target if result.contrast and result.target is not None else previous.target,
            start_accuracy=previous.start_accuracy,
            harm_step=harm_step,
            start_loss_p=previous.start_loss_p,
        )
        changed = bool(result.contrast) or harm_step != previous.harm_step
        return RefreshOutcome(result, np.asarray(weights), changed, metrics, summary)

    def measure_start(self, model, generation_context=None, dist: Dist | None = None) -> dict[int, float]:
        """``drift_harm_gate`` on the start model (call before the first training step, on every rank): its
        per-query rollout accuracy, sampled as the first refresh samples, which later refreshes are compared with;
        and the loss test, whose evidence is clearest before the model has learnt from the rows (a wrong rule the
        model adopts soon raises the references' losses too). Harm found here opens the gate from the first
        refresh. Kept in the state (and so in checkpoints); returns the accuracies."""
        dist = dist or Dist()
        _, rollouts = pipeline.sample_and_judge(
            model,
            self.tokenizer,
            self.query_dataset,
            self.reward_funcs,
            self.params.rollouts,
            seed=self.seed,
            refresh_index=0,
            dist=dist,
            generation_context=generation_context,
            show=self.progress and dist.rank == 0,
        )
        self.state.start_accuracy = per_query_accuracy(rollouts, self.params.signing.reward_threshold)
        if not has_reference(self.query_dataset):  # only the accuracy test can find harm
            return self.state.start_accuracy
        fp = pipeline.make_feature_pass(self.projector, self.tokenizer, self.params.features, self.fused_lm_head)
        train, refs = harm_losses(fp, model, self.tokenizer, self.view, self.query_dataset, self.seed, -1, dist)
        self.state.start_loss_p = loss_excess_p(train, refs, self.params.weighting.harm_max_rank)
        if self.state.start_loss_p < self.params.weighting.harm_alpha:
            self.state.harm_step = 0
            logger.info(
                "DRIFT: the start model finds %d of %d train rows less likely than every reference answer (p = "
                "%.2g): harm found, reweighting from the first refresh",
                int(np.count_nonzero(train > refs.max())),
                len(train),
                self.state.start_loss_p,
            )
        return self.state.start_accuracy

    def harm_evidence(self, result: RefreshResult, previous: DriftState) -> dict[str, float]:
        """``drift_harm_gate``'s two p-values at this refresh (see :mod:`drift_trainer.core.harm`): ``loss``, train
        rows beyond the top reference answers' losses (1.0 at a refresh without contrast, which measures no losses);
        ``accuracy``, the rollouts' per-query accuracy below the start's (1.0 without a start measurement)."""
        train, refs = result.harm_sample_loss, result.reference_loss
        now = per_query_accuracy(result.rollouts, result.reward_threshold)
        start, max_rank = previous.start_accuracy, self.params.weighting.harm_max_rank
        return {
            "loss": 1.0 if train is None or refs is None else loss_excess_p(train, refs, max_rank),
            "accuracy": accuracy_drop_p(start, now, seed=self.seed) if start else 1.0,
        }

    def _weights(self, result: RefreshResult, previous: DriftState, dist: Dist, step: int):
        """``(smoothed, weights, reason)``: new ones, or (no contrast) the previous ones and why they were kept."""
        self.no_contrast_run = 0 if result.contrast else self.no_contrast_run + 1
        if not result.contrast:
            reason = (
                "no contrast: every judged rollout got the same verdict "
                f"(rollout accuracy {result.rollout_accuracy:.3f}); previous weights kept"
            )
            logger.warning("DRIFT refresh at step %d: %s", step, reason)
            if self.no_contrast_run >= NO_CONTRAST_WARN_AFTER:
                self.warn_no_contrast(result.rollout_accuracy)
            weights = previous.weights if previous.weights is not None else np.ones(result.scores.shape[0])
            return previous.smoothed, weights, reason
        started = time.perf_counter()
        smoothed, weights = new_weights(result, previous.smoothed, previous.weights, self.params)
        weights = dist.broadcast(weights)  # identical on every rank, bit for bit
        result.timings["weights"] = time.perf_counter() - started
        return smoothed, weights, None

    def _check_capture(self, result: RefreshResult, step: int) -> None:
        """Count failed agreement checks of the captured features; turn capture off after a few in a row."""
        capture = self.capture
        if capture is None or result.capture_agreement is None:
            return
        capture.stale_checks = capture.stale_checks + 1 if result.capture_full else 0
        if result.capture_full:
            logger.warning(
                "DRIFT refresh at step %d: cached features no longer agree with the model (mean cosine %.3f < "
                "drift_capture_min_agreement=%.2f), so every row was recomputed.",
                step,
                result.capture_agreement,
                self.params.capture.capture_min_agreement,
            )
        if capture.stale_checks >= STALE_CHECKS_TO_STOP:
            # the model keeps moving too fast for the cache (e.g. a high learning rate): stop paying for capture
            capture.disable()
            logger.warning(
                "DRIFT: %d refreshes in a row found the captured features stale; feature capture is off for the "
                "rest of this run and every refresh recomputes every row (as with drift_capture_features=False).",
                STALE_CHECKS_TO_STOP,
            )

    def finish(self) -> None:
        """At the end of training: warn when no refresh had contrast (DRIFT did nothing this run)."""
        history = self.state.history
        if history and not any(h.get("contrast") for h in history):
            self.warn_no_contrast(float(self.state.rollout_accuracy or 0.0))

    def warn_no_contrast(self, accuracy: float) -> None:
        """Warn once that DRIFT has kept uniform (or stale) weights for several refreshes, with the likely cause."""
        if self.warned_no_contrast:
            return
        self.warned_no_contrast = True
        r = self.params.rollouts
        if accuracy <= 0.0:
            cause = (
                "every rollout was judged wrong. Likely: the first refresh comes before the model can answer (raise "
                f"drift_first_refresh_step, now {self.first_step}); drift_max_new_tokens={r.max_new_tokens} "
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
                f"drift_num_rollouts (now {r.num_rollouts}) or drift_temperature (now "
                f"{r.temperature}), or set drift_no_contrast='keep' to let all-right / all-wrong queries count"
            )
        logger.warning(
            "DRIFT has changed no weights for %d refresh(es) in a row (the train data is drawn as in plain SFT): %s.",
            self.no_contrast_run,
            cause,
        )
