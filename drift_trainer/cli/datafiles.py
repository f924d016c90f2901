"""Dataset files for ``drift-trainer refine`` and ``report``: read, tokenize as SFTTrainer does, write back.

Formats: JSONL (``.jsonl`` / ``.json`` with one object per line), Parquet (``.parquet``) and a directory written by
``datasets.Dataset.save_to_disk``. A refined copy is written in the input's format; JSONL rows are written back as
they were read (plus the weight column), so nothing but the filter or the weight changes.

Tokenization mirrors TRL 1.16 ``SFTTrainer._prepare_dataset`` (without packing):

- ``prompt`` + ``completion`` (text): EOS appended to the completion, prompt tokens masked (``completion_only_loss``);
- ``prompt`` + ``completion`` (messages): chat template, the completion starting where the templated prompt (with
  generation prompt) and prompt+completion diverge;
- ``messages``: chat template, every token labelled (or only assistant tokens with ``assistant_only_loss``);
- ``text``: EOS appended, every token labelled;
- then truncation to ``max_length`` (keep the start); rows left with no labelled token are not scored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from trl.data_utils import common_prefix_length

from drift_trainer.core.features import IGNORE_INDEX, example_labels
from drift_trainer.core.rollouts import is_conversational_prompt, tokenize_prompt
from drift_trainer.core.state import atomic_path

FORMATS = ("jsonl", "parquet", "disk")


@dataclass
class TableFile:
    """A dataset file as read: its rows (list of dicts) and what is needed to write a refined copy back."""

    path: str
    format: str  # one of FORMATS
    rows: list[dict]
    arrow: object = None  # pyarrow.Table for parquet / disk (keeps the schema on write)

    @property
    def columns(self) -> list[str]:
        if self.arrow is not None:
            return list(self.arrow.column_names)
        cols: dict[str, None] = {}
        for r in self.rows[:1000]:
            cols.update(dict.fromkeys(r))
        return list(cols)


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
            raise ValueError(
                f"{path} is a DatasetDict saved with save_to_disk (splits: {splits}); point at one split's directory, "
                f"e.g. {os.path.join(path, splits[0] if splits else 'train')}."
            )
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_info.json")):
            return "disk"
        raise ValueError(
            f"{path} is a directory but not a dataset saved with Dataset.save_to_disk (no state.json). Pass a .jsonl "
            "or .parquet file, or a save_to_disk directory."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"Dataset file not found: {path}. Check the path.")
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise ValueError(
        f"Cannot tell the format of {path}: name it .jsonl (one JSON object per line), .parquet, or pass a directory "
        "written by Dataset.save_to_disk."
    )


def read_table(path: str) -> TableFile:
    """Read a dataset file (see the module docstring for the formats); raises a clear error naming the file."""
    fmt = detect_format(path)
    if fmt == "jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}:{lineno} is not valid JSON ({exc.msg}). The file must hold one JSON object per line."
                    ) from exc
                if not isinstance(row, dict):
                    raise ValueError(  # noqa: TRY004 - a bad file, not a bad argument type
                        f"{path}:{lineno} is a JSON {type(row).__name__}, not an object (one row per line)."
                    )
                rows.append(row)
        return TableFile(path, fmt, rows)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise ValueError(f"Cannot read {path} as Parquet: {exc}") from exc
    else:
        from datasets import load_from_disk

        try:
            table = load_from_disk(path).flatten_indices().data.table
        except Exception as exc:
            raise ValueError(f"Cannot load {path} with datasets.load_from_disk: {exc}") from exc
    return TableFile(path, fmt, table.to_pylist(), arrow=table)


def write_table(table: TableFile, out_path: str, keep: np.ndarray | None = None, weights: dict | None = None) -> str:
    """Write a refined copy of ``table`` atomically: rows where ``keep`` is True, plus ``weights`` columns
    (``{name: array}``). Returns the written path (a file, or a directory for ``disk``)."""
    n = len(table.rows)
    keep = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    weights = weights or {}
    if table.format == "jsonl":
        with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for i in np.flatnonzero(keep):
                row = dict(table.rows[i])
                for name, values in weights.items():
                    row[name] = float(values[i])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return out_path
    import pyarrow as pa

    arrow = table.arrow
    for name, values in weights.items():
        column = pa.array(np.asarray(values, dtype=np.float64))
        if name in arrow.column_names:
            arrow = arrow.set_column(arrow.column_names.index(name), name, column)
        else:
            arrow = arrow.append_column(name, column)
    arrow = arrow.filter(pa.array(keep))
    if table.format == "parquet":
        import pyarrow.parquet as pq

        with atomic_path(out_path) as tmp:
            pq.write_table(arrow, tmp)
        return out_path
    from datasets import Dataset

    with atomic_path(out_path, directory=True) as tmp:
        Dataset(arrow).save_to_disk(tmp)
    return out_path


def refined_name(fmt: str) -> str:
    return {"jsonl": "refined.jsonl", "parquet": "refined.parquet", "disk": "refined"}[fmt]


# ---------------------------------------------------------------------------------------------- train rows


def train_kind(columns: list[str], path: str, text_field: str = "text") -> str:
    """``prompt_completion``, ``messages`` or ``text``; a clear error naming the file otherwise."""
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if text_field in columns:
        return "text"
    raise ValueError(
        f"Train file {path} has columns {columns}: it needs `prompt` and `completion` (text or chat messages), "
        f"`messages` (a chat), or `{text_field}` (plain text). Rename the columns, or pass --dataset_text_field."
    )


def _to_chatml(messages: list) -> list:
    """ShareGPT ``{"from", "value"}`` messages to ``{"role", "content"}`` (as TRL's ``maybe_convert_to_chatml``)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
    out = []
    for m in messages:
        if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:
            out.append({"role": roles.get(m["from"], m["from"]), "content": m["value"]})
        else:
            out.append(m)
    return out


def _template_ids(tokenizer, messages: list, **kwargs) -> dict:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return {k: list(v) for k, v in out.items()}


def tokenize_row(
    row: dict,
    kind: str,
    tokenizer,
    text_field: str = "text",
    completion_only_loss: bool = True,
    assistant_only_loss: bool = False,
) -> dict:
    """One train row tokenized as SFTTrainer does: ``{"input_ids", "labels"}`` (labels -100 where not trained)."""
    eos = tokenizer.eos_token or ""
    if kind == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if is_conversational_prompt(prompt):
            prompt, completion = _to_chatml(prompt), _to_chatml(completion)
            prompt_ids = tokenize_prompt(tokenizer, prompt)
            full = _template_ids(tokenizer, prompt + completion, return_assistant_tokens_mask=assistant_only_loss)
            ids = full["input_ids"]
        else:
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ValueError("`prompt` and `completion` must both be strings or both be lists of chat messages.")
            if eos and not completion.endswith(eos):
                completion = completion + eos
            prompt_ids = tokenize_prompt(tokenizer, prompt)
            full = {"input_ids": list(tokenizer(text=prompt + completion)["input_ids"])}
            ids = full["input_ids"]
        n_prompt = common_prefix_length(prompt_ids, ids)  # as SFTTrainer: the completion starts where they diverge
        masked = {"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)}
        if not completion_only_loss:
            masked.pop("completion_mask")
        if "assistant_masks" in full:
            masked["assistant_masks"] = full["assistant_masks"]
    elif kind == "messages":
        messages = _to_chatml(row.get("messages") if row.get("messages") is not None else row["conversations"])
        full = _template_ids(tokenizer, messages, return_assistant_tokens_mask=assistant_only_loss)
        masked = {k: full[k] for k in ("input_ids", "assistant_masks") if k in full}
    else:
        text = row[text_field]
        if not isinstance(text, str):
            raise ValueError(f"`{text_field}` must be a string; got {type(text).__name__}.")
        if eos and not text.endswith(eos):
            text = text + eos
        masked = {"input_ids": list(tokenizer(text=text)["input_ids"])}
    return {"input_ids": list(masked["input_ids"]), "labels": example_labels(masked)}


def tokenize_rows(
    table: TableFile,
    tokenizer,
    kind: str,
    max_length: int | None = 1024,
    text_field: str = "text",
    completion_only_loss: bool = True,
    assistant_only_loss: bool = False,
) -> tuple[list[dict], np.ndarray]:
    """Tokenized rows that carry a labelled token and their index in ``table.rows``."""
    rows, index = [], []
    for i, row in enumerate(table.rows):
        try:
            tok = tokenize_row(row, kind, tokenizer, text_field, completion_only_loss, assistant_only_loss)
        except Exception as exc:
            raise ValueError(f"Cannot tokenize row {i} of {table.path} ({kind} format): {exc}") from exc
        if max_length is not None:
            tok = {k: v[:max_length] for k, v in tok.items()}
        if any(t != IGNORE_INDEX for t in tok["labels"]):
            rows.append(tok)
            index.append(i)
    return rows, np.asarray(index, dtype=np.int64)


def example_text(row: dict, text_field: str = "text") -> str:
    """A readable one-string rendering of a train row (for reports)."""

    def render(value) -> str:
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return "\n".join(
                f"{m.get('role', m.get('from', '?'))}: {m.get('content', m.get('value', ''))}" for m in value
            )
        return str(value)

    if "prompt" in row and "completion" in row:
        return f"{render(row['prompt'])} \u2192 {render(row['completion'])}"
    for key in ("messages", "conversations", text_field):
        if key in row and row[key] is not None:
            return render(row[key])
    return json.dumps(row, ensure_ascii=False, default=str)[:2000]


def load_dataset_from(spec: str, split: str = "train", name: str | None = None, what: str = "dataset"):
    """A ``datasets.Dataset`` from a local file (``.jsonl``, ``.json`` as JSON lines or one JSON array,
    ``.parquet``), a ``save_to_disk`` directory (a ``DatasetDict`` one: its ``split``), or else a hub dataset id
    (``load_dataset(spec, name, split=split)``). ``what`` names the option in error messages."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "dataset_dict.json")):
            detect_format(spec)  # raises a clear error for a directory that is no saved dataset
            return load_from_disk(spec)
        loaded = load_from_disk(spec)
        if isinstance(loaded, DatasetDict) and split not in loaded:
            raise ValueError(f"{what}: {spec} has no split {split!r} (splits: {sorted(loaded)}). Pick one of them.")
        return loaded[split]
    if os.path.isfile(spec):
        if spec.lower().endswith(".json"):
            with open(spec, encoding="utf-8") as f:
                head = f.read(4096).lstrip()[:1]
            if head == "[":
                with open(spec, encoding="utf-8") as f:
                    rows = json.load(f)
                if not all(isinstance(r, dict) for r in rows):
                    raise ValueError(f"{what}: {spec} must hold a JSON array of objects (one per row).")
                return Dataset.from_list(rows)
        return Dataset.from_list(read_table(spec).rows)
    if spec.lower().endswith((".jsonl", ".json", ".ndjson", ".parquet")):
        raise FileNotFoundError(f"{what}: file not found: {spec}. Check the path.")
    try:
        return load_dataset(spec, name, split=split)
    except Exception as exc:
        raise ValueError(
            f"{what}: {spec!r} is neither a local file or directory nor a dataset the hub could serve "
            f"(load_dataset raised {type(exc).__name__}: {exc}). Pass a .jsonl / .json / .parquet file, a "
            "save_to_disk directory, or a hub dataset id (with network access)."
        ) from exc
