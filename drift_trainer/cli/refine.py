"""``drift-trainer refine``: score a training set once with a checkpoint and write a refined copy.

::

    drift-trainer refine --model ckpt/ --train_file train.jsonl --query_file queries.jsonl \\
        --reward math_answer --output_dir refined/ --mode filter --keep_fraction 0.7 --drift_num_rollouts 8

One DRIFT refresh (rollouts on the queries, signing, projected per-example gradients, influence, weights; see
``drift_trainer.refresh``), run outside any Trainer. Outputs in ``--output_dir``:

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
holds a full copy of the model; shard ``s`` goes to rank ``s % world_size`` (``refresh.Dist`` over
``torch.distributed``); rank 0 samples the rollouts and broadcasts the target, then reads every shard file and writes
the outputs. Scores do not depend on the number of processes (shards are fixed by ``--shard_size``), and a run
interrupted with one process count resumes with another. ``--output_dir`` must be on a disk every process sees (one
machine, or a shared filesystem). On CPU, ``torchrun`` (gloo) works; ``accelerate launch --cpu`` starts one process
unless accelerate is configured for multi-CPU.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from drift_trainer.cli.datafiles import (
    example_text,
    read_table,
    refined_name,
    tokenize_rows,
    train_kind,
    write_table,
)
from drift_trainer.core.state import _json_default, atomic_path, atomic_write_text
from drift_trainer.hf.config import DriftArguments

logger = logging.getLogger("drift_trainer.refine")
WORK_DIR = "work"
# Seeds of the first refresh, as refresh.run_refresh derives them (refresh_index=0), so refine on a checkpoint samples
# the same queries and rollouts as a training-time refresh with the same seed would.
QUERY_SEED_STRIDE = 7919
GENERATION_SEED_STRIDE = 104729

# test hook: called with the shard number after each shard file is written (a test raises here to simulate a crash)
_after_shard = None


@dataclass
class RefineArguments:
    """Inputs and outputs of ``drift-trainer refine`` (the ``drift_*`` options come from ``DriftArguments``)."""

    model: str = field(metadata={"help": "Local model directory (from save_pretrained), or a PEFT adapter directory."})
    train_file: str = field(metadata={"help": "Train set: .jsonl, .parquet, or a Dataset.save_to_disk directory."})
    query_file: str = field(metadata={"help": "Validation queries (same formats) with a prompt column."})
    output_dir: str = field(metadata={"help": "Where scores, the refined dataset, rollouts and the report go."})
    reward: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={"help": "Reward(s), summed: built-in `exact_match` / `math_answer`, or `package.module:function`."},
    )
    answer_column: str = field(
        default="answer", metadata={"help": "Query column with the reference answer (passed to rewards as `answer`)."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Query column with the prompt (text or messages)."})
    mode: str = field(
        default="weight",
        metadata={
            "help": "`weight`: keep every row, add a weight column. `filter`: keep rows by --keep_fraction or "
            "--min_weight.",
            "choices": ["weight", "filter"],
        },
    )
    keep_fraction: float | None = field(
        default=None, metadata={"help": "With --mode filter: keep this top share of scored rows by score, in (0, 1]."}
    )
    min_weight: float | None = field(
        default=None, metadata={"help": "With --mode filter: keep rows whose weight is >= this."}
    )
    weight_column: str = field(default="weight", metadata={"help": "Name of the weight column in --mode weight."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer directory. Default: the model's."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model directory of a PEFT adapter. Default: the adapter's config."}
    )
    dataset_text_field: str = field(default="text", metadata={"help": "Text column of plain language-modelling data."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate train rows to this many tokens (TRL)."})
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Prompt-completion rows: score the completion tokens only (TRL default)."}
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "Conversational rows: score assistant tokens only (needs {%% generation %%} in the chat template)."
        },
    )
    shard_size: int = field(default=512, metadata={"help": "Train rows per feature shard (the unit of resuming)."})
    seed: int = field(default=42, metadata={"help": "Seed of query sampling and rollouts."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    device: str | None = field(default=None, metadata={"help": "Device. Default: the process's GPU if any, else CPU."})
    keep_work: bool = field(default=False, metadata={"help": "Keep {output_dir}/work/ (feature shards) after success."})
    overwrite: bool = field(
        default=False, metadata={"help": "Start over even if output_dir holds an unfinished run with other inputs."}
    )
    report: bool = field(default=True, metadata={"help": "Write report/report.html after scoring."})

    def validate(self) -> None:
        if self.mode == "filter":
            if (self.keep_fraction is None) == (self.min_weight is None):
                raise ValueError("--mode filter needs exactly one of --keep_fraction or --min_weight.")
            if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
                raise ValueError(f"--keep_fraction must be in (0, 1]; got {self.keep_fraction}.")
        elif self.keep_fraction is not None or self.min_weight is not None:
            raise ValueError("--keep_fraction / --min_weight only apply with --mode filter.")
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1; got {self.shard_size}.")


def parse_args(argv: list[str]) -> tuple[RefineArguments, DriftArguments]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((RefineArguments, DriftArguments), prog="drift-trainer refine")
    refine_args, drift_args = parser.parse_args_into_dataclasses(args=argv)
    refine_args.validate()
    drift_args.validate_drift()
    return refine_args, drift_args


# ---------------------------------------------------------------------------------------------- inputs


def check_model_dir(path: str) -> bool:
    """Raise a clear error unless ``path`` is a model or PEFT adapter directory; returns True for an adapter."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--model {path}: no such directory. Pass a local directory written by model.save_pretrained(dir) "
            "(config.json and weights), or a PEFT adapter directory (adapter_config.json)."
        )
    is_adapter = os.path.exists(os.path.join(path, "adapter_config.json"))
    if not is_adapter and not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(
            f"--model {path} holds neither config.json nor adapter_config.json (files: {sorted(os.listdir(path))[:10]}). "
            "Save the model with model.save_pretrained(dir) (and tokenizer.save_pretrained(dir)), or pass a PEFT "
            "adapter directory."
        )
    return is_adapter


def load_model_and_tokenizer(ra: RefineArguments, device):
    """Model (a PEFT model with trainable adapters when ``ra.model`` holds ``adapter_config.json``) and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ra.model
    is_adapter = check_model_dir(path)
    if ra.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, ra.dtype)
    base_path = path
    if is_adapter:
        with open(os.path.join(path, "adapter_config.json")) as f:
            base_path = ra.base_model or json.load(f).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path: pass --base_model DIR.")
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    except Exception as exc:
        where = f"the adapter's base model {base_path!r} (from {path}/adapter_config.json)" if is_adapter else path
        raise ValueError(
            f"Cannot load a causal LM from {where}: {type(exc).__name__}: {exc}. "
            + (
                "Pass --base_model with a local directory of the base model."
                if is_adapter
                else "Check that the directory holds config.json and the weights (model.safetensors)."
            )
        ) from exc
    if is_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=True)  # trainable: features need LoRA grads
        except Exception as exc:
            raise ValueError(f"Cannot load the PEFT adapter in {path}: {type(exc).__name__}: {exc}") from exc
    tok_candidates = [ra.tokenizer] if ra.tokenizer else [path] + ([base_path] if is_adapter else [])
    tokenizer, errors = None, []
    for candidate in tok_candidates:
        try:
            tokenizer = AutoTokenizer.from_pretrained(candidate)
            break
        except Exception as exc:  # noqa: BLE001 - any failure: try the next place, report them all
            errors.append(f"{candidate}: {type(exc).__name__}: {exc}")
    if tokenizer is None:
        raise ValueError(
            "Cannot load a tokenizer (" + "; ".join(errors) + "). Save it beside the model with "
            "tokenizer.save_pretrained(dir), or pass --tokenizer DIR."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def load_queries(ra: RefineArguments):
    from datasets import Dataset

    table = read_table(ra.query_file)
    cols = table.columns
    missing = [c for c in (ra.prompt_column, ra.answer_column) if c not in cols]
    if missing:
        raise ValueError(
            f"Query file {ra.query_file} has no column {missing} (columns: {cols}). Pass --prompt_column / "
            "--answer_column with the names it uses."
        )
    if not table.rows:
        raise ValueError(f"Query file {ra.query_file} is empty: refine needs at least one query.")
    rows = []
    for r in table.rows:
        r = dict(r)
        prompt, answer = r.pop(ra.prompt_column), r.pop(ra.answer_column)
        rows.append(
            {"prompt": prompt, "answer": answer, **{k: v for k, v in r.items() if k not in ("prompt", "answer")}}
        )
    return Dataset.from_list(rows)


def probe_rewards(ra: RefineArguments, reward_funcs, queries) -> None:
    """Call the rewards once on the first query (empty completion) so a broken reward fails before any sampling."""
    from drift_trainer.core.rewards import check_reward_funcs

    try:
        check_reward_funcs(reward_funcs, queries)
    except Exception as exc:
        raise RuntimeError(reward_error(ra, queries, exc)) from exc


def reward_error(ra: RefineArguments, queries, exc: Exception) -> str:
    return (
        f"--reward {' '.join(ra.reward)} failed on the first batch: {exc}. Rewards are called as "
        f"f(prompts, completions, **columns) with the columns of {ra.query_file} ({queries.column_names}, the answer "
        f"column {ra.answer_column!r} renamed to 'answer'); fix the function or the query file."
    )


# ---------------------------------------------------------------------------------------------- work directory


def fingerprint(ra: RefineArguments, da: DriftArguments) -> dict:
    """What a resumed run must share with the interrupted one."""

    def stat(p):
        if os.path.isdir(p):
            files = sorted(os.listdir(p))
            return [(f, os.path.getsize(os.path.join(p, f)), int(os.path.getmtime(os.path.join(p, f)))) for f in files]
        return [os.path.getsize(p), int(os.path.getmtime(p))]

    inputs = {
        "model": [os.path.abspath(ra.model), stat(ra.model)],
        "train_file": [os.path.abspath(ra.train_file), stat(ra.train_file)],
        "query_file": [os.path.abspath(ra.query_file), stat(ra.query_file)],
    }
    scoring = {
        k: v
        for k, v in asdict(ra).items()
        if k
        in (
            "reward",
            "answer_column",
            "prompt_column",
            "tokenizer",
            "base_model",
            "dataset_text_field",
            "max_length",
            "completion_only_loss",
            "assistant_only_loss",
            "shard_size",
            "seed",
            "dtype",
        )
    }
    options = {k: v for k, v in da.drift_options().items() if k not in ("drift_progress", "drift_save_artifacts")}
    blob = json.dumps([inputs, scoring, options], sort_keys=True, default=str)
    return {"hash": hashlib.sha256(blob.encode()).hexdigest()[:16], "scoring": scoring}


def prepare_work_dir(ra: RefineArguments, fp: dict, is_main: bool) -> str:
    work = os.path.join(ra.output_dir, WORK_DIR)
    meta_path = os.path.join(work, "meta.json")
    if is_main:
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if old.get("hash") != fp["hash"]:
                if not ra.overwrite:
                    raise ValueError(
                        f"{work} holds an unfinished refine run with other inputs or options (fingerprint "
                        f"{old.get('hash')} != {fp['hash']}). Rerun with the same command to resume it, pass "
                        "--overwrite to start over, or choose another --output_dir."
                    )
                shutil.rmtree(work)
        os.makedirs(work, exist_ok=True)
        for stale in glob.glob(os.path.join(work, ".tmp-*")):  # left by a process killed while writing
            os.remove(stale)
        if not os.path.exists(meta_path):
            atomic_write_text(meta_path, json.dumps(fp, indent=2))
    return work


def save_npz(path: str, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def shard_path(work: str, s: int) -> str:
    return os.path.join(work, f"shard-{s:05d}.npz")


# ---------------------------------------------------------------------------------------------- the run


def _setup_distributed():
    """Initialise torch.distributed under accelerate launch / torchrun (WORLD_SIZE > 1); return the device."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _barrier(dist) -> None:
    if dist.td is not None:
        dist.td.barrier()


def run(ra: RefineArguments, da: DriftArguments) -> dict:
    """Score ``ra.train_file`` and write the outputs; returns the summary (on every rank)."""
    import torch

    from drift_trainer.core.features import ProjectedGradients, select_target_modules
    from drift_trainer.core.refresh import (
        Dist,
        FeaturePass,
        RefreshResult,
        new_weights,
        progress_bar,
    )
    from drift_trainer.core.rewards import resolve_reward_funcs
    from drift_trainer.core.rollouts import Rollouts, generate_rollouts, sample_queries
    from drift_trainer.core.signing import sign_rollouts

    started = time.perf_counter()
    timings: dict[str, float] = {}
    device = torch.device(ra.device) if ra.device else _setup_distributed()
    dist = Dist()
    is_main = dist.rank == 0
    show = da.drift_progress and is_main

    # inputs: fail on anything bad before the model is loaded
    check_model_dir(ra.model)
    table = read_table(ra.train_file)
    if not table.rows:
        raise ValueError(f"Train file {ra.train_file} is empty.")
    kind = train_kind(table.columns, ra.train_file, ra.dataset_text_field)
    queries = load_queries(ra)
    try:
        reward_funcs = resolve_reward_funcs(ra.reward)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--reward: {exc}") from exc
    probe_rewards(ra, reward_funcs, queries)
    fp = fingerprint(ra, da)
    work = prepare_work_dir(ra, fp, is_main)
    _barrier(dist)
    # shards already on disk, counted before any rank can write one (they wait for rank 0's target below)
    n_resumed = len(glob.glob(os.path.join(work, "shard-*.npz"))) if is_main else 0

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(ra, device)
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, user_index = tokenize_rows(
        table, tokenizer, kind, ra.max_length, ra.dataset_text_field, ra.completion_only_loss, ra.assistant_only_loss
    )
    timings["tokenize"] = time.perf_counter() - t0
    n_examples, n_rows = len(table.rows), len(rows)
    projector = ProjectedGradients(
        select_target_modules(model, da.drift_target_modules), da.drift_projection_dim, da.drift_projection_seed
    )
    fpass = FeaturePass(projector, tokenizer.pad_token_id, da.drift_feature_batch_size)

    # 1. rollouts, signs and the target G (rank 0, saved; broadcast to the other ranks)
    target_path = os.path.join(work, "target.npz")
    rollouts_path = os.path.join(work, "rollouts.json")
    rollouts, signs = Rollouts(), np.zeros(0)
    if is_main:
        if os.path.exists(target_path) and os.path.exists(rollouts_path):
            logger.info("resuming: rollouts and target read from %s", work)
            with open(rollouts_path) as f:
                rollouts = Rollouts(**json.load(f))
            saved = np.load(target_path)
            with open(os.path.join(work, "timings.json")) as f:
                timings.update({k: v for k, v in json.load(f).items() if k not in ("load", "tokenize")})
            target, signs, contrast = saved["target"], saved["signs"], bool(saved["contrast"])
        else:
            query_rows = sample_queries(queries, da.drift_num_queries, ra.seed + QUERY_SEED_STRIDE)
            n_calls = -(-len(query_rows) * da.drift_num_rollouts // da.drift_rollout_batch_size)
            t0 = time.perf_counter()
            with progress_bar(show, n_calls, "drift rollouts") as bar:
                try:
                    rollouts = generate_rollouts(
                        model,
                        tokenizer,
                        queries,
                        query_rows,
                        da,
                        reward_funcs,
                        seed=ra.seed + GENERATION_SEED_STRIDE,
                        progress=bar,
                    )
                except RuntimeError as exc:
                    if "Reward function" in str(exc):
                        raise RuntimeError(reward_error(ra, queries, exc)) from exc
                    raise
            timings["rollouts"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            signs, contrast = sign_rollouts(rollouts.rewards, rollouts.query_index, da)
            timings["signing"] = time.perf_counter() - t0
            target = np.zeros(projector.dim)
            t0 = time.perf_counter()
            live = np.flatnonzero(signs != 0)
            if contrast and len(live):
                r_rows = rollouts.training_rows()
                rfeat, _, _ = fpass.run(model, [r_rows[j] for j in live])
                from drift_trainer.core.influence import signed_target

                target = signed_target(rfeat, signs[live])
            timings["rollout_features"] = time.perf_counter() - t0
            atomic_write_text(os.path.join(work, "timings.json"), json.dumps(timings))
            atomic_write_text(rollouts_path, json.dumps(rollouts.__dict__, default=_json_default))
            save_npz(target_path, target=target, signs=signs, contrast=np.asarray(contrast))
        packed = np.concatenate([[float(contrast)], target])
    else:
        packed = np.zeros(projector.dim + 1)
    packed = dist.broadcast(packed)
    contrast, target = bool(packed[0]), packed[1:]
    if not contrast:
        rewards = np.asarray(rollouts.rewards) if is_main else np.zeros(0)
        acc = float(np.mean(rewards >= da.drift_reward_threshold)) if len(rewards) else float("nan")
        raise RuntimeError(
            f"No contrast: every judged rollout got the same verdict (rollout accuracy {acc:.3f} over "
            f"{len(rewards)} rollouts), so the scores would carry no signal. Use more queries or rollouts "
            "(--drift_num_queries, --drift_num_rollouts), a higher --drift_temperature, a reward threshold "
            "(--drift_reward_threshold) that splits the rollouts, or a checkpoint that solves some queries. "
            f"The rollouts are in {rollouts_path}."
        )

    # 2. train features, shard by shard (skipping shards already on disk)
    n_shards = -(-n_rows // ra.shard_size)
    mine = [s for s in range(n_shards) if s % dist.world_size == dist.rank]
    done = [s for s in mine if os.path.exists(shard_path(work, s))]
    todo = [s for s in mine if s not in done]
    if done and is_main:
        logger.warning("resuming: %d of %d feature shards already done in %s", len(done), n_shards, work)
    keep_phi = da.drift_preconditioner == "fisher"
    rows_done = sum(min(ra.shard_size, n_rows - s * ra.shard_size) for s in done)
    t0 = time.perf_counter()
    with progress_bar(show, sum(min(ra.shard_size, n_rows - s * ra.shard_size) for s in mine), "drift features") as bar:
        bar.update(rows_done)
        for s in todo:
            ids = np.arange(s * ra.shard_size, min((s + 1) * ra.shard_size, n_rows))
            phi, loss, ntok = fpass.run(model, [rows[i] for i in ids], progress=bar)
            phi64 = phi.astype(np.float64)
            arrays = {
                "rows": ids,
                "raw": phi64 @ target,
                "norm": np.linalg.norm(phi64, axis=1),
                "loss": loss,
                "ntok": ntok,
            }
            if keep_phi:
                arrays["phi"] = phi
            save_npz(shard_path(work, s), **arrays)
            if _after_shard is not None:
                _after_shard(s)
    timings["features"] = time.perf_counter() - t0
    _barrier(dist)
    if not is_main:
        return {}

    # 3. influence over all shards (rank 0)
    from drift_trainer.core.influence import debias_raw, precondition

    t0 = time.perf_counter()
    raw, norms, losses, tokens = np.zeros(n_rows), np.zeros(n_rows), np.full(n_rows, np.nan), np.zeros(n_rows)
    phis = []
    for s in range(n_shards):
        with np.load(shard_path(work, s)) as z:
            ids = z["rows"]
            raw[ids], norms[ids], losses[ids], tokens[ids] = z["raw"], z["norm"], z["loss"], z["ntok"]
            if keep_phi:
                phis.append((ids, z["phi"].astype(np.float64)))
    if keep_phi:
        f_sum = sum(p.T @ p for _, p in phis)
        direction = precondition(target, "fisher", f_sum / max(n_rows, 1), da.drift_damping)
        for ids, p in phis:
            raw[ids] = p @ direction
    scores_rows = debias_raw(raw, norms, da.drift_debias, da.drift_norm_exponent)
    scores, raw_u, norm_u = np.zeros(n_examples), np.zeros(n_examples), np.zeros(n_examples)
    loss_u, scored = np.full(n_examples, np.nan), np.zeros(n_examples, dtype=bool)
    scores[user_index], raw_u[user_index], norm_u[user_index], loss_u[user_index] = scores_rows, raw, norms, losses
    scored[user_index] = tokens > 0
    for a in (scores, raw_u, norm_u):
        a[~scored] = 0.0
    timings["influence"] = time.perf_counter() - t0
    result = RefreshResult(
        step=0,
        scores=scores,
        raw_scores=raw_u,
        grad_norm=norm_u,
        loss=loss_u,
        scored=scored,
        rollouts=rollouts,
        signs=signs,
        contrast=contrast,
        timings=timings,
        num_masked=int(n_examples - scored.sum()),
    )
    result._threshold = da.drift_reward_threshold
    t0 = time.perf_counter()
    _, weights = new_weights(result, None, None, da)
    keep = select_rows(ra, scores, weights, scored)
    timings["weighting"] = time.perf_counter() - t0

    # 4. outputs
    t0 = time.perf_counter()
    summary = write_outputs(ra, da, table, kind, result, weights, keep, fp, timings, n_shards, n_resumed)
    summary["world_size"] = dist.world_size
    timings["write"] = time.perf_counter() - t0
    summary["timings"] = {k: round(v, 4) for k, v in timings.items()}
    summary["metrics"]["drift/refresh_seconds"] = time.perf_counter() - started
    atomic_write_text(os.path.join(ra.output_dir, "summary.json"), json.dumps(summary, indent=2, default=_json_default))
    if ra.report:
        from drift_trainer.cli.report import write_report

        write_report(ra.output_dir, os.path.join(ra.output_dir, "report"))
    if not ra.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return summary


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


def write_outputs(ra, da, table, kind, result, weights, keep, fp, timings, n_shards, n_resumed) -> dict:
    import pandas as pd

    from drift_trainer.core.refresh import refresh_summary
    from drift_trainer.core.rewards import completion_text

    out = ra.output_dir
    n = len(table.rows)
    frame = pd.DataFrame(
        {
            "index": np.arange(n),
            "score": result.scores,
            "weight": np.asarray(weights, dtype=np.float64),
            "grad_norm": result.grad_norm,
            "raw_score": result.raw_scores,
            "loss": result.loss,
            "scored": result.scored,
        }
    )
    with atomic_path(os.path.join(out, "scores.parquet")) as tmp:
        frame.to_parquet(tmp, index=False)
    ro = result.rollouts
    lines = [
        json.dumps(
            {
                "query_index": ro.query_index[j],
                "query": ro.prompts[j],
                "completion": completion_text(ro.completions[j]),
                "reward": ro.rewards[j],
                "sign": float(result.signs[j]),
            },
            default=_json_default,
        )
        for j in range(len(ro))
    ]
    atomic_write_text(os.path.join(out, "rollouts.jsonl"), "".join(line + "\n" for line in lines))
    examples = [
        json.dumps({"index": i, "text": example_text(r, ra.dataset_text_field)}, ensure_ascii=False, default=str)
        for i, r in enumerate(table.rows)
    ]
    atomic_write_text(os.path.join(out, "examples.jsonl"), "".join(line + "\n" for line in examples))
    refined = write_table(
        table,
        os.path.join(out, refined_name(table.format)),
        keep=keep,
        weights={ra.weight_column: weights} if ra.mode == "weight" else None,
    )
    metrics = refresh_summary(result, weights, da)
    return {
        "kind": "refine",
        "step": 0,
        "refresh": 0,
        "metrics": metrics,
        "timings": {},
        "num_examples": n,
        "num_scored": int(result.scored.sum()),
        "num_masked": result.num_masked,
        "num_rollouts": len(ro),
        "contrast": result.contrast,
        "reason": None,
        "weights_changed": True,
        "refined": {
            "path": refined,
            "format": table.format,
            "mode": ra.mode,
            "rows_kept": int(keep.sum()),
            "keep_fraction": ra.keep_fraction,
            "min_weight": ra.min_weight,
        },
        "train_format": kind,
        "shards": {
            "total": n_shards,
            "resumed": n_resumed,
            "computed": n_shards - n_resumed,
            "shard_size": ra.shard_size,
        },
        "inputs": {"model": ra.model, "train_file": ra.train_file, "query_file": ra.query_file, "reward": ra.reward},
        "fingerprint": fp["hash"],
        "options": da.drift_options(),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ra, da = parse_args(list(sys.argv[1:] if argv is None else argv))
        summary = run(ra, da)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as exc:
        print(f"drift-trainer refine: error: {exc}", file=sys.stderr)
        return 1
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
