"""Reading and writing the files cellrep keeps: JSON read with a clear error, outputs replaced
whole (written under a temporary name in the same folder, then renamed), never half-written."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from cellrep.errors import InputError


def read_json(path, what: str) -> Any:
  """The JSON in `path`; InputError naming the file when it is missing (expected `what`) or
  not valid JSON."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(path, "missing", what)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise InputError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def temporary(path) -> pathlib.Path:
  """Where `path` is written before it is renamed into place: a hidden name beside it."""
  path = pathlib.Path(path)
  return path.with_name(f".{path.name}.tmp")


def write_text(path, text: str) -> None:
  path = pathlib.Path(path)
  tmp = temporary(path)
  tmp.write_text(text)
  os.replace(tmp, path)


def write_table(df, path) -> None:
  """Writes a DataFrame as parquet or CSV (by `path`'s suffix), without the index."""
  path = pathlib.Path(path)
  tmp = temporary(path)
  if path.suffix == ".csv":
    df.to_csv(tmp, index=False)
  else:
    df.to_parquet(tmp, index=False)
  os.replace(tmp, path)
