"""Predict the cells of a store with a trained ensemble, on the same panel or another one.

  python -m cellrep.launch --config=configs/predict.py --workdir=OUT \
      --config.model_dir=RUN --config.data.store=STORE

`model_dir` is the work directory of a `classify` or `cellsighter` run (its
config.json, model.json and checkpoints/). The store's channels are mapped onto
the model's by name (`cellrep.data.transfer`): shared markers in the model's
order, missing ones fed as zeros with a warning, and an error below
`transfer.min_overlap`. Writes into WORKDIR:

  predictions.parquet           one row per predicted cell (as classify writes it)
  predictions_cellsighter.csv   with predict.cellsighter_csv=True
  channel_map.csv               each model channel and the store channel that feeds it
  report/index.html             the channel map and, for labelled cells, the metrics
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from ml_collections import config_dict

from cellrep import config_util
from cellrep.data.store import Store, open_store
from cellrep.data.transfer import parse_renames
from cellrep.eval import classification
from cellrep.eval.report import Report
from cellrep.files import write_table
from cellrep.infer import trained as trained_lib
from cellrep.infer.predict import cellsighter_csv, predictions_table
from cellrep.ops.policy import PREDICT_DTYPES
from cellrep.tasks import stores


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "predict"
  c.model_dir = config_dict.placeholder(str)  # work directory of a trained classify run
  c.data = dict(store=config_dict.placeholder(str), fovs="", threads=8,  # fovs: "" = all
                **stores.memory_defaults())
  # dtype: "auto" = bfloat16 where its products are faster, else the model's (classify.py)
  c.predict = dict(batch_size=256, cellsighter_csv=True, dtype="auto")
  c.transfer = dict(min_overlap=0.8,   # least fraction of the model's channels the store must have
                    renames="")        # "model channel=store channel;..." for renamed markers
  return c


def predict_and_report(trained: trained_lib.Trained, store: Store, indices, out_dir, report: Report, *,
                       batch_size: int = 256, threads: int = 8, min_overlap: float = 0.8,
                       renames: str = "", csv: bool = False, title: str = "Predictions",
                       prefix: str = "") -> dict:
  """Predicts rows `indices` of `store`, writes the tables into `out_dir`, adds a report section.

  Returns the classification summary of the labelled cells whose label is a model class
  (`{"cells": 0}` when there are none).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  index, probs, cmap = trained_lib.predict_store(
      trained, store, indices, batch_size=batch_size, threads=threads, min_overlap=min_overlap,
      renames=parse_renames(renames))
  table = predictions_table(store.cells.iloc[index], trained.classes, probs)
  write_table(table, out_dir / "predictions.parquet")
  if csv:
    write_table(cellsighter_csv(table, trained.classes), out_dir / "predictions_cellsighter.csv")
  channels = pd.DataFrame({"model_channel": cmap.trained,
                           "store_channel": [cmap.available[i] if i >= 0 else "" for i in cmap.index]})
  write_table(channels, out_dir / "channel_map.csv")

  report.heading(title)
  report.key_values({"store": str(store.path), "cells": len(table),
                     "model channels found": f"{len(cmap.trained) - len(cmap.missing)} of "
                                             f"{len(cmap.trained)} ({cmap.overlap:.0%})",
                     "missing (fed as zeros)": ", ".join(cmap.missing) or "none",
                     "store channels unused": ", ".join(sorted(set(cmap.available) - {
                         cmap.available[i] for i in cmap.index if i >= 0})) or "none"})
  # Only labels the model knows can be scored; other classes of the store are left out.
  known = table.label.isin(list(trained.classes)).fillna(False).to_numpy(bool)
  scored = table.assign(label=table.label.where(known))
  if (table.label.notna().to_numpy(bool) & ~known).any():
    report.paragraph(f"{int((table.label.notna() & ~known).sum())} labelled cells of classes the model "
                     "does not have are not scored.")
  return classification.add_to_report(report, scored, trained.classes, f"{title}: metrics",
                                      prefix=prefix)


def run(config, workdir) -> dict:
  config_util.check(bool(config.model_dir), "model_dir", "not set",
                    "the work directory of a trained classify run")
  config_util.check(bool(config.data.store), "data.store", "not set", "the store to predict")
  stores.check_memory(config)
  config_util.check(0 <= config.transfer.min_overlap <= 1, "transfer.min_overlap",
                    f"{config.transfer.min_overlap}", "a fraction in [0, 1]")
  config_util.check_choice(config, "predict.dtype", PREDICT_DTYPES)
  workdir = pathlib.Path(workdir)
  trained = trained_lib.load(config.model_dir, dtype=config.predict.dtype)
  logging.info("%s", trained.policy.describe())
  store = stores.with_memory(open_store(config.data.store), config)
  fovs = config_util.comma_list(config.data.fovs)
  unknown = sorted(set(fovs) - set(store.meta.fovs))
  config_util.check(not unknown, "data.fovs", f"unknown FOVs {unknown}",
                    f"names among {list(store.meta.fovs)[:20]}")
  indices = (np.flatnonzero(store.cells.fov_name.isin(fovs).to_numpy()) if fovs
             else np.arange(len(store.cells)))
  report = Report(workdir / "report", "cellrep: predictions")
  report.key_values({"model": str(config.model_dir), "classes": ", ".join(trained.classes),
                     "members": trained.members})
  with config_util.config_keys("transfer"):
    stats = predict_and_report(trained, store, indices, workdir, report,
                               batch_size=config.predict.batch_size, threads=config.data.threads,
                               min_overlap=config.transfer.min_overlap,
                               renames=config.transfer.renames, csv=config.predict.cellsighter_csv,
                               title=f"Predictions of {store.path}")
  report.write()
  logging.info("predicted %d cells of %s; report: %s", len(indices), store.path,
               workdir / "report" / "index.html")
  return stats
