"""Reading a benchmark's rows from its Hugging Face hub dataset, or from local files with the same columns.

Local data convention: `data_dir` holds the files of one split, with the hub dataset's columns. Files are found
recursively, preferring `*.parquet`, then `*.jsonl`, then `*.json`. Parquet files written by `datasets` (or
downloaded from the hub) keep their image column as images; in JSON files the `image` column holds a path, relative
to `data_dir` unless absolute. A benchmark that reads several hub configs (GQA) finds each in a subdirectory of
`data_dir` named after the config.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import datasets
from PIL import Image
from vtprune.eval.benchmarks.metrics import accuracy_by_group
from vtprune.eval.samples import Benchmark, Sample

LOCAL_FORMATS = (("parquet", "parquet"), ("jsonl", "json"), ("json", "json"))
"""(file suffix, `datasets` builder) in order of preference."""


def read_rows(
    hub_id: str, config: str | None, split: str, data_dir: str | Path | None, limit: int | None
) -> list[dict[str, Any]]:
    """The first `limit` rows (all if None) of the split, with any `image` column as an RGB PIL image."""
    if data_dir is None:
        rows = datasets.load_dataset(hub_id, config, split=split)
        image_root = Path.cwd()
    else:
        rows = local_rows(Path(data_dir))
        image_root = Path(data_dir)
    selected = list(itertools.islice(rows, limit))
    for row in selected:
        if "image" in row:
            row["image"] = to_image(row["image"], image_root)
    return selected


def local_rows(directory: Path) -> datasets.IterableDataset:
    """The rows of the data files under `directory`, streamed (nothing is copied into the `datasets` cache)."""
    for suffix, builder in LOCAL_FORMATS:
        files = sorted(str(path) for path in directory.rglob(f"*.{suffix}"))
        if files:
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    raise FileNotFoundError(f"no .parquet, .jsonl or .json files under {directory}")


def to_image(value: Image.Image | dict[str, Any] | str, root: Path) -> Image.Image:
    """An RGB image from a decoded image, an undecoded `{"bytes", "path"}` record, or a path relative to `root`."""
    if isinstance(value, str):
        value = {"path": value}
    if isinstance(value, dict):
        # Holding the encoded bytes rather than an open file keeps large splits within the open-file limit.
        image = Image.open(io.BytesIO(value.get("bytes") or (root / value["path"]).read_bytes()))
    else:
        image = value
    # Checking the mode leaves an RGB image undecoded until it is used; other modes are converted now.
    return image if image.mode == "RGB" else image.convert("RGB")


class HubBenchmark(Benchmark):
    """A benchmark whose samples are the rows of one hub dataset config, mapped by `to_sample`; scored by default as
    the mean of `correct`, overall and per group."""

    hub_id: str
    config: str | None = None

    def load(self, split: str | None = None, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
        """The first `limit` rows of the split as samples; see the module docstring for `data_dir`."""
        rows = read_rows(self.hub_id, self.config, self.checked_split(split), data_dir, limit)
        return [self.to_sample(row, position) for position, row in enumerate(rows)]

    def checked_split(self, split: str | None) -> str:
        """`split`, or the default split when None; unknown splits raise ValueError."""
        if split is None:
            return self.splits[0]
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        return split

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        """The sample for one dataset row; `position` is the row's index in the split."""
        raise NotImplementedError

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        return accuracy_by_group(samples, self.correctness(samples, predictions))
