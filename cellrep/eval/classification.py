"""Classification metrics and plots: per-class precision/recall/F1, recall-normalised
confusion, confidence split by correct/wrong, recall vs coverage over confidence thresholds.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from cellrep.eval.report import Report  # noqa: E402

THRESHOLDS = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))


def labelled(predictions: pd.DataFrame, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(true class ids, predicted class ids, confidence) for the labelled rows."""
  index = {c: i for i, c in enumerate(classes)}
  rows = predictions[predictions.label.notna()]
  y_true = np.array([index[c] for c in rows.label], dtype=np.int64)
  y_pred = np.array([index[c] for c in rows.pred], dtype=np.int64)
  return y_true, y_pred, rows.confidence.to_numpy(np.float64)


def per_class(y_true, y_pred, classes) -> pd.DataFrame:
  p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=np.arange(len(classes)),
                                               zero_division=0)
  return pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": s},
                      index=pd.Index(list(classes), name="class"))


def balanced_recall(y_true, y_pred) -> float:
  """Mean over the classes present in y_true of their recall."""
  present = np.unique(y_true)
  return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in present])) if len(present) else float("nan")


def confusion_normalised(y_true, y_pred, num_classes: int) -> np.ndarray:
  """[true, pred] counts divided by each true class's count (rows sum to 1; absent rows 0)."""
  cm = confusion_matrix(y_true, y_pred, labels=np.arange(num_classes)).astype(np.float64)
  return cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)


def recall_coverage(y_true, y_pred, confidence, thresholds=THRESHOLDS) -> pd.DataFrame:
  """Per confidence threshold t, over the cells with confidence ≥ t: coverage (their
  fraction), accuracy and balanced recall."""
  rows = []
  for t in thresholds:
    keep = confidence >= t
    rows.append({
        "threshold": float(t),
        "coverage": float(np.mean(keep)) if len(keep) else float("nan"),
        "accuracy": float(np.mean(y_true[keep] == y_pred[keep])) if keep.any() else float("nan"),
        "balanced_recall": balanced_recall(y_true[keep], y_pred[keep]) if keep.any() else float("nan"),
    })
  return pd.DataFrame(rows)


def summary(y_true, y_pred, confidence) -> dict[str, float]:
  correct = y_true == y_pred
  return {
      "balanced_recall": balanced_recall(y_true, y_pred),
      "accuracy": float(np.mean(correct)) if len(correct) else float("nan"),
      "wrong_confident_0.9": float(np.mean(~correct & (confidence > 0.9))) if len(correct) else float("nan"),
      "cells": int(len(y_true)),
  }


def plot_confusion(cm: np.ndarray, classes):
  n = len(classes)
  fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
  im = ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
  ax.set_xticks(range(n), classes, rotation=60, ha="right")
  ax.set_yticks(range(n), classes)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(n):
    for j in range(n):
      if cm[i, j] >= 0.005:
        ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if cm[i, j] > 0.5 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046, label="recall-normalised")
  return fig


def plot_confidence(confidence, correct):
  fig, ax = plt.subplots(figsize=(5, 3.2))
  bins = np.linspace(0, 1, 21)
  ax.hist(confidence[correct], bins=bins, alpha=0.7, label=f"correct ({correct.sum()})")
  ax.hist(confidence[~correct], bins=bins, alpha=0.7, label=f"wrong ({(~correct).sum()})")
  ax.set_xlabel("confidence (max mean probability)")
  ax.set_ylabel("cells")
  ax.legend()
  return fig


def plot_recall_coverage(table: pd.DataFrame):
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(table.coverage, table.balanced_recall, marker="o", ms=3, label="balanced recall")
  ax.plot(table.coverage, table.accuracy, marker="s", ms=3, label="accuracy")
  ax.set_xlabel("coverage (fraction of cells kept at confidence ≥ threshold)")
  ax.set_ylabel("score")
  ax.set_xlim(0, 1.02)
  ax.legend()
  return fig


def add_to_report(report: Report, predictions: pd.DataFrame, classes, title: str,
                  prefix: str = "") -> dict:
  """Adds tables and plots for the labelled rows of `predictions`; returns the summary.

  prefix: put before the figure file names, so several sections can share a report.
  """
  y_true, y_pred, conf = labelled(predictions, classes)
  report.heading(title)
  if len(y_true) == 0:
    report.paragraph("No labelled cells to score.")
    return {"cells": 0}
  stats = summary(y_true, y_pred, conf)
  report.key_values(stats)
  report.table(per_class(y_true, y_pred, classes))
  report.figure(plot_confusion(confusion_normalised(y_true, y_pred, len(classes)), classes),
                f"{prefix}confusion", "Confusion matrix, each true class's row divided by its count.")
  report.figure(plot_confidence(conf, y_true == y_pred), f"{prefix}confidence",
                "Ensemble confidence of correct and wrong predictions.")
  rc = recall_coverage(y_true, y_pred, conf)
  report.figure(plot_recall_coverage(rc), f"{prefix}recall_coverage",
                "Keeping only cells above a confidence threshold: what is kept and how good it is.")
  report.table(rc.set_index("threshold"))
  return stats
