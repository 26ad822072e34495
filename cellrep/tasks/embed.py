"""The embed job: per-cell features of a trained (or randomly initialised) model -> embeddings.parquet.

  python -m cellrep.launch --config=configs/embed.py --workdir=OUT --config.model_dir=RUN

`model_dir` is the work directory of a run that trained a model (classify,
cellsighter); its store is embedded unless `data.store` names another (channels are
matched by name as `predict` matches them). `random_init=True` keeps the
architecture, members, channels and sizes but draws fresh parameters (from `seed`):
the baseline a learned representation must beat. Without `model_dir` the ensemble is
random: `model.*`, `ensemble.members` and `data.*` describe it. Writes into WORKDIR:

  embeddings.parquet   one row per cell: Metadata_cell_id, Metadata_fov, Metadata_fov_name,
                       Metadata_label, the store's Metadata_* columns, and the features
                       <layer>_<i> (per channel: <channel>_<layer>_<i>), float32
  report/index.html    what was embedded, and a PCA map of the embeddings by class
  deepprofiler/        with embed.deepprofiler=True: DeepProfiler's layout, index.csv and
                       features/<plate>/<well>_<site>.npz (features, locations, metadata), as
                       pycytominer's DeepProfiler loader reads it (cellrep.data.deepprofiler)

The table is written in row groups as cells are embedded (a chunk at most
`embed.memory_budget_mb` of features in memory), under a temporary name renamed at
the end. `configs/profile_eval.py:level=cell` reads it as it is.
"""

from __future__ import annotations

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
from cellrep.infer import trained as trained_lib
from cellrep.ops import policy as policy_lib
from cellrep.tasks import stores
from cellrep.train.ensemble import make_mesh

OUTPUT = "embeddings.parquet"
# Cells whose embeddings the report's PCA map draws (at most).
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
                channels="",      # without model_dir: markers to use, in order; "" = all
                crop_size=32, input_size=24, normalize="none",  # without model_dir
                threads=8, **stores.memory_defaults())
  c.embed = dict(layers="pool",     # named layers, comma-separated, each mean-pooled, concatenated
                 member=-1,         # -1: the mean of the members' embeddings; else that member
                 per_channel=False,  # each marker alone through a one-channel model, concatenated
                 batch_size=256,
                 memory_budget_mb=256.0,  # features held before a row group is written
                 dtype="auto",      # compute dtype (as predict.dtype)
                 deepprofiler=False)  # also WORKDIR/deepprofiler/: index.csv + one .npz a site
  c.transfer = dict(min_overlap=0.8, renames="")  # a trained model's channels in another store
  return c


def _check(config) -> None:
  check = config_util.check
  check(bool(config.model_dir) or bool(config.data.store), "data.store", "not set",
        "the store to embed (without model_dir, a random model.* ensemble embeds it)")
  check(bool(config_util.comma_list(config.embed.layers)), "embed.layers", "empty",
        "layer names, e.g. pool")
  check(config.embed.batch_size >= 1, "embed.batch_size", f"{config.embed.batch_size}", "≥ 1")
  check(config.embed.memory_budget_mb > 0, "embed.memory_budget_mb",
        f"{config.embed.memory_budget_mb}", "a positive number of MiB")
  check(config.ensemble.members >= 1, "ensemble.members", f"{config.ensemble.members}", "≥ 1")
  stores.check_memory(config)
  check(0 <= config.transfer.min_overlap <= 1, "transfer.min_overlap",
        f"{config.transfer.min_overlap}", "a fraction in [0, 1]")
  check(config.data.crop_size >= config.data.input_size >= 8, "data.crop_size",
        f"crop {config.data.crop_size}, input {config.data.input_size}",
        "input_size ≥ 8 and crop_size ≥ input_size")
  config_util.check_choice(config, "embed.dtype", policy_lib.PREDICT_DTYPES)
  config_util.check_choice(config, "data.normalize", normalize_lib.METHODS)


def _random_ensemble(config, store: Store) -> trained_lib.Trained:
  """config.model on the store's markers (data.channels), its variables still to be drawn."""
  channels = tuple(config_util.comma_list(config.data.channels)) or store.meta.channels
  unknown = sorted(set(channels) - set(store.meta.channels))
  config_util.check(not unknown, "data.channels", f"not channels of {store.path}: {unknown}",
                    f"names among {list(store.meta.channels)}")
  spec = dict(config.model.to_dict(), num_classes=1)
  with config_util.config_keys("model"):
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
    if per_channel and not config.random_init:
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


def write_embeddings(path: pathlib.Path, chunks, cells: pd.DataFrame, names,
                     keep: np.ndarray = np.zeros(0, np.int64), also=None
                     ) -> tuple[int, pd.DataFrame]:
  """Writes the (row indices, features) chunks as one parquet file, a row group per chunk,
  under a temporary name renamed at the end.

  keep: sorted positions (in the order written) of rows to hand back as well.
  also: called with (rows of `cells`, features) of every chunk (another format's writer).
  Returns (rows written, the kept rows as a table). In a run of several processes, process 0
  writes; the others compute the same chunks and write nothing.
  """
  tmp, write = files.temporary(path), distributed.is_writer()
  writer, rows, kept = None, 0, []
  try:
    for index, features in chunks:
      table = identity_columns(cells.iloc[index])
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
          [identity_columns(cells.iloc[:0]), pd.DataFrame(columns=list(names), dtype=np.float32)],
          axis=1), preserve_index=False), tmp)
    else:
      writer.close()
    os.replace(tmp, path)
  return rows, pd.concat(kept) if kept else pd.DataFrame()


def _report(workdir: pathlib.Path, summary: dict, sample: pd.DataFrame) -> None:
  """The summary, and a PCA map of `sample` (rows of the embeddings table) by class."""
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
    labels = sample.Metadata_label.fillna("unlabelled").astype(str).to_numpy()
    for name in sorted(set(labels)):
      at = labels == name
      ax.scatter(pcs[at, 0], pcs[at, 1] if pcs.shape[1] > 1 else np.zeros(at.sum()), s=4,
                 label=name, alpha=0.7)
    ax.set_xlabel(f"PC 1 ({share[0]:.0%})")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%})" if len(share) > 1 else "")
    ax.legend(fontsize=7, markerscale=3, loc="best")
    report.figure(fig, "pca", f"The embeddings of {len(sample)} cells, first two principal "
                              "components, by the store's class labels")
  report.write()


def run(config, workdir) -> dict:
  _check(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  trained, store, what = ensemble_and_store(config)
  layers = config_util.comma_list(config.embed.layers)
  rows = _rows(store, config.data.fovs)
  with config_util.config_keys("transfer", capture="embed.layers"):
    e = embed_lib.embedder(trained, store, layers, per_channel=config.embed.per_channel,
                           member=config.embed.member, min_overlap=config.transfer.min_overlap,
                           renames=parse_renames(config.transfer.renames))
  logging.info("%s", trained.policy.describe())
  logging.info("embedding %d cells of %s with %s: %d features (%s)", len(rows), store.path, what,
               len(e.names), ", ".join(layers))
  chunks = embed_lib.embed_store(e, store, rows, batch_size=config.embed.batch_size,
                                 threads=config.data.threads,
                                 memory_budget=int(config.embed.memory_budget_mb * 2**20))
  path = workdir / OUTPUT
  keep = np.sort(np.random.default_rng(0).choice(len(rows), min(len(rows), MAP_CELLS),
                                                 replace=False))
  export = (deepprofiler.Writer(workdir / "deepprofiler")
            if config.embed.deepprofiler and distributed.is_writer() else None)
  written, sample = write_embeddings(path, chunks, store.cells, e.names, keep,
                                     also=export.add if export else None)
  if export is not None:
    logging.info("wrote %d sites in DeepProfiler's layout to %s", export.close(), export.dir)
  summary = {"model": what, "members": trained.members,
             "members combined": "mean" if config.embed.member < 0 else f"member {config.embed.member}",
             "layers": ", ".join(layers), "per channel": bool(config.embed.per_channel),
             "channels": ", ".join(trained.channels), "store": str(store.path), "cells": written,
             "features": len(e.names), "output": str(path)}
  _report(workdir, summary, sample)
  logging.info("wrote %s (%d cells x %d features); report: %s", path, written, len(e.names),
               workdir / "report" / "index.html")
  return summary
