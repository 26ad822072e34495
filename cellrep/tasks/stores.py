"""The store a run reads: given, generated (synthetic), ingested (a CellSighter folder), then
gated; a store the run makes is made once per work directory and reused when it resumes."""

from __future__ import annotations

import json
import pathlib
from typing import Callable

from absl import logging

from cellrep import config_util, distributed, files
from cellrep.config_util import comma_list
from cellrep.data import gating, ingest, synthetic
from cellrep.data.store import Store, open_store
from cellrep.errors import ConfigError


def memory_defaults() -> dict:
  """The data.* keys bounding a run's read caches (every task reading a store has them)."""
  return dict(fov_cache_mb=1024,         # decoded FOVs a crop reader holds (one per Grain worker)
              tensorstore_cache_mb=256)  # TensorStore's chunk cache, per array of the store


def check_memory(config) -> None:
  for key in ("fov_cache_mb", "tensorstore_cache_mb"):
    value = config.data[key]
    config_util.check(value >= 0, f"data.{key}", f"{value}", "a size in MiB ≥ 0 (0: no cache)")


def with_memory(store: Store, config) -> Store:
  """`store` with the cache sizes of config.data (`memory_defaults`' keys)."""
  return store.with_memory(cache_bytes=int(config.data.tensorstore_cache_mb * 2**20),
                           fov_cache_bytes=int(config.data.fov_cache_mb * 2**20))


def derived_store(workdir: pathlib.Path, name: str, settings: dict, key: str,
                   make: Callable[[pathlib.Path], Store]) -> Store:
  """workdir/name, made once by `make` (by process 0 of a run of several, the others open it);
  a resumed run must ask for the same settings."""
  path = workdir / name
  stamp = workdir / f"{name}.{key.split('.')[-1]}.json"
  wanted = json.dumps(settings, sort_keys=True)
  with distributed.writer_first(f"store {path}") as writer:
    if path.exists() or not writer:
      if stamp.exists() and stamp.read_text() != wanted:
        raise ConfigError(key, f"differs from the settings that made {path}",
                          "the same settings, or a new --workdir")
      return open_store(path)
    store = make(path)
    files.write_text(stamp, wanted)
    return store


def open_run_store(config, workdir: pathlib.Path) -> Store:
  """The store the run reads: given, generated, ingested from a CellSighter folder; then gated."""
  workdir = pathlib.Path(workdir)
  d = config.data
  if d.source == "synthetic":
    def make(path):
      with config_util.config_keys("data.synthetic"):
        cfg = synthetic.from_config(d.synthetic)
      logging.info("generating synthetic tissue: %s", cfg)
      return synthetic.write_store(synthetic.generate(cfg), path, chunk_size=d.chunk_size)
    store = derived_store(workdir, "store", d.synthetic.to_dict(), "data.synthetic", make)
  elif d.source == "cellsighter":
    settings = dict(d.cellsighter.to_dict(),
                    fovs=comma_list(d.train_fovs) + comma_list(d.val_fovs))

    def make(path):
      logging.info("ingesting CellSighter folder %s", d.cellsighter.root)
      fovs = list(dict.fromkeys(settings["fovs"])) or None
      return ingest.ingest_cellsighter(
          d.cellsighter.root, path, class_names=d.cellsighter.class_names or None,
          channels_file=d.cellsighter.channels_file or None,
          blacklist=d.cellsighter.blacklist or None, fovs=fovs, chunk_size=d.chunk_size)
    store = derived_store(workdir, "store", settings, "data.cellsighter", make)
  else:
    store = open_store(d.store)
  if d.gating.rules:
    rules = gating.parse_rules(d.gating.rules)

    def make(path):
      logging.info("gating landmark labels: %s", d.gating.rules)
      with config_util.config_keys("data.gating"):
        return gating.gate_and_relabel(store, rules, path, percentile=d.gating.percentile)
    store = derived_store(workdir, "store_gated", dict(d.gating.to_dict(), store=str(store.path)),
                          "data.gating", make)
  return with_memory(store, config)
