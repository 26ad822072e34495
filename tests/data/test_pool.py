"""The one-channel pool: one FOV per (store, FOV, channel) with signal, its pixels and cells."""

from __future__ import annotations

import numpy as np
import pytest

from cellrep.data import pool
from cellrep.errors import BadValue, InputError
from tests.data.helpers import square_cells_store


def test_pools_every_channel_with_signal_and_keeps_cells(tmp_path):
  a = square_cells_store(tmp_path / "a", fov_shapes=((20, 20),), channels=("x", "y"))
  b = square_cells_store(tmp_path / "b", fov_shapes=((14, 21), (20, 20)), channels=("z",))
  out = pool.write_pool([("A", a), ("B", b)], tmp_path / "pool")
  assert out.meta.channels == ("image",)
  assert out.meta.fovs == ("A:fov0:x", "A:fov0:y", "B:fov0:z", "B:fov1:z")
  image, mask = out.read_fov(1)
  src_image, src_mask = a.read_fov(0)
  np.testing.assert_array_equal(image[0], src_image[1])
  np.testing.assert_array_equal(mask, src_mask)
  cells = out.cells
  assert len(cells) == 2 * len(a.cells) + len(b.cells)
  assert set(cells.Metadata_Source) == {"A", "B"}
  first = cells[cells.fov == 0]
  np.testing.assert_array_equal(first[["y", "x"]], a.cells[["y", "x"]])
  assert (cells[cells.fov == 1].Metadata_Channel == "y").all()


def test_leaves_out_empty_and_excluded_channels(tmp_path):
  s = square_cells_store(tmp_path / "s", fov_shapes=((20, 20),), channels=("x", "Background"))
  image, mask = s.read_fov(0)
  from cellrep.data.store import StoreWriter
  with StoreWriter(tmp_path / "e", ("x", "empty"), ("f",), [(20, 20)]) as w:
    w.write_fov(0, np.stack([image[0], np.full_like(image[0], 3.0)]), mask)
    e = w.commit()
  out = pool.write_pool([("s", s), ("e", e)], tmp_path / "pool", exclude=("Background",))
  assert out.meta.fovs == ("s:fov0:x", "e:f:x")
  with pytest.raises(InputError, match="no channel"):
    pool.write_pool([("e", e)], tmp_path / "p2", exclude=("x",))


def test_tiles_cover_the_fov_on_a_grid(tmp_path):
  s = square_cells_store(tmp_path / "s", fov_shapes=((20, 30),), channels=("x",))
  out = pool.write_pool([("s", s)], tmp_path / "pool", unit="tiles", spacing=8)
  ys, xs = sorted(set(out.cells.y)), sorted(set(out.cells.x))
  assert ys == [4, 12, 16] and xs == [4, 12, 20, 26]   # last tiles flush with the far edges
  assert len(out.cells) == 12
  with pytest.raises(BadValue, match="unit"):
    pool.write_pool([("s", s)], tmp_path / "p2", unit="fovs")
  with pytest.raises(BadValue, match="stores"):
    pool.write_pool([("s", s), ("s", s)], tmp_path / "p3")
