"""The embed job: features of a trained (or randomly initialised) model -> embeddings.parquet.

  python -m cellrep.launch --config=configs/embed.py --workdir=OUT --config.model_dir=RUN

`model_dir` is the work directory of a run that trained a model (classify,
cellsighter, pretrain); its store is embedded unless `data.store` names another (channels
are matched by name as `predict` matches them). `random_init=True` keeps the
architecture, members, channels and sizes but draws fresh parameters (from `seed`):
the baseline a learned representation must beat. Without `model_dir` the ensemble is
random: `model.*`, `ensemble.members` and `data.*` describe it.

`embed.mode` says what goes through the network (Microsnoop's modes, `cellrep.infer.fields`):
``single_cell`` the store's crops centred on each cell; ``cell_region`` each cell's bounding
box x `embed.ratio` (capped at `embed.cap`, zero-padded); ``rescale`` each whole FOV resized
to the input; ``tile`` input-size tiles of each FOV overlapping by `embed.overlap`, their
embeddings averaged. The cell modes write a row per cell (`embed.fov_mean=True`: a row per
FOV, the mean of its cells'); rescale and tile a row per FOV. `embed.batch_experiment=True`
then sphers the FOV rows per plate on the controls (ZCA-cor, λ = knee / 10) and averages
them per treatment, scored by NSC / NSCB when `embed.moa` names the MoA column
(`cellrep.tasks.embed_experiment`). Writes into WORKDIR:

  embeddings.parquet   a row per cell: Metadata_cell_id, Metadata_fov, Metadata_fov_name,
                       Metadata_label, the store's Metadata_* columns, and the features
                       <layer>_<i> (per channel: <channel>_<layer>_<i>), float32; a row per
                       FOV: Metadata_fov, Metadata_fov_name and the Metadata_* columns
                       constant within every FOV, then the features
  treatment_profiles.parquet   with embed.batch_experiment: a row per treatment, sphered
  scores.json          with embed.batch_experiment and embed.moa: NSC and NSCB
  report/index.html    what was embedded, and a PCA map of the embeddings by class
  deepprofiler/        with embed.deepprofiler=True (cell rows): DeepProfiler's layout,
                       index.csv and features/<plate>/<well>_<site>.npz (features, locations,
                       metadata), as pycytominer's DeepProfiler loader reads it
                       (cellrep.data.deepprofiler)

The table is written in row groups as cells (FOVs) are embedded (a chunk at most
`embed.memory_budget_mb` of features in memory), under a temporary name renamed at
the end. `configs/profile_eval.py:level=cell` reads it as it is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from ml_collections import config_dict

from cellrep import config_util, distributed, files, models
from cellrep.data import deepprofiler, normalize as normalize_lib
from cellrep.data.store import Store, open_store
from cellrep.data.transfer import parse_renames
from cellrep.errors import ConfigError
from cellrep.eval.report import Report
from cellrep.infer import embed as embed_lib
from cellrep.infer import fields
from cellrep.infer import trained as trained_lib
from cellrep.ops import policy as policy_lib
from cellrep.tasks import embed_experiment, stores, training
from cellrep.train.ensemble import make_mesh

OUTPUT = "embeddings.parquet"
PROFILES, SCORES = embed_experiment.PROFILES, embed_experiment.SCORES  # batch experiments
MODES = ("single_cell",) + fields.MODES
# Cells (FOVs) whose embeddings the report's PCA map draws (at most).
MAP_CELLS = 5000


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "embed"
  c.seed = 0
  c.model_dir = config_dict.placeholder(str)  # a trained run; unset: a random model.* ensemble
  c.random_init = False   # model_dir's model with fresh parameters (from seed): the baseline
  # Without model_dir: the random ensemble's model and inputs.
  c.model = dict(name="resnet18", width=0.125, stem="small", dtype="float32", conv_impl="auto")
  c.ensemble = dict(members=1)
  c.data = dict(store=config_dict.placeholder(str),  # default: the store model_dir trained on
                fovs="",          # FOV names to embed, comma-separated; "" = all
                channels="",      # markers to use, in order ("" = all): without model_dir,
                                  # or for a one-channel model embedding per channel
                crop_size=32, input_size=24, normalize="none",  # without model_dir
                threads=8, **stores.memory_defaults())
  c.embed = dict(layers="pool",     # named layers, comma-separated, each mean-pooled, concatenated
                 member=-1,         # -1: the mean of the members' embeddings; else that member
                 per_channel=False,  # each marker alone through a one-channel model, concatenated
                 batch_size=256,
                 memory_budget_mb=256.0,  # features held before a row group is written
                 dtype="auto",      # compute dtype (as predict.dtype)
                 deepprofiler=False,  # also WORKDIR/deepprofiler/: index.csv + one .npz a site
                 # What goes through the network (Microsnoop): single_cell crops, cell_region
                 # (bounding box x ratio), rescale (the FOV resized), tile (FOV tiles).
                 mode="single_cell",
                 ratio=2.5,         # cell_region: window side / the box's longer side
                 cap=224,           # cell_region: the largest window side, px
                 overlap=0.1,       # tile: the fraction of a tile its neighbour overlaps
                 fov_mean=False,    # single_cell, cell_region: a row per FOV, its cells' mean
                 # Batch experiments: FOV rows sphered per plate on the controls (ZCA-cor,
                 # λ = knee / 10), averaged per treatment, scored by NSC / NSCB.
                 batch_experiment=False,
                 plate="Metadata_Plate",
                 treatment="Metadata_compound",
                 controls="Metadata_control == True",  # pandas query on the FOV rows
                 moa="",            # MoA column: "" skips NSC / NSCB
                 compound="",       # NSC's compound ("" = the treatment column)
                 batch="")          # NSCB's batch ("" = the plate column)
  c.transfer = dict(min_overlap=0.8, renames="")  # a trained model's channels in another store
  return c


def _fov_rows(config) -> bool:
  return config.embed.mode in ("rescale", "tile") or config.embed.fov_mean


def _check(config) -> None:
  check, embed = config_util.check, config.embed
  check(bool(config.model_dir) or bool(config.data.store), "data.store", "not set",
        "the store to embed (without model_dir, a random model.* ensemble embeds it)")
  check(bool(config_util.comma_list(embed.layers)), "embed.layers", "empty",
        "layer names, e.g. pool")
  check(embed.batch_size >= 1, "embed.batch_size", f"{embed.batch_size}", "≥ 1")
  check(embed.memory_budget_mb > 0, "embed.memory_budget_mb",
        f"{embed.memory_budget_mb}", "a positive number of MiB")
  check(config.ensemble.members >= 1, "ensemble.members", f"{config.ensemble.members}", "≥ 1")
  stores.check_memory(config)
  check(0 <= config.transfer.min_overlap <= 1, "transfer.min_overlap",
        f"{config.transfer.min_overlap}", "a fraction in [0, 1]")
  check(config.data.crop_size >= config.data.input_size >= 8, "data.crop_size",
        f"crop {config.data.crop_size}, input {config.data.input_size}",
        "input_size ≥ 8 and crop_size ≥ input_size")
  config_util.check_choice(config, "embed.dtype", policy_lib.PREDICT_DTYPES)
  config_util.check_choice(config, "data.normalize", normalize_lib.METHODS)
  config_util.check_choice(config, "embed.mode", MODES)
  check(0 < embed.ratio < math.inf, "embed.ratio", f"{embed.ratio}",
        "a positive window-to-box ratio (Microsnoop: 2.5, 2.0)")
  check(embed.cap >= 1, "embed.cap", f"{embed.cap}", "a window side ≥ 1 px")
  check(0 <= embed.overlap < 1, "embed.overlap", f"{embed.overlap}", "a fraction in [0, 1)")
  check(not (embed.deepprofiler and _fov_rows(config)), "embed.deepprofiler",
        f"a row per FOV (embed.mode={embed.mode}, embed.fov_mean={embed.fov_mean})",
        "a row per cell: DeepProfiler's layout holds each cell's location")
  if embed.batch_experiment:
    embed_experiment.check_config(config)


def _channels(config, store: Store) -> tuple[str, ...]:
  """data.channels (checked against the store), default all its markers."""
  channels = tuple(config_util.comma_list(config.data.channels)) or store.meta.channels
  unknown = sorted(set(channels) - set(store.meta.channels))
  config_util.check(not unknown, "data.channels", f"not channels of {store.path}: {unknown}",
                    f"names among {list(store.meta.channels)}")
  return channels


def _random_ensemble(config, store: Store) -> trained_lib.Trained:
  """config.model on the store's markers (data.channels), its variables still to be drawn."""
  channels = _channels(config, store)
  with config_util.config_keys("model"):
    spec = training.model_spec(config, 1)
    model = models.build(spec)
  return trained_lib.Trained(
      model=model, variables=None, classes=("none",), channels=channels,
      input_size=config.data.input_size, crop_size=config.data.crop_size,
      normalize=config.data.normalize, mesh=make_mesh(1, -1), spec=spec,
      policy=policy_lib.resolve(conv_impl=spec["conv_impl"], dtype=spec["dtype"],
                                predict_dtype=config.embed.dtype))


def ensemble_and_store(config) -> tuple[trained_lib.Trained, Store, str]:
  """The ensemble to embed with, the store, and a description of the model for the report."""
  rng = jax.random.key(config.seed)
  per_channel = config.embed.per_channel
  if config.model_dir:
    trained = trained_lib.load(config.model_dir, dtype=config.embed.dtype)
    store = stores.with_memory(
        open_store(config.data.store or trained_lib.trained_store(config.model_dir)), config)
    if per_channel and trained.input_shape[-1] == 1:
      # A one-channel model (pretrained per channel, as Microsnoop's) takes every marker of
      # the store (data.channels, default all) one at a time.
      trained = dataclasses.replace(trained, channels=_channels(config, store))
    elif per_channel and not config.random_init:
      raise ConfigError("embed.per_channel", f"the model of {config.model_dir} takes "
                        f"{trained.input_shape[-1]} channels together",
                        "a one-channel model: random_init=True, or a model pretrained per channel")
    what = f"{trained.spec.get('name')} of {config.model_dir}"
  else:
    store = stores.with_memory(open_store(config.data.store), config)
    trained = _random_ensemble(config, store)
    what = f"{trained.spec['name']} (config.model)"
  if config.random_init or not config.model_dir:
    members = trained.members if config.model_dir else config.ensemble.members
    trained = embed_lib.random_like(trained, rng, in_channels=1 if per_channel else None,
                                    members=members)
    what = f"{what}, randomly initialised (seed {config.seed})"
  config_util.check(-1 <= config.embed.member < trained.members, "embed.member",
                    f"{config.embed.member}", f"-1 (the mean) or a member below {trained.members}")
  return trained, store, what


def _rows(store: Store, fovs_text: str) -> np.ndarray:
  fovs = config_util.comma_list(fovs_text)
  unknown = sorted(set(fovs) - set(store.meta.fovs))
  config_util.check(not unknown, "data.fovs", f"unknown FOVs {unknown}",
                    f"names among {list(store.meta.fovs)[:20]}")
  if not fovs:
    return np.arange(len(store.cells))
  return np.flatnonzero(store.cells.fov_name.isin(fovs).to_numpy())


def identity_columns(cells: pd.DataFrame) -> pd.DataFrame:
  """The cells' identity and metadata, pycytominer's way: every column starts with Metadata_."""
  out = pd.DataFrame({
      "Metadata_cell_id": cells.cell_id.to_numpy(), "Metadata_fov": cells.fov.to_numpy(),
      "Metadata_fov_name": cells.fov_name.astype(str).to_numpy(),
      "Metadata_label": cells.label.astype("string").to_numpy()})
  for col in cells.columns:
    if col.startswith("Metadata_") and col not in out:
      out[col] = cells[col].to_numpy()
  return out


def fov_identity(cells: pd.DataFrame) -> pd.DataFrame:
  """A row per FOV of `cells`, in FOV order: Metadata_fov, Metadata_fov_name and every other
  column of `identity_columns` but the cell id that is constant within every FOV (the
  store's per-FOV Metadata_*; Metadata_label when each FOV holds one class)."""
  table = identity_columns(cells).drop(columns="Metadata_cell_id")
  constant = table.groupby("Metadata_fov").nunique(dropna=False).le(1).all()
  keep = ["Metadata_fov"] + [c for c in table.columns if c != "Metadata_fov" and constant[c]]
  first = table.sort_values("Metadata_fov", kind="stable").drop_duplicates("Metadata_fov")
  return first[keep].reset_index(drop=True)


def write_embeddings(path: pathlib.Path, chunks, cells: pd.DataFrame, names,
                     keep: np.ndarray = np.zeros(0, np.int64), also=None,
                     identity=identity_columns) -> tuple[int, pd.DataFrame]:
  """Writes the (row indices, features) chunks as one parquet file, a row group per chunk,
  under a temporary name renamed at the end.

  keep: sorted positions (in the order written) of rows to hand back as well.
  also: called with (rows of `cells`, features) of every chunk (another format's writer).
  identity: rows of `cells` -> their Metadata_ columns (`cells` already a table of them:
  `lambda rows: rows`).
  Returns (rows written, the kept rows as a table). In a run of several processes, process 0
  writes; the others compute the same chunks and write nothing.
  """
  tmp, write = files.temporary(path), distributed.is_writer()
  writer, rows, kept = None, 0, []
  try:
    for index, features in chunks:
      table = identity(cells.iloc[index])
      feats = pd.DataFrame(features.astype(np.float32, copy=False), columns=list(names))
      chunk = pd.concat([table.reset_index(drop=True), feats], axis=1)
      mine = keep[(keep >= rows) & (keep < rows + len(index))] - rows
      kept.append(chunk.iloc[mine])
      frame = pa.Table.from_pandas(chunk, preserve_index=False)
      if also is not None:
        also(cells.iloc[index], features)
      if write and writer is None:
        writer = pq.ParquetWriter(tmp, frame.schema)
      if write:
        writer.write_table(frame)
      rows += len(index)
  except BaseException:
    if writer is not None:
      writer.close()
    if write:  # another process's failure must not remove process 0's file
      tmp.unlink(missing_ok=True)
    raise
  if write:
    if writer is None:  # no cells: an empty table with the columns
      pq.write_table(pa.Table.from_pandas(pd.concat(
          [identity(cells.iloc[:0]), pd.DataFrame(columns=list(names), dtype=np.float32)],
          axis=1), preserve_index=False), tmp)
    else:
      writer.close()
    os.replace(tmp, path)
  return rows, pd.concat(kept) if kept else pd.DataFrame()


class _FovMeans:
  """The mean of each FOV's cell features, summed (float64) as chunks of cells pass."""

  def __init__(self, fovs: np.ndarray, store_fovs: int, width: int):
    self.row = np.full(store_fovs, -1, np.int64)   # store FOV index -> row of the FOV table
    self.row[np.asarray(fovs)] = np.arange(len(fovs))
    self.sums = np.zeros((len(fovs), width))
    self.counts = np.zeros(len(fovs))

  def add(self, cells: pd.DataFrame, features: np.ndarray) -> None:
    at = self.row[cells.fov.to_numpy(np.int64)]
    np.add.at(self.sums, at, features)
    np.add.at(self.counts, at, 1)

  def means(self) -> np.ndarray:
    return (self.sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)


def _cell_chunks(config, e, store: Store, rows: np.ndarray, per_chunk: int):
  """(rows of store.cells, features) chunks of embed.mode's cell inputs."""
  embed = config.embed
  if embed.mode == "single_cell":
    return embed_lib.embed_store(e, store, rows, batch_size=embed.batch_size,
                                 threads=config.data.threads,
                                 memory_budget=int(embed.memory_budget_mb * 2**20))
  return (fields.cell_region_embeddings(e, store, rows[s:s + per_chunk], ratio=embed.ratio,
                                        cap=embed.cap, batch_size=embed.batch_size)
          for s in range(0, len(rows), per_chunk))


def _fov_chunks(config, e, store: Store, rows: np.ndarray, fovs: pd.DataFrame, per_chunk: int):
  """(rows of `fovs`, features) chunks: each FOV's embedding in embed.mode (single_cell: the
  mean of its cells')."""
  embed = config.embed
  if embed.mode == "single_cell":
    means = _FovMeans(fovs.Metadata_fov, len(store.meta.fovs), len(e.names))
    for index, x in _cell_chunks(config, e, store, rows, per_chunk):
      means.add(store.cells.iloc[index], x)
    x = means.means()
    yield from ((np.arange(s, min(s + per_chunk, len(x))), x[s:s + per_chunk])
                for s in range(0, len(x), per_chunk))
    return
  names = fovs.Metadata_fov_name.tolist()
  for s in range(0, len(names), per_chunk):
    _, x = fields.fov_embeddings(e, store, embed.mode, ratio=embed.ratio, cap=embed.cap,
                                 overlap=embed.overlap, fovs=names[s:s + per_chunk],
                                 batch_size=embed.batch_size)
    yield np.arange(s, s + len(x)), x


def _map_rows(n: int) -> np.ndarray:
  """Sorted positions of the rows the report's PCA map draws (at most MAP_CELLS)."""
  return np.sort(np.random.default_rng(0).choice(n, min(n, MAP_CELLS), replace=False))


def _write_fov_rows(config, e, store: Store, rows, fovs: pd.DataFrame, workdir, per_chunk):
  """Writes a row per FOV; returns (rows written, the map's rows, every FOV row for a batch
  experiment, else None)."""
  every = config.embed.batch_experiment
  written, kept = write_embeddings(
      workdir / OUTPUT, _fov_chunks(config, e, store, rows, fovs, per_chunk), fovs, e.names,
      np.arange(len(fovs)) if every else _map_rows(len(fovs)), identity=lambda t: t)
  return written, kept.iloc[_map_rows(len(kept))] if every else kept, kept if every else None


def _write_cell_rows(config, e, store: Store, rows, fovs: pd.DataFrame, workdir, per_chunk):
  """Writes a row per cell (and DeepProfiler's layout); returns (rows written, the map's rows,
  the FOV rows, the means of their cells', for a batch experiment, else None)."""
  embed = config.embed
  export = (deepprofiler.Writer(workdir / "deepprofiler")
            if embed.deepprofiler and distributed.is_writer() else None)
  means = (_FovMeans(fovs.Metadata_fov, len(store.meta.fovs), len(e.names))
           if embed.batch_experiment else None)
  adds = [f.add for f in (export, means) if f is not None]
  also = (lambda cells, x: [add(cells, x) for add in adds]) if adds else None
  written, sample = write_embeddings(
      workdir / OUTPUT, _cell_chunks(config, e, store, rows, per_chunk), store.cells, e.names,
      _map_rows(len(rows)), also=also)
  if export is not None:
    logging.info("wrote %d sites in DeepProfiler's layout to %s", export.close(), export.dir)
  table = (None if means is None else
           pd.concat([fovs, pd.DataFrame(means.means(), columns=list(e.names))], axis=1))
  return written, sample, table


def _mode(embed) -> str:
  return {"cell_region": f"cell_region (box x {embed.ratio:g}, capped at {embed.cap} px)",
          "tile": f"tile (overlap {embed.overlap:g})"}.get(embed.mode, embed.mode)


def _report(workdir: pathlib.Path, summary: dict, sample: pd.DataFrame, unit: str,
            by=("Metadata_label",)) -> None:
  """The summary, and a PCA map of `sample` (rows of the embeddings table) by the first of
  the columns `by` it has with a value."""
  import matplotlib.pyplot as plt

  report = Report(workdir / "report", "cellrep: embeddings")
  report.key_values(summary)
  if len(sample) >= 3:
    x = sample[[c for c in sample.columns if not c.startswith("Metadata_")]].to_numpy(np.float64)
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    pcs = u[:, :2] * s[:2]
    share = s[:2] ** 2 / max(float(np.sum(s ** 2)), 1e-12)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    column = next((c for c in by if c and c in sample and sample[c].notna().any()), None)
    labels = (sample[column].astype("string").fillna("unlabelled").to_numpy(str) if column
              else np.full(len(sample), "all"))
    for name in sorted(set(labels)):
      at = labels == name
      ax.scatter(pcs[at, 0], pcs[at, 1] if pcs.shape[1] > 1 else np.zeros(at.sum()), s=4,
                 label=name, alpha=0.7)
    ax.set_xlabel(f"PC 1 ({share[0]:.0%})")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%})" if len(share) > 1 else "")
    ax.legend(fontsize=7, markerscale=3, loc="best")
    report.figure(fig, "pca", f"The embeddings of {len(sample)} {unit}, first two principal "
                              f"components, by {column or 'nothing (no label column)'}")
  report.write()


def run(config, workdir) -> dict:
  _check(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  embed = config.embed
  trained, store, what = ensemble_and_store(config)
  layers = config_util.comma_list(embed.layers)
  rows = _rows(store, config.data.fovs)
  per_fov = _fov_rows(config)
  # A row per FOV (the cells' identity copied once: only where FOV rows are made).
  fovs = fov_identity(store.cells.iloc[rows]) if per_fov or embed.batch_experiment else None
  controls = (embed_experiment.experiment_controls(config, fovs, store)
              if embed.batch_experiment else None)
  if embed.mode == "cell_region":  # before any embedding: a store of centres has no boxes
    fields.check_outlines(store, rows)
  with config_util.config_keys("transfer", capture="embed.layers"):
    e = embed_lib.embedder(trained, store, layers, per_channel=embed.per_channel,
                           member=embed.member, min_overlap=config.transfer.min_overlap,
                           renames=parse_renames(config.transfer.renames))
  unit = "FOVs" if per_fov else "cells"
  logging.info("%s", trained.policy.describe())
  logging.info("embedding %d cells of %s with %s, mode %s, a row per %s: %d features (%s)",
               len(rows), store.path, what, _mode(embed), unit[:-1], len(e.names),
               ", ".join(layers))
  per_chunk = max(embed.batch_size, int(embed.memory_budget_mb * 2**20) // (4 * len(e.names)))
  write = _write_fov_rows if per_fov else _write_cell_rows
  written, sample, table = write(config, e, store, rows, fovs, workdir, per_chunk)
  summary = {"model": what, "members": trained.members,
             "members combined": "mean" if embed.member < 0 else f"member {embed.member}",
             "layers": ", ".join(layers), "per channel": bool(embed.per_channel),
             "channels": ", ".join(trained.channels), "store": str(store.path),
             "mode": _mode(embed), "rows": f"a row per {unit[:-1]}", unit.lower(): written,
             "features": len(e.names), "output": str(workdir / OUTPUT)}
  if embed.batch_experiment:
    summary.update(embed_experiment.batch_experiment(
        config, workdir, table, controls, e.names, source=f"{workdir / OUTPUT} (FOV rows)"))
  _report(workdir, summary, sample, unit,
          by=("Metadata_label", embed.moa, embed.treatment) if per_fov else ("Metadata_label",))
  logging.info("wrote %s (%d %s x %d features); report: %s", workdir / OUTPUT, written, unit,
               len(e.names), workdir / "report" / "index.html")
  return summary
