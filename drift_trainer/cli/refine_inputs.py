"""Inputs of ``drift-trainer refine``: the model directory, the query file, the rewards, and the resumable work
directory (a fingerprint of everything a resumed run must share, and the feature shards)."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import typing
from dataclasses import asdict, dataclass, field

import numpy as np

from drift_trainer.cli.datafiles import read_table
from drift_trainer.core.state import atomic_path, atomic_write_text
from drift_trainer.hf.config import DriftArguments

WORK_DIR = "work"


# the drift_* options that mean something only during training: `refine --help` does not list them
TRAINING_ONLY = (
    "drift_enabled",
    "drift_query_dataset",
    "drift_query_split",
    "drift_reward_funcs",
    "drift_refresh_steps",
    "drift_first_refresh_step",
    "drift_max_train_examples",
    "drift_capture_features",
    "drift_rescore_budget",
    "drift_capture_window",
    "drift_capture_check_rows",
    "drift_capture_min_agreement",
    "drift_score_ema",
    "drift_target_ema",
    "drift_reliability_shrink",
    "drift_reweight_mode",
    "drift_save_artifacts",
)


def _refine_drift_arguments():
    """The ``drift_*`` options of ``refine``: those of ``DriftArguments`` that take effect on one scoring pass."""
    hints = typing.get_type_hints(DriftArguments)
    kept = []
    for f in dataclasses.fields(DriftArguments):
        if f.name in TRAINING_ONLY:
            continue
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {}
        if f.default_factory is not dataclasses.MISSING:
            default = {"default_factory": f.default_factory}
        kept.append((f.name, hints[f.name], field(metadata=f.metadata, **default)))
    return dataclasses.make_dataclass("RefineDriftArguments", kept)


RefineDriftArguments = _refine_drift_arguments()


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
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Shard the model over the processes with torch's FSDP2 (fully_shard: one group per decoder block, "
            "then the root), for a model one device cannot hold; every process takes part in every forward. Needs "
            "several processes (torchrun / accelerate launch). Default: a full copy of the model per process."
        },
    )
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

    parser = HfArgumentParser((RefineArguments, RefineDriftArguments), prog="drift-trainer refine")
    refine_args, drift_flags = parser.parse_args_into_dataclasses(args=argv)
    refine_args.validate()
    drift_args = DriftArguments(**dataclasses.asdict(drift_flags))
    drift_args.validate_drift()
    if drift_args.drift_preconditioner == "adam":
        raise ValueError(
            "--drift_preconditioner adam reads a training run's Adam second moments, which refine (one scoring pass "
            "over a saved model) does not have. Use --drift_preconditioner identity, fisher or kronecker."
        )
    return refine_args, drift_args


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
