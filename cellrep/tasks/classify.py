"""CellSighter-style cell classification: store -> crops -> ensemble training -> predictions -> report.

Writes into the work directory:
  store/                 the synthetic dataset store (only with data.source="synthetic")
  config.json            the config of the latest run
  checkpoints/           orbax checkpoints: train state + Grain iterator position
  metrics.jsonl          train metrics every train.log_every steps; eval/* at the end
  tensorboard/           the same scalars as TensorBoard events
  predictions.parquet    one row per held-out cell: cell_id, fov, fov_name, label, pred,
                         confidence, prob_<class>..., Metadata_* columns
  predictions_cellsighter.csv   with predict.cellsighter_csv=True
  report/index.html      metrics, confusion matrix, confidence histogram, recall vs coverage

Re-running the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from ml_collections import config_dict

from cellrep import config_util
from cellrep.data import augment as augment_lib
from cellrep.data import synthetic
from cellrep.data.crops import NUM_MASK_CHANNELS, CropSource
from cellrep.data.pipeline import data_sharding, eval_batches, train_dataset
from cellrep.data.sampling import BALANCE, EpochSampler, cap_per_class, sample_weights, split_fovs
from cellrep.data.store import Store, open_store
from cellrep.errors import ConfigError
from cellrep.eval import classification
from cellrep.eval.report import Report
from cellrep.infer.predict import cellsighter_csv, make_predict_fn, predict, predictions_table
from cellrep.models import DTYPES, NAMES, get_model
from cellrep.train.checkpoint import Checkpointer
from cellrep.train.ensemble import STRATEGIES, MemberStep, make_mesh, make_train_step
from cellrep.train.loop import fit
from cellrep.train.metrics import MetricWriter
from cellrep.train.optim import SCHEDULES, adam, learning_rate
from cellrep.train.state import abstract_state, create_state

SOURCES = ("synthetic", "store")


def default_config() -> ml_collections.ConfigDict:
  """Every key the task reads, with CellSighter's values where it has one."""
  c = ml_collections.ConfigDict()
  c.task = "classify"
  c.seed = 0
  c.progress = True
  c.data = dict(
      source="store",                        # "store" (data.store) or "synthetic"
      store=config_dict.placeholder(str),    # a store directory (configs/ingest.py writes one)
      synthetic=dataclasses.asdict(synthetic.SyntheticConfig()),
      chunk_size=64,                         # chunk edge of a generated synthetic store
      crop_size=128,                         # read window around each cell (CellSighter crop_size)
      input_size=60,                         # network input after augmentation (crop_input_size)
      val_fovs="",                           # held-out FOV names, comma-separated; else val_fraction
      val_fraction=0.2,
      balance="class",                       # "none" | "class" | "hierarchy" (sample_batch)
      hierarchy="",                          # "class=category;..." (hierarchy_match)
      max_per_class=0,                       # cap on training cells per class (size_data); 0 = all
      workers=0,                             # Grain worker processes (0 = threads in-process)
      threads=8,                             # Grain reader threads
  )
  c.model = dict(name="resnet50", width=1.0, stem="imagenet", dtype="float32")
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
  c.predict = dict(batch_size=256, cellsighter_csv=False)
  return c


def _names(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def validate(config) -> None:
  c, check = config, config_util.check
  config_util.check_choice(c, "data.source", SOURCES)
  config_util.check_choice(c, "data.balance", BALANCE)
  config_util.check_choice(c, "model.name", NAMES)
  config_util.check_choice(c, "model.stem", ("imagenet", "small"))
  config_util.check_choice(c, "model.dtype", DTYPES)
  config_util.check_choice(c, "ensemble.strategy", STRATEGIES)
  config_util.check_choice(c, "train.schedule", SCHEDULES)
  if c.data.source == "store":
    check(bool(c.data.store), "data.store", "no store path given", "a store directory (configs/ingest.py writes one)")
  check(c.data.input_size >= 8, "data.input_size", f"{c.data.input_size} is too small", "≥ 8 pixels")
  check(c.data.crop_size >= c.data.input_size, "data.crop_size",
        f"{c.data.crop_size} < data.input_size {c.data.input_size}", "a read window at least the input size")
  check(0 < c.data.val_fraction < 1, "data.val_fraction", f"{c.data.val_fraction}", "a fraction in (0, 1)")
  check(c.model.width > 0, "model.width", f"{c.model.width}", "a positive multiplier")
  check(c.ensemble.members >= 1, "ensemble.members", f"{c.ensemble.members}", "≥ 1")
  check(c.train.batch_size >= 1, "train.batch_size", f"{c.train.batch_size}", "≥ 1")
  check(c.train.steps > 0 or c.train.epochs > 0, "train.steps", "neither steps nor epochs is set",
        "train.steps > 0 or train.epochs > 0")
  check(c.train.lr > 0 and math.isfinite(c.train.lr), "train.lr", f"{c.train.lr}", "a positive learning rate")
  check(c.train.log_every >= 1 and c.train.checkpoint_every >= 1, "train.log_every",
        "log_every and checkpoint_every must be ≥ 1", "positive step counts")
  check(c.predict.batch_size >= 1, "predict.batch_size", f"{c.predict.batch_size}", "≥ 1")


def _synthetic_store(config, workdir: pathlib.Path) -> Store:
  """The synthetic store in workdir/store, generated once; a resumed run must ask for the same data."""
  cfg = synthetic.from_config(config.data.synthetic)
  path = workdir / "store"
  stamp = workdir / "store.synthetic.json"
  wanted = json.dumps(config.data.synthetic.to_dict(), sort_keys=True)
  if path.exists():
    if stamp.exists() and stamp.read_text() != wanted:
      raise ConfigError("data.synthetic", f"differs from the settings that made {path}",
                        "the same settings, or a new --workdir")
    return open_store(path)
  logging.info("generating synthetic tissue: %s", cfg)
  store = synthetic.write_store(synthetic.generate(cfg), path, chunk_size=config.data.chunk_size)
  stamp.write_text(wanted)
  return store


def _hierarchy(text: str, classes) -> dict[int, str] | None:
  """"CD4 T=T cell;CD8 T=T cell;..." -> {class index: category}; every class must be mapped."""
  if not text:
    return None
  mapping = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    name, eq, category = part.partition("=")
    if not eq:
      raise ConfigError("data.hierarchy", f"{part!r} has no '='", "'class=category;...'")
    mapping[name.strip()] = category.strip()
  missing = [c for c in classes if c not in mapping]
  if missing:
    raise ConfigError("data.hierarchy", f"classes without a category: {missing}", "every class mapped")
  return {i: mapping[c] for i, c in enumerate(classes)}


def _write_parquet(df: pd.DataFrame, path: pathlib.Path) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  df.to_parquet(tmp, index=False)
  os.replace(tmp, path)


def _write_csv(df: pd.DataFrame, path: pathlib.Path) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  df.to_csv(tmp, index=False)
  os.replace(tmp, path)


def run(config, workdir: pathlib.Path) -> dict:
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  store = (_synthetic_store(config, workdir) if config.data.source == "synthetic"
           else open_store(config.data.store))
  classes = store.meta.classes
  if not classes:
    raise ConfigError("data.store", f"{store.path} has no labelled cells", "a store with labels")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  # Which cells: train on labelled cells of the training FOVs; predict every held-out cell.
  labels = store.label_ids()
  fov_names = store.cells.fov_name.to_numpy()
  train_fovs, val_fovs = split_fovs(store.meta.fovs, _names(config.data.val_fovs),
                                    config.data.val_fraction, config.seed)
  train_idx = np.flatnonzero(np.isin(fov_names, train_fovs) & (labels >= 0))
  train_idx = cap_per_class(train_idx, labels, config.data.max_per_class, config.seed)
  val_idx = np.flatnonzero(np.isin(fov_names, val_fovs))
  if len(train_idx) == 0:
    raise ConfigError("data.val_fovs", "no labelled cells left to train on", "labelled training FOVs")
  batch_size = config.train.batch_size
  steps_per_epoch = max(1, len(train_idx) // batch_size)
  num_steps = config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch
  logging.info("%d training cells (%s), %d held-out cells (%s), %d steps", len(train_idx),
               ",".join(train_fovs), len(val_idx), ",".join(val_fovs), num_steps)

  source = CropSource(store, config.data.crop_size)
  weights = (None if config.data.balance == "none" else
             sample_weights(labels[train_idx], config.data.balance,
                            _hierarchy(config.data.hierarchy, classes)))
  sampler = EpochSampler(train_idx, num_steps * batch_size, config.seed, weights)
  batches = iter(train_dataset(source, sampler, batch_size, workers=config.data.workers,
                               threads=config.data.threads))

  # Model, optimizer, mesh and state (restored when a checkpoint exists).
  members = config.ensemble.members
  mesh = make_mesh(config.ensemble.mesh_member, config.ensemble.mesh_data)
  if members % mesh.shape["member"] or batch_size % mesh.shape["data"]:
    raise ConfigError("ensemble.mesh_member", f"mesh {dict(mesh.shape)} does not divide "
                      f"{members} members / batch {batch_size}", "divisors of members and batch size")
  model = get_model(config.model.name, len(classes), width=config.model.width,
                    stem=config.model.stem, dtype=config.model.dtype)
  schedule = learning_rate(config.train.lr, config.train.schedule, num_steps,
                           decay_rate=config.train.decay_rate,
                           decay_steps=config.train.decay_epochs * steps_per_epoch,
                           warmup_steps=config.train.warmup_steps)
  tx = adam(schedule, config.train.weight_decay, config.train.grad_clip)
  input_size = config.data.input_size
  input_shape = (1, input_size, input_size, len(store.meta.channels) + NUM_MASK_CHANNELS)
  abstract = abstract_state(model, tx, input_shape, members, mesh)
  checkpointer = Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  rng = jax.random.key(config.seed)
  if latest is not None:
    logging.info("resuming from checkpoint at step %d", latest)
    state = checkpointer.restore(latest, abstract, batches)
  else:
    state = create_state(jax.random.fold_in(rng, 0), model, tx, input_shape, members, mesh)

  aug_cfg = augment_lib.AugmentConfig(**config.augment.to_dict())
  preprocess = functools.partial(augment_lib.augment, input_size=input_size, cfg=aug_cfg)
  step = make_train_step(MemberStep(model, tx, preprocess, config.train.label_smoothing),
                         mesh, abstract, config.ensemble.strategy)
  writer = MetricWriter(workdir)
  state = fit(state, step, batches, rng=jax.random.fold_in(rng, 1), num_steps=num_steps,
              data_sharding=data_sharding(mesh), writer=writer, checkpointer=checkpointer,
              checkpoint_every=config.train.checkpoint_every, log_every=config.train.log_every,
              learning_rate=schedule, progress=config.progress)

  # Predict the held-out FOVs, score the labelled ones, report.
  predict_fn = make_predict_fn(model, functools.partial(augment_lib.center, input_size=input_size),
                               mesh, config.ensemble.strategy)
  index, member_probs = predict(state.variables, predict_fn,
                                eval_batches(source, val_idx, config.predict.batch_size,
                                             threads=config.data.threads), data_sharding(mesh))
  cells = store.cells.iloc[index]
  table = predictions_table(cells, classes, member_probs)
  _write_parquet(table, workdir / "predictions.parquet")
  if config.predict.cellsighter_csv:
    _write_csv(cellsighter_csv(table, classes), workdir / "predictions_cellsighter.csv")

  report = Report(workdir / "report", "cellrep: cell classification")
  report.key_values({"store": str(store.path), "classes": ", ".join(classes),
                     "training FOVs": ", ".join(train_fovs), "held-out FOVs": ", ".join(val_fovs),
                     "members": members, "model": f"{config.model.name} x{config.model.width}",
                     "steps": num_steps, "training cells": len(train_idx)})
  stats = classification.add_to_report(report, table, classes, f"Ensemble of {members} on held-out FOVs")
  single = predictions_table(cells, classes, member_probs[:, :1])
  single_stats = classification.add_to_report(report, single, classes, "Member 0 alone",
                                                  prefix="member0_")
  report.write()
  scalars = {f"eval/{k}": v for k, v in stats.items()}
  scalars.update({f"eval/member0_{k}": v for k, v in single_stats.items()})
  writer.write(num_steps, scalars)
  writer.close()
  checkpointer.close()
  logging.info("held-out balanced recall %.3f (member 0 alone %.3f); report: %s",
               stats.get("balanced_recall", float("nan")),
               single_stats.get("balanced_recall", float("nan")), workdir / "report" / "index.html")
  return scalars
