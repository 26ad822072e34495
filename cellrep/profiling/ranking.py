"""Host driver of the ranking kernels: blocks under a memory budget, column compaction.

In a run of several processes (`cellrep.distributed`) the query blocks are dealt out
round robin, each process ranks its own against the whole table, and the APs are
gathered: every process ends with the one-process result.

Queries are ordered so that a block's queries share their candidates (replicates
of one treatment against the same controls); each block then ranks only the union
of its candidates, padded to a few bucketed widths so that compilations are reused.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from cellrep import distributed
from cellrep.profiling import kernels
from cellrep.profiling.pairs import PairRules

# Bytes per (query, candidate) entry a rank block holds at once: similarity, key,
# packed key, its sorted copy, masks and XLA temporaries (an upper estimate; see the
# peak memory in benchmarks/results/profiling.json).
_RANK_BYTES = 48
_MIN_BLOCK, _MAX_BLOCK = 8, 4096
# Smaller blocks rank fewer shared candidates (controls) per query; 512 keeps the
# per-block overhead negligible.
_DEFAULT_BLOCK = 512


@dataclasses.dataclass
class Ranked:
  """Per query unit (a row, or a (row, label) pair in multilabel mode).

  row: [U] index into the kept rows; label: [U] label index or -1;
  n_pos, n_neg: [U] int64 pair counts; ap: [U] float64 average precision (NaN
  without positives); iap: [U] float64 interpolated AP, or None.
  """
  row: np.ndarray
  label: np.ndarray
  n_pos: np.ndarray
  n_neg: np.ndarray
  ap: np.ndarray
  iap: np.ndarray | None


def _bucket(n: int, lo: int = 128) -> int:
  """Smallest of {1, 1.25, 1.5, 1.75} * 2^k >= n (at least `lo`): few compiled shapes."""
  b = lo
  while True:
    for f in (4, 5, 6, 7):
      if n <= b * f // 4:
        return b * f // 4
    b *= 2


def block_rows(n_cols: int, memory_budget: int, bytes_per_entry: int,
               max_rows: int | None = None) -> int:
  rows = memory_budget // max(1, bytes_per_entry * n_cols)
  rows = int(np.clip(rows, _MIN_BLOCK, max_rows or _MAX_BLOCK))
  return max(_MIN_BLOCK, rows - rows % _MIN_BLOCK)


def ap_from_ranks(ranks: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
  """Non-interpolated AP: mean over positives of precision at their rank (float64)."""
  k = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)
  valid = k[None, :] <= n_pos[:, None]
  prec = np.where(valid, k[None, :] / np.maximum(ranks, 1), 0.0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return prec.sum(axis=1) / n_pos


def interpolated_ap_from_ranks(ranks: np.ndarray, n_pos: np.ndarray,
                               recall_points: int) -> np.ndarray:
  """AP with precision interpolated as the max over higher recall, averaged at
  `recall_points` equally spaced recall levels 0..1 (the Cell Painting CNN paper).

  At recall r the interpolated precision is max over positives k >= ceil(r P) of
  k / rank_k, so recall level g counts for the positive k = max(1, ceil(g P / (R - 1))).
  """
  p = ranks.shape[1]
  k = np.arange(1, p + 1, dtype=np.int64)[None, :]
  npos = np.maximum(n_pos, 1)[:, None].astype(np.int64)
  valid = k <= npos
  prec = np.where(valid, k / np.maximum(ranks, 1), 0.0)
  suffix_max = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
  r1 = recall_points - 1
  weight = (k * r1) // npos - ((k - 1) * r1) // npos + (k == 1)
  out = (np.where(valid, suffix_max * weight, 0.0)).sum(axis=1) / recall_points
  return np.where(n_pos > 0, out, np.nan)


def _units(rules: PairRules) -> tuple[np.ndarray, np.ndarray]:
  n = len(rules.codes)
  if not rules.multilabel:
    return np.arange(n, dtype=np.int32), np.full(n, -1, np.int32)
  rows, labels = np.nonzero(rules.labels)
  return rows.astype(np.int32), labels.astype(np.int32)


def _group_sizes(codes: np.ndarray, cols: tuple[int, ...]) -> np.ndarray:
  """[N] size of each row's group on `cols` (N when `cols` is empty)."""
  if not cols:
    return np.full(len(codes), len(codes), np.int64)
  _, inverse, counts = np.unique(codes[:, list(cols)], axis=0, return_inverse=True,
                                 return_counts=True)
  return counts[inverse.ravel()].astype(np.int64)


def count_pairs(codes: np.ndarray, same: tuple[int, ...], diff: tuple[int, ...]) -> np.ndarray:
  """[N] number of j != i sharing `same` and differing in every `diff` column.

  Inclusion-exclusion over subsets T of `diff` of the group sizes on same + T:
  O(N 2^|diff|) on the host instead of an N^2 pass.
  """
  if set(same) & set(diff):
    return np.zeros(len(codes), np.int64)
  total = np.zeros(len(codes), np.int64)
  for r in range(len(diff) + 1):
    for t in itertools.combinations(diff, r):
      total += (-1) ** r * _group_sizes(codes, tuple(same) + t)
  return total - (0 if diff else 1)


def _counts(rules: PairRules, rows, labels, codes_d, labels_d, static, b):
  if not rules.multilabel:
    n_pos = count_pairs(rules.codes, rules.pos_same, rules.pos_diff)
    n_neg = count_pairs(rules.codes, rules.neg_same, rules.neg_diff)
    both = count_pairs(rules.codes, tuple(set(rules.pos_same + rules.neg_same)),
                       tuple(set(rules.pos_diff + rules.neg_diff)))
    return n_pos[rows], n_neg[rows], int(both.sum())
  u = len(rows)
  n_pos, n_neg, overlap = np.zeros(u, np.int64), np.zeros(u, np.int64), 0
  for s, q, lab, ok in _blocks(rows, labels, b):
    p, ng, both = kernels.count_block(codes_d, labels_d, q, lab, ok, rules=static)
    m = int(ok.sum())
    n_pos[s], n_neg[s] = np.asarray(p)[:m], np.asarray(ng)[:m]
    overlap += int(np.asarray(both).sum())
  return n_pos, n_neg, overlap


def _blocks(rows: np.ndarray, labels: np.ndarray, b: int):
  """(slice, rows [b], labels [b], valid [b]) per block, the last one padded."""
  for start in range(0, len(rows), b):
    s = slice(start, min(start + b, len(rows)))
    m = s.stop - s.start
    q = np.zeros(b, np.int32)
    lab = np.full(b, -1, np.int32)
    q[:m], lab[:m] = rows[s], labels[s]
    yield s, q, lab, np.arange(b) < m


def _cluster_order(rules: PairRules, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
  # Queries that share their positive/negative groups share their candidates.
  keys = [rules.codes[rows, i] for i in reversed(rules.neg_same + rules.pos_same)]
  return np.lexsort(keys + [labels]) if keys else np.argsort(labels, kind="stable")


def rank_queries(feats: np.ndarray, rules: PairRules, distance: str = "cosine",
                 memory_budget: int = 512 << 20, max_block_rows: int | None = None,
                 interpolated: bool = False, recall_points: int | None = None,
                 host_sort: bool | None = None) -> Ranked:
  """Average precision of every query unit under `rules` (see `Ranked`)."""
  if distance not in kernels.DISTANCES:
    raise ValueError(f"distance {distance!r} is not one of {kernels.DISTANCES}")
  if host_sort is None:
    host_sort = jax.default_backend() == "cpu"
  n = len(feats)
  rows, labels = _units(rules)
  u = len(rows)
  x, sqn = kernels.prepare(feats, distance)
  codes = jnp.asarray(rules.codes)
  lab = jnp.asarray(rules.labels if rules.multilabel else np.zeros((n, 1)), jnp.float32)
  static = (rules.pos_same, rules.pos_diff, rules.neg_same, rules.neg_diff, rules.multilabel,
            rules.neg_no_shared_label)
  b = block_rows(_bucket(n), memory_budget, _RANK_BYTES, max_block_rows or _DEFAULT_BLOCK)
  n_pos, n_neg, overlap = _counts(rules, rows, labels, codes, lab, static, b)
  dual = overlap > 0
  if dual:
    b = block_rows(2 * _bucket(n), memory_budget, _RANK_BYTES, max_block_rows or _DEFAULT_BLOCK)

  ap = np.full(u, np.nan)
  iap = np.full(u, np.nan) if interpolated else None
  r_points = recall_points or n
  todo = np.flatnonzero(n_pos > 0)
  todo = todo[_cluster_order(rules, rows[todo], labels[todo])]
  # In a run of several processes each ranks every P-th block; the APs are then combined.
  index, count = distributed.process_index(), distributed.process_count()
  mine = np.zeros(u, bool)
  for i, (s, q, ql, q_ok) in enumerate(_blocks(rows[todo], labels[todo], b)):
    if i % count != index:
      continue
    idx = todo[s]
    mine[idx] = True
    cols = np.flatnonzero(np.asarray(
        kernels.candidate_union(codes, lab, q, ql, q_ok, rules=static))).astype(np.int32)
    w = _bucket(len(cols))
    c = np.zeros(w, np.int32)
    c[:len(cols)] = cols
    c_ok = np.arange(w) < len(cols)
    p_max = _bucket(int(n_pos[idx].max()), lo=8)
    args = (x, sqn, codes, lab, q, ql, q_ok, c, c_ok)
    if host_sort:
      packed = np.asarray(kernels.packed_block(*args, rules=static, distance=distance,
                                               dual=dual))
      ranks = kernels.positive_ranks_host(packed, p_max)
    else:
      ranks = np.asarray(kernels.rank_block(*args, rules=static, distance=distance, dual=dual,
                                            p_max=p_max))
    ranks = ranks[:len(idx)]
    ap[idx] = ap_from_ranks(ranks, n_pos[idx])
    if interpolated:
      iap[idx] = interpolated_ap_from_ranks(ranks, n_pos[idx], r_points)
  if count > 1:
    ap = distributed.combine_disjoint(ap, mine)
    iap = distributed.combine_disjoint(iap, mine) if interpolated else None
  return Ranked(rows, labels, n_pos, n_neg, ap, iap)
