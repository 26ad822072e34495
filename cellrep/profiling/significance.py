"""mAP per group with copairs' permutation p-values and Benjamini-Hochberg correction.

The null of one query is the AP of a random ranking of its n_pos positives among
its n_total pairs; a group's null is the mean of its members' nulls (sample by
sample, as copairs does) and p = (#{null > mAP} + 1) / (null_size + 1).

Two samplers of the same null:
- "copairs": copairs' own stream (numpy PCG64 seeded per configuration, a full
  permutation of n_total per sample), so p-values equal copairs' for the same
  seed and null size. Cost O(null_size * n_total) per configuration.
- "fast": the same distribution from a different stream: a uniformly random
  k-subset of ranks drawn with replacement, duplicates redrawn until distinct
  (label-symmetric, hence uniform over subsets), or its complement when k > n/2.
  Cost O(null_size * k log k); p-values differ from copairs' only by Monte-Carlo
  noise (tested as a distribution match, not bit equality).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellrep.errors import InputError

NULL_METHODS = ("fast", "copairs")
_CHUNK = 1 << 22  # sampled ranks held at once


def copairs_null(num_pos: int, total: int, null_size: int, seed) -> np.ndarray:
  """[null_size] float32, bit-equal to copairs' `random_ap(null_size, num_pos, total, seed)`."""
  rng = np.random.default_rng(seed)
  dtype = np.uint16 if total < 2**16 else np.uint32
  indices = np.tile(np.arange(total, dtype=dtype), (null_size, 1))
  rng.permuted(indices, axis=1, out=indices)
  rel_k = np.sort(indices[:, :num_pos], axis=1)
  pr_k = np.arange(1, num_pos + 1, dtype=np.float32) / (rel_k + 1)
  return (pr_k.sum(axis=1) / num_pos).astype(np.float32)


def _subset_ranks(rng: np.random.Generator, rows: int, k: int, total: int) -> np.ndarray:
  """[rows, k] sorted 0-based ranks of a uniformly random k-subset of range(total)."""
  if 2 * k > total:
    out = np.ones((rows, total), bool)
    comp = _subset_ranks(rng, rows, total - k, total)
    np.put_along_axis(out, comp, False, axis=1)
    return np.nonzero(out)[1].reshape(rows, k)
  ranks = rng.integers(0, total, size=(rows, k))
  while True:
    ranks.sort(axis=1)
    dup = ranks[:, 1:] == ranks[:, :-1]
    n_dup = int(dup.sum())
    if not n_dup:
      return ranks
    ranks[:, 1:][dup] = rng.integers(0, total, size=n_dup)


def fast_null(num_pos: int, total: int, null_size: int, seed) -> np.ndarray:
  """[null_size] float32 APs of random rankings: copairs' null, another stream."""
  rng = np.random.default_rng(seed)
  chunk = max(1, _CHUNK // max(num_pos, total - num_pos if 2 * num_pos > total else 1))
  out = np.empty(null_size, np.float32)
  k = np.arange(1, num_pos + 1, dtype=np.float64)
  for start in range(0, null_size, chunk):
    rows = min(chunk, null_size - start)
    ranks = _subset_ranks(rng, rows, num_pos, total)
    out[start:start + rows] = (k / (ranks + 1)).mean(axis=1)
  return out


def null_distributions(confs: np.ndarray, null_size: int, seed: int,
                       method: str = "fast") -> np.ndarray:
  """[n_confs, null_size] float32 nulls for the (n_pos, n_total) rows of `confs`.

  Seeds per configuration come from `seed` as in copairs' `get_null_dists`.
  """
  seeds = np.random.default_rng(seed).integers(8096, size=len(confs))
  sampler = copairs_null if method == "copairs" else fast_null
  out = np.empty((len(confs), null_size), np.float32)
  for i, (k, total) in enumerate(confs):
    out[i] = sampler(int(k), int(total), null_size, seeds[i])
  return out


def benjamini_hochberg(p_values) -> np.ndarray:
  """BH-adjusted p-values (statsmodels' `multipletests(method="fdr_bh")`)."""
  p = np.asarray(p_values, np.float64)
  n = len(p)
  if not n:
    return p
  order = np.argsort(p, kind="mergesort")
  scaled = p[order] * n / np.arange(1, n + 1)
  adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
  out = np.empty(n)
  out[order] = np.minimum(adjusted, 1.0)
  return out


def map_p_values(ap_scores: pd.DataFrame, sameby, null_size: int, seed: int,
                 null_method: str = "fast", source: str = "ap_scores") -> pd.DataFrame:
  """Groups by `sameby`: mean_average_precision, indices, mean normalised AP, p_value."""
  if null_method not in NULL_METHODS:
    raise InputError(source, f"null_method {null_method!r} is not known", f"one of {NULL_METHODS}")
  sameby = [sameby] if isinstance(sameby, str) else list(sameby)
  for col in sameby + ["average_precision", "n_pos_pairs", "n_total_pairs"]:
    if col not in ap_scores.columns:
      raise InputError(source, f"column {col!r} does not exist",
                       f"one of {list(ap_scores.columns)}")
  if null_size < 1:
    raise InputError(source, f"null_size {null_size}", "a positive number of null samples")
  ap = ap_scores[ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)]
  ap = ap.reset_index(drop=True)
  if not len(ap):
    raise InputError(source, "no profile has an AP (no positives)", "at least one positive pair")
  confs, rev = np.unique(ap[["n_pos_pairs", "n_total_pairs"]].to_numpy(np.int64), axis=0,
                         return_inverse=True)
  rev = rev.ravel()
  nulls = null_distributions(confs, null_size, seed, null_method)
  agg = {"average_precision": ["mean", lambda x: list(x.index)]}
  has_norm = "normalized_average_precision" in ap.columns
  if has_norm:
    agg["normalized_average_precision"] = "mean"
  out = ap.groupby(sameby, observed=True, as_index=False).agg(agg)
  out.columns = sameby + ["mean_average_precision", "indices"] + (
      ["mean_normalized_average_precision"] if has_norm else [])
  scores = out["mean_average_precision"].to_numpy()
  if null_method == "copairs":
    # copairs' float32 mean over members, bit for bit.
    counts = [(nulls[rev[idx]].mean(axis=0) > m).sum() for m, idx in zip(scores, out["indices"])]
  else:
    counts = _group_exceedances(out["indices"], rev, nulls, scores, len(confs))
  out["p_value"] = (np.asarray(counts, np.float64) + 1) / (null_size + 1)
  return out


def _group_exceedances(indices, rev, nulls, scores, n_confs, block: int = 1024) -> np.ndarray:
  # Group null = (members per configuration / group size) @ nulls, a block of groups
  # at a time, instead of a Python loop over groups.
  counts = np.empty(len(scores), np.int64)
  idx = list(indices)
  for start in range(0, len(idx), block):
    part = idx[start:start + block]
    weights = np.zeros((len(part), n_confs), np.float32)
    for g, members in enumerate(part):
      np.add.at(weights[g], rev[members], 1.0 / len(members))
    null = weights @ nulls
    counts[start:start + len(part)] = (null > scores[start:start + len(part), None]).sum(axis=1)
  return counts


def mean_average_precision(ap_scores: pd.DataFrame, sameby, null_size: int, threshold: float,
                           seed: int, progress_bar: bool = False, max_workers=None,
                           cache_dir=None, *, null_method: str = "fast",
                           source: str = "ap_scores") -> pd.DataFrame:
  """copairs' `mean_average_precision`: mAP, p_value, corrected_p_value (BH), below_p,
  below_corrected_p per `sameby` group. progress_bar, max_workers and cache_dir are
  accepted for compatibility; nothing is cached on disk.
  """
  out = map_p_values(ap_scores, sameby, null_size, seed, null_method, source)
  out["corrected_p_value"] = benjamini_hochberg(out["p_value"].to_numpy())
  out["below_p"] = out["p_value"] < threshold
  out["below_corrected_p"] = out["corrected_p_value"] < threshold
  return out
