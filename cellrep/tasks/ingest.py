"""The ingest job: raw images → a dataset store, optionally with gated landmark labels.

Reads `config.ingest` (see configs/ingest.py), writes the store to
`config.ingest.output` or `WORKDIR/store`, and logs what it holds.
"""

from __future__ import annotations

import pathlib
import shutil
import uuid

from absl import logging

from cellrep import config_util, distributed, files
from cellrep.data import gating, ingest
from cellrep.data.store import Store, open_store
from cellrep.errors import ConfigError, InputError


def _check(config) -> None:
  config_util.check_choice(config, "ingest.format", ingest.FORMATS)
  config_util.check(bool(config.ingest.input), "ingest.input", "not set",
                    "the folder to ingest, e.g. --config.ingest.input=../shared/data/mibi_fov8")
  config_util.check(config.ingest.chunk_size > 0, "ingest.chunk_size",
                    f"{config.ingest.chunk_size}", "a positive number of pixels")
  config_util.check(not (config.gating.rules and config.ingest.labels), "gating.rules",
                    "set together with ingest.labels", "one source of labels")
  config_util.check(0 <= config.gating.percentile < 100, "gating.percentile",
                    f"{config.gating.percentile}", "a percentile in [0, 100)")


def summary(store: Store) -> str:
  """One paragraph: cells, channels, FOVs and cells per class."""
  cells, meta = store.cells, store.meta
  counts = cells["label"].value_counts()
  per_class = ", ".join(f"{c}: {int(counts.get(c, 0))}" for c in meta.classes) or "none"
  return (f"{store.path}: {len(cells)} cells in {len(meta.fovs)} FOVs, "
          f"{len(meta.channels)} channels ({', '.join(meta.channels)}), {meta.dtype} pixels; "
          f"classes {per_class}; unlabelled {int(cells['label'].isna().sum())}")


def run(config, workdir: pathlib.Path) -> Store:
  """Process 0 of a run of several ingests; the others wait for it and open the store."""
  _check(config)
  out = pathlib.Path(config.ingest.output or pathlib.Path(workdir) / "store")
  with distributed.writer_first(f"ingest {out}") as writer:
    return _ingest(config, out) if writer else open_store(out)


def _ingest(config, out: pathlib.Path) -> Store:
  rules = gating.parse_rules(config.gating.rules) if config.gating.rules else None
  if out.exists() and not config.ingest.overwrite:  # before minutes of reading, not after
    raise InputError(out, "already exists", "a new store path, or --config.ingest.overwrite=true")
  problem = files.writable_dir_problem(out.parent)
  if problem:
    raise ConfigError("ingest.output", f"{out}: its folder {out.parent} {problem}",
                      "a store path in a folder that can be written")
  logging.info("ingesting %s (%s) into %s", config.ingest.input, config.ingest.format, out)
  if rules is None:
    with config_util.config_keys("ingest"):
      store = ingest.ingest(config.ingest, out=out)
  else:
    # Ingest beside the target, gate, and write the labelled store in its place;
    # the unlabelled one never appears at `out`.
    raw = out.parent / f".{out.name}.ungated-{uuid.uuid4().hex[:8]}"
    try:
      with config_util.config_keys("ingest"):
        store = ingest.ingest(config.ingest, out=raw)
      with config_util.config_keys("gating"):
        store = gating.gate_and_relabel(store, rules, out, percentile=config.gating.percentile,
                                        overwrite=config.ingest.overwrite)
    finally:
      shutil.rmtree(raw, ignore_errors=True)
  logging.info("wrote %s", summary(store))
  return store
