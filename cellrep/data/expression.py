"""Per-cell marker expression: the mean intensity of each channel inside each cell's mask.

This is the feature table of classic cell typing (gating, clustering, the
XGBoost baseline of CellSighter's paper). It is computed FOV by FOV with
`np.bincount` over the label image, so the cost is a few passes over the pixels
whatever the number of cells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellrep.data.store import Store


def fov_means(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean of each channel over each cell.

  Args:
    image: [K, H, W] pixel values (counts).
    mask: [H, W] int cell ids, 0 = background.

  Returns:
    means: [max_id + 1, K] float64, row i = cell i (NaN where a cell has no pixels).
    area: [max_id + 1] int64, pixels per cell id.
  """
  ids = mask.ravel().astype(np.intp)
  n = int(ids.max(initial=0)) + 1
  area = np.bincount(ids, minlength=n)
  sums = np.stack([np.bincount(ids, weights=channel.ravel(), minlength=n) for channel in image],
                  axis=1) if len(image) else np.zeros((n, 0))
  with np.errstate(invalid="ignore", divide="ignore"):
    return sums / area[:, None], area


def expression_matrix(store: Store, cells: pd.DataFrame | None = None, *,
                      cofactor: float | None = None) -> pd.DataFrame:
  """Mean intensity per cell and channel.

  Args:
    store: the dataset store.
    cells: rows of `store.cells` to compute (default all); needs `fov`, `cell_id`.
    cofactor: when given, values are `arcsinh(mean / cofactor)`, the usual
      variance-stabilising transform of count data (5 for mass cytometry/MIBI).

  Returns:
    [cells, channels] float64 DataFrame, index = `cells.index`, columns = the
    store's channel names; units are the store's pixel units (or arcsinh of them).
  """
  cells = store.cells if cells is None else cells
  out = np.full((len(cells), len(store.meta.channels)), np.nan)
  fov = cells["fov"].to_numpy()
  cell_id = cells["cell_id"].to_numpy(np.intp)
  for f in np.unique(fov):
    rows = np.flatnonzero(fov == f)
    image, mask = store.read_fov(int(f))
    means, _ = fov_means(image, mask)
    ids = cell_id[rows]
    if ids.max(initial=0) >= len(means):
      raise ValueError(f"cell ids {ids[ids >= len(means)][:5]} not in FOV {int(f)}'s mask")
    out[rows] = means[ids]
  if cofactor is not None:
    if cofactor <= 0:
      raise ValueError(f"cofactor {cofactor} must be positive")
    out = np.arcsinh(out / cofactor)
  return pd.DataFrame(out, index=cells.index, columns=list(store.meta.channels))
