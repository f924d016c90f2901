"""One refresh: rollouts -> signing -> target -> train features -> influence -> scores, and the weights after it.

:func:`run_refresh` composes the stages of :mod:`drift_trainer.core.pipeline` once; it is independent of the Trainer
(:class:`~drift_trainer.core.refresher.Refresher` calls it on schedule during training). Ranks split the train rows
(each rank's shard padded to equal batch counts, since a forward under ZeRO-3 is a collective); only ``G``, the
preconditioner and the scores cross ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from drift_trainer.core import pipeline
from drift_trainer.core.dist import Dist, fsdp2_unsharded, shard
from drift_trainer.core.feature_pass import RowFormat, TrainFeatures, TrainView, progress_bar, refresh_subset
from drift_trainer.core.features import ProjectedGradients, summed_logps
from drift_trainer.core.influence import inner_products, split_half_reliability
from drift_trainer.core.params import RefreshParams
from drift_trainer.core.rollouts import Rollouts
from drift_trainer.core.weighting import effective_sample_size, scores_to_weights, standardize
from drift_trainer.methods.scorers import get_scorer, has_reference, reference_rows, require_reference


@dataclass
class RefreshResult:
    step: int
    scores: np.ndarray  # (num_examples,) debiased; 0 where not scored
    raw_scores: np.ndarray
    grad_norm: np.ndarray
    loss: np.ndarray  # mean completion-token loss of each example (nan where not scored)
    scored: np.ndarray  # bool: has a feature (not dropped by preparation, not fully masked)
    rollouts: Rollouts
    signs: np.ndarray
    contrast: bool
    timings: dict[str, float] = field(default_factory=dict)
    num_masked: int = 0
    num_recomputed: int = -1  # rows whose features this refresh computed (-1: every scored row)
    capture_agreement: float | None = None  # captured features: mean cosine of cached vs recomputed check rows
    capture_full: bool = False  # captured features: the check failed, every row was recomputed
    reward_threshold: float = 0.5  # a rollout whose reward is >= this counts as correct
    reliability: float | None = None  # drift_reliability_shrink: split-half reliability of the scores, in [0, 1]
    target: np.ndarray | None = None  # the unit target direction scored against (smoothed by drift_target_ema)
    stale: np.ndarray | None = None  # captured features: (num_examples,) bool, scored from a feature older than the
    # previous refresh (its standardised score is shrunk by capture_agreement)
    reference_loss: np.ndarray | None = None  # the sampled queries' reference-answer losses (reference bound, gate)
    harm_sample_loss: np.ndarray | None = None  # drift_harm_gate: losses of a sample of train rows, taken with the
    # references' (same model, same forward pass), for the loss test
    reference_bound: bool = False  # drift_reference_bound was on (beyond_reference then demotes rows)

    @property
    def beyond_reference(self) -> np.ndarray | None:
        """``drift_reference_bound``: (num_examples,) bool, scored rows whose loss exceeds every reference answer's
        (None without the option or without reference losses)."""
        if not self.reference_bound or self.reference_loss is None or not len(self.reference_loss):
            return None
        loss = np.nan_to_num(np.asarray(self.loss, dtype=np.float64), nan=-np.inf)
        return self.scored & (loss > float(np.max(self.reference_loss)))

    @property
    def rollout_accuracy(self) -> float:
        rewards = np.asarray(self.rollouts.rewards)
        return float(np.mean(rewards >= self.reward_threshold)) if len(self.rollouts) else 0.0


def no_contrast_result(step: int, num_examples: int, rollouts: Rollouts, signs, timings, threshold) -> RefreshResult:
    """A refresh whose rollouts carry no contrast: nothing scored, the caller keeps its previous weights."""
    zeros = np.zeros(num_examples)
    result = RefreshResult(
        step,
        zeros,
        zeros.copy(),
        zeros.copy(),
        np.full(num_examples, np.nan),
        np.zeros(num_examples, dtype=bool),
        rollouts,
        signs,
        False,
        timings,
        reward_threshold=threshold,
    )
    return result


def run_refresh(
    *,
    args,
    step: int,
    model,
    tokenizer,
    view: TrainView,
    query_dataset,
    reward_funcs,
    projector: ProjectedGradients,
    generation_context=None,
    fused_lm_head: bool = False,
    dist: Dist | None = None,
    refresh_index: int = 0,
    seed: int = 0,
    progress: bool = True,
    capture=None,
    row_format: RowFormat | None = None,
    previous_target: np.ndarray | None = None,
    optimizer=None,
) -> RefreshResult:
    """Run one refresh and return scores over the user's train examples (identical on every rank).

    ``args``: a :class:`~drift_trainer.core.params.RefreshParams` or a config with ``drift_*`` fields.
    ``generation_context``: see :func:`~drift_trainer.core.pipeline.sample_and_judge`. ``capture``: a
    :class:`~drift_trainer.core.capture.TrainCapture` whose cache holds features captured during training; then only
    the stalest rows within ``drift_rescore_budget`` are recomputed and every row with a feature is scored.
    ``row_format``: how the train rows are batched and differentiated (default: language-modelling rows; the DPO
    trainer passes its pairs' format, the rollouts stay language-modelling rows).
    """
    params = RefreshParams.of(args)
    scorer = get_scorer(params.scorer)
    dist = dist or Dist()
    if capture is not None:
        capture.flush(write=True)  # file the last training backward's features, disarm before this refresh's passes
    show = progress and dist.rank == 0
    timings: dict[str, float] = {}
    with pipeline.timed(timings, "rollouts"):
        query_rows, rollouts = pipeline.sample_and_judge(
            model,
            tokenizer,
            query_dataset,
            reward_funcs,
            params.rollouts,
            seed=seed,
            refresh_index=refresh_index,
            dist=dist,
            generation_context=generation_context,
            show=show,
        )
    with pipeline.timed(timings, "signing"):
        signs, contrast = pipeline.sign(rollouts, params.signing, scorer)
    if not contrast:  # nothing to attribute towards: skip the (costly) feature passes
        return no_contrast_result(step, view.num_examples, rollouts, signs, timings, params.signing.reward_threshold)
    fp = pipeline.make_feature_pass(projector, tokenizer, params.features, fused_lm_head)
    target_fp = fp
    if params.influence.preconditioner == "adam" and scorer.uses_preconditioner:
        target_fp = pipeline.make_feature_pass(
            pipeline.adam_projector(projector, optimizer), tokenizer, params.features, fused_lm_head
        )
    split = params.influence.reliability_shrink
    with pipeline.timed(timings, "rollout_features"):
        g = pipeline.target(
            scorer, target_fp, model, tokenizer, query_dataset, query_rows, rollouts, signs, contrast, split
        )
    g, halves = g if split else (g, None)
    g = pipeline.smooth_target(g, previous_target, params.influence.target_ema)
    train_fp = (
        fp
        if row_format is None
        else pipeline.make_feature_pass(projector, tokenizer, params.features, fused_lm_head, row_format)
    )
    with pipeline.timed(timings, "features"):
        feats = train_features(train_fp, model, view, params, dist, step, refresh_index, seed, show, capture)
    with pipeline.timed(timings, "influence"):
        seed_s = pipeline.stage_seed("scores", seed, refresh_index)
        rows, scores, reliability = score_rows(scorer, params, g, feats, len(view), projector, dist, seed_s, halves)
    reference_loss = harm_sample_loss = None
    gate_losses = params.weighting.harm_gate and has_reference(query_dataset)
    if params.weighting.reference_bound or gate_losses:
        with pipeline.timed(timings, "reference_loss"):
            if gate_losses:
                harm_sample_loss, reference_loss = harm_losses(
                    fp, model, tokenizer, view, query_dataset, seed, refresh_index, dist
                )
            else:
                reference_loss = reference_losses(fp, model, tokenizer, query_dataset, query_rows, dist)
    user = pipeline.to_user(view.user_index, view.num_examples, rows, scores, feats.subset)
    if feats.stale is not None:
        user["stale"] = np.zeros(view.num_examples, dtype=bool)
        user["stale"][view.user_index] = feats.stale
        user["stale"] &= user["scored"]
    return RefreshResult(
        step=step,
        rollouts=rollouts,
        signs=signs,
        contrast=contrast,
        timings=timings,
        num_recomputed=feats.num_recomputed,
        capture_agreement=feats.agreement,
        capture_full=feats.full,
        reward_threshold=params.signing.reward_threshold,
        reliability=reliability,
        target=g,
        reference_loss=reference_loss,
        harm_sample_loss=harm_sample_loss,
        reference_bound=params.weighting.reference_bound,
        **user,
    )


BOUND_WHO = "drift_reference_bound=True compares train losses with"
BOUND_FIX = "or set drift_reference_bound=False"


HARM_ROWS = 1024  # train rows (and reference answers) the gate's loss test measures per refresh (all if fewer)


def harm_sample(num_rows: int, seed: int) -> np.ndarray:
    """The rows the harm gate's loss test measures at one refresh: all, or a seeded sample of HARM_ROWS."""
    if num_rows <= HARM_ROWS:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, HARM_ROWS, replace=False))


def harm_losses(fp, model, tokenizer, view, query_dataset, seed, refresh_index, dist=None):
    """``drift_harm_gate``'s loss test inputs, ``(train sample losses, reference losses)``, from the same model by
    the same forward passes (``refresh_index`` -1: the start model, before the first step). The references are every
    query's (up to HARM_ROWS, sampled), not only this refresh's ``query_rows``: the test's power grows with their
    number, and a forward pass per reference is cheap."""
    stage = pipeline.stage_seed("harm", seed, refresh_index)
    train = forward_losses(fp, model, view.fetch(harm_sample(len(view), stage)), dist)
    queries = harm_sample(len(query_dataset), stage + 1).tolist()
    return train, reference_losses(fp, model, tokenizer, query_dataset, queries, dist)


def forward_losses(fp, model, rows: list[dict], dist: Dist | None = None) -> np.ndarray:
    """Mean labelled-token loss of each row under the current model, by forward passes only (eval mode; batches
    split over the ranks, every rank gets every value); rows without a labelled token are left out. Under FSDP2 the
    weights are gathered for the passes and resharded after (a forward without backward leaves the root unsharded)."""
    with fsdp2_unsharded(model) as full:
        logp, count = summed_logps(full, rows, fp.pad_token_id, fp.batch_size, dist)
    live = count > 0
    return -logp[live] / count[live]


def reference_losses(fp, model, tokenizer, query_dataset, query_rows, dist: Dist | None = None) -> np.ndarray:
    """The mean completion-token loss of each sampled query's reference answer (``answer`` + EOS after its prompt,
    as a rollout is tokenized) under the current model (``drift_reference_bound``, ``drift_harm_gate``)."""
    require_reference(query_dataset, BOUND_WHO, BOUND_FIX)
    rows = reference_rows(tokenizer, query_dataset, query_rows)
    return forward_losses(fp, model, rows, dist) if rows else np.zeros(0)


def score_rows(scorer, params: RefreshParams, g, feats, n_rows: int, projector, dist: Dist, seed: int, halves=None):
    """Stage 5-6: ``H^-1 G`` (the preconditioner all-reduced over ranks), each row's raw score and norm, gathered
    from every rank into per-row arrays, and the scorer's scores. ``halves``: the ``(2, dim)`` targets of two halves
    of the evidence, whose scores give the split-half reliability. Returns ``(rows, scores, reliability)`` (None
    without ``halves``), identical on every rank."""
    dim = projector.dim
    columns = np.asarray(g, dtype=np.float64)[:, None]
    if halves is not None:
        columns = np.concatenate([columns, np.asarray(halves, dtype=np.float64).T], axis=1)

    def blocks():
        return pipeline.feature_blocks(feats.phi, dim)

    d = pipeline.direction(columns, scorer, params.influence, blocks, dim, dist, k=projector.k)
    raw, norms = inner_products(blocks(), d)
    ids, *cols = pipeline.gather_rows(dist, feats.per_rank, feats.rows, raw[:, 0], norms, feats.loss, feats.ntok)
    rows = pipeline.row_arrays(n_rows, ids, *cols)
    scores = scorer.scores(rows["raw"], rows["norm"], rows["loss"], seed, params.influence)
    if halves is None:
        return rows, scores, None
    ids_h, raw_a, raw_b = pipeline.gather_rows(dist, feats.per_rank, feats.rows, raw[:, 1], raw[:, 2])
    live = rows["tokens"][ids_h] > 0
    half_scores = [scorer.influence(r[live], rows["norm"][ids_h][live], params.influence) for r in (raw_a, raw_b)]
    return rows, scores, split_half_reliability(*half_scores)


def train_features(fp, model, view, params, dist, step, refresh_index, seed, show, capture=None) -> TrainFeatures:
    """Train features: all rows (or this refresh's block of ``drift_max_train_examples``), sharded over ranks; or,
    with features captured during training, only the stalest rows within ``drift_rescore_budget``."""
    if capture is not None:
        return capture.features_for_refresh(fp, model, view, params.capture, dist, step, seed + 7 * refresh_index, show)
    subset = refresh_subset(len(view), params.features.max_train_examples, refresh_index, seed)
    mine_pos, per_rank = shard(len(subset), dist.rank, dist.world_size)
    mine = subset[mine_pos]
    rows = view.fetch(mine)
    with progress_bar(show, len(rows), "drift features") as bar:
        phi, loss, ntok = fp.run(model, rows, num_batches=-(-per_rank // fp.batch_size), progress=bar)
    return TrainFeatures(mine, phi, loss, ntok, per_rank, subset)


def new_weights(result: RefreshResult, previous_smoothed: np.ndarray | None, previous_weights, args):
    """Smoothed standardised scores and the new weights (unscored examples keep their previous weight).

    ``args``: a :class:`~drift_trainer.core.params.RefreshParams` or a config."""
    params = RefreshParams.of(args)
    if not get_scorer(params.scorer).reweights:  # the no-reweighting baseline: weights stay exactly 1
        return np.zeros_like(result.scores), np.ones_like(result.scores)
    wp = params.weighting
    z = standardize(result.scores, result.scored)
    z = shrink_stale(z, result)
    bound = result.beyond_reference if wp.reference_bound else None
    known = result.scored
    partial = params.features.max_train_examples is not None or result.num_recomputed >= 0
    if previous_smoothed is not None and partial:
        # block rescoring / captured features: examples this refresh did not score keep their previous smoothed score
        # and still count
        previous_smoothed = np.asarray(previous_smoothed, dtype=np.float64)
        known = result.scored | (previous_smoothed != 0)
        ema = wp.score_ema
        z = np.where(result.scored, ema * previous_smoothed + (1 - ema) * z, previous_smoothed)
        weights = shrink_toward_uniform(scores_to_weights(z, wp, known, bound), result.reliability)
        if previous_weights is not None:
            weights = np.where(known, weights, previous_weights)
        return z, weights
    if previous_smoothed is not None and wp.score_ema > 0:
        z = np.where(result.scored, wp.score_ema * previous_smoothed + (1 - wp.score_ema) * z, 0.0)
    weights = shrink_toward_uniform(scores_to_weights(z, wp, result.scored, bound), result.reliability)
    if previous_weights is not None:
        weights = np.where(result.scored, weights, previous_weights)
    return z, weights


def shrink_toward_uniform(weights: np.ndarray, reliability: float | None) -> np.ndarray:
    """``drift_reliability_shrink``: each weight moves only ``reliability`` of the way from 1 to what the rule gave,
    ``1 + r (w - 1)``, so evidence that two halves of the rollouts disagree on (r near 0) leaves the weights near 1.
    The mean stays 1 and the clip still holds. Applied to the weights, not the scores: the rules standardise their
    input, which would undo a scaling of the scores."""
    if reliability is None:
        return weights
    r = float(np.clip(reliability, 0.0, 1.0))
    return 1.0 + r * (np.asarray(weights, dtype=np.float64) - 1.0)


def shrink_stale(z: np.ndarray, result: RefreshResult) -> np.ndarray:
    """Standardised scores with the stale rows' (captured features older than the previous refresh) shrunk toward
    the mean, 0, by the measured agreement of stale cached features with recomputed ones (clipped to [0, 1])."""
    if result.stale is None or result.capture_agreement is None or not result.stale.any():
        return z
    keep = float(np.clip(result.capture_agreement, 0.0, 1.0))
    return np.where(result.stale, z * keep, z)


def refresh_summary(result: RefreshResult, weights: np.ndarray) -> dict:
    """Metrics of a refresh, keyed as they are logged (``drift/*``)."""
    rewards = np.asarray(result.rollouts.rewards, dtype=np.float64)
    return {
        "drift/rollout_accuracy": result.rollout_accuracy,
        "drift/reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "drift/ess": effective_sample_size(weights),
        "drift/frac_positive": float((result.scores[result.scored] > 0).mean()) if result.scored.any() else 0.0,
        "drift/weight_max": float(weights.max()),
        "drift/refresh_seconds": float(sum(result.timings.values())),
        **({"drift/capture_agreement": result.capture_agreement} if result.capture_agreement is not None else {}),
        **({"drift/reliability": result.reliability} if result.reliability is not None else {}),
        **(
            {
                "drift/reference_loss_max": float(np.max(result.reference_loss)),
                "drift/beyond_reference": float(result.beyond_reference[result.scored].mean()),
            }
            if result.beyond_reference is not None and result.scored.any()
            else {}
        ),
        **(
            {"drift/stale_fraction": float(result.stale[result.scored].mean())}
            if result.stale is not None and result.scored.any()
            else {}
        ),
    }


def summary_record(result: RefreshResult, metrics: dict, options: dict, **extra) -> dict:
    """The summary of one refresh as it is kept in ``DriftState.history`` and written to ``summary.json``."""
    return {
        "step": result.step,
        "metrics": metrics,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "num_examples": int(result.scores.shape[0]),
        "num_scored": int(result.scored.sum()),
        "num_masked": result.num_masked,
        "num_rollouts": len(result.rollouts),
        "rollout_tokens": int(sum(len(c) for c in result.rollouts.completion_ids)),  # generated, up to each EOS
        "rollout_decoded": int(sum(result.rollouts.decode_steps)),  # tokens decoded (each row stops at its EOS)
        "contrast": result.contrast,
        **extra,
        "options": options,
    }
