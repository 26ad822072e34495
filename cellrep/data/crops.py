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

`read(indices)` reads a batch at once, the fast path (`cellrep.data.pipeline`
uses it): crops of one FOV come from that FOV held decoded in memory when it
is there, or when the batch has enough of its cells that decoding the whole FOV
costs less than decoding the chunks under each crop; the others are TensorStore
window reads, all issued before any is awaited so that TensorStore decodes them
in parallel. Decoded FOVs are kept, least recently used first out, up to
`fov_cache_bytes`; with FOV-local sampling (`EpochSampler(fov_window=...)`) a
FOV is decoded about once per epoch.
"""

from __future__ import annotations

import collections
import threading
from concurrent import futures

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

  fov_cache_bytes: memory for whole decoded FOVs (images and masks); 0 turns it off;
  None: the store's `fov_cache_bytes` (1 GiB unless set).
  Pickles cheaply for Grain workers: the store reopens its TensorStore handles
  lazily and the FOV cache starts empty.
  """

  def __init__(self, store: Store | str, crop_size: int, fov_cache_bytes: int | None = None):
    self.store = open_store(store) if not isinstance(store, Store) else store
    self.crop_size = int(crop_size)
    self.fov_cache_bytes = int(self.store.fov_cache_bytes if fov_cache_bytes is None
                               else fov_cache_bytes)
    cells = self.store.cells
    self._fov = cells.fov.to_numpy(np.int64)
    self._y = cells.y.to_numpy(np.int64)
    self._x = cells.x.to_numpy(np.int64)
    self._cell_id = cells.cell_id.to_numpy(np.int64)
    self._label = self.store.label_ids(cells)
    self.num_channels = len(self.store.meta.channels) + NUM_MASK_CHANNELS
    self._init_cache()

  def _init_cache(self):
    meta = self.store.meta
    h, w = meta.padded_shape
    pixel = len(meta.channels) * np.dtype(meta.dtype).itemsize + 4  # markers + int32 mask
    self._fov_bytes = h * w * pixel
    self._all_fit = self._fov_bytes * len(meta.fovs) <= self.fov_cache_bytes
    self._lock = threading.Lock()
    self._fovs: collections.OrderedDict[int, futures.Future] = collections.OrderedDict()

  def __getstate__(self):
    state = self.__dict__.copy()
    for key in ("_lock", "_fovs"):
      state.pop(key)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return len(self._fov)

  def __repr__(self) -> str:
    return f"CropSource({self.store!r}, crop_size={self.crop_size})"

  @property
  def labels(self) -> np.ndarray:
    """[N] int32 class index per cell, -1 unlabelled."""
    return self._label

  @property
  def fovs(self) -> np.ndarray:
    """[N] int64 FOV index per cell."""
    return self._fov

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    batch = self.read(np.array([int(index)]))
    return {"crop": batch["crop"][0], "label": batch["label"][0], "index": batch["index"][0]}

  def read(self, indices) -> dict[str, np.ndarray]:
    """Crops of cells `indices` [B]: crop [B, K+2, S, S] float32, label [B] int32, index [B]."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    out = np.empty((len(indices), self.num_channels, self.crop_size, self.crop_size), np.float32)
    fov = self._fov[indices]
    in_memory, pending = [], []
    for f in np.unique(fov).tolist():
      rows = np.flatnonzero(fov == f)
      whole = self._whole_fov(f, len(rows))
      if whole is not None:
        in_memory.append((rows, whole))
      else:  # issue every window read first: TensorStore decodes them in parallel
        pending.extend((r, self._start_read(int(indices[r]))) for r in rows.tolist())
    for rows, whole in in_memory:
      image, mask = whole.result()
      for r in rows.tolist():
        y0, y1, x0, x1, win = self._window(int(indices[r]))
        self._fill(out[r], image[:, y0:y1, x0:x1], mask[y0:y1, x0:x1], win, int(indices[r]))
    for r, (image, mask, win) in pending:
      self._fill(out[r], image.result(), mask.result(), win, int(indices[r]))
    return {"crop": out, "label": self._label[indices], "index": indices}

  def _window(self, index: int):
    height, width = self.store.meta.padded_shape
    y0, y1, wy0, wy1 = window(int(self._y[index]), self.crop_size, height)
    x0, x1, wx0, wx1 = window(int(self._x[index]), self.crop_size, width)
    return y0, y1, x0, x1, (wy0, wy1, wx0, wx1)

  def _start_read(self, index: int):
    y0, y1, x0, x1, win = self._window(index)
    fov = int(self._fov[index])
    return (self.store.images[fov, :, y0:y1, x0:x1].read(),
            self.store.masks[fov, y0:y1, x0:x1].read(), win)

  def _fill(self, crop: np.ndarray, image, mask, win, index: int) -> None:
    """crop [K+2, S, S] <- markers image [K, h, w] and mask [h, w] placed at win, zeros around."""
    wy0, wy1, wx0, wx1 = win
    s = self.crop_size
    if wy1 - wy0 < s or wx1 - wx0 < s:
      crop[...] = 0
    crop[:ALL_CELLS_CHANNEL, wy0:wy1, wx0:wx1] = image
    np.greater(mask, 0, out=crop[ALL_CELLS_CHANNEL, wy0:wy1, wx0:wx1], casting="unsafe")
    np.equal(mask, self._cell_id[index], out=crop[CELL_CHANNEL, wy0:wy1, wx0:wx1],
             casting="unsafe")

  def _whole_fov(self, fov: int, crops: int) -> futures.Future | None:
    """A future of FOV `fov` decoded whole ([K, H, W], [H, W]), or None to read windows instead.

    A FOV not yet in memory is read whole when every FOV fits in the cache, or when
    decoding it costs no more than decoding the chunks under `crops` crops.
    """
    with self._lock:
      held = self._fovs.get(fov)
      if held is not None:
        self._fovs.move_to_end(fov)
        return held
      if self._fov_bytes > self.fov_cache_bytes:
        return None
      h, w = self.store.meta.padded_shape
      chunk = self.store.meta.chunk_size
      if not (self._all_fit or crops * (self.crop_size + chunk) ** 2 >= h * w):
        return None
      loading = futures.Future()
      self._fovs[fov] = loading
      while len(self._fovs) * self._fov_bytes > self.fov_cache_bytes:
        self._fovs.popitem(last=False)
    try:  # outside the lock: other threads go on with FOVs already in memory
      image = self.store.images[fov].read()
      mask = self.store.masks[fov].read()
      loading.set_result((image.result(), mask.result()))
    except BaseException as e:
      with self._lock:
        self._fovs.pop(fov, None)
      loading.set_exception(e)
      raise
    return loading
