"""A pool of one-channel images from every channel of one or more stores: what Microsnoop
pretrains on (any stain, one at a time).

The pool is itself a store, so the spine's crop reader, samplers and training loop read it
unchanged: one channel, ``image``; one FOV per (source store, FOV, channel), named
``<source>:<fov>:<channel>``, holding that channel's pixels (float32, as stored) and the
source FOV's segmentation; its cells are either the source FOV's cells (``unit="cells"``:
crops centred on cells) or the centres of a square grid of `spacing` px (``unit="tiles"``:
crops that tile the FOV, cells or not). Every cell row carries ``Metadata_Source``
and ``Metadata_Channel``.

A channel whose 1st and 99th percentiles over the FOV are equal (an empty or nearly empty
stain: normalise99 would make it all zeros) holds no signal to reconstruct and is left out,
as are the channels of `exclude` (e.g. a ``Background`` channel of a MIBI panel).
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from absl import logging

from cellrep.data.store import Store, StoreWriter
from cellrep.errors import BadValue, InputError

UNITS = ("cells", "tiles")
CHANNEL = "image"


def _grid(shape: tuple[int, int], spacing: int) -> np.ndarray:
  """[n, 2] (y, x) centres of a grid of `spacing` px squares covering an H x W FOV (the last
  row and column of squares aligned with the far edges)."""
  axes = []
  for extent in shape:
    last = max(extent - spacing, 0)
    starts = np.arange(0, last + 1, spacing)
    if starts[-1] != last:
      starts = np.append(starts, last)
    axes.append(np.minimum(starts + spacing // 2, extent - 1))
  yy, xx = np.meshgrid(*axes, indexing="ij")
  return np.stack([yy.ravel(), xx.ravel()], axis=1)


def has_signal(image: np.ndarray) -> bool:
  """Whether a channel [H, W] has 99th percentile > 1st (the rest normalise to zeros)."""
  lo, hi = np.percentile(image, [1.0, 99.0])
  return bool(hi > lo)


def plan(stores: Sequence[tuple[str, Store]], exclude: Sequence[str] = ()
         ) -> list[tuple[int, int, int, str]]:
  """(store, FOV, channel, pool FOV name) of every image with signal, in store, FOV and
  channel order."""
  names = [name for name, _ in stores]
  if len(set(names)) != len(names):
    raise BadValue("stores", f"duplicate source names {names}", "a unique name per store")
  skip = set(exclude)
  out, empty = [], []
  for s, (name, store) in enumerate(stores):
    keep = [k for k, c in enumerate(store.meta.channels) if c not in skip]
    for f, fov in enumerate(store.meta.fovs):
      image, _ = store.read_fov(f)
      for k in keep:
        channel = store.meta.channels[k]
        if has_signal(image[k]):
          out.append((s, f, k, f"{name}:{fov}:{channel}"))
        else:
          empty.append(f"{name}:{fov}:{channel}")
  if empty:
    logging.info("pool: %d images without signal (p99 == p1) left out: %s", len(empty),
                 ", ".join(empty[:20]) + (" ..." if len(empty) > 20 else ""))
  if not out:
    raise InputError(", ".join(str(store.path) for _, store in stores),
                     "no channel of any FOV has signal (99th percentile > 1st)",
                     "images with some contrast")
  return out


def write_pool(stores: Sequence[tuple[str, Store]], out, *, unit: str = "cells",
               spacing: int = 64, exclude: Sequence[str] = (), chunk_size: int = 64,
               overwrite: bool = False) -> Store:
  """Writes the one-channel pool of `stores` ((source name, store) pairs) to `out`.

  unit: ``cells`` (the source's cells) or ``tiles`` (a grid of `spacing` px squares).
  """
  if unit not in UNITS:
    raise BadValue("unit", f"{unit!r}", f"one of {list(UNITS)}")
  if spacing < 1:
    raise BadValue("spacing", f"{spacing}", "a tile side ≥ 1 px")
  items = plan(stores, exclude)
  shapes = [stores[s][1].meta.fov_shapes[f] for s, f, _, _ in items]
  with StoreWriter(pathlib.Path(out), (CHANNEL,), [n for *_, n in items], shapes,
                   dtype="float32", chunk_size=chunk_size, overwrite=overwrite) as w:
    for i, (s, f, k, _) in enumerate(items):
      name, store = stores[s]
      image, mask = store.read_fov(f)
      meta = {"Metadata_Source": name, "Metadata_Channel": store.meta.channels[k]}
      pixels = image[k:k + 1].astype(np.float32)
      if unit == "cells":
        w.write_fov(i, pixels, mask, metadata=meta)
      else:
        w.write_fov(i, pixels, None, metadata=meta, centres=_grid(mask.shape, spacing))
    pool = w.commit()
  logging.info("pool %s: %d one-channel images of %d stores, %d %s", out, len(items),
               len(stores), len(pool.cells), unit)
  return pool
