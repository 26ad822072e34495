"""Aggregation of profiles: cell -> site (median) -> well (mean) -> treatment (mean).

Groups are integer ids from the strata columns (pycytominer's `aggregate`: rows
grouped by `strata`, sorted by them, features reduced by median or mean). Means are
jitted segment sums; medians use numpy's O(n) selection on groups bucketed by size
(XLA:CPU's comparator sort is several times slower than a selection). NaN features
are never silently skipped: a column with NaN is dropped and reported
(`nan="drop"`), or refused (`nan="raise"`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from cellrep.errors import BadValue, InputError
from cellrep.profiling import sphering, tables

OPERATIONS = ("median", "mean")
log = logging.getLogger(__name__)


def group_ids(df: pd.DataFrame, strata: Sequence[str]) -> tuple[np.ndarray, pd.DataFrame]:
  """([rows] int32 group id, [groups] strata values), groups sorted by strata."""
  grouped = df.groupby(list(strata), sort=True, dropna=False, observed=True)
  ids = grouped.ngroup().to_numpy(np.int32)
  keys = grouped.size().reset_index()[list(strata)]
  return ids, keys


def segment_mean(x: np.ndarray, ids: np.ndarray, n_groups: int) -> np.ndarray:
  """[groups, d] float32 mean of the rows of `x` [n, d] in each group."""
  return np.asarray(_segment_mean(jnp.asarray(x, jnp.float32), jnp.asarray(ids), n_groups))


@jax.jit(static_argnames=("n_groups",))
def _segment_mean(x, ids, n_groups):
  sums = jax.ops.segment_sum(x, ids, num_segments=n_groups)
  counts = jax.ops.segment_sum(jnp.ones(x.shape[0], x.dtype), ids, num_segments=n_groups)
  return sums / counts[:, None]


def segment_median(x: np.ndarray, ids: np.ndarray, n_groups: int) -> np.ndarray:
  """[groups, d] median per group (mean of the two middle values for even sizes,
  as pandas), groups of equal size selected together."""
  order = np.argsort(ids, kind="stable")
  sizes = np.bincount(ids, minlength=n_groups)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  xs = np.asarray(x)[order]
  out = np.empty((n_groups, x.shape[1]), np.float64)
  for m in np.unique(sizes[sizes > 0]):
    groups = np.flatnonzero(sizes == m)
    rows = starts[groups][:, None] + np.arange(m)[None, :]
    block = xs[rows]  # [groups, m, d]
    lo, hi = (m - 1) // 2, m // 2
    part = np.partition(block, sorted({lo, hi}), axis=1)
    out[groups] = (part[:, lo].astype(np.float64) + part[:, hi]) / 2
  return out.astype(np.float32)


def aggregate(df: pd.DataFrame, strata: Sequence[str], operation: str = "median",
              nan: str = "drop", source: str = "profiles") -> pd.DataFrame:
  """One row per group of `strata`: strata columns, the Metadata_ columns that are
  constant within every group, then the reduced features (float32).

  Dropped feature columns (NaN, with nan="drop") are listed in
  `result.attrs["dropped_features"]` and logged.
  """
  if operation not in OPERATIONS:
    raise InputError(source, f"aggregation {operation!r} is not known", f"one of {OPERATIONS}")
  if nan not in ("drop", "raise"):
    raise InputError(source, f"nan policy {nan!r}", "'drop' or 'raise'")
  strata = [strata] if isinstance(strata, str) else list(strata)
  tables.require_columns(df, strata, source, "strata")
  features = tables.feature_columns(df)
  if len(df) < 1:
    raise InputError(source, "no rows", "at least one row to aggregate")
  bad = [c for c, t in zip(features, df[features].dtypes) if not pd.api.types.is_numeric_dtype(t)]
  if bad:
    raise InputError(source, f"feature column {bad[0]!r} is {df[bad[0]].dtype}",
                     "numeric features (metadata columns must start with 'Metadata_')")
  x = df[features].to_numpy(np.float32)
  finite = np.isfinite(x).all(axis=0)
  dropped = [f for f, ok in zip(features, finite) if not ok]
  if dropped and nan == "raise":
    tables.check_finite(x, features, source)
  if dropped:
    log.warning("%s: dropped %d feature columns with NaN/Inf: %s", source, len(dropped),
                dropped[:10])
    x = x[:, finite]
    features = [f for f, ok in zip(features, finite) if ok]
  if not features:
    raise InputError(source, "every feature column has NaN/Inf", "some finite feature columns")
  ids, keys = group_ids(df, strata)
  reduce = segment_median if operation == "median" else segment_mean
  values = reduce(x, ids, len(keys))
  extra = [c for c in tables.metadata_columns(df) if c not in strata]
  if extra:
    constant = df.groupby(ids)[extra].nunique(dropna=False).le(1).all()
    extra = [c for c in extra if constant[c]]
    first = df[extra].groupby(ids).first().reset_index(drop=True)
    keys = pd.concat([keys.reset_index(drop=True), first], axis=1)
  out = pd.concat([keys.reset_index(drop=True), pd.DataFrame(values, columns=features)], axis=1)
  out.attrs["dropped_features"] = dropped
  return out


def aggregate_levels(cells: pd.DataFrame, site: Sequence[str], well: Sequence[str],
                     treatment: Sequence[str], nan: str = "drop",
                     source: str = "cells") -> dict[str, pd.DataFrame]:
  """The paper's hierarchy: sites = median of cells, wells = mean of sites,
  treatments = mean of wells. Each level's strata must include the next one's."""
  sites = aggregate(cells, site, "median", nan, source)
  wells = aggregate(sites, well, "mean", nan, f"{source} (sites)")
  treatments = aggregate(wells, treatment, "mean", nan, f"{source} (wells)")
  return {"site": sites, "well": wells, "treatment": treatments}


def batch_experiment_profiles(table: pd.DataFrame, features: Sequence[str], *, plate: str,
                              treatment: str, controls, method: str = "ZCA-cor",
                              reg: float | str = "knee", source: str = "profiles"
                              ) -> pd.DataFrame:
  """Microsnoop's batch experiments: one row per treatment (sorted): `treatment`, the Metadata_ columns constant within it,
  and the mean over its rows, on every plate, of the sphered `features` (float32).

  table: one row per FOV or well, `plate` and `treatment` Metadata_ columns. controls: a
  pandas query on the Metadata_ columns or a boolean row mask; each plate is sphered on
  its own controls (`sphering.sphere(..., by=plate)`: ZCA-cor, λ = knee / 10; the
  controls' unit-variance convention is sphering's, ddof 1).
  """
  for role, col in (("plate", plate), ("treatment", treatment)):
    if not str(col).startswith(tables.METADATA_PREFIX):
      raise BadValue(role, f"column {col!r}", f"a {tables.METADATA_PREFIX} column")
  features = list(features)
  metadata = [c for c in features if str(c).startswith(tables.METADATA_PREFIX)]
  if metadata:
    raise BadValue("features", f"metadata column {metadata[0]!r}", "feature columns")
  tables.require_columns(table, [plate, treatment] + features, source, "batch experiment")
  profiles = table[tables.metadata_columns(table) + features].reset_index(drop=True)
  if not isinstance(controls, str):
    controls = np.asarray(controls, bool)
  sphered = sphering.sphere(profiles, controls, method=method, reg=reg, by=plate, source=source)
  return aggregate(sphered, [treatment], "mean", nan="raise", source=source)
