"""The dataset store: what every cellrep job reads.

A store is a directory::

  store.json      channels, classes, fov names, each FOV's true [height, width]
  images.zarr     zarr3 (TensorStore) [fov, channel, y, x], zstd, chunks [1, K, c, c]
  masks.zarr      zarr3 [fov, y, x] int32 cell ids, 0 = background, chunks [1, c, c]
  cells.parquet   one row per cell: cell_id, fov, fov_name, y, x, area, label,
                  plus any Metadata_* columns

FOVs of different sizes are padded with zeros to the largest FOV; the true shape
of each is recorded in ``store.json`` (``fov_shapes``). Pixels outside a FOV's
true shape are 0 in images and background in masks, so a crop that reaches past
a FOV edge reads zeros, exactly as a crop past the array edge does.

A store is written by ``StoreWriter`` into a temporary directory beside the
target and renamed into place by ``commit()``: a failed write leaves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import tensorstore as ts
from absl import logging

from cellrep.errors import InputError
from cellrep.files import read_json

FORMAT_VERSION = 1
_META = "store.json"
_CELLS = "cells.parquet"
_IMAGES = "images.zarr"
_MASKS = "masks.zarr"
# Pixel types kept as they are; anything else is stored as float32.
_KEPT_DTYPES = ("uint8", "uint16", "float32")


@dataclasses.dataclass(frozen=True)
class StoreMeta:
  channels: tuple[str, ...]
  classes: tuple[str, ...]
  fovs: tuple[str, ...]
  fov_shapes: tuple[tuple[int, int], ...]
  dtype: str
  chunk_size: int

  @property
  def padded_shape(self) -> tuple[int, int]:
    return (max(h for h, _ in self.fov_shapes), max(w for _, w in self.fov_shapes))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["format_version"] = FORMAT_VERSION
    return d

  @classmethod
  def from_json(cls, d: dict, path) -> "StoreMeta":
    try:
      return cls(
          channels=tuple(d["channels"]),
          classes=tuple(d["classes"]),
          fovs=tuple(d["fovs"]),
          fov_shapes=tuple((int(h), int(w)) for h, w in d["fov_shapes"]),
          dtype=str(d["dtype"]),
          chunk_size=int(d["chunk_size"]),
      )
    except (KeyError, TypeError, ValueError) as e:
      raise InputError(path, f"malformed store metadata ({e!r})",
                       "keys channels, classes, fovs, fov_shapes, dtype, chunk_size") from None


def storage_dtype(dtype) -> str:
  """The dtype a store keeps for input pixels of `dtype`."""
  name = np.dtype(dtype).name
  return name if name in _KEPT_DTYPES else "float32"


def _zarr_spec(path: pathlib.Path, shape, chunks, dtype: str) -> dict:
  return {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": str(path)},
      "metadata": {
          "shape": list(shape),
          "data_type": dtype,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
          "codecs": [
              {"name": "bytes", "configuration": {"endian": "little"}},
              {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
          ],
          "fill_value": 0,
      },
      "create": True,
      "delete_existing": True,
  }


def cells_from_mask(mask: np.ndarray) -> pd.DataFrame:
  """One row per non-zero id of `mask` [H, W]: cell_id, y, x (centroid, int), area."""
  flat = mask.ravel().astype(np.int64)
  if flat.size and flat.min() < 0:
    raise ValueError("negative cell ids")
  n = int(flat.max(initial=0)) + 1
  area = np.bincount(flat, minlength=n)
  yy, xx = np.indices(mask.shape)
  ysum = np.bincount(flat, weights=yy.ravel(), minlength=n)
  xsum = np.bincount(flat, weights=xx.ravel(), minlength=n)
  ids = np.nonzero(area)[0]
  ids = ids[ids != 0]
  return pd.DataFrame({
      "cell_id": ids.astype(np.int64),
      "y": np.round(ysum[ids] / area[ids]).astype(np.int32),
      "x": np.round(xsum[ids] / area[ids]).astype(np.int32),
      "area": area[ids].astype(np.int32),
  })


def _cells_from_centres(name: str, centres, shape: tuple[int, int]) -> pd.DataFrame:
  if centres is None:
    raise ValueError("write_fov needs a mask or centres")
  yx = np.asarray(centres).reshape(-1, 2)
  if not np.issubdtype(yx.dtype, np.integer):
    if not np.isfinite(yx).all():
      raise InputError(name, "a cell centre is not a finite number", "pixel coordinates")
    yx = np.floor(yx).astype(np.int64)
  outside = ~((yx >= 0) & (yx < np.asarray(shape))).all(axis=1)
  if outside.any():
    i = int(np.flatnonzero(outside)[0])
    raise InputError(name, f"{int(outside.sum())} cell centres outside the {shape[0]}x{shape[1]} "
                     f"image, first (y, x) = {tuple(int(v) for v in yx[i])}", "centres inside it")
  return pd.DataFrame({"cell_id": np.arange(1, len(yx) + 1, dtype=np.int64),
                       "y": yx[:, 0].astype(np.int32), "x": yx[:, 1].astype(np.int32),
                       "area": np.zeros(len(yx), np.int32)})


class StoreWriter:
  """Writes a store FOV by FOV; nothing appears at `path` until `commit()`.

  Usage::

    with StoreWriter(path, channels, fovs, fov_shapes, dtype) as w:
      for i, ...: w.write_fov(i, image, mask, labels)
      store = w.commit()
  """

  def __init__(self, path, channels: Sequence[str], fovs: Sequence[str],
               fov_shapes: Sequence[tuple[int, int]], dtype="float32",
               classes: Sequence[str] | None = None, chunk_size: int = 64,
               overwrite: bool = False):
    self.path = pathlib.Path(path)
    if self.path.exists() and not overwrite:
      raise InputError(self.path, "already exists", "a new store path, or overwrite=True")
    if len(fovs) != len(fov_shapes) or not fovs:
      raise ValueError("need one shape per FOV and at least one FOV")
    if len(set(fovs)) != len(fovs):
      raise InputError(self.path, f"duplicate FOV names {sorted(fovs)}", "unique FOV names")
    if len(set(channels)) != len(channels):
      raise InputError(self.path, f"duplicate channel names {list(channels)}", "unique channel names")
    self.overwrite = overwrite
    self.fixed_classes = tuple(classes) if classes is not None else None
    self.meta = StoreMeta(tuple(channels), (), tuple(fovs),
                          tuple((int(h), int(w)) for h, w in fov_shapes),
                          storage_dtype(dtype), int(chunk_size))
    self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
    self.tmp.mkdir(parents=True)
    n, k = len(fovs), len(channels)
    h, w = self.meta.padded_shape
    c = self.meta.chunk_size
    self._images = ts.open(_zarr_spec(self.tmp / _IMAGES, (n, k, h, w), (1, k, c, c),
                                      self.meta.dtype)).result()
    self._masks = ts.open(_zarr_spec(self.tmp / _MASKS, (n, h, w), (1, c, c), "int32")).result()
    self._cells: list[pd.DataFrame] = [None] * n
    self._done = False

  def write_fov(self, index: int, image: np.ndarray, mask: np.ndarray | None,
                labels: Mapping[int, str | None] | None = None,
                metadata: Mapping[str, object] | None = None, *,
                centres: np.ndarray | None = None) -> None:
    """image: [K, H, W]; mask: [H, W] int cell ids; labels: cell id -> class name or None.

    metadata: Metadata_* values that apply to every cell of this FOV.
    centres: instead of a mask (None), cells given by their centres [n, 2] (y, x) pixel
      indices, as nuclei locations are (DeepProfiler): ids 1..n in that order, area 0, and
      an all-zero mask (no cell outlines).
    """
    name = self.meta.fovs[index]
    h, w = self.meta.fov_shapes[index]
    if image.shape != (len(self.meta.channels), h, w):
      raise InputError(name, f"image shape {image.shape}",
                       f"{(len(self.meta.channels), h, w)} [channel, y, x]")
    if mask is None:
      cells = _cells_from_centres(name, centres, (h, w))
    else:
      if mask.shape != (h, w):
        raise InputError(name, f"segmentation shape {mask.shape}", f"{(h, w)}, the image's shape")
      cells = cells_from_mask(mask)
    if cells.empty:
      raise InputError(name, "segmentation has no cells", "at least one non-zero cell id")
    warn_implausible(name, image, cells, self.meta.channels)
    labels = dict(labels or {})
    missing = sorted(set(labels) - set(cells.cell_id.tolist()))
    if missing:
      raise InputError(name, f"labels for cell ids not in the segmentation: {missing[:10]}"
                       + (" ..." if len(missing) > 10 else ""), "ids present in the mask")
    cells.insert(1, "fov", np.int32(index))
    cells.insert(2, "fov_name", name)
    cells["label"] = pd.array([labels.get(int(i)) for i in cells.cell_id], dtype="string")
    for key, value in (metadata or {}).items():
      if not key.startswith("Metadata_"):
        raise ValueError(f"metadata column {key!r} must start with 'Metadata_'")
      cells[key] = value
    self._images[index, :, :h, :w].write(image.astype(self.meta.dtype, copy=False)).result()
    if mask is not None:  # else the fill value: zeros
      self._masks[index, :h, :w].write(mask.astype(np.int32, copy=False)).result()
    self._cells[index] = cells

  def commit(self) -> "Store":
    unwritten = [self.meta.fovs[i] for i, c in enumerate(self._cells) if c is None]
    if unwritten:
      raise RuntimeError(f"FOVs never written: {unwritten}")
    cells = pd.concat(self._cells, ignore_index=True)
    present = sorted(set(cells.label.dropna()))
    if self.fixed_classes is not None:
      unknown = sorted(set(present) - set(self.fixed_classes))
      if unknown:
        raise InputError(self.path, f"labels {unknown} not among the classes", f"{list(self.fixed_classes)}")
      classes = self.fixed_classes
    else:
      classes = tuple(present)
    meta = dataclasses.replace(self.meta, classes=classes)
    cells.to_parquet(self.tmp / _CELLS, index=False)
    (self.tmp / _META).write_text(json.dumps(meta.to_json(), indent=1))
    if self.path.exists():
      shutil.rmtree(self.path)
    os.replace(self.tmp, self.path)
    self._done = True
    return open_store(self.path)

  def abort(self) -> None:
    shutil.rmtree(self.tmp, ignore_errors=True)
    self._done = True

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if not self._done:
      self.abort()
    return False


def _cache_context(cache_bytes: int) -> ts.Context:
  return ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})


# A "cell" covering more of its FOV than this is probably a background or tissue-free label.
LARGE_CELL_FRACTION = 0.05


def warn_implausible(fov: str, image: np.ndarray, cells: pd.DataFrame, channels) -> list[str]:
  """Logs (and returns) warnings about data that is valid but probably not meant: cells
  larger than LARGE_CELL_FRACTION of the FOV, channels that are zero everywhere."""
  warnings = []
  pixels = image.shape[-1] * image.shape[-2]
  large = cells[cells.area > LARGE_CELL_FRACTION * pixels]
  for cell_id, area in zip(large.cell_id.tolist()[:5], large.area.tolist()[:5]):
    warnings.append(f"{fov}: cell {cell_id} covers {area / pixels:.0%} of the FOV ({area:,} px): "
                    "a background or tissue-free region labelled as a cell?")
  zero = [c for c, plane in zip(channels, image) if not plane.any()]
  if zero:
    warnings.append(f"{fov}: channels {zero} are zero everywhere")
  for w in warnings:
    logging.warning("%s", w)
  return warnings


class Store:
  """A read handle on a store. Cheap to pickle: TensorStore handles open lazily.

  cache_bytes: TensorStore's chunk cache for each of the store's arrays; fov_cache_bytes:
  the memory a `CropSource` reading this store holds decoded FOVs in (each Grain worker
  process has its own). `with_memory` sets both.
  """

  def __init__(self, path, meta: StoreMeta, cache_bytes: int = 256 << 20,
               fov_cache_bytes: int = 1 << 30):
    self.path = pathlib.Path(path)
    self.meta = meta
    self.cache_bytes = int(cache_bytes)
    self.fov_cache_bytes = int(fov_cache_bytes)
    self._cells = None
    self._images = None
    self._masks = None

  def __getstate__(self):
    return {"path": self.path, "meta": self.meta, "cache_bytes": self.cache_bytes,
            "fov_cache_bytes": self.fov_cache_bytes}

  def with_memory(self, cache_bytes: int | None = None,
                  fov_cache_bytes: int | None = None) -> "Store":
    """The same store with other cache sizes (None keeps one)."""
    return Store(self.path, self.meta,
                 self.cache_bytes if cache_bytes is None else cache_bytes,
                 self.fov_cache_bytes if fov_cache_bytes is None else fov_cache_bytes)

  def __setstate__(self, state):
    self.__init__(**state)

  def __repr__(self):
    m = self.meta
    return (f"Store({str(self.path)!r}, fovs={len(m.fovs)}, channels={len(m.channels)}, "
            f"classes={len(m.classes)})")

  @property
  def cells(self) -> pd.DataFrame:
    if self._cells is None:
      self._cells = pd.read_parquet(self.path / _CELLS)
    return self._cells

  def label_ids(self, cells: pd.DataFrame | None = None) -> np.ndarray:
    """Class index per cell row (int32), -1 for unlabelled cells."""
    cells = self.cells if cells is None else cells
    index = {c: i for i, c in enumerate(self.meta.classes)}
    return np.array([index.get(v, -1) if isinstance(v, str) else -1 for v in cells.label],
                    dtype=np.int32)

  def _open(self, name: str) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)},
            "open": True}
    return ts.open(spec, read=True, context=_cache_context(self.cache_bytes)).result()

  @property
  def images(self) -> ts.TensorStore:
    """[fov, channel, y, x] TensorStore, opened on first use."""
    if self._images is None:
      self._images = self._open(_IMAGES)
    return self._images

  @property
  def masks(self) -> ts.TensorStore:
    """[fov, y, x] int32 TensorStore, opened on first use."""
    if self._masks is None:
      self._masks = self._open(_MASKS)
    return self._masks

  def read_fov(self, fov: int) -> tuple[np.ndarray, np.ndarray]:
    """The FOV's image [K, H, W] and mask [H, W] at their true shape."""
    h, w = self.meta.fov_shapes[fov]
    image = self.images[fov, :, :h, :w].read().result()
    mask = self.masks[fov, :h, :w].read().result()
    return image, mask


def open_store(path, cache_bytes: int = 256 << 20) -> Store:
  path = pathlib.Path(path)
  meta_path = path / _META
  if not meta_path.is_file():
    raise InputError(path, f"no {_META}", "a cellrep store written by `cellrep.data.ingest`")
  for part in (_CELLS, _IMAGES, _MASKS):
    if not (path / part).exists():
      raise InputError(path / part, "missing", "a complete cellrep store")
  d = read_json(meta_path, "a cellrep store written by `cellrep.data.ingest`")
  return Store(path, StoreMeta.from_json(d, meta_path), cache_bytes)
