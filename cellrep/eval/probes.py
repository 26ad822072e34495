"""Probes of an embedding: cross-validated kNN and linear classifiers, and NSC / NSCB.

`knn_probe` and `linear_probe` score how well frozen embeddings [cells, D] separate
known classes (Microsnoop's kNN and linear evaluation). Both use the same folds:
sklearn's `StratifiedKFold(folds, shuffle=True, random_state=seed)`. When the
smallest class has fewer members than `folds`, the folds are reduced to its count
(logged); a class with a single member cannot be split and raises `BadValue`.

Each returns a `ProbeResult`: one row per fold of accuracy, MCC, balanced accuracy
and macro F1 (every class counts, as each test fold holds every class), and
`summary()`: their mean and SD over folds (population SD, ddof=0, as numpy's
`scores.std()` of sklearn's cross-validation examples and `learning_curve.summarise`).

`nsc_nscb` scores treatment profiles the way Ando et al. (2017) and Microsnoop do:
the MoA of each profile's nearest (cosine) profile of another compound (NSC), or of
another compound in another batch (NSCB).

Similarities are matrix products of unit rows, taken in blocks of queries so that a
block holds about `_BLOCK_BYTES` (never N^2): 1e5 cells fit on a laptop.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellrep.errors import BadValue
from cellrep.eval.classification import balanced_recall

log = logging.getLogger(__name__)

METRICS = ("accuracy", "mcc", "balanced_accuracy", "macro_f1")
_BLOCK_BYTES = 256 << 20  # similarities, their negation and argpartition's int64 indices


@dataclasses.dataclass
class ProbeResult:
  """per_fold: one row per fold: `fold`, `cells` (test cells) and the `METRICS`;
  predictions: [N] each cell's prediction while it was in the test fold, in the
  labels' own values; folds: the number of folds used (fewer than asked, if a class
  was smaller)."""
  per_fold: pd.DataFrame
  predictions: np.ndarray
  folds: int

  def summary(self) -> dict[str, float]:
    """{metric: mean over folds, metric_sd: SD over folds (ddof=0)} and `folds`."""
    out = {}
    for m in METRICS:
      out[m] = float(self.per_fold[m].mean())
      out[f"{m}_sd"] = float(self.per_fold[m].std(ddof=0))
    out["folds"] = self.folds
    return out


def _embeddings(x, field: str = "embeddings") -> np.ndarray:
  """[N, D] finite float (float64 kept, anything else float32)."""
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] == 0:
    raise BadValue(field, f"shape {x.shape}", "a [rows, features] matrix with rows")
  x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
  if not np.isfinite(x).all():
    raise BadValue(field, f"{int((~np.isfinite(x)).sum())} NaN/Inf values", "finite numbers")
  return x


def _unit_rows(x: np.ndarray, field: str = "embeddings") -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  zero = np.flatnonzero(norms[:, 0] == 0)
  if len(zero):
    raise BadValue(field, f"row {int(zero[0])} is all zeros",
                   "rows with a nonzero norm (cosine similarity needs a direction)")
  return x / norms


def _codes(values, n: int, field: str) -> tuple[np.ndarray, np.ndarray]:
  """(integer codes [n], sorted unique values) of a label column of length n."""
  values = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
  if values.ndim != 1 or len(values) != n:
    raise BadValue(field, f"{values.shape[0] if values.ndim else 0} values for {n} rows",
                   "one value per row")
  codes, uniques = pd.factorize(values, sort=True)
  if (codes < 0).any():
    raise BadValue(field, f"{int((codes < 0).sum())} missing values", "a value for every row")
  return codes, np.asarray(uniques)


def _plain(value):
  """A label as a Python value, so that messages read 'odd', not np.str_('odd')."""
  return value.item() if isinstance(value, np.generic) else value


def _blocks(n_queries: int, n_columns: int, itemsize: int):
  rows = max(1, _BLOCK_BYTES // (max(n_columns, 1) * (2 * itemsize + 8)))
  for start in range(0, n_queries, rows):
    yield slice(start, min(start + rows, n_queries))


def _knn_ids(train: np.ndarray, train_ids: np.ndarray, queries: np.ndarray, k: int,
             n_classes: int) -> np.ndarray:
  """Majority vote of the k most similar unit rows of `train`; [Q] class ids.

  Neighbours are ordered by similarity, equal similarities by training row (of rows
  tied at the k-th similarity, argpartition's deterministic pick is kept). A tie of
  votes goes to the tied class whose best neighbour ranks first, i.e. the vote of
  the nearest neighbours decides (sklearn would take the smallest class id instead).
  """
  out = np.empty(len(queries), np.int64)
  for s in _blocks(len(queries), len(train), train.itemsize):
    sim = queries[s] @ train.T                                  # [B, T]
    b = sim.shape[0]
    idx = (np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < len(train)
           else np.broadcast_to(np.arange(len(train)), (b, len(train))))
    top = np.take_along_axis(sim, idx, axis=1)
    idx = np.take_along_axis(idx, np.lexsort((idx, -top), axis=1), axis=1)
    nn = train_ids[idx]                                         # [B, k] nearest first
    rows = np.arange(b)[:, None]
    votes = np.bincount((rows * n_classes + nn).ravel(), minlength=b * n_classes)
    first = np.full((b, n_classes), k, np.int64)
    for j in range(k - 1, -1, -1):
      first[rows[:, 0], nn[:, j]] = j
    out[s] = np.argmax(votes.reshape(b, n_classes) * (k + 1) - first, axis=1)
  return out


def knn_predict(train, train_labels, queries, k: int = 11) -> np.ndarray:
  """Cosine kNN predictions [Q] (in the labels' values) of `queries` [Q, D] from
  `train` [T, D] and `train_labels` [T]; uniform votes, ties as in `_knn_ids`."""
  train, queries = _embeddings(train, "train"), _embeddings(queries, "queries")
  ids, classes = _codes(train_labels, len(train), "train_labels")
  _check_k(k, len(train))
  if queries.shape[1] != train.shape[1]:
    raise BadValue("queries", f"{queries.shape[1]} features", f"{train.shape[1]} as in train")
  return classes[_knn_ids(_unit_rows(train, "train"), ids, _unit_rows(queries, "queries"), k,
                          len(classes))]


def _check_k(k: int, n_train: int) -> None:
  if not 1 <= k <= n_train:
    raise BadValue("k", f"{k} neighbours from {n_train} training cells",
                   f"1 <= k <= {n_train} (the cells of a training fold)")


def _folds(ids: np.ndarray, classes: np.ndarray, folds: int, seed: int) -> list:
  if folds < 2:
    raise BadValue("folds", f"{folds}", "at least 2 folds")
  if len(classes) < 2:
    raise BadValue("labels", f"a single class {_plain(classes[0])!r}",
                   "at least 2 classes to tell apart")
  counts = np.bincount(ids, minlength=len(classes))
  smallest = int(counts.min())
  if smallest < 2:
    raise BadValue("labels", f"class {_plain(classes[np.argmin(counts)])!r} has 1 member",
                   "at least 2 members per class for cross-validation")
  if smallest < folds:
    log.warning("smallest class has %d members: %d folds instead of %d", smallest, smallest, folds)
    folds = smallest
  split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
  return list(split.split(np.zeros(len(ids)), ids))


def _cross_validate(x: np.ndarray, labels, folds: int, seed: int, predict) -> ProbeResult:
  """x: checked embeddings; predict(train_rows, train_ids, test_rows, n_classes) -> the
  test rows' class ids, called once per fold."""
  ids, classes = _codes(labels, len(x), "labels")
  splits = _folds(ids, classes, folds, seed)
  pred = np.empty(len(x), np.int64)
  rows = []
  for fold, (train, test) in enumerate(splits):
    pred[test] = predict(train, ids[train], test, len(classes))
    y, p = ids[test], pred[test]
    rows.append({"fold": fold, "cells": len(test), "accuracy": accuracy_score(y, p),
                 "mcc": matthews_corrcoef(y, p), "balanced_accuracy": balanced_recall(y, p),
                 "macro_f1": f1_score(y, p, labels=np.arange(len(classes)), average="macro",
                                      zero_division=0)})
  return ProbeResult(pd.DataFrame(rows), classes[pred], len(splits))


def knn_probe(embeddings, labels, k: int = 11, folds: int = 5, seed: int = 0) -> ProbeResult:
  """Cosine kNN (uniform majority vote of the k most similar training cells; a vote
  tie goes to the tied class with the nearest neighbour) under stratified k-fold CV.

  embeddings: [N, D] floats (no all-zero row); labels: [N] class labels of any kind.
  """
  x = _embeddings(embeddings)
  unit = _unit_rows(x)

  def predict(train, train_ids, test, n_classes):
    _check_k(k, len(train))
    return _knn_ids(unit[train], train_ids, unit[test], k, n_classes)

  return _cross_validate(x, labels, folds, seed, predict)


def linear_probe(embeddings, labels, folds: int = 5, seed: int = 0, C: float = 1.0,
                 max_iter: int = 1000) -> ProbeResult:
  """Multinomial logistic regression (sklearn, lbfgs, L2 with inverse strength C) on
  features standardised with each training fold's mean and SD, under stratified
  k-fold CV (the folds of `knn_probe` for the same labels and seed)."""
  if not C > 0:
    raise BadValue("C", f"{C}", "a positive inverse regularisation strength")
  x = _embeddings(embeddings)

  def predict(train, train_ids, test, n_classes):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    return model.fit(x[train], train_ids).predict(x[test])

  return _cross_validate(x, labels, folds, seed, predict)


def nsc_nscb(profiles: np.ndarray, moa, compound, batch=None) -> dict:
  """Not-same-compound (and -or-batch) 1-NN MoA accuracy of treatment profiles.

  profiles: [N, D] one row per compound (or compound-concentration, or x batch);
  moa, compound, batch: [N] labels. For each profile, its most cosine-similar profile
  of another compound (NSC) — so other concentrations of the same compound never
  count — or of another compound in another batch (NSCB); equal similarities go to
  the first row. Accuracy: fraction of profiles whose neighbour has the same MoA.

  Returns {"nsc": accuracy (NaN if none scored), "nsc_scored": profiles with an
  eligible neighbour, "nsc_excluded": profiles without one, "nsc_neighbour": [N]
  row of each neighbour (-1 if excluded)}, and the same `nscb*` keys when `batch` is
  given.
  """
  x = _unit_rows(_embeddings(profiles, "profiles"), "profiles")
  moa_ids, _ = _codes(moa, len(x), "moa")
  comp_ids, _ = _codes(compound, len(x), "compound")
  rules = {"nsc": None}
  if batch is not None:
    rules["nscb"] = _codes(batch, len(x), "batch")[0]
  neighbour = {name: np.full(len(x), -1, np.int64) for name in rules}
  for s in _blocks(len(x), len(x), x.itemsize):
    sim = x[s] @ x.T                                            # [B, N]
    other = comp_ids[s, None] != comp_ids[None, :]
    for name, batch_ids in rules.items():
      ok = other if batch_ids is None else other & (batch_ids[s, None] != batch_ids[None, :])
      masked = np.where(ok, sim, -np.inf)
      best = np.argmax(masked, axis=1)
      neighbour[name][s] = np.where(ok.any(axis=1), best, -1)
  out = {}
  for name, nn in neighbour.items():
    scored = nn >= 0
    hits = moa_ids[scored] == moa_ids[nn[scored]]
    out[name] = float(hits.mean()) if scored.any() else float("nan")
    out[f"{name}_scored"] = int(scored.sum())
    out[f"{name}_excluded"] = int((~scored).sum())
    out[f"{name}_neighbour"] = nn
  return out
