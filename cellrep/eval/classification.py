"""Classification metrics and plots: per-class precision/recall/F1, recall-normalised
confusion, confidence split by correct/wrong, recall vs coverage over confidence thresholds.
"""

from __future__ import annotations

from typing import Mapping

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


# ---------------------------------------------------------------- comparing models on the same cells

CONFIDENCE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def recall_side_by_side(y_true, preds: Mapping[str, np.ndarray], classes) -> pd.DataFrame:
  """Per-class recall of several models on the same cells: [classes + balanced recall, models]."""
  out = pd.DataFrame({name: per_class(y_true, y_pred, classes).recall for name, y_pred in preds.items()})
  out.loc["balanced recall"] = [balanced_recall(y_true, y_pred) for y_pred in preds.values()]
  out.insert(0, "support", list(np.bincount(y_true, minlength=len(classes))) + [len(y_true)])
  return out


def top2(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """probs [N, C] -> (first class [N], second class [N], margin p1 - p2 [N])."""
  order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
  p = np.take_along_axis(probs, order, axis=1)
  return order[:, 0], order[:, 1], p[:, 0] - p[:, 1]


def top2_confusion(y_true, probs: np.ndarray, classes, most: int = 10) -> pd.DataFrame:
  """The class pairs the model hesitates between: cells grouped by their top-2 classes.

  Per unordered pair {a, b} of first and second choice: how many cells, how many
  of them are wrong, of the wrong ones the fraction whose true class is the runner-up,
  and the mean margin between the two probabilities. The `most` pairs with the most
  wrong predictions come first.
  """
  first, second, margin = top2(probs)
  wrong = first != y_true
  lo, hi = np.minimum(first, second), np.maximum(first, second)
  rows = []
  for a, b in sorted(set(zip(lo.tolist(), hi.tolist()))):
    pair = (lo == a) & (hi == b)
    rows.append({"pair": f"{classes[a]} / {classes[b]}", "cells": int(pair.sum()),
                 "wrong": int((pair & wrong).sum()),
                 "truth_second": (float(np.mean(y_true[pair & wrong] == second[pair & wrong]))
                                  if (pair & wrong).any() else float("nan")),
                 "mean_margin": float(np.mean(margin[pair]))})
  table = pd.DataFrame(rows, columns=["pair", "cells", "wrong", "truth_second", "mean_margin"])
  return table.sort_values(["wrong", "cells"], ascending=False).head(most).set_index("pair")


def confidence_comparison(y_true, probs: Mapping[str, np.ndarray],
                          thresholds=CONFIDENCE_THRESHOLDS) -> tuple[pd.DataFrame, pd.DataFrame]:
  """Several models' probabilities [N, C] for the same labelled cells.

  Returns (summary, per threshold): summary has per model the balanced recall,
  accuracy, wrong-and-confident (> 0.9) fraction and top-2 accuracy; the second
  table has per model and threshold the coverage, accuracy and balanced recall of
  the cells kept at confidence ≥ threshold.
  """
  summaries, curves = {}, []
  for name, p in probs.items():
    y_pred, conf = p.argmax(axis=1), p.max(axis=1)
    first, second, _ = top2(p)
    summaries[name] = dict(summary(y_true, y_pred, conf),
                           top2_accuracy=float(np.mean((first == y_true) | (second == y_true))))
    curves.append(recall_coverage(y_true, y_pred, conf, thresholds).assign(model=name))
  return (pd.DataFrame.from_dict(summaries, orient="index"),
          pd.concat(curves).set_index(["model", "threshold"]))


def plot_recall_coverage_models(table: pd.DataFrame):
  """Balanced recall against coverage, one line per model (table from `confidence_comparison`)."""
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for name, curve in table.groupby(level="model", sort=False):
    ax.plot(curve.coverage, curve.balanced_recall, marker="o", ms=3, label=name)
  ax.set_xlabel("coverage (fraction of cells with confidence ≥ threshold)")
  ax.set_ylabel("balanced recall")
  ax.set_xlim(0, 1.02)
  ax.legend()
  return fig


def add_comparison_to_report(report: Report, y_true, probs: Mapping[str, np.ndarray], classes,
                             thresholds=CONFIDENCE_THRESHOLDS, prefix: str = ""
                             ) -> tuple[pd.DataFrame, pd.DataFrame]:
  """Per-class recall side by side, the confidence analysis and the top-2 confusions of every model.

  Returns the summary (models x balanced recall, accuracy, wrong_confident_0.9, top2_accuracy)
  and the per-threshold table of `confidence_comparison`.
  """
  report.heading("Models side by side on the same held-out cells")
  report.table(recall_side_by_side(y_true, {n: p.argmax(axis=1) for n, p in probs.items()}, classes))
  summaries, curves = confidence_comparison(y_true, probs, thresholds)
  report.heading("Confidence", level=3)
  report.paragraph("wrong_confident_0.9: fraction of cells predicted wrongly with confidence "
                   "> 0.9. Coverage: fraction of cells kept at confidence ≥ threshold.")
  report.table(summaries)
  report.figure(plot_recall_coverage_models(curves), f"{prefix}recall_coverage_models",
                "Balanced recall of the cells kept at each confidence threshold.")
  report.table(curves.unstack("model"))
  for name, p in probs.items():
    report.heading(f"Top-2 confusions: {name}", level=3)
    report.table(top2_confusion(y_true, p, list(classes)))
  return summaries, curves
