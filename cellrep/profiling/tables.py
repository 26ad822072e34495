"""Profile tables: split `Metadata_*` columns from features and refuse bad input early.

Every profiling entry point names its input `source` (a file path, or a word such as
"profiles" for an in-memory table) so that an error says which table, which column
and what was expected, as one `InputError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cellrep.errors import InputError

METADATA_PREFIX = "Metadata_"


def metadata_columns(df: pd.DataFrame) -> list[str]:
  """pycytominer's convention: metadata columns start with `Metadata_`."""
  return [c for c in df.columns if str(c).startswith(METADATA_PREFIX)]


def feature_columns(df: pd.DataFrame) -> list[str]:
  """Every column that is not metadata."""
  return [c for c in df.columns if not str(c).startswith(METADATA_PREFIX)]


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: str, role: str) -> None:
  """Raises InputError naming the first of `columns` that `df` lacks."""
  for col in columns:
    if col not in df.columns:
      known = metadata_columns(df) or list(df.columns)[:20]
      raise InputError(source, f"{role} column {col!r} does not exist",
                       f"one of {known}")


def feature_matrix(df: pd.DataFrame, features: Sequence[str], source: str,
                   min_rows: int = 2) -> np.ndarray:
  """[rows, features] float32 from numeric, finite feature columns; else InputError."""
  if len(df) < min_rows:
    raise InputError(source, f"{len(df)} rows", f"at least {min_rows} rows")
  if not len(features):
    raise InputError(source, "no feature columns",
                     f"numeric columns not starting with {METADATA_PREFIX!r}")
  sub = df[list(features)]
  bad = [c for c, t in zip(features, sub.dtypes) if not pd.api.types.is_numeric_dtype(t)]
  if bad:
    raise InputError(source, f"feature column {bad[0]!r} is {df[bad[0]].dtype}",
                     "numeric feature columns (metadata columns must start with 'Metadata_')")
  x = sub.to_numpy(dtype=np.float32)
  check_finite(x, features, source)
  return x


def check_finite(x: np.ndarray, features: Sequence[str], source: str) -> None:
  """Raises InputError naming the first feature column that holds NaN or Inf."""
  finite = np.isfinite(x)
  if not finite.all():
    col = int(np.argmin(finite.all(axis=0)))
    rows = int((~finite[:, col]).sum())
    raise InputError(source, f"feature column {features[col]!r} has {rows} NaN/Inf values",
                     "finite features (drop or impute them first, e.g. aggregate(nan='drop'))")


def as_features(feats, n_rows: int, source: str) -> np.ndarray:
  """Accepts a DataFrame or array of features; [n_rows, d] float32, finite."""
  if isinstance(feats, pd.DataFrame):
    names = [str(c) for c in feats.columns]
    x = feats.to_numpy(dtype=np.float32)
  else:
    x = np.asarray(feats, dtype=np.float32)
    names = [f"feature {i}" for i in range(x.shape[-1])] if x.ndim == 2 else []
  if x.ndim != 2:
    raise InputError(source, f"features have shape {x.shape}", "a [rows, features] matrix")
  if x.shape[0] != n_rows:
    raise InputError(source, f"{x.shape[0]} feature rows for {n_rows} metadata rows",
                     "one feature row per metadata row")
  if n_rows < 2:
    raise InputError(source, f"{n_rows} rows", "at least 2 rows")
  check_finite(x, names, source)
  return x
