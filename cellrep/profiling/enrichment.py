"""Folds of enrichment (the Cell Painting CNN paper's retrieval score).

For each query profile, the other profiles are split by its own `percentile`
similarity (numpy's linear percentile over the N - 1 similarities, self excluded)
into "above" and "below", and by "shares an MoA label" or not; the 2x2 table gives
an odds ratio and a one-sided Fisher p-value (scipy's `fisher_exact(alternative=
"greater")`). Folds of enrichment is the mean odds ratio over queries with at least
one same-MoA partner, an infinite odds ratio counted as the table's below/non-match
cell, as in the paper's code.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

from cellrep.errors import InputError
from cellrep.profiling import kernels, pairs, ranking, tables


@functools.partial(jax.jit, static_argnames=("distance", "k", "lo_frac"))
def _enrichment_block(x, sqn, labels, q, q_ok, *, distance, k, lo_frac):
  """Per query [B]: threshold, above-and-match, above, match counts."""
  n = x.shape[0]
  sim = kernels.similarity(x[q], sqn[q], x, sqn, distance)
  not_self = q[:, None] != jnp.arange(n)[None, :]
  top = jax.lax.top_k(jnp.where(not_self, sim, -jnp.inf), k)[0]
  a, b = top[:, -1], top[:, -2] if k > 1 else top[:, -1]  # ascending positions lo, lo + 1
  # numpy's _lerp, so that a threshold on a sample value stays on it.
  diff = b - a
  thr = jnp.where(lo_frac >= 0.5, b - diff * (1.0 - lo_frac), a + diff * lo_frac)
  match = (jnp.dot(labels[q], labels.T) > 0.5) & not_self
  above = (sim > thr[:, None]) & not_self & q_ok[:, None]
  count = lambda m: jnp.sum(m, axis=1, dtype=jnp.int32)
  return thr, count(above & match), count(above), count(match & q_ok[:, None])


def enrichment(meta: pd.DataFrame, feats, moa_col: str, percentile: float = 99.0,
               distance: str = "cosine", sep: str = "|", memory_budget: int = 256 << 20,
               source: str = "profiles") -> pd.DataFrame:
  """Per query with a same-MoA partner: meta columns, `threshold`, the 2x2 table
  `v11` (above, match) `v12` (above, other) `v21` (below, match) `v22` (below,
  other), `odds_ratio` (scipy's), `folds` (inf -> v22) and `p_value`.

  moa_col: MoA labels; "a|b" strings (split at `sep`) or lists share a label if any.
  """
  tables.require_columns(meta, [moa_col], source, "MoA")
  x = tables.as_features(feats, len(meta), source)
  if distance not in kernels.DISTANCES:
    raise InputError(source, f"distance {distance!r}", f"one of {kernels.DISTANCES}")
  if not 0 < percentile < 100:
    raise InputError(source, f"percentile {percentile}", "a number between 0 and 100")
  lists = pairs.split_labels(meta[moa_col], sep)
  names = sorted({l for row in lists for l in row}, key=str)
  index = {l: i for i, l in enumerate(names)}
  hot = np.zeros((len(meta), max(len(names), 1)), np.float32)
  for r, row in enumerate(lists):
    hot[r, [index[l] for l in row]] = 1.0
  n, m = len(x), len(x) - 1
  pos = percentile / 100.0 * (m - 1)
  lo = math.floor(pos)
  k = m - lo
  xd, sqn = kernels.prepare(x, distance)
  lab = jnp.asarray(hot)
  b = ranking.block_rows(n, memory_budget, 24)
  thr, v11, above, match = (np.zeros(n, np.float32), *(np.zeros(n, np.int64) for _ in range(3)))
  for s, q, _, ok in ranking._blocks(np.arange(n, dtype=np.int32), np.full(n, -1, np.int32), b):
    r = _enrichment_block(xd, sqn, lab, q, ok, distance=distance, k=k, lo_frac=pos - lo)
    size = s.stop - s.start
    thr[s], v11[s], above[s], match[s] = (np.asarray(a)[:size] for a in r)
  v12, v21 = above - v11, match - v11
  v22 = m - above - v21
  with np.errstate(divide="ignore", invalid="ignore"):
    odds = np.where((v21 > 0) & (v12 > 0), v11 * v22 / (v12 * v21), np.inf)
  empty = (above == 0) | (above == m) | (match == 0) | (match == m)
  odds = np.where(empty, np.nan, odds)
  p = np.where(empty, 1.0, stats.hypergeom.sf(v11 - 1, m, above, match))
  out = meta.reset_index(drop=True).assign(
      threshold=thr, v11=v11, v12=v12, v21=v21, v22=v22, odds_ratio=odds,
      folds=np.where(np.isinf(odds), v22, odds), p_value=p)
  return out[match > 0].reset_index(drop=True)


def folds_of_enrichment(meta: pd.DataFrame, feats, moa_col: str, percentile: float = 99.0,
                        **kwargs) -> float:
  """Mean folds of enrichment over queries with a same-MoA partner."""
  per_query = enrichment(meta, feats, moa_col, percentile, **kwargs)
  if not len(per_query):
    raise InputError(kwargs.get("source", "profiles"), f"no profile shares a {moa_col} label",
                     "at least two profiles with a common MoA")
  return float(per_query["folds"].mean())
