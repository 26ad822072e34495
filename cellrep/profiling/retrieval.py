"""Average precision per profile, drop-in compatible with copairs' `average_precision`.

Same pair rules, same AP (mean of precision at each positive's rank, not
interpolated), same tie rule (at equal float32 `1 - similarity` a positive ranks
ahead of a negative), same output columns; computed blockwise on device in memory
bounded by `memory_budget` instead of materialising every pair.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellrep.errors import InputError
from cellrep.profiling import pairs, ranking, tables


def harmonic_numbers(n: int) -> np.ndarray:
  """[n + 1] float64, H_0 = 0, H_k = sum 1/i, summed in copairs' order."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64))])


def expected_ap(n_pos: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
  """Expected AP of a random ranking (copairs' `expected_ap`, vectorised)."""
  m = np.asarray(n_pos, np.float64)
  total = m + np.asarray(n_neg, np.float64)
  h = harmonic_numbers(int(total.max()) if total.size else 0)[total.astype(np.int64)]
  with np.errstate(invalid="ignore", divide="ignore"):
    mu = (1.0 / total) * (((m - 1.0) / (total - 1.0)) * (total - h) + h)
  mu = np.where(m == total, 1.0, mu)
  mu = np.where(m == 0, 0.0, mu)
  return np.where(total == 1, np.where(m == 1, 1.0, 0.0), mu)


def normalize_ap(ap: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray,
                 eps: float = 1e-10) -> np.ndarray:
  """(AP - E[AP]) / (1 - E[AP]) clipped to [-1, 1] (copairs' `normalize_ap`)."""
  mu = expected_ap(n_pos, n_neg)
  return np.clip((ap - mu) / np.maximum(1.0 - mu, eps), -1.0, 1.0)


def average_precision(meta: pd.DataFrame, feats, pos_sameby, pos_diffby, neg_sameby,
                      neg_diffby, batch_size: int | None = None, distance: str = "cosine",
                      progress_bar: bool = False, *, multilabel_col: str | None = None,
                      multilabel_sep: str = "|", interpolated: bool = False,
                      recall_points: int | None = None, memory_budget: int = 512 << 20,
                      source: str = "profiles") -> pd.DataFrame:
  """AP of every profile against its positives and negatives.

  meta: [N] rows of metadata; feats: [N, D] features (array or DataFrame).
  pos_sameby / pos_diffby / neg_sameby / neg_diffby: copairs' pair rules; an entry
  may be a pandas query string, which filters rows first.
  batch_size: at most this many queries per block (the memory budget decides
  otherwise); progress_bar: accepted for copairs compatibility, ignored.
  distance: "cosine", "correlation" or "euclidean" (similarity 1 / (1 + d)).
  multilabel_col: copairs' multilabel mode: one output row per (profile, label),
  the column in pos_sameby and neg_diffby; string cells are split at multilabel_sep.
  interpolated: also return `interpolated_average_precision` (see
  `ranking.interpolated_ap_from_ranks`) at `recall_points` levels (default N).
  memory_budget: bytes one block may hold; peak memory grows with it, not with N^2.

  Returns meta (filtered rows, index reset) with `n_pos_pairs`, `n_total_pairs`,
  `average_precision` (NaN without positives) and `normalized_average_precision`;
  in multilabel mode only (profile, label) rows with positives, as copairs.
  """
  if distance not in ("cosine", "correlation", "euclidean"):
    raise InputError(source, f"distance {distance!r} is not supported",
                     "'cosine', 'correlation' or 'euclidean'")
  x = tables.as_features(feats, len(meta), source)
  rules = pairs.build_rules(meta, pos_sameby, pos_diffby, neg_sameby, neg_diffby,
                            multilabel_col, multilabel_sep, source)
  x = x[rules.keep]
  if len(x) < 2:
    raise InputError(source, f"{len(x)} rows left after the query filters", "at least 2 rows")
  _check_degenerate(x, distance, source)
  res = ranking.rank_queries(x, rules, distance, memory_budget, batch_size,
                             interpolated=interpolated, recall_points=recall_points)
  if not res.n_pos.any():
    raise InputError(source, "no positive pairs under the rules",
                     "at least one pair sharing pos_sameby and differing in pos_diffby")
  if not res.n_neg.any():
    raise InputError(source, "no negative pairs under the rules",
                     "at least one pair sharing neg_sameby and differing in neg_diffby")

  out_meta = meta.iloc[rules.keep].reset_index(drop=True)
  total = res.n_pos + res.n_neg
  with np.errstate(invalid="ignore", divide="ignore"):
    norm = normalize_ap(res.ap, res.n_pos, res.n_neg)
  norm = np.where(total > 0, norm, np.nan)
  cols = {"n_pos_pairs": res.n_pos, "n_total_pairs": total, "average_precision": res.ap,
          "normalized_average_precision": norm}
  if rules.multilabel:  # copairs' multilabel column order
    cols = {k: cols[k] for k in ("average_precision", "normalized_average_precision",
                                 "n_pos_pairs", "n_total_pairs")}
  if interpolated:
    cols["interpolated_average_precision"] = res.iap
  if not rules.multilabel:
    out = out_meta.copy()
    for k, v in cols.items():
      out[k] = v
    return out
  keep = res.n_pos > 0
  order = np.lexsort([res.label[keep], res.row[keep]])
  row, label = res.row[keep][order], res.label[keep][order]
  out = out_meta.drop(columns=[multilabel_col]).iloc[row].reset_index(drop=True)
  for k, v in cols.items():
    out[k] = v[keep][order]
  out[multilabel_col] = np.asarray(rules.label_names, dtype=object)[label]
  return out


def _check_degenerate(x: np.ndarray, distance: str, source: str) -> None:
  if distance == "cosine":
    bad = np.flatnonzero(~np.any(x != 0, axis=1))
    what = "is all zeros (cosine similarity undefined)"
  elif distance == "correlation":
    bad = np.flatnonzero(np.ptp(x, axis=1) == 0)
    what = "is constant (correlation undefined)"
  else:
    return
  if len(bad):
    raise InputError(source, f"feature row {int(bad[0])} {what}", "rows with some variation")
