"""What the dataset adapters share: metadata files read with clear errors, columns found by name, ages
and sexes normalised, and the table of `TABLE_COLUMNS` put together."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.datasets import TABLE_COLUMNS, DatasetError
from cxr.data.findings import NUM_FINDINGS
from cxr.data.metadata import MAX_PLAUSIBLE_AGE

log = logging.getLogger(__name__)


def read_csv(path: Path, **options: Any) -> pd.DataFrame:
    """A metadata CSV (plain or compressed, by its suffix); DatasetError names the file when it is
    missing or does not parse."""
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    try:
        return pd.read_csv(path, **options)
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error


def header(path: Path) -> list[str]:
    """The column names of a metadata CSV, without reading its rows."""
    return list(read_csv(path, nrows=0).columns)


def find_columns(columns: Iterable[str], wanted: Iterable[str], path: Path) -> dict[str, str]:
    """Each wanted column's name as the file spells it, matched case-insensitively after stripping blanks;
    DatasetError names the file and the columns it lacks."""
    spelled = {str(name).strip().lower(): str(name) for name in columns}
    found = {name: spelled.get(name.lower()) for name in wanted}
    missing = [name for name, column in found.items() if column is None]
    if missing:
        raise DatasetError(f"{path} lacks the column(s) {', '.join(missing)}")
    return {name: column for name, column in found.items() if column is not None}


def has_columns(path: Path, columns: Iterable[str]) -> bool:
    """Whether `path` is a readable CSV (plain or gzipped) whose header names all `columns`."""
    try:
        find_columns(header(path), columns, path)
    except DatasetError:
        return False
    return True


def read_columns(path: Path, dtypes: Mapping[str, str]) -> pd.DataFrame:
    """The named columns of a CSV (plain or gzipped; any order, names matched as `find_columns` does) with
    the given dtypes; a `DatasetError` names the file and what it lacks."""
    spelled = find_columns(header(path), dtypes, path)
    frame = read_csv(path, usecols=list(spelled.values()), dtype={spelled[k]: v for k, v in dtypes.items()})
    return frame.rename(columns={column: name for name, column in spelled.items()})


def years(values: pd.Series, where: str) -> pd.Series:
    """Ages in whole years (Int64); negative or implausible ones (over MAX_PLAUSIBLE_AGE) become missing."""
    numbers = pd.to_numeric(values, errors="coerce")
    implausible = (numbers < 0) | (numbers > MAX_PLAUSIBLE_AGE)
    if implausible.any():
        log.warning("%s: %d implausible ages set to missing", where, int(implausible.sum()))
    return np.floor(numbers.where(~implausible)).astype("Int64")


def sexes(values: pd.Series) -> pd.Series:
    """Sex as "M" or "F" (from any case, blanks around); anything else is missing."""
    normal = values.astype("string").str.strip().str.upper()
    return normal.where(normal.isin(["M", "F"]))


def upper_or_missing(values: pd.Series) -> pd.Series:
    """Text stripped and upper-cased; blank becomes missing."""
    normal = values.astype("string").str.strip().str.upper()
    return normal.where(normal != "")


def image_table(count: int, **columns: Any) -> pd.DataFrame:
    """The table of `TABLE_COLUMNS` for `count` images from the columns given (a Series or array per row,
    or one value for all); columns not given are missing. Text columns hold str or None, `age` is Int64."""
    unknown = set(columns) - set(TABLE_COLUMNS)
    if unknown:
        raise ValueError(f"not table columns: {sorted(unknown)}")
    table = pd.DataFrame(index=pd.RangeIndex(count))
    for name in TABLE_COLUMNS:
        value = columns.get(name)
        if isinstance(value, pd.Series):
            value = value.to_numpy(dtype=object, na_value=None)
        column = pd.Series(value, index=table.index, dtype=object)  # one value is repeated; None: missing
        table[name] = column.astype("Int64") if name == "age" else column.where(column.notna(), None)
    return table


def unlabelled(rows: int) -> np.ndarray:
    """An N×14 float32 label array of NaN: nothing labelled yet."""
    return np.full((rows, NUM_FINDINGS), np.nan, dtype=np.float32)
