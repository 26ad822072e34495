"""Single-cell features in DeepProfiler's output layout, as pycytominer's DeepProfiler loader reads it.

  DIR/index.csv                              Metadata_Plate, Metadata_Well, Metadata_Site (one row a site)
  DIR/features/<plate>/<well>_<site>.npz     features [cells, D] float32, locations [cells, 2] (x, y),
                                             metadata {Plate, Well, Site, Model}

(`pycytominer.cyto_utils.DeepProfiler_processing.DeepProfilerData(index, DIR/features)`,
`cyto_utils.load.load_npz_features` / `load_npz_locations`). A site is the cells' plate,
well and site; cells without those columns (tissue) are one site per FOV: plate ``cells``,
well the FOV's name, site 1. Rows arrive in chunks, grouped by site as they come; a site
met again later is appended to its file.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd

from cellrep import files

SITE = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")


def site_keys(cells: pd.DataFrame) -> pd.DataFrame:
  """[cells, 3] strings: each cell's plate, well and site."""
  if all(c in cells for c in SITE):
    return cells[list(SITE)].astype(str).reset_index(drop=True)
  return pd.DataFrame({"Metadata_Plate": "cells",
                       "Metadata_Well": cells.fov_name.astype(str).to_numpy(),
                       "Metadata_Site": "1"})


class Writer:
  """Writes chunks of (cells rows of cells.parquet, features [n, D]) into `directory`."""

  def __init__(self, directory, model: str = "cellrep"):
    self.dir = pathlib.Path(directory)
    self.model = model
    self.sites: list[tuple[str, str, str]] = []
    self._key: tuple | None = None
    self._parts: list[tuple[np.ndarray, np.ndarray]] = []

  def add(self, cells: pd.DataFrame, features: np.ndarray) -> None:
    keys = site_keys(cells).itertuples(index=False, name=None)
    locations = cells[["x", "y"]].to_numpy(np.float32)
    keys = list(keys)
    start = 0
    for i in range(1, len(keys) + 1):
      if i == len(keys) or keys[i] != keys[start]:
        self._take(tuple(keys[start]), features[start:i], locations[start:i])
        start = i

  def _take(self, key, features, locations) -> None:
    if key != self._key:
      self._flush()
      self._key = key
    self._parts.append((features.astype(np.float32), locations))

  def _path(self, key) -> pathlib.Path:
    plate, well, site = key
    return self.dir / "features" / plate / f"{well}_{site}.npz"

  def _flush(self) -> None:
    if self._key is None or not self._parts:
      return
    key, path = self._key, self._path(self._key)
    features = np.concatenate([f for f, _ in self._parts])
    locations = np.concatenate([l for _, l in self._parts])
    if key in self.sites:  # met again: append to what is there
      with np.load(path, allow_pickle=True) as old:
        features = np.concatenate([old["features"], features])
        locations = np.concatenate([old["locations"], locations])
    else:
      self.sites.append(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.temporary(path)
    plate, well, site = key
    with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix to it
      np.savez(f, features=features, locations=locations,
               metadata={"Plate": plate, "Well": well, "Site": site, "Model": self.model})
    tmp.replace(path)
    self._parts = []

  def close(self) -> int:
    """Writes the last site and index.csv; returns the number of sites."""
    self._flush()
    self._key = None
    files.write_table(pd.DataFrame(self.sites, columns=list(SITE)), self.dir / "index.csv")
    return len(self.sites)
