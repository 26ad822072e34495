"""The pretrain task's probes: a pretrained one-channel encoder and a randomly initialised one
embed the cells of a labelled store channel by channel (Microsnoop's way: 256-d per channel,
concatenated in channel order), and cross-validated kNN and linear probes score how well the
embeddings tell the cells' classes apart.

Modes: ``single_cell`` (crops centred on each cell, as the spine's embedding path reads
them) and ``cell_region`` (each cell's bounding box x `probe.ratios`, capped, zero-padded:
`cellrep.infer.fields`), one probe table row per (mode, encoder, probe).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from cellrep import config_util, files
from cellrep.config_util import comma_list
from cellrep.data import synthetic
from cellrep.data.store import Store, open_store
from cellrep.errors import ConfigError
from cellrep.eval import probes
from cellrep.infer import embed as embed_lib
from cellrep.infer.trained import Trained
from cellrep.tasks import stores

MODES = ("single_cell", "cell_region")
LAYERS = ("embedding",)
ENCODERS = ("pretrained", "random_init")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      store="",            # a labelled store to probe; "" = synthetic tissue (data.synthetic)
      synthetic_fovs=2,    # its FOVs, drawn with seed data.synthetic.seed + synthetic_seed
      synthetic_seed=1000,  # (other FOVs than the pool's)
      modes="single_cell,cell_region",
      ratios="2.5,2.0",    # cell_region: bounding box x ratio (each ratio its own rows)
      cap=224,             # cell_region: the largest window side, px
      max_cells=2000,      # a class-stratified sample of at most this many labelled cells
      k=11, folds=5,       # kNN neighbours (cosine); stratified folds of both probes
      random_init=True,    # also probe a randomly initialised U-Net (the baseline)
      memory_budget_mb=256.0))  # features held in memory (batches: predict.batch_size)


def _ratios(config) -> list[float]:
  try:
    return [float(r) for r in comma_list(config.probe.ratios)]
  except ValueError:
    return [-1.0]


def validate(config) -> None:
  p, check = config.probe, config_util.check
  modes = comma_list(p.modes)
  unknown = sorted(set(modes) - set(MODES))
  check(bool(modes) and not unknown, "probe.modes", f"{p.modes!r}",
        f"comma-separated names among {list(MODES)}")
  ratios = _ratios(config)
  check("cell_region" not in modes or (ratios and all(r > 0 for r in ratios)), "probe.ratios",
        f"{p.ratios!r}", "comma-separated positive ratios")
  check(p.cap >= 1, "probe.cap", f"{p.cap}", "a window side ≥ 1 px")
  check(p.k >= 1, "probe.k", f"{p.k}", "a number of neighbours ≥ 1")
  check(p.folds >= 2, "probe.folds", f"{p.folds}", "≥ 2 folds")
  check(p.max_cells >= 2 * p.folds, "probe.max_cells", f"{p.max_cells}", f"≥ {2 * p.folds}")
  check(p.memory_budget_mb > 0, "probe.memory_budget_mb", f"{p.memory_budget_mb}", "> 0 MiB")
  if p.store:
    store = open_store(p.store)
    check(bool(store.meta.classes), "probe.store", f"{p.store} has no cell classes",
          "a store with labels (ingest with labels)")
  else:
    check(p.synthetic_fovs >= 1, "probe.synthetic_fovs", f"{p.synthetic_fovs}", "≥ 1")


def open_probe_store(config, workdir) -> Store:
  """probe.store, or synthetic tissue of probe.synthetic_fovs FOVs (made once per workdir)."""
  p = config.probe
  if p.store:
    return stores.with_memory(open_store(p.store), config)
  settings = dict(config.data.synthetic.to_dict(), n_fovs=p.synthetic_fovs,
                  seed=config.data.synthetic.seed + p.synthetic_seed)

  def make(path):
    return synthetic.write_store(synthetic.generate(synthetic.from_config(settings)), path,
                                 chunk_size=config.data.chunk_size)
  return stores.with_memory(stores.derived_store(pathlib.Path(workdir), "probe_store", settings,
                                                 "probe.synthetic_fovs", make), config)


def probe_rows(config, store: Store) -> np.ndarray:
  """Rows of store.cells to probe: labelled cells of the classes with at least probe.folds
  of them (the rest cannot be cross-validated: left out, logged), at most probe.max_cells,
  each class sampled in proportion (seeded). Fewer than 2 classes is a ConfigError."""
  labels = store.label_ids()
  rows = np.flatnonzero(labels >= 0)
  counts = np.bincount(labels[rows], minlength=len(store.meta.classes))
  small = [c for c, n in zip(store.meta.classes, counts) if 0 < n < config.probe.folds]
  if small:
    logging.info("probe: classes with fewer than %d cells left out: %s", config.probe.folds,
                 ", ".join(small))
    rows = rows[counts[labels[rows]] >= config.probe.folds]
  kept = len(np.unique(labels[rows]))
  if kept < 2:
    raise ConfigError("probe.store" if config.probe.store else "probe.synthetic_fovs",
                      f"{store.path} has {kept} class(es) of at least {config.probe.folds} cells",
                      "a probe store with 2 or more classes of probe.folds cells each")
  if len(rows) > config.probe.max_cells:
    from sklearn.model_selection import train_test_split
    rows, _ = train_test_split(rows, train_size=config.probe.max_cells, stratify=labels[rows],
                               random_state=config.seed)
  return np.sort(rows)


def per_channel(trained: Trained, store: Store) -> Trained:
  """The one-channel ensemble taking every marker of `store`, one at a time."""
  return dataclasses.replace(trained, channels=store.meta.channels)


def encoders(config, trained: Trained, store: Store) -> dict[str, Trained]:
  out = {"pretrained": per_channel(trained, store)}
  if config.probe.random_init:
    out["random_init"] = embed_lib.random_like(out["pretrained"],
                                               jax.random.key(config.seed + 7919), in_channels=1)
  return out


def single_cell(config, trained: Trained, store: Store, rows: np.ndarray) -> np.ndarray:
  """[rows, K x 256] embeddings of crops centred on the cells."""
  e = embed_lib.embedder(trained, store, LAYERS, per_channel=True)
  chunks = list(embed_lib.embed_store(e, store, rows, batch_size=config.predict.batch_size,
                                      memory_budget=int(config.probe.memory_budget_mb * 2**20)))
  index = np.concatenate([i for i, _ in chunks])
  assert np.array_equal(index, rows), "embed_store hands rows back in order"
  return np.concatenate([x for _, x in chunks])


def embeddings(config, trained: Trained, store: Store, rows: np.ndarray
               ) -> dict[tuple[str, str], np.ndarray]:
  """{(mode, encoder): [rows, D]} for every mode of probe.modes (cell_region once per ratio,
  mode ``cell_region_<ratio>``)."""
  out = {}
  for name, enc in encoders(config, trained, store).items():
    for mode in comma_list(config.probe.modes):
      if mode == "single_cell":
        out[(mode, name)] = single_cell(config, enc, store, rows)
      else:
        from cellrep.infer import fields
        e = embed_lib.embedder(enc, store, LAYERS, per_channel=True)
        for ratio in _ratios(config):
          _, out[(f"cell_region_{ratio:g}", name)] = fields.cell_region_embeddings(
              e, store, rows, ratio=ratio, cap=config.probe.cap,
              batch_size=config.predict.batch_size)
  return out


def _probe_rows(config, x: np.ndarray, labels: np.ndarray) -> list[dict]:
  p = config.probe
  rows = []
  for probe, result in (("knn", probes.knn_probe(x, labels, k=p.k, folds=p.folds,
                                                 seed=config.seed)),
                        ("linear", probes.linear_probe(x, labels, folds=p.folds,
                                                       seed=config.seed))):
    rows.append({"probe": probe, **result.summary()})
  return rows


def probe_all(config, workdir, trained: Trained, store: Store) -> pd.DataFrame:
  """probes.parquet: one row per (mode, encoder, probe) with the probes' summaries."""
  rows = probe_rows(config, store)
  labels = np.asarray(store.meta.classes)[store.label_ids()[rows]]
  table = []
  for (mode, encoder), x in embeddings(config, trained, store, rows).items():
    for r in _probe_rows(config, x, labels):
      table.append({"mode": mode, "encoder": encoder, "cells": len(rows), "dims": x.shape[1], **r})
      logging.info("probe %s %s %s: balanced accuracy %.3f ± %.3f", mode, encoder, r["probe"],
                   r["balanced_accuracy"], r["balanced_accuracy_sd"])
  table = pd.DataFrame(table)
  files.write_table(table, pathlib.Path(workdir) / "probes.parquet")
  return table


def scalars(table: pd.DataFrame) -> dict[str, float]:
  """probe/<mode>/<encoder>/<probe>_<metric> for metrics.jsonl."""
  out = {}
  for _, r in table.iterrows():
    for m in ("balanced_accuracy", "accuracy", "mcc", "macro_f1"):
      if m in r:
        out[f"probe/{r['mode']}/{r['encoder']}/{r['probe']}_{m}"] = float(r[m])
  return out


def linear_score(config, trained: Trained, store: Store) -> float:
  """The single-cell linear probe's balanced accuracy of `trained` (the mask-ratio sweep)."""
  rows = probe_rows(config, store)
  labels = store.label_ids()[rows]
  x = single_cell(config, per_channel(trained, store), store, rows)
  return float(probes.linear_probe(x, labels, folds=config.probe.folds, seed=config.seed)
               .summary()["balanced_accuracy"])
