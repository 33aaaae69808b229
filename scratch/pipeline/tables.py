"""Your own labelled reviews: a table (CSV, TSV, JSON Lines or Parquet) read with pandas (and
pyarrow for Parquet) into the same ``{"train": Reviews, "test": Reviews}`` that
:func:`scratch.pipeline.data.load_imdb` gives, so every command that takes ``--data`` takes a
table too (``reference.pipeline.features``, both ``train`` commands, the demo).

Columns: ``--text-column`` (default ``text``), ``--label-column`` (default ``label``) and an
optional ``--split-column`` whose values are ``train`` or ``test``.  Labels are 0/1 (numbers,
booleans, or the strings "0"/"1"), or any two distinct values, mapped in sorted order (the
first to 0, the second to 1) and kept as the run's label names (saved in the checkpoint's
config.json, printed by predict).  The test reviews come from the split column, else from a
second table (``--test-data``, same columns, same labels), else from a seeded split of the
table: :func:`scratch.pipeline.data.train_valid_split` with ``--seed`` takes
:data:`TEST_FRACTION` of the rows as test (the command says so).  The train reviews are then
split 70/30 into train and validation by the train command, exactly as for IMDB.

Bad tables fail with one line (:class:`TableError`, an :class:`~scratch.pipeline.data.ImdbError`,
so every command ends with exit status 2): an unreadable file, a missing column, more than two
labels, a file with one class only, an empty or non-text cell (naming the row: rows count from 1,
the header not counted), a split value other than train/test.  Reviews found in both the train
and the test part are a warning, with their count (the accuracy measured on them is not a
held-out one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import ImdbError, Reviews, train_valid_split

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".zst")
TEST_FRACTION = 0.2
DEFAULT_NAMES = ("negative", "positive")
SPLIT_VALUES = ("train", "test")


class TableError(ImdbError):
    """A table that cannot be used: the message names the file, and the row where there is one."""


def table_format(path) -> str | None:
    """``csv`` | ``tsv`` | ``jsonl`` | ``parquet`` from the file name (a compression suffix such as
    ``.gz`` is looked through), or None when the name is not a table's."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def is_table(path) -> bool:
    return Path(path).is_file() and table_format(path) is not None


@dataclass
class Table:
    """The rows of one file: ``texts``, raw ``labels`` (normalised: 0/1 ints or strings) and
    ``splits`` (None without a split column); ``rows[i]`` is row i's number (from 1)."""
    path: Path
    texts: list[str]
    labels: list
    splits: list[str] | None = None
    rows: list[int] = field(default_factory=list)


def _read_frame(path: Path, columns: list[str]):
    import pandas as pd

    fmt = table_format(path)
    try:
        if fmt in ("csv", "tsv"):
            # every cell as text, empty cells as "" (not NaN): CSV has no types to lose
            frame = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str,
                                keep_default_na=False, na_values=[], encoding="utf-8")
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not valid UTF-8 (byte {e.start + 1}: {e.reason})") from e
    except ImportError as e:
        raise TableError(f"{path}: reading {fmt} needs {e.name or 'pyarrow'} "
                         f"(pip install pandas pyarrow)") from e
    except Exception as e:  # pandas/pyarrow raise many kinds (ParserError, ArrowInvalid, ...)
        raise TableError(f"{path}: not a readable {fmt} table ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from e
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(repr(str(c)) for c in list(frame.columns)[:8])
        raise TableError(f"{path}: no column {', '.join(repr(c) for c in missing)} (it has "
                         f"{have or 'none'}; choose with --text-column/--label-column/"
                         f"--split-column)")
    if not len(frame):
        raise TableError(f"{path}: no rows")
    return frame


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _label(v, path: Path, row: int, column: str):
    """A cell of the label column -> 0, 1 (numbers, booleans, "0", "1") or a string."""
    if hasattr(v, "item") and not isinstance(v, str):        # NumPy scalars
        v = v.item()
    if _missing(v) or (isinstance(v, str) and not v.strip()):
        raise TableError(f"{path}: row {row}: empty label in column {column!r}")
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return v if v in (0, 1) and isinstance(v, int) else str(v)
    if isinstance(v, str):
        v = v.strip()
        return int(v) if v in ("0", "1") else v
    raise TableError(f"{path}: row {row}: the label in column {column!r} is a "
                     f"{type(v).__name__}, not a number or text")


def read_table(path, text_column: str = "text", label_column: str = "label",
               split_column: str | None = None) -> Table:
    """The rows of one table file, every cell checked (see the module docstring)."""
    path = Path(path)
    if table_format(path) is None:
        raise TableError(f"{path}: not a table file name (expected one of "
                         f"{', '.join(sorted(FORMATS))})")
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    columns = [text_column, label_column] + ([split_column] if split_column else [])
    frame = _read_frame(path, columns)
    texts, labels, splits, rows = [], [], [] if split_column else None, []
    for i, (text, label) in enumerate(zip(frame[text_column].tolist(),
                                          frame[label_column].tolist(), strict=True)):
        row = i + 1
        if _missing(text) or (isinstance(text, str) and not text.strip()):
            raise TableError(f"{path}: row {row}: empty text in column {text_column!r}")
        if not isinstance(text, str):
            raise TableError(f"{path}: row {row}: the text in column {text_column!r} is a "
                             f"{type(text).__name__} ({text!r:.40}), not text")
        texts.append(text)
        labels.append(_label(label, path, row, label_column))
        rows.append(row)
    if split_column:
        for row, v in enumerate(frame[split_column].tolist(), 1):
            s = v.strip().lower() if isinstance(v, str) else v
            if s not in SPLIT_VALUES:
                raise TableError(f"{path}: row {row}: split {v!r} in column {split_column!r} "
                                 f"is neither 'train' nor 'test'")
            splits.append(s)
    return Table(path, texts, labels, splits, rows)


def label_names(values, where: str) -> tuple[tuple[str, str] | None, dict]:
    """(names, {value: 0 or 1}) of a label column's values: 0/1 -> (None, identity); two
    other distinct values -> their sorted order.  One value or more than two: TableError."""
    distinct = set(values)
    if distinct <= {0, 1} and len(distinct) == 2:
        return None, {0: 0, 1: 1}
    if len(distinct) == 1:
        raise TableError(f"{where}: every row has the label {next(iter(distinct))!r}: one "
                         f"class only, a classifier needs two")
    if len(distinct) > 2:
        shown = sorted(map(str, distinct))
        more = f", ... ({len(shown)} in all)" if len(shown) > 5 else ""
        raise TableError(f"{where}: more than two labels ({', '.join(map(repr, shown[:5]))}"
                         f"{more}); the head is a binary classifier")
    names = tuple(sorted(str(v) for v in distinct))
    return names, {v: names.index(str(v)) for v in distinct}


def _reviews(table: Table, idx, mapping: dict, names) -> Reviews:
    idx = list(idx)
    return Reviews([table.texts[i] for i in idx],
                   np.array([mapping[table.labels[i]] for i in idx], dtype=np.int64),
                   [f"{table.path.name}:row {table.rows[i]}" for i in idx],
                   label_names=names)


def _check_both_classes(reviews: Reviews, what: str, names) -> None:
    present = set(reviews.labels.tolist())
    if len(present) < 2:
        name = (names or DEFAULT_NAMES)[present.pop()] if present else "?"
        raise TableError(f"{what}: every review is {name!r}: one class only, a classifier needs "
                         "two")


def load_table(path, text_column: str = "text", label_column: str = "label",
               split_column: str | None = None, test_data=None, seed: int = 3407,
               test_fraction: float = TEST_FRACTION) -> tuple[dict, list[str], list[str]]:
    """``({"train": Reviews, "test": Reviews}, notes, warnings)``: the table's reviews split
    into train and test (module docstring), what was decided (the label order, where the test
    reviews come from) and the warnings (duplicates across train and test)."""
    if split_column and test_data:
        raise TableError("give either --split-column or --test-data, not both: both say which "
                         "reviews are the test set")
    table = read_table(path, text_column, label_column, split_column)
    test_table = (read_table(test_data, text_column, label_column) if test_data else None)
    values = table.labels + (test_table.labels if test_table else [])
    names, mapping = label_names(values, str(path) + (f" and {test_data}" if test_data else ""))
    notes = [f"table {Path(path).name}: {len(table.texts)} reviews"
             + (f" (+ {len(test_table.texts)} in {Path(test_data).name})" if test_table else "")
             + (f"; labels {names[0]!r} -> 0, {names[1]!r} -> 1 (sorted)" if names
                else "; labels 0/1")]
    n = len(table.texts)
    if split_column:
        tr = [i for i, s in enumerate(table.splits) if s == "train"]
        te = [i for i, s in enumerate(table.splits) if s == "test"]
        for part, rows in (("train", tr), ("test", te)):
            if not rows:
                raise TableError(f"{path}: no row has {split_column!r} = {part!r}")
        data = {"train": _reviews(table, tr, mapping, names),
                "test": _reviews(table, te, mapping, names)}
        notes.append(f"split column {split_column!r}: {len(tr)} train, {len(te)} test")
    elif test_table is not None:
        data = {"train": _reviews(table, range(n), mapping, names),
                "test": _reviews(test_table, range(len(test_table.texts)), mapping, names)}
        notes.append(f"test reviews: {len(test_table.texts)} from {test_data}")
    else:
        n_test = round(n * test_fraction)
        if n_test < 1 or n - n_test < 2:
            raise TableError(f"{path}: {n} rows are too few to split off a test set (give "
                             f"--test-data or a split column)")
        tr, te = train_valid_split(n, n_test, seed)
        data = {"train": _reviews(table, tr, mapping, names),
                "test": _reviews(table, te, mapping, names)}
        notes.append(f"no split column and no --test-data: a seeded {test_fraction:.0%} test "
                     f"split (seed {seed}): {n - n_test} train, {n_test} test reviews")
    if len(data["train"]) < 2:
        raise TableError(f"{path}: {len(data['train'])} train review(s): need at least 2 "
                         "(split 70/30 into train and validation)")
    _check_both_classes(data["train"], f"{path}: the train reviews", names)
    seen = set(data["train"].texts)
    dup = sum(t in seen for t in data["test"].texts)
    warnings = ([f"{dup} of the {len(data['test'])} test reviews {'is' if dup == 1 else 'are'} "
                 "also among the train reviews (identical text): the test accuracy is not a "
                 "held-out one"]
                if dup else [])
    return data, notes, warnings
