"""Crops centred on cells, read from a store: a Grain `RandomAccessDataSource`.

Element i is the crop of row i of `cells.parquet`:

  crop  [K + 2, S, S] float32: channels 0..K-1 the markers (raw store values),
        channel K the mask of all cells in the window (segmentation > 0, the
        centre cell included), channel K+1 the centre cell's own mask.
  label int32: class index, -1 for unlabelled cells.
  index int64: the cell's row in `cells.parquet`.

The channel order and meaning of the masks are CellSighter's (data/data.py stacks
image, `all_cells_mask` = cells > 0, then the cell's `mask`). Unlike CellSighter,
which silently drops cells whose window leaves the image, a window reaching past
a FOV edge is zero-padded: every cell gets a prediction.
"""

from __future__ import annotations

import numpy as np

from cellrep.data.store import Store, open_store

# A crop's extra channels after the K markers.
ALL_CELLS_CHANNEL = -2
CELL_CHANNEL = -1
NUM_MASK_CHANNELS = 2


def window(center: int, size: int, extent: int) -> tuple[int, int, int, int]:
  """Source [lo, hi) clipped to [0, extent) and where it lands in a window of `size`."""
  lo = center - size // 2
  hi = lo + size
  src_lo, src_hi = max(lo, 0), min(hi, extent)
  return src_lo, src_hi, src_lo - lo, src_hi - lo


class CropSource:
  """Random access to cell-centred crops; implements Grain's RandomAccessDataSource protocol.

  Pickles cheaply for Grain workers: the store reopens its TensorStore handles lazily.
  """

  def __init__(self, store: Store | str, crop_size: int):
    self.store = open_store(store) if not isinstance(store, Store) else store
    self.crop_size = int(crop_size)
    cells = self.store.cells
    self._fov = cells.fov.to_numpy(np.int64)
    self._y = cells.y.to_numpy(np.int64)
    self._x = cells.x.to_numpy(np.int64)
    self._cell_id = cells.cell_id.to_numpy(np.int64)
    self._label = self.store.label_ids(cells)
    self.num_channels = len(self.store.meta.channels) + NUM_MASK_CHANNELS

  def __len__(self) -> int:
    return len(self._fov)

  def __repr__(self) -> str:
    return f"CropSource({self.store!r}, crop_size={self.crop_size})"

  @property
  def labels(self) -> np.ndarray:
    """[N] int32 class index per cell, -1 unlabelled."""
    return self._label

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    s = self.crop_size
    fov = int(self._fov[index])
    height, width = self.store.meta.padded_shape
    y0, y1, wy0, wy1 = window(int(self._y[index]), s, height)
    x0, x1, wx0, wx1 = window(int(self._x[index]), s, width)
    images = self.store.images[fov, :, y0:y1, x0:x1].read()
    masks = self.store.masks[fov, y0:y1, x0:x1].read()
    crop = np.zeros((self.num_channels, s, s), np.float32)
    crop[:ALL_CELLS_CHANNEL, wy0:wy1, wx0:wx1] = images.result()
    seg = masks.result()
    crop[ALL_CELLS_CHANNEL, wy0:wy1, wx0:wx1] = seg > 0
    crop[CELL_CHANNEL, wy0:wy1, wx0:wx1] = seg == self._cell_id[index]
    return {"crop": crop, "label": self._label[index], "index": np.int64(index)}
