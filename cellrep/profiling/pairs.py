"""Pair rules in copairs' terms, turned into integer codes a jitted kernel can compare.

Two rows i != j form a pair of a rule when they share every `*_sameby` column and
differ in every `*_diffby` column (copairs' `find_pairs`). An entry that is not a
column but a pandas query string ("Metadata_control == False") filters the rows
first, as copairs' `evaluate_and_filter` does. One column may hold several labels
per row (multi-label MoA strings "a|b" or lists); copairs' multilabel rules apply:
in `pos_sameby` it makes one query per (row, label), in `neg_diffby` it means "no
label in common".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cellrep.errors import InputError


@dataclasses.dataclass(frozen=True)
class PairRules:
  """Pair rules over the kept rows.

  codes: [rows, columns] int32, one factorised code per single-valued rule column.
  pos_same, pos_diff, neg_same, neg_diff: indices into the columns of `codes`.
  labels: [rows, n_labels] bool multi-hot of the multilabel column, or None.
  label_names: the label of each column of `labels`.
  neg_no_shared_label: negatives must share no label (multilabel column in neg_diffby).
  keep: [rows] indices of the kept rows in the input table (query filters drop rows).
  """
  codes: np.ndarray
  pos_same: tuple[int, ...]
  pos_diff: tuple[int, ...]
  neg_same: tuple[int, ...]
  neg_diff: tuple[int, ...]
  labels: np.ndarray | None
  label_names: tuple
  neg_no_shared_label: bool
  keep: np.ndarray

  @property
  def multilabel(self) -> bool:
    return self.labels is not None


def _as_list(rule) -> list[str]:
  if rule is None:
    return []
  if isinstance(rule, str):
    return [rule]
  return list(rule)


def _query_columns(expr: str, columns) -> list[str]:
  # copairs' own test for "is this a query": names followed by a comparison operator.
  return [c for c in re.findall(r"(\w+)\s*[=<>!]+", expr) if c in columns]


def split_labels(values: pd.Series, sep: str) -> list[list]:
  """Multi-label cells ("a|b" strings, lists or arrays) as lists of labels."""
  out = []
  for v in values:
    if isinstance(v, str):
      out.append([s for s in v.split(sep) if s != ""])
    elif v is None or (np.isscalar(v) and pd.isna(v)):
      out.append([])
    else:
      out.append(list(v))
  return out


def build_rules(meta: pd.DataFrame, pos_sameby: Sequence[str], pos_diffby: Sequence[str],
                neg_sameby: Sequence[str], neg_diffby: Sequence[str],
                multilabel_col: str | None = None, multilabel_sep: str = "|",
                source: str = "metadata") -> PairRules:
  """Validates the rules against `meta` and factorises the columns they use."""
  rules = {"pos_sameby": _as_list(pos_sameby), "pos_diffby": _as_list(pos_diffby),
           "neg_sameby": _as_list(neg_sameby), "neg_diffby": _as_list(neg_diffby)}
  queries, cols = [], {k: [] for k in rules}
  for name, entries in rules.items():
    for entry in entries:
      if entry in meta.columns:
        cols[name].append(entry)
      elif _query_columns(entry, meta.columns):
        queries.append(entry)
      else:
        raise InputError(source, f"{name} column {entry!r} does not exist",
                         f"a metadata column (one of {list(meta.columns)}) or a query on one")
  for kind in ("pos", "neg"):
    same, diff = cols[f"{kind}_sameby"], cols[f"{kind}_diffby"]
    if set(same) & set(diff):
      shared = sorted(set(same) & set(diff))
      raise InputError(source, f"{kind}_sameby and {kind}_diffby share {shared}", "disjoint lists")
    if not same and not diff:
      raise InputError(source, f"{kind}_sameby and {kind}_diffby are both empty",
                       "at least one column that defines the pairs")

  keep = np.arange(len(meta))
  if queries:
    combined = " & ".join(f"({q})" for q in queries)
    try:
      keep = np.flatnonzero(meta.eval(combined).to_numpy(dtype=bool))
    except Exception as e:  # pandas raises many types for a bad expression
      raise InputError(source, f"query {combined!r} failed: {e}", "a valid pandas query") from None
    if not len(keep):
      raise InputError(source, f"no row matches the query {combined!r}", "at least 2 rows")
  kept = meta.iloc[keep]

  labels, label_names, neg_no_shared = None, (), False
  if multilabel_col is not None:
    if multilabel_col not in cols["pos_sameby"] or multilabel_col not in cols["neg_diffby"]:
      raise InputError(source, f"multilabel column {multilabel_col!r} is not in both "
                       "pos_sameby and neg_diffby", "copairs' multilabel rules")
    for name in ("pos_diffby", "neg_sameby"):
      if multilabel_col in cols[name]:
        raise InputError(source, f"multilabel column {multilabel_col!r} in {name}",
                         "it only in pos_sameby and neg_diffby")
    lists = split_labels(kept[multilabel_col], multilabel_sep)
    label_names = tuple(sorted({l for row in lists for l in row}, key=str))
    index = {l: i for i, l in enumerate(label_names)}
    labels = np.zeros((len(kept), len(label_names)), dtype=bool)
    for r, row in enumerate(lists):
      labels[r, [index[l] for l in row]] = True
    neg_no_shared = True
    cols = {k: [c for c in v if c != multilabel_col] for k, v in cols.items()}

  used = list(dict.fromkeys(c for v in cols.values() for c in v))
  for col in used:
    if kept[col].isna().any():
      raise InputError(source, f"column {col!r} has {int(kept[col].isna().sum())} missing values",
                       "a value in every row of a pair-rule column")
  codes = np.zeros((len(kept), max(len(used), 1)), dtype=np.int32)
  for i, col in enumerate(used):
    codes[:, i] = pd.factorize(kept[col])[0]
  pos = {c: i for i, c in enumerate(used)}
  idx = {k: tuple(pos[c] for c in v) for k, v in cols.items()}
  return PairRules(codes, idx["pos_sameby"], idx["pos_diffby"], idx["neg_sameby"],
                   idx["neg_diffby"], labels, label_names, neg_no_shared, keep)
