"""The Cell Painting job's second half: per-cell features of each set, their profile evaluations,
and the report.

Feature sets (`features_and_profiles`):
  wsl             the trained ensemble's named layers (features.layers, block6a_activation by
                  default), mean-pooled per cell through the spine's embedding path
                  (`cellrep.infer.embed`); also in DeepProfiler's .npz layout
  random_init     the same architecture with fresh parameters: what training must beat
  mean_intensity  each channel's mean over the crop and over its central quarter (around the
                  nucleus): the paper's simplest baseline

Each set's `embeddings.parquet` is evaluated by `cellrep.tasks.profile_eval` at cell level
(site median -> well mean -> sphering on the controls, with its λ sweep -> treatment mean ->
replicate and same-MoA mAP, enrichment, strength), under WORKDIR/profiles/<set>/, with
config.profile's columns, controls, sphering and retrieval; the wsl set once more without
sphering (profiles/wsl_unsphered/), to show what sphering does.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pandas as pd
from absl import logging

from cellrep import config_util, distributed, models
from cellrep.data import deepprofiler
from cellrep.data.crops import CropSource
from cellrep.data.store import Store
from cellrep.eval.report import Report
from cellrep.infer import embed as embed_lib
from cellrep.infer.trained import Trained
from cellrep.tasks import embed as embed_task
from cellrep.profiling import sphering
from cellrep.tasks import profile_eval
from cellrep.train.metrics import read_metrics

BASELINES = ("random_init", "mean_intensity")
EMBEDDINGS = "embeddings.parquet"
# profile_eval summary entries -> the scalar names of metrics.jsonl (profile/<set>/<name>).
_SCALARS = {"activity mAP (mean over treatments)": "activity_map",
            "fraction of treatments retrieved (corrected p < threshold)": "retrieved_fraction",
            "MoA mAP (mean over MoAs)": "moa_map",
            "MoA interpolated mAP (paper)": "moa_interpolated_map"}


def _embed_set(config, store: Store, trained: Trained, path: pathlib.Path,
               export: pathlib.Path | None = None) -> int:
  layers = config_util.comma_list(config.features.layers)
  with config_util.config_keys("features", capture="features.layers"):
    e = embed_lib.embedder(trained, store, layers)
  chunks = embed_lib.embed_store(e, store, batch_size=config.predict.batch_size,
                                 threads=config.data.threads,
                                 memory_budget=int(config.features.memory_budget_mb * 2**20))
  writer = deepprofiler.Writer(export, model=trained.spec.get("name", "cellrep")) if (
      export is not None and distributed.is_writer()) else None
  rows, _ = embed_task.write_embeddings(path, chunks, store.cells, e.names,
                                        also=writer.add if writer else None)
  if writer is not None:
    logging.info("wrote %d sites in DeepProfiler's layout to %s", writer.close(), export)
  return rows


def mean_intensity_chunks(store: Store, crop_size: int, batch_size: int = 256):
  """(rows, features [n, 2K]) per batch: each marker's mean over the crop, then over its central
  quarter (a square of half the crop's side)."""
  source = CropSource(store, crop_size)
  k = len(store.meta.channels)
  lo, hi = crop_size // 4, crop_size - crop_size // 4
  for start in range(0, len(store.cells), batch_size):
    rows = np.arange(start, min(start + batch_size, len(store.cells)))
    crops = source.read(rows)["crop"][:, :k]
    yield rows, np.concatenate([crops.mean(axis=(2, 3)),
                                crops[:, :, lo:hi, lo:hi].mean(axis=(2, 3))], axis=1)


def mean_intensity_names(channels) -> list[str]:
  return [f"{c}_mean" for c in channels] + [f"{c}_centre_mean" for c in channels]


def profile_config(config, features, sphered: bool = True):
  """The profile evaluation of a cell table `features` with config.profile's settings."""
  pe = profile_eval.default_config()
  p = config.profile
  pe.input, pe.level, pe.controls = str(features), "cell", p.controls
  pe.columns.update(p.columns.to_dict())
  pe.sphering.update(p.sphering.to_dict())
  pe.retrieval.update(p.retrieval.to_dict())
  if not sphered:
    pe.sphering.method, pe.sphering.sweep = "none", ""
  return pe


def _profile(config, features: pathlib.Path, out: pathlib.Path, sphered: bool = True) -> dict:
  with config_util.nested_config("profile"):
    return profile_eval.run(profile_config(config, features, sphered), out)


def check_layers(config) -> None:
  """features.layers are layers of config.model (from shapes alone: no compile)."""
  layers = tuple(config_util.comma_list(config.features.layers))
  model = models.build(config.model, num_classes=2)
  x = jax.ShapeDtypeStruct((1, config.data.input_size, config.data.input_size, 5), np.float32)
  with config_util.config_keys("features", capture="features.layers"):
    jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, capture=layers), x)


def features_and_profiles(config, workdir, store: Store, trained: Trained) -> dict[str, dict]:
  """Embeds every cell with each feature set and evaluates its profiles; returns each
  evaluation's summary by set name (wsl, wsl_unsphered, then the baselines)."""
  workdir = pathlib.Path(workdir)
  sets = ["wsl"] + config_util.comma_list(config.features.baselines)
  paths = {name: workdir / "features" / name / EMBEDDINGS for name in sets}
  for name in sets:
    paths[name].parent.mkdir(parents=True, exist_ok=True)
  export = workdir / "features" / "wsl" / "deepprofiler" if config.features.deepprofiler else None
  cells = _embed_set(config, store, trained, paths["wsl"], export)
  logging.info("embedded %d cells with the trained model", cells)
  if "random_init" in sets:
    random = embed_lib.random_like(trained, jax.random.key(config.seed + 1))
    _embed_set(config, store, random, paths["random_init"])
  if "mean_intensity" in sets:
    embed_task.write_embeddings(paths["mean_intensity"],
                                mean_intensity_chunks(store, trained.input_size),
                                store.cells, mean_intensity_names(store.meta.channels))
  distributed.barrier("cellpainting features")  # process 0 wrote them; every process reads them
  summaries = {"wsl": _profile(config, paths["wsl"], workdir / "profiles" / "wsl"),
               "wsl_unsphered": _profile(config, paths["wsl"], workdir / "profiles" / "wsl_unsphered",
                                         sphered=False)}
  for name in sets[1:]:
    summaries[name] = _profile(config, paths[name], workdir / "profiles" / name)
  return summaries


def profile_scalars(config, workdir, summaries: dict[str, dict]) -> dict:
  """profile/<set>/<score> for metrics.jsonl: the scores of `_SCALARS`, folds of enrichment, and
  the replicate mAP of the weakest, median and strongest treatments, the same treatments for
  every set (the trained model's strength groups, profiles/wsl/strength.parquet)."""
  workdir, treatment = pathlib.Path(workdir), config.profile.columns.treatment
  groups = _read(workdir / "profiles" / "wsl" / "strength.parquet")
  out = {}
  for name, summary in summaries.items():
    for key, value in summary.items():
      short = _SCALARS.get(key) or ("enrichment_folds" if key.startswith("folds of enrichment")
                                    else None)
      if short is not None:
        out[f"profile/{name}/{short}"] = float(value)
    maps = _read(workdir / "profiles" / name / "map.parquet")
    if groups is None or maps is None:
      continue
    joined = groups[[treatment, "strength_group"]].merge(
        maps[[treatment, "mean_average_precision"]], on=treatment)
    for group in ("weakest", "median", "strongest"):
      chosen = joined[joined.strength_group == group]
      if len(chosen):
        out[f"profile/{name}/activity_map_{group}"] = float(chosen.mean_average_precision.mean())
  return out


# ---------------------------------------------------------------- report


def _pca(x: np.ndarray) -> np.ndarray:
  x = x - x.mean(axis=0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  return u[:, :2] * s[:2]


def _read(path: pathlib.Path) -> pd.DataFrame | None:
  return pd.read_parquet(path) if path.exists() else None


def report(config, workdir, plan, scalars: dict, summaries: dict[str, dict]) -> None:
  """report/index.html: the run, training curves, pretext scores, profile scores, mAP against λ,
  mAP per MoA and the well profiles before and after sphering."""
  import matplotlib.pyplot as plt

  workdir = pathlib.Path(workdir)
  rep = Report(workdir / "report", "cellrep: Cell Painting CNN (weakly supervised)")
  rep.key_values({"store": str(plan.store.path), "treatments": len(plan.classes),
                  "training plates": ", ".join(plan.train_plates),
                  "held-out plates": ", ".join(plan.val_plates),
                  "training cells": len(plan.train_idx),
                  "cells per treatment and epoch": plan.per_treatment or "all (no resampling)",
                  "steps": plan.num_steps, "model": config.model.name,
                  "members": config.ensemble.members, "features": config.features.layers})

  records = [r for r in read_metrics(workdir) if "train/loss" in r]
  if records:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in records]
    for ax, key in zip(axes, ("train/loss", "train/accuracy")):
      ax.plot(steps, [r.get(key, np.nan) for r in records])
      ax.set_xlabel("step")
      ax.set_ylabel(key.split("/")[1])
      ax.grid(alpha=0.3)
    rep.heading("Training")
    rep.figure(fig, "training", "Pretext task (which treatment?): loss and accuracy of the "
                                "training batches")

  rep.heading("Pretext task on held-out cells")
  rows = [{"held out": split, **{m: scalars.get(f"pretext/{split}_{m}", np.nan)
                                 for m in ("accuracy", "precision", "recall")}}
          for split in ("cells", "plates")]
  rep.paragraph(f"Macro-averaged over {len(plan.classes)} treatments; chance accuracy "
                f"{1 / len(plan.classes):.3f}. Held-out cells: the cells of the training "
                "plates' wells left out of training; held-out plates: every cell of plates "
                "never trained on.")
  rep.table(pd.DataFrame(rows))

  rep.heading("Profiles")
  table = pd.DataFrame({name: {k: v for k, v in s.items() if isinstance(v, float)}
                        for name, s in summaries.items()}).T
  rep.table(table)
  rep.paragraph("Each set's full evaluation (tables and report) is in profiles/<set>/.")

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in summaries:
    lam = _read(workdir / "profiles" / name / "lambda_sweep.parquet")
    if lam is not None and len(lam):
      ax.semilogx(lam["reg"], lam["mean_average_precision"], "o-", label=name)
  ax.set_xlabel("sphering λ")
  ax.set_ylabel("replicate mAP")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  rep.figure(fig, "map_vs_lambda", "Replicate mAP against the controls, per sphering λ")

  moa_col = config.profile.columns.moa
  per_moa = {name: _read(workdir / "profiles" / name / "moa_map.parquet") for name in summaries}
  per_moa = {k: v.set_index(moa_col)["mean_average_precision"] for k, v in per_moa.items()
             if v is not None and moa_col in v}
  if per_moa:
    moa = pd.DataFrame(per_moa)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(moa) + 2), 3.5))
    moa.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("same-MoA mAP")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    rep.heading("Mechanisms of action")
    rep.figure(fig, "map_per_moa", "Same-MoA retrieval between treatment profiles, per MoA")
    rep.table(moa.reset_index())

  before = _read(workdir / "profiles" / "wsl_unsphered" / "profiles.parquet")
  after = _read(workdir / "profiles" / "wsl" / "profiles.parquet")
  if before is not None and after is not None and len(before) >= 3:
    _sphering_figure(rep, config, before, after)
  rep.write()


def _sphering_figure(rep: Report, config, before: pd.DataFrame, after: pd.DataFrame) -> None:
  import matplotlib.pyplot as plt

  plate_col = config.profile.columns.plate
  controls = {}
  fig, axes = plt.subplots(2, 2, figsize=(9, 8), layout="constrained")
  for row, (title, wells) in enumerate((("unsphered", before), ("sphered", after))):
    feats = [c for c in wells.columns if not c.startswith("Metadata_")]
    pcs = _pca(wells[feats].to_numpy(np.float64))
    controls[title] = sphering.control_mask(wells, config.profile.controls, title)
    plates = wells[plate_col].astype(str).to_numpy() if plate_col in wells else np.full(len(wells), "all")
    for name in sorted(set(plates)):
      at = plates == name
      axes[row, 0].scatter(pcs[at, 0], pcs[at, 1], s=8, label=name, alpha=0.7)
    axes[row, 0].legend(fontsize=7, title="plate")
    for flag, label in ((False, "treated"), (True, "control")):
      at = controls[title] == flag
      axes[row, 1].scatter(pcs[at, 0], pcs[at, 1], s=8, label=label, alpha=0.7)
    axes[row, 1].legend(fontsize=7)
    for ax in axes[row]:
      ax.set_title(f"wells, {title}", fontsize=9)
      ax.set_xlabel("PC 1")
      ax.set_ylabel("PC 2")
  rep.heading("Well profiles before and after sphering")
  rep.figure(fig, "sphering", "Well profiles (trained model), first two principal components, "
                              "coloured by plate (left) and by control status (right)")
