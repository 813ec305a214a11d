"""Read and write MATPO-data parquet configs (one folder per config, files `train-*.parquet`)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_matpo.data.schema import (
    DatasetError, Sample, assign_uids, check_repeats, group_samples, repeat_k_from_name, sample_from_row,
)


@dataclass
class Dataset:
    name: str           # config name: the folder name, or the file stem for a single file
    samples: list[Sample]
    repeat_k: int       # each question appears repeat_k times (report avg@repeat_k)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def groups(self) -> dict[str, list[Sample]]:
        return group_samples(self.samples)


def parquet_files(path: str | Path) -> list[Path]:
    """A single file, or every `*.parquet` directly inside a config folder (sorted: stable order)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DatasetError(f"{p}: no such file or directory")
    files = sorted(f for f in p.glob("*.parquet") if f.is_file())
    if not files:
        subdirs = sorted(d.name for d in p.iterdir() if d.is_dir())
        hint = f" (config folders here: {', '.join(subdirs[:8])})" if subdirs else ""
        raise DatasetError(f"{p}: no *.parquet files{hint}")
    return files


def iter_rows(path: str | Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, 0-based row number within the file, row dict) for every row, file by file."""
    for f in parquet_files(path):
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{f}: not a readable parquet file: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield f, i, row


def read_dataset(path: str | Path, repeat_k: int | None = None, limit: int | None = None) -> Dataset:
    """Validate every row into a `Sample`. `repeat_k` defaults to the `repeat_<k>` suffix of the
    config name; with k > 1 each question (group = data_source + extra_info.index) must occur k times.
    `limit` keeps the first rows only (then the repeat check is skipped)."""
    p = Path(path)
    name = p.name if p.is_dir() else (p.parent.name if repeat_k_from_name(p.parent.name) > 1 else p.stem)
    k = repeat_k if repeat_k is not None else repeat_k_from_name(name)
    if k < 1:
        raise ValueError(f"repeat_k must be >= 1, got {k}")
    samples: list[Sample] = []
    for f, i, row in iter_rows(p):
        if limit is not None and len(samples) >= limit:
            break
        samples.append(sample_from_row(row, where=f"{f} row {i}"))
    if not samples:
        raise DatasetError(f"{p}: no rows")
    samples = assign_uids(samples)
    if k > 1 and limit is None:
        check_repeats(samples, k, where=str(p))
    return Dataset(name=name, samples=samples, repeat_k=k)


def _normalise_index(rows: list[dict[str, Any]]) -> None:
    """Parquet needs one type per column: if an index column mixes ints and strings, use strings."""
    kinds = {type(r["extra_info"].get("index")) for r in rows} - {type(None)}
    if len(kinds) > 1:
        for r in rows:
            if r["extra_info"].get("index") is not None:
                r["extra_info"]["index"] = str(r["extra_info"]["index"])


def write_parquet(items: Iterable[Sample | Mapping[str, Any]], path: str | Path) -> Path:
    """Write samples (or raw rows, validated first) as one MATPO-data parquet file."""
    rows: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        s = item if isinstance(item, Sample) else sample_from_row(item, where=f"row {i} to write")
        row = s.to_row()
        row["extra_info"] = dict(row["extra_info"])
        rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: refusing to write an empty dataset")
    _normalise_index(rows)
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: rows do not share one column layout: {e}") from e
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pq.write_table(table, out)
    except pa.ArrowException as e:  # e.g. an empty struct such as `metadata: {}` in every row
        raise DatasetError(f"{out}: cannot store these rows as parquet: {e}") from e
    return out
