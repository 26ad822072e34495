"""Tiny stores for tests, written with the real StoreWriter."""

from __future__ import annotations

import numpy as np

from cellrep.data.store import StoreWriter


def square_cells_store(path, fov_shapes=((40, 50), (30, 30)), channels=("a", "b", "c"),
                       side=6, classes=("x", "y")):
  """FOVs tiled with side x side square cells, each labelled classes[id % len(classes)].

  Marker c of a cell holds the value 100 * (c + 1) + cell_id, so a crop can be checked
  pixel by pixel.
  """
  with StoreWriter(path, list(channels), [f"fov{i}" for i in range(len(fov_shapes))],
                   fov_shapes, dtype="float32") as w:
    for i, (h, wd) in enumerate(fov_shapes):
      mask = np.zeros((h, wd), np.int32)
      cid = 0
      for y in range(0, h - side + 1, side + 1):
        for x in range(0, wd - side + 1, side + 1):
          cid += 1
          mask[y:y + side, x:x + side] = cid
      image = np.zeros((len(channels), h, wd), np.float32)
      for c in range(len(channels)):
        image[c] = np.where(mask > 0, 100 * (c + 1) + mask, 0)
      labels = {k: classes[k % len(classes)] for k in range(1, cid + 1)}
      w.write_fov(i, image, mask, labels)
    return w.commit()
