"""``drift-trainer refine``: score a training set once with a checkpoint and write a refined copy.

::

    drift-trainer refine --model ckpt/ --train_file train.jsonl --query_file queries.jsonl \\
        --reward math_answer --output_dir refined/ --mode filter --keep_fraction 0.7 --drift_num_rollouts 8

One DRIFT refresh (rollouts on the queries, signing, projected per-example gradients, influence, weights; see
``drift_trainer.core.pipeline``, the same stages as a training-time refresh), run outside any Trainer. Outputs in ``--output_dir``:

- ``scores.parquet``: one row per train example, columns ``index`` (row of the train file), ``score`` (debiased
  influence), ``weight`` (mean 1, as training would sample), ``grad_norm``, ``raw_score`` (before debiasing), ``loss``
  (mean completion-token loss), ``scored`` (False for rows with no trained token after truncation: score 0, weight 1);
- ``refined.jsonl`` / ``refined.parquet`` / ``refined/`` (the train file's own format): with ``--mode weight`` every
  row plus a ``weight`` column; with ``--mode filter`` the rows kept by ``--keep_fraction`` (top share of scored rows
  by score) or ``--min_weight``, in their original order, unscored rows kept;
- ``rollouts.jsonl`` (query, completion, reward, sign), ``summary.json`` (metrics, a timing table, the options),
  ``examples.jsonl`` (index and text of each train row, read by the report) and ``report/report.html``.

Resumable: features are computed in shards of ``--shard_size`` rows, each saved to ``{output_dir}/work/`` as it
completes (with the rollouts and the target before them); rerunning the same command skips finished shards. Every
output file is written through a temporary file and a rename. ``work/`` is removed after success unless
``--keep_work``.

Several processes: ``torchrun --nproc_per_node 4 -m drift_trainer.cli refine ...`` or, on GPUs,
``accelerate launch --multi_gpu --num_processes 4 -m drift_trainer.cli refine ...`` (the same flags). Each process
holds a full copy of the model, or with ``--fsdp`` its FSDP2 shard of it (``fully_shard`` per decoder block, then the
root; the rollouts hold the full weights once, as a training-time refresh does). The ranks share the rollout calls
(``core.dist.rank_calls``) and every rank computes the same target; feature shard ``s`` goes to rank
``s % world_size``; under ``--fsdp`` each rank runs the same number of feature forwards (a rank with fewer pads with
discarded ones), since a sharded forward is a collective. Rank 0 then reads every shard file and writes the outputs.
Scores do not depend on the number of processes or on ``--fsdp`` (shards are fixed by ``--shard_size``), and a run
interrupted with one process count resumes with another. ``--output_dir`` must be on a disk every process sees (one
machine, or a shared filesystem). On CPU, ``torchrun`` (gloo) works; ``accelerate launch --cpu`` starts one process
unless accelerate is configured for multi-CPU.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from drift_trainer.cli.datafiles import example_text, read_table, refined_name, tokenize_rows, train_kind, write_table
from drift_trainer.cli.refine_inputs import (
    RefineArguments,
    check_model_dir,
    fingerprint,
    load_model_and_tokenizer,
    load_queries,
    parse_args,
    prepare_work_dir,
    probe_rewards,
    reward_error,
    save_npz,
    shard_path,
)
from drift_trainer.core import pipeline
from drift_trainer.core.dist import Dist, barrier
from drift_trainer.core.feature_pass import TrainView, progress_bar
from drift_trainer.core.influence import inner_products
from drift_trainer.core.params import RefreshParams
from drift_trainer.core.refresh import RefreshResult, new_weights, refresh_summary, summary_record
from drift_trainer.core.rollouts import Rollouts
from drift_trainer.core.state import _json_default, atomic_write_text, write_examples, write_scores, write_summary
from drift_trainer.hf.config import DriftArguments
from drift_trainer.methods.scorers import get_scorer

__all__ = ["RefineArguments", "load_model_and_tokenizer", "load_queries", "main", "parse_args", "run", "select_rows"]
logger = logging.getLogger("drift_trainer.refine")


def _setup_distributed():
    """Initialise torch.distributed under accelerate launch / torchrun (WORLD_SIZE > 1); return the device."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Scoring:
    """What every stage of one ``refine`` run shares."""

    ra: RefineArguments
    params: RefreshParams
    scorer: object
    work: str
    dist: Dist
    model: object
    tokenizer: object
    queries: object
    reward_funcs: list
    fpass: object  # FeaturePass
    timings: dict
    progress: bool = True

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def show(self) -> bool:
        return self.is_main and self.progress


def run(ra: RefineArguments, da: DriftArguments) -> dict:
    """Score ``ra.train_file`` and write the outputs; returns the summary (on every rank)."""
    import torch

    from drift_trainer.core.features import ProjectedGradients, select_target_modules
    from drift_trainer.core.rewards import resolve_reward_funcs

    started = time.perf_counter()
    device = torch.device(ra.device) if ra.device else _setup_distributed()
    dist = Dist()
    params, scorer = RefreshParams.of(da), get_scorer(da.drift_scorer)
    # inputs: fail on anything bad before the model is loaded
    check_model_dir(ra.model)
    table = read_table(ra.train_file)
    if not table.rows:
        raise ValueError(f"Train file {ra.train_file} is empty.")
    kind = train_kind(table.columns, ra.train_file, ra.dataset_text_field)
    queries = load_queries(ra)
    scorer.check_queries(queries)
    try:
        reward_funcs = resolve_reward_funcs(ra.reward)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--reward: {exc}") from exc
    probe_rewards(ra, reward_funcs, queries)
    fp = fingerprint(ra, da)
    work = prepare_work_dir(ra, fp, dist.rank == 0)
    barrier(dist)
    # shards already on disk, counted before any rank can write one (they wait for rank 0's target below)
    n_resumed = len(glob.glob(os.path.join(work, "shard-*.npz"))) if dist.rank == 0 else 0
    timings: dict[str, float] = {}
    with pipeline.timed(timings, "load"):
        model, tokenizer = load_model_and_tokenizer(ra, device)
        if ra.fsdp:
            model = shard_model(model, device, dist)
    with pipeline.timed(timings, "tokenize"):
        rows, user_index = tokenize_rows(
            table,
            tokenizer,
            kind,
            ra.max_length,
            ra.dataset_text_field,
            ra.completion_only_loss,
            ra.assistant_only_loss,
        )
    projector = ProjectedGradients(
        select_target_modules(model, da.drift_target_modules, da.drift_target_layers),
        da.drift_projection_dim,
        da.drift_projection_seed,
    )
    fpass = pipeline.make_feature_pass(projector, tokenizer, params.features)
    sc = Scoring(
        ra, params, scorer, work, dist, model, tokenizer, queries, reward_funcs, fpass, timings, da.drift_progress
    )
    rollouts, signs, target = rollouts_and_target(sc)
    view = TrainView(rows, np.asarray(user_index, dtype=np.int64), len(table.rows))
    n_shards = feature_shards(sc, view, target)
    barrier(dist)
    if not sc.is_main:
        return {}
    with pipeline.timed(timings, "influence"):
        result = influence(sc, view, n_shards, target, rollouts, signs)
    with pipeline.timed(timings, "weighting"):
        _, weights = new_weights(result, None, None, params)
        keep = select_rows(ra, result.scores, weights, result.scored)
    with pipeline.timed(timings, "write"):
        summary = write_outputs(ra, da, table, kind, result, weights, keep, fp, n_shards, n_resumed)
    summary["world_size"] = dist.world_size
    summary["fsdp"] = fsdp_sharded(model)
    summary["timings"] = {k: round(v, 4) for k, v in timings.items()}
    summary["metrics"]["drift/refresh_seconds"] = time.perf_counter() - started
    write_summary(ra.output_dir, summary)
    if ra.report:
        from drift_trainer.cli.report import write_report

        write_report(ra.output_dir, os.path.join(ra.output_dir, "report"))
    if not ra.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def shard_model(model, device, dist: Dist):
    """``--fsdp``: the model under torch's FSDP2 over every process, one ``fully_shard`` group per decoder block (the
    classes the model names in ``_no_split_modules``, as accelerate's FSDP2 wraps them), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.world_size < 2:
        raise ValueError(
            "--fsdp shards the model over several processes, but this is one process. Launch with "
            "`torchrun --nproc_per_node N -m drift_trainer.cli refine ...` (or accelerate launch), or drop --fsdp."
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"--fsdp: {type(base).__name__} names no decoder-block class in _no_split_modules, so there is no block to "
            "shard; drop --fsdp (every process then holds the full model)."
        )
    mesh = init_device_mesh(device.type, (dist.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_sharded(model) -> bool:
    """Whether any parameter of ``model`` is an FSDP2 DTensor shard (recorded in the summary as ``fsdp``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def rollouts_and_target(sc: Scoring) -> tuple[Rollouts, np.ndarray, np.ndarray]:
    """Stages 1-3 (saved in the work directory by rank 0, read back on resume): the rollouts of refresh 0 (the seeds
    a training-time first refresh with the same seed uses), their signs and the scorer's target ``G``, the same on
    every rank. The ranks share the rollout calls; under ``--fsdp`` they hold the full weights for them once. Raises
    when the rollouts carry no contrast for a scorer that needs it."""
    from drift_trainer.core.dist import fsdp2_unsharded

    target_path, rollouts_path = os.path.join(sc.work, "target.npz"), os.path.join(sc.work, "rollouts.json")
    # rank 0 decides, so that every rank takes the same branch (the rollouts below are collective)
    found = sc.is_main and os.path.exists(target_path) and os.path.exists(rollouts_path)
    if sc.dist.broadcast(np.asarray([float(found)]))[0]:
        if sc.is_main:
            logger.info("resuming: rollouts and target read from %s", sc.work)
        with open(rollouts_path) as f:
            rollouts = Rollouts(**json.load(f))
        with np.load(target_path) as saved:
            target, signs, contrast = saved["target"], saved["signs"], bool(saved["contrast"])
        with open(os.path.join(sc.work, "timings.json")) as f:
            sc.timings.update({k: v for k, v in json.load(f).items() if k not in ("load", "tokenize")})
    else:
        with pipeline.timed(sc.timings, "rollouts"):
            try:
                query_rows, rollouts = pipeline.sample_and_judge(
                    sc.model,
                    sc.tokenizer,
                    sc.queries,
                    sc.reward_funcs,
                    sc.params.rollouts,
                    seed=sc.ra.seed,
                    refresh_index=0,
                    dist=sc.dist,
                    generation_context=lambda: fsdp2_unsharded(sc.model),
                    show=sc.show,
                )
            except RuntimeError as exc:
                if "Reward function" in str(exc):
                    raise RuntimeError(reward_error(sc.ra, sc.queries, exc)) from exc
                raise
        with pipeline.timed(sc.timings, "signing"):
            signs, contrast = pipeline.sign(rollouts, sc.params.signing, sc.scorer)
        with pipeline.timed(sc.timings, "rollout_features"):
            target = pipeline.target(
                sc.scorer, sc.fpass, sc.model, sc.tokenizer, sc.queries, query_rows, rollouts, signs, contrast
            )
        if sc.is_main:
            atomic_write_text(os.path.join(sc.work, "timings.json"), json.dumps(sc.timings))
            atomic_write_text(rollouts_path, json.dumps(rollouts.__dict__, default=_json_default))
            save_npz(target_path, target=target, signs=signs, contrast=np.asarray(contrast))
    if not contrast:
        _no_contrast(sc, rollouts, rollouts_path)
    return rollouts, signs, target


def _no_contrast(sc: Scoring, rollouts: Rollouts, rollouts_path: str) -> None:
    rewards = np.asarray(rollouts.rewards)
    acc = float(np.mean(rewards >= sc.params.signing.reward_threshold)) if len(rewards) else float("nan")
    raise RuntimeError(
        f"No contrast: every judged rollout got the same verdict (rollout accuracy {acc:.3f} over "
        f"{len(rewards)} rollouts), so the scores would carry no signal. Use more queries or rollouts "
        "(--drift_num_queries, --drift_num_rollouts), a higher --drift_temperature, a reward threshold "
        "(--drift_reward_threshold) that splits the rollouts, or a checkpoint that solves some queries. "
        f"The rollouts are in {rollouts_path}."
    )


def _keeps_features(sc: Scoring) -> bool:
    """Shards keep the features themselves when a preconditioner (Fisher, Kronecker) needs every row's before scoring."""
    return sc.params.influence.preconditioner in pipeline.PRECONDITIONED and sc.scorer.uses_preconditioner


def write_shard(work: str, s: int, arrays: dict) -> None:
    """Save feature shard ``s`` (the unit of resuming)."""
    save_npz(shard_path(work, s), **arrays)


def feature_shards(sc: Scoring, view: TrainView, target: np.ndarray) -> int:
    """Stage 4-5 per shard: this rank's shards of ``--shard_size`` rows (shard ``s`` on rank ``s % world``), each
    saved with its rows' raw scores against ``G``, norms, losses and token counts; shards on disk are skipped.
    Returns the number of shards."""
    ra, work, n_rows = sc.ra, sc.work, len(view)
    n_shards = -(-n_rows // ra.shard_size)
    mine = [s for s in range(n_shards) if s % sc.dist.world_size == sc.dist.rank]
    done = [s for s in mine if os.path.exists(shard_path(work, s))]
    if done and sc.is_main:
        logger.warning("resuming: %d of %d feature shards already done in %s", len(done), n_shards, work)

    def size(s):
        return min(ra.shard_size, n_rows - s * ra.shard_size)

    todo = [s for s in mine if s not in done]
    spare = _spare_forwards(sc, [-(-size(s) // sc.fpass.batch_size) for s in todo])
    with pipeline.timed(sc.timings, "features"), progress_bar(sc.show, sum(map(size, mine)), "drift features") as bar:
        bar.update(sum(map(size, done)))
        if spare and not todo:  # nothing left on this rank: its share of the collective forwards, results discarded
            sc.fpass.run(sc.model, view.fetch(np.arange(1)), num_batches=spare)
        for j, s in enumerate(todo):
            ids = np.arange(s * ra.shard_size, s * ra.shard_size + size(s))
            extra = spare if j == len(todo) - 1 else 0
            n_batches = -(-size(s) // sc.fpass.batch_size) + extra
            phi, loss, ntok = sc.fpass.run(sc.model, view.fetch(ids), num_batches=n_batches, progress=bar)
            raw, norm = inner_products([phi], target)
            arrays = {"rows": ids, "raw": raw, "norm": norm, "loss": loss, "ntok": ntok}
            if _keeps_features(sc):
                arrays["phi"] = phi
            write_shard(work, s, arrays)
    return n_shards


def _spare_forwards(sc: Scoring, batches: list[int]) -> int:
    """Under ``--fsdp``, the forwards this rank adds so that every rank runs as many as the busiest (0 otherwise):
    ranks own different numbers of shards, a last shard is short, and a resumed run has finished different ones."""
    if not sc.ra.fsdp:
        return 0
    busiest = int(sc.dist.all_reduce_max(np.asarray([float(sum(batches))]))[0])
    return busiest - sum(batches)


def influence(sc: Scoring, view: TrainView, n_shards: int, target, rollouts, signs) -> RefreshResult:
    """Stages 5-6 on rank 0 over every shard: the direction (re-scoring against ``H^-1 G`` when preconditioned), the
    scorer's scores, and the per-example result."""
    parts = []
    for s in range(n_shards):
        with np.load(shard_path(sc.work, s)) as z:
            parts.append({k: z[k] for k in z.files})
    ids = np.concatenate([p["rows"] for p in parts])
    cols = [np.concatenate([p[k] for p in parts]) for k in ("raw", "norm", "loss", "ntok")]
    if _keeps_features(sc):
        dim = sc.fpass.projector.dim
        k = sc.fpass.projector.k
        direction = pipeline.direction(
            target, sc.scorer, sc.params.influence, lambda: (p["phi"] for p in parts), dim, k=k
        )
        cols[0], _ = inner_products((p["phi"] for p in parts), direction)
    rows = pipeline.row_arrays(len(view), ids, *cols)
    seed = pipeline.stage_seed("scores", sc.ra.seed, 0)
    scores = sc.scorer.scores(rows["raw"], rows["norm"], rows["loss"], seed, sc.params.influence)
    user = pipeline.to_user(view.user_index, view.num_examples, rows, scores)
    threshold = sc.params.signing.reward_threshold
    return RefreshResult(
        step=0, rollouts=rollouts, signs=signs, contrast=True, timings=sc.timings, reward_threshold=threshold, **user
    )


def select_rows(ra: RefineArguments, scores: np.ndarray, weights: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Rows kept by ``--mode filter`` (unscored rows are kept); all rows for ``--mode weight``."""
    keep = np.ones(len(scores), dtype=bool)
    if ra.mode != "filter":
        return keep
    live = np.flatnonzero(scored)
    if ra.keep_fraction is not None:
        n_keep = int(np.ceil(ra.keep_fraction * len(live)))
        order = live[np.argsort(-scores[live], kind="stable")]
        keep[order[n_keep:]] = False
    else:
        keep[live[weights[live] < ra.min_weight]] = False
    return keep


def write_outputs(ra, da, table, kind, result, weights, keep, fp, n_shards, n_resumed) -> dict:
    """``scores.parquet``, ``rollouts.jsonl``, ``examples.jsonl`` and the refined dataset; returns the summary."""
    out = ra.output_dir
    write_scores(out, result, weights)
    write_examples(
        os.path.join(out, "examples.jsonl"),
        ((i, example_text(r, ra.dataset_text_field)) for i, r in enumerate(table.rows)),
    )
    refined = write_table(
        table,
        os.path.join(out, refined_name(table.format)),
        keep=keep,
        weights={ra.weight_column: weights} if ra.mode == "weight" else None,
    )
    return summary_record(
        result,
        refresh_summary(result, weights),
        da.drift_options(),
        kind="refine",
        refresh=0,
        reason=None,
        weights_changed=True,
        refined={
            "path": refined,
            "format": table.format,
            "mode": ra.mode,
            "rows_kept": int(keep.sum()),
            "keep_fraction": ra.keep_fraction,
            "min_weight": ra.min_weight,
        },
        train_format=kind,
        shards={"total": n_shards, "resumed": n_resumed, "computed": n_shards - n_resumed, "shard_size": ra.shard_size},
        inputs={"model": ra.model, "train_file": ra.train_file, "query_file": ra.query_file, "reward": ra.reward},
        fingerprint=fp["hash"],
    )


def _close_distributed(wait: bool) -> None:
    """Close the process group before the interpreter exits (a gloo group left to shutdown can abort the process),
    after every rank is done when ``wait``."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        if wait:
            td.barrier()
        td.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ra, da = parse_args(list(sys.argv[1:] if argv is None else argv))
        summary = run(ra, da)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as exc:
        print(f"drift-trainer refine: error: {exc}", file=sys.stderr)
        _close_distributed(wait=False)
        return 1
    _close_distributed(wait=True)
    if summary:
        m = summary["metrics"]
        print(
            f"drift-trainer refine: {summary['num_scored']}/{summary['num_examples']} examples scored, "
            f"rollout accuracy {m['drift/rollout_accuracy']:.3f}, ESS {m['drift/ess']:.3f}, "
            f"{summary['refined']['rows_kept']} rows in {summary['refined']['path']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
