"""Microsnoop's full-field and batch-experiment modes (Xun et al. 2024): inputs made from whole
FOVs, their embeddings averaged per FOV, and FOV (or well) profiles sphered per plate.

Images are [K, H, W] markers in the store's channel order; every mode makes [n, K, s, s]
float32 network inputs (s: the network's input side, 224 px in Microsnoop) that
`embed_arrays` embeds as the store's crops are (`cellrep.infer.embed`), [n, D]:

- ``cell_region`` (`cell_regions`): a square window on each cell's bounding box, of side
  min(cap, ceil(ratio x the box's longer side)) (ratio 2.5 by default, 2.0 tested; cap 224),
  centred on the box, zeros outside the image; a window under s is zero-padded, centred,
  to s x s, one over s (cap > s) is area-resized to s. The FOV: the mean of its cells'.
  Microsnoop (crop.py) differs: it applies the ratio to the half-side (side ~ 2 x ratio x
  box), clips windows at the image edge (the cell off-centre) and skips cells touching it.
- ``rescale`` (`rescale`): the FOV zero-padded, centred, to a square (Microsnoop's
  square_image), then area-resized to s x s: one input per FOV.
- ``tile`` (`tiles`): s x s tiles at stride round(s x (1 - overlap)) (overlap 0.1), the
  last on each axis flush with the far edge; a side under s is zero-padded, centred, to s.
  The FOV: the mean of its tiles'. Microsnoop uses Cellpose's make_tiles (ceil((1 + 2
  overlap) L / s) tiles evenly spaced): the same coverage, slightly different origins.

Resizing is area (box-filter) averaging: each output pixel the mean of the input it covers,
exact block means for integer factors. Microsnoop resizes with OpenCV's bilinear, which is
the same for a factor of 2 and aliases at larger ones. Each input is normalised by the
embedder's preprocessing after it is made, as Microsnoop normalises after resizing / tiling.

Batch experiments: `cellrep.profiling.aggregate.batch_experiment_profiles`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import scipy.ndimage

from cellrep import distributed
from cellrep.data.crops import NUM_MASK_CHANNELS, window
from cellrep.data.pipeline import data_sharding
from cellrep.data.store import Store
from cellrep.errors import BadValue, InputError
from cellrep.infer.embed import Embedder
from cellrep.infer.predict import device_outputs
from cellrep.infer.trained import array_batches

MODES = ("cell_region", "rescale", "tile")


def _check_int(name: str, value, lowest: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
    raise BadValue(name, f"{value!r}", f"an integer >= {lowest}")
  return int(value)


def _check_number(name: str, value, ok: Callable[[float], bool], expected: str) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not ok(value)):
    raise BadValue(name, f"{value!r}", expected)
  return float(value)


def _check_overlap(overlap) -> float:
  return _check_number("overlap", overlap, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _check_ratio(ratio) -> float:
  return _check_number("ratio", ratio, lambda v: 0 < v < math.inf,
                       "a positive window-to-box ratio (Microsnoop: 2.5, 2.0)")


def _check_image(image, mask=None) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3:
    raise BadValue("image", f"shape {image.shape}", "[K, H, W] markers")
  if mask is not None and np.shape(mask) != image.shape[1:]:
    raise BadValue("mask", f"shape {np.shape(mask)}", f"{image.shape[1:]}, the image's [H, W]")
  return image


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float64: the share of input pixel j in output pixel i's footprint
  [i n_in / n_out, (i + 1) n_in / n_out), rows summing to 1."""
  edges = np.arange(n_out + 1) * (n_in / n_out)
  j = np.arange(n_in)[None, :]
  cover = np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)
  return np.clip(cover, 0.0, None) * (n_out / n_in)


def resize_area(image: np.ndarray, size: int) -> np.ndarray:
  """[K, H, W] -> [K, size, size] float32 by area averaging (box filter; up-sizing spreads
  each pixel over the outputs it covers)."""
  image = _check_image(image)
  size = _check_int("size", size)
  wy, wx = _area_weights(image.shape[1], size), _area_weights(image.shape[2], size)
  # One channel at a time in float64: host memory of one plane, sums exact enough.
  return np.stack([wy @ plane.astype(np.float64) @ wx.T for plane in image]).astype(np.float32)


def _pad_centred(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
  """image [K, h, w] zero-padded to at least [K, height, width], the extra split as
  Microsnoop's pad_image (the smaller half first); and the padding before (y, x)."""
  _, h, w = image.shape
  py, px = max(height - h, 0), max(width - w, 0)
  if not (py or px):
    return image, 0, 0
  pads = ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2))
  return np.pad(image, pads), py // 2, px // 2


def rescale(image, size: int) -> np.ndarray:
  """[K, H, W] -> [K, size, size] float32: the FOV zero-padded, centred, to a square of its
  longer side, then area-resized to size."""
  image = _check_image(image)
  size = _check_int("size", size)
  side = max(image.shape[1:])
  return resize_area(_pad_centred(image, side, side)[0], size)


def _axis_origins(extent: int, size: int, stride: int) -> list[int]:
  return list(range(0, extent - size, stride)) + [extent - size]


def tile_origins(shape: tuple[int, int], size: int = 224, overlap: float = 0.1) -> np.ndarray:
  """[T, 2] int64 (y, x) of each tile's first pixel in an [H, W] image, row-major: stride
  round(size x (1 - overlap)) (half up, at least 1), the last tile flush with the far
  edge; an axis shorter than size has one tile at -(padding before), as `tiles` pads it."""
  size, overlap = _check_int("size", size), _check_overlap(overlap)
  stride = max(1, math.floor(size * (1 - overlap) + 0.5))
  axes = [_axis_origins(n, size, stride) if n >= size else [-((size - n) // 2)] for n in shape]
  return np.array([(y, x) for y in axes[0] for x in axes[1]], np.int64).reshape(-1, 2)


def _cut_tiles(padded: np.ndarray, origins: np.ndarray, pad: tuple[int, int], size: int):
  return np.stack([padded[:, y + pad[0]:y + pad[0] + size, x + pad[1]:x + pad[1] + size]
                   for y, x in origins]).astype(np.float32, copy=False)


def tiles(image, size: int = 224, overlap: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """[K, H, W] -> (tiles [T, K, size, size] float32, origins [T, 2] as `tile_origins`):
  tile t is image[:, y:y + size, x:x + size] at origins[t], zeros where it leaves the image."""
  image = _check_image(image)
  origins = tile_origins(image.shape[1:], size, overlap)
  padded, py, px = _pad_centred(image, size, size)
  return _cut_tiles(padded, origins, (py, px), size), origins


def cell_regions(image, mask, cell_ids, *, ratio: float = 2.5, cap: int = 224,
                 size: int = 224) -> np.ndarray:
  """[n, K, size, size] float32: the window of each cell of `cell_ids` (ids of `mask` [H, W])
  on image [K, H, W]. Side min(cap, ceil(ratio x the box's longer side)); the window starts
  at the box's centre row (first row + height // 2) minus side // 2 (columns alike), as
  crops are centred; zeros outside the image; centred zero padding below size, area
  resizing above it."""
  image = _check_image(image, mask)
  ratio, cap, size = _check_ratio(ratio), _check_int("cap", cap), _check_int("size", size)
  ids = np.asarray(cell_ids, np.int64).reshape(-1)
  boxes = scipy.ndimage.find_objects(np.asarray(mask)) if ids.size else []
  k, height, width = image.shape
  out = np.zeros((len(ids), k, size, size), np.float32)
  for i, cid in enumerate(ids.tolist()):
    box = boxes[cid - 1] if 0 < cid <= len(boxes) else None
    if box is None:
      raise BadValue("cell_ids", f"cell {cid} has no pixels in the mask", "ids of cells in it")
    (r0, r1), (c0, c1) = (box[0].start, box[0].stop), (box[1].start, box[1].stop)
    # round(): 2.2 x 5 is 11.000000000000002 in floating point, a window of 11, not 12.
    side = min(cap, math.ceil(round(ratio * max(r1 - r0, c1 - c0), 9)))
    y0, y1, wy0, wy1 = window(r0 + (r1 - r0) // 2, side, height)
    x0, x1, wx0, wx1 = window(c0 + (c1 - c0) // 2, side, width)
    win = np.zeros((k, side, side), np.float32)
    win[:, wy0:wy1, wx0:wx1] = image[:, y0:y1, x0:x1]
    if side > size:
      out[i] = resize_area(win, size)
    else:
      at = (size - side) // 2
      out[i, :, at:at + side, at:at + side] = win
  return out


class _WithMasks:
  """arrays [N, K, S, S] read a slice at a time with the crop layout's two mask channels
  appended, ones (the whole input is the object, so an embedder that isolates the centre
  cell keeps it all): what an embedder's preprocessing takes."""

  def __init__(self, arrays):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(self.arrays)

  def __getitem__(self, rows: slice) -> np.ndarray:
    x = np.asarray(self.arrays[rows], np.float32)
    return np.concatenate([x, np.ones((len(x), NUM_MASK_CHANNELS) + x.shape[2:], np.float32)], 1)


def embed_arrays(e: Embedder, arrays, *, batch_size: int = 64) -> np.ndarray:
  """[N, D] float32 member-mean embeddings (e.names) of arrays [N, K, S, S] held in memory:
  K the markers of the store the embedder was made for, in its order (then mapped to the
  model's channels and normalised by its preprocessing); S any side (the centre
  input_size, zero-padded when smaller), S = trained.crop_size reproducing `embed_store`.
  The two mask channels are fed as ones (the input is the object): these inputs are for
  marker-only models (Microsnoop's). A batch at a time, data-parallel over the mesh."""
  if np.ndim(arrays) != 4 or np.shape(arrays)[2] != np.shape(arrays)[3]:
    raise BadValue("arrays", f"shape {np.shape(arrays)}", "[N, K, S, S] markers")
  trained = e.trained
  data = trained.mesh.shape["data"]
  size = -(-_check_int("batch_size", batch_size) // data) * data
  sharding = data_sharding(trained.mesh)
  out = np.zeros((len(arrays), len(e.names)), np.float32)
  batches = array_batches(_WithMasks(arrays), size, distributed.local_rows(sharding, size))
  for index, features in device_outputs(e.fn, trained.variables, batches, sharding):
    keep = index >= 0
    out[index[keep]] = features.mean(axis=0)[keep]
  return out


def _embed_chunks(e: Embedder, n: int, make: Callable[[int, int], np.ndarray],
                  batch_size: int) -> np.ndarray:
  """[n, D] embeddings of make(start, stop) -> arrays of items start..stop-1, a batch of
  items at a time: host memory of one batch of inputs, whatever n."""
  parts = [embed_arrays(e, make(s, min(s + batch_size, n)), batch_size=batch_size)
           for s in range(0, n, batch_size)]
  return np.concatenate(parts) if parts else np.zeros((0, len(e.names)), np.float32)


def _cell_rows(e: Embedder, store: Store, image, mask, rows: np.ndarray, ratio, cap,
               batch_size) -> np.ndarray:
  ids = store.cells.cell_id.to_numpy(np.int64)[rows]
  return _embed_chunks(e, len(ids), lambda a, b: cell_regions(
      image, mask, ids[a:b], ratio=ratio, cap=cap, size=e.trained.input_size), batch_size)


def check_outlines(store: Store, rows: np.ndarray) -> None:
  """Raises InputError naming the store when a cell of `rows` (of store.cells) has no
  outline (area 0: a store of nuclei centres): cell_region mode needs each cell's box."""
  flat = rows[store.cells.area.to_numpy()[rows] <= 0]
  if flat.size:
    fov = store.cells.fov_name.iloc[int(flat[0])]
    raise InputError(store.path, f"{flat.size} cells without an outline (area 0), the first "
                     f"in FOV {fov}", "a segmentation mask: cell_region mode needs each "
                     "cell's bounding box")


def cell_region_embeddings(e: Embedder, store: Store, indices=None, *, ratio: float = 2.5,
                           cap: int = 224, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(rows of store.cells [n] as given (default all), [n, D] float32): each cell's
  cell-region embedding (`cell_regions` at the network's input side); each FOV read once."""
  ratio, cap = _check_ratio(ratio), _check_int("cap", cap)
  rows = np.arange(len(store.cells)) if indices is None else np.asarray(indices, np.int64)
  check_outlines(store, rows)
  fov = store.cells.fov.to_numpy(np.int64)[rows]
  out = np.zeros((len(rows), len(e.names)), np.float32)
  for f in np.unique(fov).tolist():
    at = np.flatnonzero(fov == f)
    image, mask = store.read_fov(f)
    out[at] = _cell_rows(e, store, image, mask, rows[at], ratio, cap, batch_size)
  return rows, out


def fov_embeddings(e: Embedder, store: Store, mode: str, *, ratio: float = 2.5, cap: int = 224,
                   overlap: float = 0.1, fovs: Sequence[str] | None = None,
                   batch_size: int = 64) -> tuple[tuple[str, ...], np.ndarray]:
  """(FOV names, [F, D] float32): each FOV's embedding in `mode` (MODES), the mean of its
  inputs' (cells', tiles'; rescale's one) at the network's input side. fovs: names
  (default all the store's), each read once."""
  if mode not in MODES:
    raise BadValue("mode", f"{mode!r}", f"one of {MODES}")
  ratio, cap, overlap = _check_ratio(ratio), _check_int("cap", cap), _check_overlap(overlap)
  names = tuple(store.meta.fovs if fovs is None else fovs)
  unknown = sorted(set(names) - set(store.meta.fovs))
  if unknown:
    raise BadValue("fovs", f"unknown FOVs {unknown[:10]}", f"names among {list(store.meta.fovs)[:20]}")
  size = e.trained.input_size
  fov_of_cell = store.cells.fov.to_numpy(np.int64)
  out = np.zeros((len(names), len(e.names)), np.float32)
  for i, name in enumerate(names):
    f = store.meta.fovs.index(name)
    image, mask = store.read_fov(f)
    if mode == "cell_region":
      rows = np.flatnonzero(fov_of_cell == f)
      check_outlines(store, rows)
      parts = _cell_rows(e, store, image, mask, rows, ratio, cap, batch_size)
    elif mode == "rescale":
      parts = embed_arrays(e, rescale(image, size)[None], batch_size=batch_size)
    else:
      origins = tile_origins(image.shape[1:], size, overlap)
      padded, py, px = _pad_centred(image, size, size)
      parts = _embed_chunks(e, len(origins), lambda a, b: _cut_tiles(
          padded, origins[a:b], (py, px), size), batch_size)
    out[i] = parts.mean(axis=0)
  return names, out
