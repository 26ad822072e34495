"""The expression-matrix baseline of CellSighter's paper: XGBoost on per-cell mean marker intensities.

Features: per cell, the mean of each marker over the cell's mask (its summed
signal divided by its size in pixels, i.e. normalised by cell size), arcsinh
transformed with a configurable cofactor: arcsinh(mean / cofactor). From a store
(`store_features`, through `cellrep.data.expression.expression_matrix`) or from
crops held in memory (`crop_features`, for crops that a simulation changed):
both give the same numbers for a cell that lies inside its crop window.

Classifier: `xgboost.XGBClassifier` with the paper's n_estimators=100 and
max_depth=2, optionally with CellSighter's balancing weights (total / count of
the cell's class, or of its hierarchy category) as sample weights. It runs on one
thread: on a small shared CPU, BLAS and OpenMP thread pools oversubscribe badly.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from cellrep.data.crops import CELL_CHANNEL, NUM_MASK_CHANNELS
from cellrep.data.expression import expression_matrix
from cellrep.data.sampling import sample_weights
from cellrep.data.store import Store
from cellrep.errors import BadValue
from cellrep.infer.predict import predictions_table

BALANCE = ("none", "class", "hierarchy")


def arcsinh(means: np.ndarray, cofactor: float) -> np.ndarray:
  if cofactor <= 0:
    raise BadValue("cofactor", f"{cofactor}", "a positive cofactor")
  return np.arcsinh(np.asarray(means, np.float64) / cofactor)


def features_from_means(means: np.ndarray, cofactor: float = 5.0) -> np.ndarray:
  """[cells, K] float64 features from mean intensities; cells with no pixels (NaN) get 0."""
  return np.nan_to_num(arcsinh(means, cofactor))


def store_features(store: Store, cells: pd.DataFrame | None = None, *,
                   cofactor: float = 5.0) -> np.ndarray:
  """[cells, K] float64: arcsinh(mean marker intensity in the cell's mask / cofactor)."""
  return features_from_means(expression_matrix(store, cells).to_numpy(), cofactor)


def crop_features(crops: np.ndarray, *, cofactor: float = 5.0) -> np.ndarray:
  """The same features from crop windows [N, K + 2, S, S] (markers, all-cells mask, cell mask).

  The mask is the crop's centre-cell channel, so a cell cut by its window is
  measured on the part inside it.
  """
  crops = np.asarray(crops, np.float64)
  cell = crops[:, CELL_CHANNEL] > 0.5                          # [N, S, S]
  area = np.maximum(cell.sum(axis=(1, 2)), 1)
  sums = np.einsum("nkyx,nyx->nk", crops[:, :-NUM_MASK_CHANNELS], cell)
  return arcsinh(sums / area[:, None], cofactor)


@dataclasses.dataclass
class XGBoost:
  """A fitted XGBoost classifier over all `num_classes` classes (absent classes get p = 0)."""
  model: object
  present: np.ndarray  # [classes seen in training] class ids, in the model's output order
  num_classes: int

  def predict_proba(self, features: np.ndarray) -> np.ndarray:
    """[N, num_classes] float32 class probabilities."""
    out = np.zeros((len(features), self.num_classes), np.float32)
    if len(features) == 0:
      return out
    if len(self.present) == 1:
      out[:, self.present[0]] = 1.0
      return out
    with threadpool_limits(1):
      out[:, self.present] = self.model.predict_proba(features)
    return out


def fit_xgboost(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                n_estimators: int = 100, max_depth: int = 2, learning_rate: float = 0.3,
                balance: str = "class", categories: Mapping[int, str] | None = None,
                seed: int = 0) -> XGBoost:
  """Fits XGBoost on features [N, K] and class ids labels [N] (all ≥ 0).

  balance: "none", "class" (each class weighs the same in total) or "hierarchy"
    (each category of `categories`, class id -> category, weighs the same).
  """
  import xgboost  # imported here: only this baseline needs it

  if balance not in BALANCE:
    raise BadValue("balance", f"{balance!r} is not a known choice",
                      f"one of {list(BALANCE)}")
  labels = np.asarray(labels)
  present = np.unique(labels)
  # XGBoost wants classes 0..n-1: renumber the classes present in training.
  dense = np.searchsorted(present, labels)
  weights = None if balance == "none" else sample_weights(labels, balance, categories)
  model = xgboost.XGBClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                learning_rate=learning_rate, n_jobs=1, random_state=seed,
                                tree_method="hist")
  if len(present) > 1:
    with threadpool_limits(1):
      model.fit(features, dense, sample_weight=weights)
  return XGBoost(model, present, num_classes)


def predictions_from_probs(cells: pd.DataFrame, classes, probs: np.ndarray) -> pd.DataFrame:
  """A predictions table (as `cellrep.infer.predict.predictions_table`) from probabilities [N, C]."""
  return predictions_table(cells, classes, np.asarray(probs)[:, None, :])
