import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score

from cellrep.eval import classification
from cellrep.eval.report import Report


def _preds(y_true, y_pred, conf, classes=("a", "b", "c")):
  return pd.DataFrame({
      "label": pd.array([classes[i] if i >= 0 else None for i in y_true], dtype="string"),
      "pred": [classes[i] for i in y_pred], "confidence": conf})


def test_metrics_match_sklearn():
  rng = np.random.default_rng(0)
  y_true = rng.integers(0, 3, 200)
  y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 3, 200))
  assert classification.balanced_recall(y_true, y_pred) == balanced_accuracy_score(y_true, y_pred)
  table = classification.per_class(y_true, y_pred, ["a", "b", "c"])
  np.testing.assert_allclose(table.recall, recall_score(y_true, y_pred, average=None))
  cm = classification.confusion_normalised(y_true, y_pred, 3)
  np.testing.assert_allclose(cm.sum(1), 1)
  np.testing.assert_allclose(np.diag(cm), table.recall)


def test_labelled_rows_and_recall_coverage():
  preds = _preds([0, 1, 2, -1, 0], [0, 2, 2, 1, 0], [0.95, 0.6, 0.8, 0.99, 0.3])
  y_true, y_pred, conf = classification.labelled(preds, ["a", "b", "c"])
  assert y_true.tolist() == [0, 1, 2, 0] and y_pred.tolist() == [0, 2, 2, 0]
  rc = classification.recall_coverage(y_true, y_pred, conf, thresholds=(0.0, 0.7, 0.9))
  assert rc.coverage.tolist() == [1.0, 0.5, 0.25]
  assert rc.accuracy.tolist() == [0.75, 1.0, 1.0]
  s = classification.summary(y_true, y_pred, conf)
  assert s["wrong_confident_0.9"] == 0.0 and s["cells"] == 4


def test_report_section(tmp_path):
  preds = _preds([0, 1, 2, 0], [0, 2, 2, 1], [0.95, 0.92, 0.8, 0.5])
  report = Report(tmp_path, "t")
  stats = classification.add_to_report(report, preds, ["a", "b", "c"], "Ensemble", prefix="e_")
  page = report.write().read_text()
  assert stats["wrong_confident_0.9"] == 0.25
  for name in ("e_confusion", "e_confidence", "e_recall_coverage"):
    assert (tmp_path / f"{name}.png").stat().st_size > 1000 and f"{name}.png" in page
  assert not list(tmp_path.glob(".*tmp*"))


def test_side_by_side_top2_and_confidence_comparison(tmp_path):
  classes = ["a", "b", "c"]
  y_true = np.array([0, 0, 1, 1, 2, 2])
  good = np.array([[.95, .04, .01], [.8, .15, .05], [.1, .85, .05], [.05, .9, .05],
                   [.02, .03, .95], [.2, .1, .7]])
  # Confidently wrong on cells 1 and 3 (a<->b), the truth second.
  bad = np.array([[.95, .04, .01], [.04, .95, .01], [.1, .85, .05], [.94, .05, .01],
                  [.02, .03, .95], [.5, .1, .4]])
  side = classification.recall_side_by_side(y_true, {"good": good.argmax(1), "bad": bad.argmax(1)},
                                            classes)
  assert side.good.tolist() == [1, 1, 1, 1] and side.bad.tolist()[:3] == [0.5, 0.5, 0.5]
  assert side.support.tolist() == [2, 2, 2, 6]
  first, second, margin = classification.top2(bad)
  assert first.tolist() == [0, 1, 1, 0, 2, 0] and second.tolist() == [1, 0, 0, 1, 1, 2]
  np.testing.assert_allclose(margin, [.91, .91, .75, .89, .92, .1])
  pairs = classification.top2_confusion(y_true, bad, classes)
  assert pairs.index[0] == "a / b"
  assert pairs.loc["a / b"].tolist()[:3] == [4, 2, 1.0]
  assert pairs.loc["a / c"].tolist()[:3] == [1, 1, 1.0]
  assert pairs.loc["b / c"].tolist()[:2] == [1, 0] and np.isnan(pairs.loc["b / c", "truth_second"])
  summary, curves = classification.confidence_comparison(y_true, {"good": good, "bad": bad},
                                                         thresholds=(0.5, 0.9))
  assert summary.loc["good", "wrong_confident_0.9"] == 0
  assert summary.loc["bad", "wrong_confident_0.9"] == pytest.approx(2 / 6)
  assert summary.loc["bad", "top2_accuracy"] == 1.0
  assert curves.loc[("good", 0.9), "coverage"] == pytest.approx(3 / 6)
  report = Report(tmp_path, "t")
  summary2, _ = classification.add_comparison_to_report(report, y_true, {"good": good, "bad": bad},
                                                        classes)
  page = report.write().read_text()
  assert "recall_coverage_models.png" in page and "Top-2 confusions: bad" in page
  assert summary2.equals(classification.confidence_comparison(y_true, {"good": good, "bad": bad})[0])
