"""Local data files as TRL users name them in flags (``drift_query_dataset``): every format, and errors that name the
option."""

import pandas as pd
import pytest
from datasets import DatasetDict

from drift_trainer.cli.datafiles import load_dataset_from
from drift_trainer.cli.toy import addition_dataset, query_dataset_from


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk", "disk-dict"])
def test_query_dataset_from_every_local_format(tmp_path, fmt):
    queries = query_dataset_from(addition_dataset(6, seed=1))
    path = str(tmp_path / f"q.{fmt}")
    if fmt == "jsonl":
        queries.to_json(path)
    elif fmt == "json":  # one JSON array
        pd.DataFrame(queries.to_list()).to_json(path, orient="records")
    elif fmt == "parquet":
        queries.to_parquet(path)
    elif fmt == "disk":
        queries.save_to_disk(path)
    else:
        DatasetDict({"validation": queries, "train": queries.select(range(2))}).save_to_disk(path)
    loaded = load_dataset_from(path, split="validation", what="drift_query_dataset")
    assert loaded.to_list() == queries.to_list()


def test_query_dataset_errors_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="drift_query_dataset: file not found"):
        load_dataset_from(str(tmp_path / "missing.jsonl"), what="drift_query_dataset")
    DatasetDict({"train": query_dataset_from(addition_dataset(2, seed=1))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train'\]\)"):
        load_dataset_from(str(tmp_path / "dd"), split="test", what="drift_query_dataset")
    with pytest.raises(ValueError, match="drift_query_dataset: 'no-such-org/no-such-set' is neither"):
        load_dataset_from("no-such-org/no-such-set", what="drift_query_dataset")  # offline: no hub
