"""The stages of a refresh, each a plain function over small parameter objects.

1. :func:`sample_and_judge`: rollouts on a seeded sample of the validation queries, judged by the rewards;
2. :func:`sign`: the signing rule's signs, then the scorer's (and whether they carry contrast);
3. :func:`target`: the scorer's target ``G`` in the projected gradient space;
4. train features: :class:`~drift_trainer.core.feature_pass.FeaturePass` over the train rows, or the features captured
   in training (:mod:`drift_trainer.core.capture`);
5. :func:`direction` and :func:`~drift_trainer.core.influence.inner_products`: ``H^-1 G`` and each row's raw score and
   norm, streamed over feature blocks;
6. :func:`row_arrays` / :func:`to_user`: per-row arrays, then per user example (what SFT preparation dropped scores 0);
7. the scorer's scores, weights and summary (:mod:`drift_trainer.core.refresh`).

``refresh.run_refresh`` runs them once during training; ``drift-trainer refine`` runs the same calls in a resumable
shard loop; ``DriftDPOTrainer`` runs them with a pair loss. Every seed a stage draws comes from :func:`stage_seed`, so
a training-time refresh and ``refine`` on the same checkpoint and seed sample the same queries and rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import numpy as np

from drift_trainer.core.dist import Dist
from drift_trainer.core.feature_pass import LM_ROWS, FeaturePass, RowFormat, progress_bar
from drift_trainer.core.features import adam_scales
from drift_trainer.core.influence import kronecker_factors, kronecker_precondition, precondition, second_moment
from drift_trainer.core.params import FeatureParams, InfluenceParams, RolloutParams, SigningParams
from drift_trainer.core.rewards import resolve_reward_funcs
from drift_trainer.core.rollouts import Rollouts, generate_rollouts, sample_queries
from drift_trainer.core.signing import sign_rollouts
from drift_trainer.core.storage import row_chunks
from drift_trainer.methods.scorers import Scorer, TargetInputs

# one stride per stage that draws random numbers: refresh k (0-based) uses seed + stride * (k + 1)
SEED_STRIDES = {"queries": 7919, "generation": 104729, "scores": 15485863, "harm": 32452843}


def stage_seed(stage: str, seed: int, refresh_index: int) -> int:
    """The seed ``stage`` (``queries``, ``generation``, ``scores`` or ``harm``) uses at refresh ``refresh_index``."""
    return int(seed) + SEED_STRIDES[stage] * (int(refresh_index) + 1)


@contextmanager
def timed(timings: dict, name: str):
    """Add the wall time of the block to ``timings[name]``."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def sample_and_judge(
    model,
    tokenizer,
    query_dataset,
    reward_funcs,
    params: RolloutParams,
    *,
    seed: int,
    refresh_index: int,
    dist: Dist | None = None,
    generation_context=None,
    show: bool = False,
) -> tuple[list[int], Rollouts]:
    """The query rows sampled for this refresh and their judged rollouts (identical on every rank: ranks share the
    ``generate`` calls and gather). ``generation_context``: a callable returning a context manager that yields the
    model to generate with (under ZeRO-3, TRL's gathered-weights context); default: ``model`` itself."""
    params = RolloutParams.of(params)
    world = dist.world_size if dist is not None else 1
    query_rows = sample_queries(query_dataset, params.num_queries, stage_seed("queries", seed, refresh_index))
    n_batches = -(-len(query_rows) * params.num_rollouts // params.batch_size)
    with progress_bar(show, -(-n_batches // world), "drift rollouts") as bar:
        ctx = generation_context() if generation_context is not None else nullcontext(model)
        with ctx as gen_model:
            funcs = resolve_reward_funcs(reward_funcs)
            gen_seed = stage_seed("generation", seed, refresh_index)
            rollouts = generate_rollouts(
                gen_model, tokenizer, query_dataset, query_rows, params, funcs, seed=gen_seed, progress=bar, dist=dist
            )
            mixed = mixed_queries(rollouts, query_rows) if params.contrast_rollouts > 0 else []
            if mixed:  # drift_contrast_rollouts: more rollouts where the verdicts already differ
                more = replace(params, num_rollouts=params.contrast_rollouts)
                extra = generate_rollouts(
                    gen_model, tokenizer, query_dataset, mixed, more, funcs, seed=gen_seed + CONTRAST_SEED, dist=dist
                )
                rollouts = rollouts.extend(extra)
    return query_rows, rollouts


CONTRAST_SEED = 1_000_003  # offset of the extra rollouts' generation seeds from the first round's


def mixed_queries(rollouts: Rollouts, query_rows: list[int]) -> list[int]:
    """The query rows (in sampled order) whose rollouts got different rewards: the queries that carry contrast."""
    rewards: dict[int, set] = {}
    for q, r in zip(rollouts.query_index, rollouts.rewards):
        rewards.setdefault(int(q), set()).add(float(r))
    return [q for q in query_rows if len(rewards.get(int(q), ())) > 1]


def sign(rollouts: Rollouts, params: SigningParams, scorer: Scorer) -> tuple[np.ndarray, bool]:
    """The rollouts' signs under the signing rule, as the scorer takes them, and whether the refresh has contrast
    (without it the caller keeps its previous weights and skips the feature passes)."""
    params = SigningParams.of(params)
    signs, contrast = sign_rollouts(rollouts.rewards, rollouts.query_index, params)
    return scorer.signs(np.asarray(rollouts.rewards), signs, contrast, params.reward_threshold)


def make_feature_pass(
    projector, tokenizer, params: FeatureParams, fused_lm_head: bool = False, row_format: RowFormat = LM_ROWS
) -> FeaturePass:
    """The feature pass of a refresh: ``params.batch_size`` rows per forward, features stored as ``params`` says;
    ``row_format``: the rows' batching and loss (preference pairs supply theirs)."""
    params = FeatureParams.of(params)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return FeaturePass(
        projector, pad, params.batch_size, fused_lm_head, params.memmap_dir, params.memory_mb, row_format
    )


def target(
    scorer: Scorer,
    fp: FeaturePass,
    model,
    tokenizer,
    query_dataset,
    query_rows,
    rollouts,
    signs,
    contrast,
    halves: bool = False,
):
    """The scorer's target ``G`` (``(dim,)``; zeros for scorers without one). ``halves``: return ``(G, halves)``,
    with ``halves`` the ``(2, dim)`` targets of two disjoint halves of the queries (None for a scorer without a
    split), computed from the same rollout features."""
    inputs = TargetInputs(fp, model, tokenizer, query_dataset, query_rows, rollouts, signs, contrast, fp.projector.dim)
    if not halves:
        return scorer.target(inputs)
    parts = scorer.target_halves(inputs)
    return (scorer.target(inputs), None) if parts is None else (parts.sum(0), parts)


def smooth_target(g: np.ndarray, previous: np.ndarray | None, ema: float) -> np.ndarray:
    """``drift_target_ema``: ``G`` itself when ``ema`` is 0; else the unit target averaged with the previous
    refresh's (itself smoothed) as ``ema * previous + (1 - ema) * G / ||G||``. Scores are standardised before they
    become weights, so only the direction of ``G`` matters to them."""
    g = np.asarray(g, dtype=np.float64)
    if ema <= 0:
        return g
    norm = np.linalg.norm(g)
    unit = g / norm if norm > 0 else g
    return unit if previous is None else ema * np.asarray(previous, dtype=np.float64) + (1.0 - ema) * unit


PRECONDITIONED = ("fisher", "kronecker")  # preconditioners that read the train features


def adam_projector(projector, optimizer):
    """``adam`` preconditioner: the projection of ``G / sqrt(v)`` (Adam's second moments, factored per module), which
    builds the target; train features keep the plain projection. Since ``<Gamma(g_i), G> = <g_i, Gamma(G)>`` for a
    diagonal ``Gamma``, this scores each row's Adam-preconditioned gradient (LESS) without recomputing any train
    feature."""
    scales = adam_scales(optimizer, projector.modules) if optimizer is not None else None
    if scales is None:
        raise ValueError(
            "drift_preconditioner='adam' reads the optimizer's Adam second moments (`exp_avg_sq` of each target "
            f"module's weight), but {'no optimizer was given' if optimizer is None else type(optimizer).__name__} "
            "holds none for the target modules (a non-Adam optimizer, DeepSpeed's partitioned state, or a refresh "
            "before the first optimizer step). Use drift_preconditioner='identity', 'fisher' or 'kronecker'."
        )
    return projector.scaled(scales)


def direction(
    target_g: np.ndarray,
    scorer: Scorer,
    params: InfluenceParams,
    blocks,
    dim: int,
    dist: Dist | None = None,
    k: int | None = None,
) -> np.ndarray:
    """``H^-1 G``: the target itself, or (``fisher`` / ``kronecker`` preconditioner, for scorers that use one) the
    target solved against the damped empirical Fisher, or its per-module Kronecker factors, of the train features of
    every rank. ``target_g``: ``(dim,)`` or ``(dim, c)``. ``blocks``: a callable returning an iterable of this rank's
    feature blocks (only called when a preconditioner needs them). ``k``: the projection side (``kronecker``)."""
    params = InfluenceParams.of(params)
    if params.preconditioner not in PRECONDITIONED or not scorer.uses_preconditioner:
        return np.asarray(target_g, dtype=np.float64)
    if params.preconditioner == "kronecker":
        if k is None:
            raise ValueError("direction: the `kronecker` preconditioner needs the projection side k.")
        s, a, _ = kronecker_factors(blocks(), int(k), dim)
        if dist is not None:
            s, a = dist.all_reduce_sum(s), dist.all_reduce_sum(a)
        return kronecker_precondition(target_g, s, a, params.damping)
    total, count = second_moment(blocks(), dim)
    if dist is not None:
        total = dist.all_reduce_sum(total)
        count = dist.all_reduce_sum(np.asarray([float(count)]))[0]
    return precondition(target_g, "fisher", total / max(count, 1.0), params.damping)


def gather_rows(dist: Dist, per_rank: int, ids: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every rank's ``(ids, *columns)`` (each rank padded to ``per_rank`` rows), concatenated in rank order."""
    pack = np.full((per_rank, 1 + len(columns)), np.nan)
    pack[: len(ids), 0] = ids
    for j, col in enumerate(columns):
        pack[: len(ids), j + 1] = col
    gathered = dist.all_gather(pack)
    gathered = gathered[~np.isnan(gathered[:, 0])]
    return (gathered[:, 0].astype(np.int64), *gathered[:, 1:].T)


def row_arrays(n_rows: int, ids: np.ndarray, raw, norms, loss, ntok) -> dict[str, np.ndarray]:
    """Per-row ``raw``, ``norm``, ``loss`` and ``tokens`` over ``n_rows`` rows (rows not in ``ids``: 0, loss nan)."""
    out = {"raw": np.zeros(n_rows), "norm": np.zeros(n_rows), "loss": np.full(n_rows, np.nan)}
    out["tokens"] = np.zeros(n_rows)
    ids = np.asarray(ids, dtype=np.int64)
    out["raw"][ids], out["norm"][ids], out["loss"][ids], out["tokens"][ids] = raw, norms, loss, ntok
    return out


def to_user(user_index: np.ndarray, num_examples: int, rows: dict, scores: np.ndarray, subset=None) -> dict:
    """Per user example: ``scores``, ``raw_scores``, ``grad_norm``, ``loss``, ``scored`` and ``num_masked`` from
    per-row arrays (``rows`` from :func:`row_arrays`). An example is scored when its row has a trained token; examples
    without a row (dropped by SFT preparation) or with nothing trained score 0. ``subset``: the rows this refresh
    scored or tried to (default: all) -- masked rows are counted among them."""
    ui = np.asarray(user_index, dtype=np.int64)
    n = int(num_examples)
    out = {k: np.zeros(n) for k in ("scores", "raw_scores", "grad_norm")}
    out["loss"] = np.full(n, np.nan)
    out["scores"][ui], out["raw_scores"][ui], out["grad_norm"][ui] = scores, rows["raw"], rows["norm"]
    out["loss"][ui] = rows["loss"]
    scored = np.zeros(n, dtype=bool)
    scored[ui] = rows["tokens"] > 0
    for k in ("scores", "raw_scores", "grad_norm"):
        out[k][~scored] = 0.0
    tried = np.zeros(n, dtype=bool)
    tried[ui if subset is None else ui[np.asarray(subset, dtype=np.int64)]] = True
    dropped = np.ones(n, dtype=bool)  # user examples SFT preparation dropped (no row at all)
    dropped[ui] = False
    out["scored"] = scored
    out["num_masked"] = int((tried & ~scored).sum() + dropped.sum())
    return out


def feature_blocks(phi, dim: int) -> Iterable[np.ndarray]:
    """``phi`` (possibly memory-mapped) in float64 blocks of bounded size, so statistics never copy all of it."""
    for sl in row_chunks(len(phi), dim):
        yield np.asarray(phi[sl], dtype=np.float64)
