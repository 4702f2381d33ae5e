"""Small numeric CSVs for the regression jobs: one checked reader, and the split rule for
tutorial-sized data."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from tasks.kernel import UserError


def read_xy_csv(path: Path, columns: int = 2, header: str = "x,y") -> np.ndarray:
    """Read a numeric CSV with a header row into a float64 array [rows, columns], or raise
    UserError naming the problem and the fix. ``header`` is the expected header line, named in
    the messages."""
    path = Path(path)
    rows = csv_rows(path, header)
    names = rows[0][1]
    if len(names) != columns:
        raise UserError(f"data file {path} has {len(names)} columns ({', '.join(names)}); "
                        f"expected {columns} (header '{header}')")
    if all(_is_number(c) for c in names):
        raise UserError(f"data file {path} has no header (first line {','.join(names)}); add the line '{header}' at the top")
    if len(rows) == 1:
        raise UserError(f"data file {path} has a header but no rows; add numeric rows")
    values = np.empty((len(rows) - 1, columns), dtype=np.float64)
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) != columns:
            raise UserError(f"data file {path} is not a valid CSV (line {line} has {len(row)} value{'s' * (len(row) != 1)}); "
                            f"every row needs exactly {columns} comma-separated values")
        values[i] = [number(path, line, col, cell) for col, cell in zip(names, row)]
    return values


def csv_rows(path: Path, header: str) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a text CSV as ``(line number, cells)``, the header first."""
    if not path.exists():
        raise UserError(f"data file {path} does not exist; pass --data PATH to a CSV with header '{header}'")
    if path.is_dir():
        raise UserError(f"data path {path} is a folder; pass --data PATH to a CSV file")
    try:
        text: str | None = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the header
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.strip():
        raise UserError(f"data file {path} is empty; it needs a header '{header}' and numeric rows")
    if text is None or "\x00" in text:
        raise UserError(f"data file {path} is not a text CSV; expected header '{header}' and numeric rows")
    # The standard csv module, not pandas: the same cells (read as text, converted by float()),
    # without pandas' import at every run's start.
    reader = csv.reader(text.splitlines())
    return [(reader.line_num, row) for row in reader if row]  # blank lines skipped


def number(path: Path, line: int, column: str, cell: str) -> float:
    """One finite number from a cell, or a UserError naming the line and column."""
    try:
        v = float(cell)
    except ValueError:
        raise UserError(f"data file {path} line {line}, column {column!r}: {cell!r} is not a number; fix or remove that row") from None
    if not math.isfinite(v):
        raise UserError(f"data file {path} line {line}, column {column!r}: {cell!r} is not finite; fix or remove that row")
    return v


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def train_on_all_rows(n: int) -> tuple[int, int, int]:
    """Split rule for tutorial-sized data (a handful of rows): train on every row, as the
    tutorials do; validation and test are empty because holding out 1-2 of 6-7 points would
    change the fitted line far more than it would tell us. Jobs using it evaluate the fit on the
    training rows and against the closed-form least-squares solution in their ``report``."""
    return n, 0, 0
