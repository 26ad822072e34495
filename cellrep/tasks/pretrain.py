"""Microsnoop's pretraining (Xun et al. 2024): a masked residual U-Net learns to fill in hidden
patches of one-channel images from every channel of one or more stores; its frozen encoder
then embeds cells channel by channel, probed against known cell classes.

  sources (stores, TIFF folders, synthetic tissue) -> one-channel pool (cellrep.data.pool)
  -> crops of input_size, flips / rot90, normalise99 -> masked U-Net, Adam, masked-pixel MSE
  -> per-channel 256-d embeddings of a labelled probe store (single-cell crops; cell-region
  crops) -> kNN and linear probes, pretrained against a randomly initialised U-Net
  [-> the mask-ratio sweep: one more pretraining per ratio, scored by the linear probe]

Writes into the work directory:
  sources/<name>/, pool/   the stores it made (synthetic tissue, ingested TIFF folders) and
                           the one-channel pool; probe_store/ (synthetic, unless probe.store)
  config.json, model.json, checkpoints/, metrics.jsonl, tensorboard/   as every training run
  probes.parquet           one row per (mode, encoder, probe): balanced accuracy, accuracy,
                           MCC, macro F1, mean and SD over folds
  sweep/ratio_<r>/         with sweep.mask_ratios: a pretraining run per ratio (resumable)
  sweep.parquet            its linear-probe balanced accuracy per ratio
  report/index.html        reconstructions, the loss curve, probe tables, the sweep

The trained model takes one channel (``image``): `configs/embed.py --config.model_dir=RUN
--config.embed.per_channel=true --config.embed.layers=embedding` embeds any store with it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from cellrep import config_util, files
from cellrep.config_util import comma_list
from cellrep.data import augment_microsnoop as augment_lib
from cellrep.data import ingest, isolate as isolate_lib, normalize as normalize_lib
from cellrep.data import pool as pool_lib, synthetic
from cellrep.data.crops import NUM_MASK_CHANNELS
from cellrep.data.sampling import EpochSampler
from cellrep.data.store import Store, open_store
from cellrep.infer import trained as trained_lib
from cellrep.tasks import pretrain_probes, stores, training
from cellrep.train.objectives import MaskedReconstruction
from cellrep.train.optim import adam, learning_rate


def default_config() -> ml_collections.ConfigDict:
  """Every key the task reads, with Microsnoop's values where the paper has one."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.progress = True
  c.data = dict(
      stores="",            # stores to pool, comma-separated (configs/ingest.py makes them)
      tiff_folders="",      # folders of <channel>.tiff + segmentation.tiff, ingested by the run
      synthetic_fovs=0,     # FOVs of synthetic tissue generated into the pool (0: none)
      synthetic=dataclasses.asdict(synthetic.SyntheticConfig()),
      exclude_channels="Background",  # channel names never pooled
      unit="cells",         # pool crops centred on "cells", or "tiles" of the FOVs
      tile_spacing=224,     # with unit "tiles": the grid's spacing in px
      chunk_size=64,
      crop_size=224,        # read window; a random input_size window of it is the input
      input_size=224,       # Microsnoop's 224 px
      normalize="normalize99",  # per image, as Microsnoop (embeddings read it from model.json)
      isolate=0,            # unit "cells": markers zero beyond the centre cell's mask dilated by
                            # this many px (Microsnoop's crops of one cell); -1: whole windows
      workers=0, threads=8, prefetch=2,
      **stores.memory_defaults(),
      fov_window=0,
  )
  c.model = dict(name="masked_unet", widths=(32, 64, 128, 256), style=True, mask_patch=16,
                 mask_ratio=0.25, bn_momentum=0.95, bn_epsilon=1e-5, dtype="float32",
                 conv_impl="auto")
  c.objective = dict(masked_only=True)  # MSE on the hidden pixels (False: on all pixels)
  c.augment = dataclasses.asdict(augment_lib.PretrainAugmentConfig())
  c.ensemble = dict(members=1, strategy="auto", mesh_member=1, mesh_data=-1)
  c.train = dict(steps=0, epochs=10, batch_size=16, lr=1e-3, schedule="cosine",
                 warmup_steps=0, weight_decay=0.0, grad_clip=0.0, log_every=50,
                 checkpoint_every=500, keep_checkpoints=2)
  c.predict = dict(batch_size=64, dtype="auto")
  c.probe = pretrain_probes.default_config()
  c.sweep = dict(mask_ratios="",  # e.g. "0.1,0.25,0.5,0.75": one pretraining per ratio
                 steps=0)         # its steps (0: train.steps)
  return c


def validate(config) -> None:
  c, check = config, config_util.check
  d = c.data
  check(bool(comma_list(d.stores) or comma_list(d.tiff_folders) or d.synthetic_fovs > 0),
        "data.stores", "no images to pretrain on",
        "data.stores, data.tiff_folders or data.synthetic_fovs > 0")
  check(d.synthetic_fovs >= 0, "data.synthetic_fovs", f"{d.synthetic_fovs}", "a number ≥ 0")
  for path in comma_list(d.stores):
    open_store(path)  # names the path when it is not a store
  for path in comma_list(d.tiff_folders):
    check(pathlib.Path(path).is_dir(), "data.tiff_folders", f"{path} is not a folder",
          "folders of <channel>.tiff files and a segmentation.tiff")
  if d.synthetic_fovs:
    with config_util.config_keys("data.synthetic"):
      synthetic.from_config(dict(d.synthetic.to_dict(), n_fovs=d.synthetic_fovs))
  config_util.check_choice(c, "data.unit", pool_lib.UNITS)
  check(d.tile_spacing >= 1, "data.tile_spacing", f"{d.tile_spacing}", "a spacing ≥ 1 px")
  check(isinstance(d.isolate, int) and d.isolate >= isolate_lib.OFF, "data.isolate",
        f"{d.isolate!r}", f"a margin ≥ 0 px, or {isolate_lib.OFF} for whole windows")
  config_util.check_choice(c, "data.normalize", ("normalize99", "standardize", "none"))
  config_util.check_choice(c, "train.schedule", ("constant", "cosine"))
  training.validate(c, min_input=8)
  side = 2 ** (len(c.model.widths) - 1)
  check(d.input_size % side == 0, "data.input_size", f"{d.input_size}",
        f"a multiple of {side} ({len(c.model.widths)} U-Net levels)")
  for ratio in [c.model.mask_ratio] + _sweep_ratios(c):
    if ratio:
      check(d.input_size % c.model.mask_patch == 0, "model.mask_patch",
            f"{c.model.mask_patch} px patches do not tile {d.input_size} px inputs",
            "a divisor of data.input_size")
  check(c.train.weight_decay >= 0, "train.weight_decay", f"{c.train.weight_decay}", "≥ 0")
  check(c.train.warmup_steps >= 0, "train.warmup_steps", f"{c.train.warmup_steps}", "≥ 0")
  with config_util.config_keys("augment"):
    augment_lib.PretrainAugmentConfig(**c.augment.to_dict())
  check(c.sweep.steps >= 0, "sweep.steps", f"{c.sweep.steps}", "a number of steps ≥ 0")
  pretrain_probes.validate(c)


def _sweep_ratios(config) -> list[float]:
  try:
    ratios = [float(r) for r in comma_list(config.sweep.mask_ratios)]
  except ValueError:
    ratios = [-1.0]
  config_util.check(all(0 <= r <= 1 for r in ratios), "sweep.mask_ratios",
                    f"{config.sweep.mask_ratios!r}", "comma-separated fractions in [0, 1]")
  return ratios


# ---------------------------------------------------------------- the pool


def _sources(config, workdir: pathlib.Path) -> list[tuple[str, Store]]:
  """(name, store) of every source: data.stores, then data.tiff_folders, then synthetic."""
  d = config.data
  (workdir / "sources").mkdir(parents=True, exist_ok=True)
  out = [(pathlib.Path(p).name, open_store(p)) for p in comma_list(d.stores)]
  for folder in comma_list(d.tiff_folders):
    name = pathlib.Path(folder).resolve().name
    out.append((name, stores.derived_store(
        workdir, f"sources/{name}", {"folder": str(folder)}, "data.tiff_folders",
        lambda path, folder=folder: ingest.ingest_tiff_folder(folder, path,
                                                              chunk_size=d.chunk_size))))
  if d.synthetic_fovs:
    settings = dict(d.synthetic.to_dict(), n_fovs=d.synthetic_fovs)

    def make(path):
      cfg = synthetic.from_config(settings)
      logging.info("generating synthetic tissue for the pool: %s", cfg)
      return synthetic.write_store(synthetic.generate(cfg), path, chunk_size=d.chunk_size)
    out.append(("synthetic", stores.derived_store(workdir, "sources/synthetic", settings,
                                                  "data.synthetic", make)))
  return out


def open_pool(config, workdir) -> Store:
  """The run's one-channel pool (made once per work directory)."""
  workdir = pathlib.Path(workdir)
  d = config.data
  sources = _sources(config, workdir)
  # Sources by name (a store the run made lives in workdir/sources/<name>, with its own
  # settings checked there), and data.stores by path.
  settings = {"sources": [name for name, _ in sources], "stores": comma_list(d.stores),
              "unit": d.unit,
              "tile_spacing": d.tile_spacing, "exclude": comma_list(d.exclude_channels)}
  pool = stores.derived_store(
      workdir, "pool", settings, "data.unit",
      lambda path: pool_lib.write_pool(sources, path, unit=d.unit, spacing=d.tile_spacing,
                                       exclude=settings["exclude"], chunk_size=d.chunk_size))
  return stores.with_memory(pool, config)


@dataclasses.dataclass
class Plan:
  """What a run pretrains on: every cell (or tile) of the pool."""
  store: Store
  train_idx: np.ndarray
  num_steps: int
  steps_per_epoch: int
  classes: tuple[str, ...] = ()
  scales: None = None


def prepare(config, workdir, check: bool = True) -> Plan:
  """Checks the config (unless `check` is False: a sweep's run of a checked one), opens (or
  makes) the sources and the pool; every crop of the pool trains."""
  if check:
    validate(config)
  pool = open_pool(config, workdir)
  idx = np.arange(len(pool.cells))
  steps_per_epoch, num_steps = training.steps(config, len(idx))
  logging.info("pool of %d images, %d crops; %d steps", len(pool.meta.fovs), len(idx), num_steps)
  return Plan(pool, idx, num_steps, steps_per_epoch)


def train(config, workdir, plan: Plan, writer) -> trained_lib.Trained:
  """Microsnoop's recipe: crops of the pool, flips and rotations, normalise99, Adam, the
  reconstruction of the masked patches."""
  t = config.train
  sampler = EpochSampler(plan.train_idx, plan.num_steps * t.batch_size, config.seed,
                         fovs=plan.store.cells.fov.to_numpy()[plan.train_idx],
                         fov_window=config.data.fov_window)
  schedule = learning_rate(t.lr, t.schedule, plan.num_steps, warmup_steps=t.warmup_steps)
  tx = adam(schedule, t.weight_decay, t.grad_clip)
  cfg = augment_lib.PretrainAugmentConfig(**config.augment.to_dict())
  augment = functools.partial(augment_lib.augment, input_size=config.data.input_size, cfg=cfg)

  margin = config.data.isolate if config.data.unit == "cells" else isolate_lib.OFF

  def preprocess(key, crops):
    crops = isolate_lib.isolate(crops, margin)
    x = augment(key, crops[:, :crops.shape[1] - NUM_MASK_CHANNELS])
    return normalize_lib.normalize(x, config.data.normalize, masks=0)

  recipe = training.Recipe(sampler, preprocess, tx, schedule,
                           MaskedReconstruction(config.objective.masked_only), masks=False,
                           isolate=margin)
  return training.fit_ensemble(config, workdir, plan, writer, recipe)


# ---------------------------------------------------------------- the run


def _sweep(config, workdir: pathlib.Path, probe_store: Store) -> pd.DataFrame | None:
  """One pretraining per ratio of sweep.mask_ratios (sweep.steps each, on the main run's
  pool), each scored by the single-cell linear probe's balanced accuracy."""
  ratios = _sweep_ratios(config)
  if not ratios:
    return None
  rows = []
  for ratio in ratios:
    sub = config.copy_and_resolve_references()
    sub.model.mask_ratio = ratio
    sub.sweep.mask_ratios = ""
    if config.sweep.steps:
      sub.train.steps = config.sweep.steps
    run_dir = workdir / "sweep" / f"ratio_{ratio:g}"
    plan = prepare(sub, workdir, check=False)  # the main run's sources and pool
    writer = training.metric_writer(run_dir)
    try:
      trained = train(sub, run_dir, plan, writer)
    finally:
      writer.close()
    score = pretrain_probes.linear_score(sub, trained, probe_store)
    logging.info("mask ratio %g: linear-probe balanced accuracy %.3f", ratio, score)
    rows.append({"mask_ratio": ratio, "steps": plan.num_steps, "linear_balanced_accuracy": score})
  table = pd.DataFrame(rows)
  files.write_table(table, workdir / "sweep.parquet")
  return table


def run(config, workdir) -> dict:
  """prepare -> pretrain -> probes (pretrained and random-init) -> sweep -> report; returns the
  scalars written to metrics.jsonl at the end."""
  from cellrep.tasks import pretrain_report
  workdir = pathlib.Path(workdir)
  plan = prepare(config, workdir)
  probe_store = pretrain_probes.open_probe_store(config, workdir)
  pretrain_probes.probe_rows(config, probe_store)  # its classes checked before the long work
  writer = training.metric_writer(workdir)
  try:
    trained = train(config, workdir, plan, writer)
    table = pretrain_probes.probe_all(config, workdir, trained, probe_store)
    scalars = pretrain_probes.scalars(table)
    sweep = _sweep(config, workdir, probe_store)
    if sweep is not None:
      scalars.update({f"sweep/ratio_{r:g}/linear_balanced_accuracy": float(s) for r, s in
                      zip(sweep.mask_ratio, sweep.linear_balanced_accuracy)})
    pretrain_report.report(config, workdir, plan, trained, probe_store, table, sweep)
    writer.write(plan.num_steps, scalars)
  finally:
    writer.close()
  logging.info("single-cell linear probe balanced accuracy: pretrained %.3f, random-init %.3f; "
               "report: %s", scalars.get("probe/single_cell/pretrained/linear_balanced_accuracy",
                                         float("nan")),
               scalars.get("probe/single_cell/random_init/linear_balanced_accuracy", float("nan")),
               workdir / "report" / "index.html")
  return scalars
