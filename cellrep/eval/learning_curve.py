"""Learning curves: held-out balanced recall against the number of training cells per class.

CellSighter's paper trains on N labelled cells per class (its `size_data`) for
N in 100, 250, 500, 1000, 5000, with repeats that draw different cells, to show
how many labels a lab needs. The training itself is the classify task's; this
module chooses the sizes, summarises the runs and draws the curve.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellrep.errors import BadValue  # noqa: E402
from cellrep.eval.report import Report  # noqa: E402


def sizes_to_run(text: str, class_counts: np.ndarray) -> list[int]:
  """The sizes of `text` ("100,250,...") worth a run: a size at or above the largest class's
  count trains on every cell, so only the first such size is kept."""
  try:
    sizes = sorted({int(t) for t in text.split(",") if t.strip()})
  except ValueError:
    raise BadValue("sizes", f"{text!r}", "comma-separated cell counts") from None
  if not sizes or sizes[0] < 1:
    raise BadValue("sizes", f"{text!r}", "positive cell counts")
  largest = int(np.max(class_counts)) if len(class_counts) else 0
  kept = [n for n in sizes if n < largest]
  return kept + [n for n in sizes if n >= largest][:1]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
  """runs: one row per (cells_per_class, repeat) with *_balanced_recall columns -> mean and sd."""
  metrics = [c for c in runs.columns if c.endswith("balanced_recall")]
  grouped = runs.groupby("cells_per_class")
  out = grouped[["training_cells"] + metrics].mean()
  for m in metrics:
    out[f"{m}_sd"] = grouped[m].std(ddof=0)
  out["repeats"] = grouped.size()
  return out


def plot(summary: pd.DataFrame):
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for m in [c for c in summary.columns if c.endswith("balanced_recall")]:
    ax.errorbar(summary.index, summary[m], yerr=summary[f"{m}_sd"], marker="o", ms=3, capsize=3,
                label=m.replace("_balanced_recall", ""))
  ax.set_xscale("log")
  ax.set_xlabel("training cells per class (at most)")
  ax.set_ylabel("held-out balanced recall")
  ax.legend(fontsize=8)
  return fig


def add_to_report(report: Report, runs: pd.DataFrame) -> pd.DataFrame:
  summary = summarise(runs)
  report.heading("Learning curve")
  report.paragraph("Each point: models trained on at most N cells of each class (different cells "
                   "per repeat), scored on the same held-out cells; mean ± sd over repeats.")
  report.figure(plot(summary), "learning_curve", "Held-out balanced recall against labels per class.")
  report.table(summary)
  return summary
