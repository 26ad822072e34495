import pickle

import numpy as np
import pytest

from cellrep.data.crops import CropSource, window
from tests.data.helpers import square_cells_store


def test_window_clips_and_places():
  assert window(10, 8, 100) == (6, 14, 0, 8)
  assert window(2, 8, 100) == (0, 6, 2, 8)      # 2 rows of zero padding above
  assert window(98, 8, 100) == (94, 100, 0, 6)  # 2 rows below


# 0: every crop a TensorStore window read; default: whole FOVs decoded once and sliced.
FOV_CACHES = pytest.mark.parametrize("fov_cache_bytes", [0, 1 << 30])


@FOV_CACHES
def test_crop_channels_follow_cellsighter(tmp_path, fov_cache_bytes):
  store = square_cells_store(tmp_path / "s")
  src = CropSource(store, crop_size=10, fov_cache_bytes=fov_cache_bytes)
  assert len(src) == len(store.cells) and src.num_channels == 5
  row = 9  # an interior cell: its window lies inside the FOV
  cell = store.cells.iloc[row]
  item = src[row]
  crop = item["crop"]
  assert crop.shape == (5, 10, 10) and crop.dtype == np.float32
  assert item["label"] == store.label_ids()[row] and item["index"] == row
  image, mask = store.read_fov(int(cell.fov))
  y0, x0 = int(cell.y) - 5, int(cell.x) - 5
  np.testing.assert_array_equal(crop[:3], image[:, y0:y0 + 10, x0:x0 + 10])
  own = mask[y0:y0 + 10, x0:x0 + 10] == cell.cell_id
  np.testing.assert_array_equal(crop[-1], own)                       # the cell itself
  np.testing.assert_array_equal(crop[-2], mask[y0:y0 + 10, x0:x0 + 10] > 0)  # all cells
  assert crop[-1][5, 5] == 1 and crop[-2].sum() > crop[-1].sum()


@FOV_CACHES
def test_border_cells_are_zero_padded_not_dropped(tmp_path, fov_cache_bytes):
  store = square_cells_store(tmp_path / "s")
  src = CropSource(store, crop_size=20, fov_cache_bytes=fov_cache_bytes)
  first = src[0]["crop"]  # cell at the FOV's top-left corner
  assert np.all(first[:, :7, :] == 0) and np.all(first[:, :, :7] == 0)
  assert first[-1, 10, 10] == 1
  # Every cell yields a crop, also in the smaller (padded) FOV.
  assert all(src[i]["crop"][-1, 10, 10] == 1 for i in range(len(src)))


def test_pickles_without_open_handles(tmp_path):
  src = CropSource(square_cells_store(tmp_path / "s"), crop_size=8)
  _ = src[0]
  clone = pickle.loads(pickle.dumps(src))
  assert clone.store._images is None
  np.testing.assert_array_equal(clone[3]["crop"], src[3]["crop"])


def test_batched_read_equals_single_reads_whichever_path(tmp_path):
  store = square_cells_store(tmp_path / "s")
  indices = np.array([5, 0, len(store.cells) - 1, 5, 12])  # both FOVs, borders, a repeat
  ref = np.stack([CropSource(store, 20, fov_cache_bytes=0)[int(i)]["crop"] for i in indices])
  # Window reads; whole FOVs (all fit); an LRU of one FOV that must evict and reload.
  one_fov = 40 * 50 * (3 * 4 + 4)
  for cache in (0, 1 << 30, one_fov):
    src = CropSource(store, 20, fov_cache_bytes=cache)
    for _ in range(2):
      batch = src.read(indices)
      np.testing.assert_array_equal(batch["crop"], ref)
      np.testing.assert_array_equal(batch["index"], indices)
      np.testing.assert_array_equal(batch["label"], store.label_ids()[indices])
    assert len(src._fovs) <= max(1, cache // one_fov)
