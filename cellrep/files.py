"""Reading and writing the files cellrep keeps: JSON read with a clear error, outputs replaced
whole (written under a temporary name in the same folder, then renamed), never half-written.

In a run of several processes only process 0 writes (`cellrep.distributed.is_writer`): the
others skip these writes. A temporary left by an interrupted write (``.NAME.tmp``, or a
store's ``.NAME.tmp-XXXXXXXX`` folder) is removed by `remove_temporaries` when the next run
starts in that work directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

from cellrep import distributed
from cellrep.errors import InputError

_TEMPORARY = re.compile(r"^\..+\.tmp(-[0-9a-f]{8})?$")


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


def writable_dir_problem(path) -> str | None:
  """Why files cannot be written in folder `path` (made when missing), or None when they can:
  tried for real (a probe file), since permission bits say nothing to root or of /proc."""
  path = pathlib.Path(path)
  try:
    if path.exists() and not path.is_dir():
      return "is a file, not a folder"
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    return f"cannot be written ({e.strerror or e})"
  return None


def remove_temporaries(directory, skip=("checkpoints",)) -> list[pathlib.Path]:
  """Removes what interrupted writes left under `directory` (not under `skip`: orbax tidies
  its own); returns what it removed."""
  removed = []
  for root, dirs, names in os.walk(directory):
    dirs[:] = [d for d in dirs if d not in skip]
    for name in list(dirs) + names:
      if _TEMPORARY.match(name):
        path = pathlib.Path(root) / name
        if path.is_dir():
          shutil.rmtree(path, ignore_errors=True)
          dirs.remove(name)
        else:
          path.unlink(missing_ok=True)
        removed.append(path)
  return removed


def write_text(path, text: str) -> None:
  if not distributed.is_writer():
    return
  path = pathlib.Path(path)
  tmp = temporary(path)
  tmp.write_text(text)
  os.replace(tmp, path)


def write_table(df, path) -> None:
  """Writes a DataFrame as parquet or CSV (by `path`'s suffix), without the index."""
  if not distributed.is_writer():
    return
  path = pathlib.Path(path)
  tmp = temporary(path)
  if path.suffix == ".csv":
    df.to_csv(tmp, index=False)
  else:
    df.to_parquet(tmp, index=False)
  os.replace(tmp, path)
