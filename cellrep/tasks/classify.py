"""CellSighter-style cell classification: store -> crops -> ensemble training -> predictions -> report.

Writes into the work directory:
  store/                 the dataset store made for the run (data.source "synthetic" or
                         "cellsighter"); store_gated/ with landmark labels (data.gating.rules)
  config.json            the config of the latest run
  model.json             classes, channels, sizes and normalisation of the model
  checkpoints/           orbax checkpoints: train state + Grain iterator position
  metrics.jsonl          train metrics every train.log_every steps; eval/* at the end
  tensorboard/           the same scalars as TensorBoard events
  predictions.parquet    one row per held-out cell: cell_id, fov, fov_name, label, pred,
                         confidence, prob_<class>..., Metadata_* columns
  predictions_cellsighter.csv   with predict.cellsighter_csv=True
  report/index.html      metrics, confusion matrix, confidence histogram, recall vs coverage

Re-running the same command resumes from the latest checkpoint. The run is made
of reusable pieces: `prepare` (store and cells), `train` (the ensemble, as a
`cellrep.infer.trained.Trained`), `evaluate` (predictions and report sections);
`run(config, workdir, extend=...)` lets another task add analyses to the report.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable

import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from ml_collections import config_dict

from cellrep import config_util
from cellrep.config_util import comma_list
from cellrep.data import augment as augment_lib
from cellrep.data import normalize as normalize_lib, synthetic
from cellrep.data.sampling import (BALANCE, EpochSampler, cap_per_class, parse_hierarchy,
                                   sample_weights, split_fovs)
from cellrep.data.store import Store
from cellrep.errors import ConfigError
from cellrep.eval import classification
from cellrep.eval.report import Report
from cellrep.files import write_table
from cellrep.infer import trained as trained_lib
from cellrep.infer.predict import cellsighter_csv, predictions_table
from cellrep.tasks import stores, training
from cellrep.train.metrics import MetricWriter
from cellrep.train.objectives import SoftmaxCrossEntropy
from cellrep.train.optim import SCHEDULES, adam, learning_rate

SOURCES = ("synthetic", "store", "cellsighter")


def default_config() -> ml_collections.ConfigDict:
  """Every key the task reads, with CellSighter's values where it has one."""
  c = ml_collections.ConfigDict()
  c.task = "classify"
  c.seed = 0
  c.progress = True
  c.data = dict(
      source="store",                        # "store" (data.store), "synthetic" or "cellsighter"
      store=config_dict.placeholder(str),    # a store directory (configs/ingest.py writes one)
      synthetic=dataclasses.asdict(synthetic.SyntheticConfig()),
      cellsighter=dict(                      # source "cellsighter": a CellSighter data folder
          root="",                           # its root_dir (holding CellTypes/)
          channels_file="",                  # channels_path; "" = ROOT/channels.txt
          blacklist="",                      # channels left out, comma-separated
          class_names="",                    # names of class ids 0, 1, ...; "" = the ids
      ),
      gating=dict(rules="", percentile=80.0),  # landmark labels from marker gates; "" = off
      chunk_size=64,                         # chunk edge of a store the run writes
      crop_size=128,                         # read window around each cell (CellSighter crop_size)
      input_size=60,                         # network input after augmentation (crop_input_size)
      train_fovs="",                         # training FOV names (train_set); "" = all not held out
      val_fovs="",                           # held-out FOV names (val_set); else val_fraction
      val_fraction=0.2,
      balance="class",                       # "none" | "class" | "hierarchy" (sample_batch)
      hierarchy="",                          # "class=category;..." (hierarchy_match)
      max_per_class=0,                       # cap on training cells per class (size_data); 0 = all
      normalize="none",                      # "none" (raw counts) | "p99" | "anscombe"
      workers=0,                             # Grain worker processes (0 = threads in-process)
      threads=8,                             # Grain reader threads
      prefetch=2,                            # training batches read ahead beyond the threads'
      **stores.memory_defaults(),
      fov_window=0,                          # >0: shuffle this many FOVs' cells at a time (FOV-local
                                             # order: each FOV decoded ~once per epoch; README Performance)
  )
  # conv_impl: "auto" = convolutions as matrix products on a CPU, XLA convolutions elsewhere
  # (cellrep.ops.conv; parameters are the same under each).
  c.model = dict(name="resnet50", width=1.0, stem="imagenet", dtype="float32", conv_impl="auto")
  c.ensemble = dict(members=10, strategy="auto", mesh_member=1, mesh_data=-1)
  c.train = dict(
      steps=0,                    # total steps; 0 = epochs x (training cells // batch)
      epochs=50,                  # CellSighter epoch_max
      batch_size=128,
      lr=1e-3,
      schedule="exponential",     # CellSighter: ExponentialLR(gamma=0.85) per epoch
      decay_rate=0.85,
      decay_epochs=1,
      warmup_steps=0,
      weight_decay=0.0,
      grad_clip=0.0,
      label_smoothing=0.0,
      log_every=20,
      checkpoint_every=200,
      keep_checkpoints=2,
  )
  c.augment = dataclasses.asdict(augment_lib.AugmentConfig())
  # dtype: compute dtype of prediction; "auto" = bfloat16 where its products are faster
  # (GPU/TPU, CPUs with AVX512-BF16/AMX), else model.dtype (cellrep.infer.predict).
  c.predict = dict(batch_size=256, cellsighter_csv=False, dtype="auto")
  return c


def validate(config) -> None:
  c, check = config, config_util.check
  config_util.check_choice(c, "data.source", SOURCES)
  config_util.check_choice(c, "data.balance", BALANCE)
  config_util.check_choice(c, "data.normalize", normalize_lib.METHODS)
  config_util.check_choice(c, "train.schedule", SCHEDULES)
  if c.data.source == "store":
    check(bool(c.data.store), "data.store", "no store path given", "a store directory (configs/ingest.py writes one)")
  if c.data.source == "cellsighter":
    check(bool(c.data.cellsighter.root), "data.cellsighter.root", "not set",
          "a CellSighter data folder holding CellTypes/")
  check(0 <= c.data.gating.percentile < 100, "data.gating.percentile", f"{c.data.gating.percentile}",
        "a percentile in [0, 100)")
  check(0 < c.data.val_fraction < 1, "data.val_fraction", f"{c.data.val_fraction}", "a fraction in (0, 1)")
  training.validate(c, min_input=8)
  with config_util.config_keys("augment"):
    augment_lib.AugmentConfig(**c.augment.to_dict())
  if c.data.source == "synthetic":
    with config_util.config_keys("data.synthetic"):
      synthetic.from_config(c.data.synthetic)


# ---------------------------------------------------------------- which cells


@dataclasses.dataclass
class Plan:
  """What a run trains on and predicts.

  labels: [cells] class index per row of store.cells (-1 unlabelled).
  train_idx: rows the ensemble trains on (labelled cells of the training FOVs, capped).
  val_idx: rows it predicts (every cell of the held-out FOVs).
  scales: the store's per-channel divisors for data.normalize="p99", else None.
  """
  store: Store
  classes: tuple[str, ...]
  labels: np.ndarray
  train_fovs: list[str]
  val_fovs: list[str]
  train_idx: np.ndarray
  val_idx: np.ndarray
  num_steps: int
  steps_per_epoch: int
  scales: np.ndarray | None = None

  def with_training_cells(self, config, train_idx: np.ndarray) -> "Plan":
    """The same plan training on other cells, with the step count `config` gives for them."""
    steps_per_epoch, num_steps = training.steps(config, len(train_idx))
    return dataclasses.replace(self, train_idx=train_idx, num_steps=num_steps,
                               steps_per_epoch=steps_per_epoch)


def prepare(config, workdir) -> Plan:
  """Checks the config, opens (or makes) the store, and chooses the cells."""
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  store = stores.open_run_store(config, workdir)
  classes = store.meta.classes
  if not classes:
    raise ConfigError("data.store", f"{store.path} has no labelled cells", "a store with labels")
  labels = store.label_ids()
  fov_names = store.cells.fov_name.to_numpy()
  with config_util.config_keys("data"):
    train_fovs, val_fovs = split_fovs(store.meta.fovs, comma_list(config.data.val_fovs),
                                      config.data.val_fraction, config.seed,
                                      train_fovs=comma_list(config.data.train_fovs))
    scales = normalize_lib.store_scales(store, config.data.normalize)
  train_idx = np.flatnonzero(np.isin(fov_names, train_fovs) & (labels >= 0))
  train_idx = cap_per_class(train_idx, labels, config.data.max_per_class, config.seed)
  val_idx = np.flatnonzero(np.isin(fov_names, val_fovs))
  if len(train_idx) == 0:
    raise ConfigError("data.val_fovs", "no labelled cells left to train on", "labelled training FOVs")
  steps_per_epoch, num_steps = training.steps(config, len(train_idx))
  overlap = sorted(set(train_fovs) & set(val_fovs))
  if overlap:
    logging.warning("held-out FOVs %s are also trained on: their scores are not of unseen "
                    "cells (set data.val_fovs to FOVs left out of training)", ",".join(overlap))
  logging.info("%d training cells (%s), %d held-out cells (%s), %d steps", len(train_idx),
               ",".join(train_fovs), len(val_idx), ",".join(val_fovs), num_steps)
  return Plan(store, classes, labels, train_fovs, val_fovs, train_idx, val_idx, num_steps,
              steps_per_epoch, scales)


# ---------------------------------------------------------------- training


def train(config, workdir, plan: Plan, writer: MetricWriter) -> trained_lib.Trained:
  """Trains (or resumes) the ensemble on plan.train_idx; checkpoints in workdir/checkpoints.

  CellSighter's recipe: class-balanced draws, its augmentations (then data.normalize), Adam,
  softmax cross-entropy; the crops' two masks are network inputs.
  """
  store = plan.store
  with config_util.config_keys("data"):
    weights = (None if config.data.balance == "none" else
               sample_weights(plan.labels[plan.train_idx], config.data.balance,
                              parse_hierarchy(config.data.hierarchy, plan.classes)))
  sampler = EpochSampler(plan.train_idx, plan.num_steps * config.train.batch_size, config.seed,
                         weights, fovs=store.cells.fov.to_numpy()[plan.train_idx],
                         fov_window=config.data.fov_window)
  schedule = learning_rate(config.train.lr, config.train.schedule, plan.num_steps,
                           decay_rate=config.train.decay_rate,
                           decay_steps=config.train.decay_epochs * plan.steps_per_epoch,
                           warmup_steps=config.train.warmup_steps)
  tx = adam(schedule, config.train.weight_decay, config.train.grad_clip)
  with config_util.config_keys("augment"):
    aug_cfg = augment_lib.AugmentConfig(**config.augment.to_dict())
  augment = functools.partial(augment_lib.augment, input_size=config.data.input_size, cfg=aug_cfg)
  if config.data.normalize == "none":
    preprocess = augment
  else:  # after the Poisson resampling, which needs raw counts
    def preprocess(key, crops):
      return normalize_lib.normalize(augment(key, crops), config.data.normalize, plan.scales)
  recipe = training.Recipe(sampler, preprocess, tx, schedule,
                           SoftmaxCrossEntropy(config.train.label_smoothing))
  return training.fit_ensemble(config, workdir, plan, writer, recipe)


# ---------------------------------------------------------------- prediction and report


@dataclasses.dataclass
class Evaluation:
  """The held-out predictions: rows `index` of store.cells; member_probs [N, M, classes]."""
  index: np.ndarray
  cells: pd.DataFrame
  member_probs: np.ndarray
  table: pd.DataFrame
  scalars: dict


def evaluate(config, workdir, plan: Plan, trained: trained_lib.Trained, report: Report) -> Evaluation:
  """Predicts plan.val_idx, writes the predictions and adds the ensemble and member-0 sections."""
  workdir = pathlib.Path(workdir)
  index, member_probs, _ = trained_lib.predict_store(
      trained, plan.store, plan.val_idx, batch_size=config.predict.batch_size,
      threads=config.data.threads, scales=plan.scales)
  cells = plan.store.cells.iloc[index]
  table = predictions_table(cells, plan.classes, member_probs)
  write_table(table, workdir / "predictions.parquet")
  if config.predict.cellsighter_csv:
    write_table(cellsighter_csv(table, plan.classes), workdir / "predictions_cellsighter.csv")

  report.key_values({"store": str(plan.store.path), "classes": ", ".join(plan.classes),
                     "training FOVs": ", ".join(plan.train_fovs),
                     "held-out FOVs": ", ".join(plan.val_fovs) + (
                         " (also trained on: not unseen cells)"
                         if set(plan.val_fovs) & set(plan.train_fovs) else ""),
                     "members": trained.members,
                     "model": f"{config.model.name} x{config.model.width}",
                     "normalisation": config.data.normalize, "steps": plan.num_steps,
                     "training cells": len(plan.train_idx)})
  stats = classification.add_to_report(report, table, plan.classes,
                                       f"Ensemble of {trained.members} on held-out FOVs")
  single = predictions_table(cells, plan.classes, member_probs[:, :1])
  single_stats = classification.add_to_report(report, single, plan.classes, "Member 0 alone",
                                              prefix="member0_")
  scalars = {f"eval/{k}": v for k, v in stats.items()}
  scalars.update({f"eval/member0_{k}": v for k, v in single_stats.items()})
  return Evaluation(index, cells, member_probs, table, scalars)


Extension = Callable[[Plan, trained_lib.Trained, Evaluation, Report], dict]


def run(config, workdir: pathlib.Path, extend: Extension | None = None,
        title: str = "cellrep: cell classification") -> dict:
  """prepare -> train -> evaluate -> `extend` (more report sections and scalars) -> report.

  Returns the scalars written to metrics.jsonl at the end.
  """
  workdir = pathlib.Path(workdir)
  plan = prepare(config, workdir)
  writer = training.metric_writer(workdir)
  try:
    trained = train(config, workdir, plan, writer)
    report = Report(workdir / "report", title)
    result = evaluate(config, workdir, plan, trained, report)
    scalars = dict(result.scalars)
    if extend is not None:
      scalars.update(extend(plan, trained, result, report))
    report.write()
    writer.write(plan.num_steps, scalars)
  finally:
    writer.close()
  logging.info("held-out balanced recall %.3f (member 0 alone %.3f); report: %s",
               scalars.get("eval/balanced_recall", float("nan")),
               scalars.get("eval/member0_balanced_recall", float("nan")),
               workdir / "report" / "index.html")
  return scalars
