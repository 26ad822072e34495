import json
import pickle

import numpy as np
import pytest

from cellrep.data.store import StoreWriter, cells_from_mask, open_store
from cellrep.errors import InputError
from tests.data.helpers import square_cells_store


def test_cells_from_mask_centroids_and_areas():
  mask = np.zeros((10, 10), np.int32)
  mask[0:2, 0:4] = 3
  mask[5:10, 5:10] = 7
  cells = cells_from_mask(mask)
  assert cells.cell_id.tolist() == [3, 7]
  assert cells.area.tolist() == [8, 25]
  assert cells.y.tolist() == [0, 7] and cells.x.tolist() == [2, 7]  # 0.5 and 1.5 round to even


def test_round_trip_with_fovs_of_different_sizes(tmp_path):
  store = square_cells_store(tmp_path / "s")
  m = store.meta
  assert m.fov_shapes == ((40, 50), (30, 30)) and m.padded_shape == (40, 50)
  assert store.images.shape == (2, 3, 40, 50) and store.masks.shape == (2, 40, 50)
  image, mask = store.read_fov(1)
  assert image.shape == (3, 30, 30) and mask.shape == (30, 30)
  # Padding beyond a smaller FOV reads as zeros / background.
  assert np.all(store.images[1, :, 30:, :].read().result() == 0)
  assert np.all(store.masks[1, :, 30:].read().result() == 0)
  assert m.classes == ("x", "y")
  cells = store.cells
  assert list(cells.columns[:7]) == ["cell_id", "fov", "fov_name", "y", "x", "area", "label"]
  assert set(store.label_ids()) == {0, 1}
  meta = json.loads((tmp_path / "s" / "store.json").read_text())
  assert meta["channels"] == ["a", "b", "c"] and meta["format_version"] == 1
  reopened = pickle.loads(pickle.dumps(store))
  np.testing.assert_array_equal(reopened.read_fov(0)[1], store.read_fov(0)[1])


def test_unlabelled_and_metadata_columns(tmp_path):
  mask = np.zeros((8, 8), np.int32)
  mask[1:3, 1:3], mask[5:7, 5:7] = 1, 2
  with StoreWriter(tmp_path / "s", ["a"], ["f"], [(8, 8)], dtype="uint16") as w:
    w.write_fov(0, np.ones((1, 8, 8), np.uint16), mask, {1: "T"}, {"Metadata_Plate": "P1"})
    store = w.commit()
  assert store.label_ids().tolist() == [0, -1]
  assert store.cells.Metadata_Plate.tolist() == ["P1", "P1"]
  assert store.meta.dtype == "uint16"


@pytest.mark.parametrize("problem", ["image_shape", "mask_shape", "empty", "label_id"])
def test_bad_fov_refused_and_nothing_left(tmp_path, problem):
  mask = np.zeros((8, 8), np.int32)
  mask[2:4, 2:4] = 1
  image = np.ones((1, 8, 8), np.float32)
  labels = {1: "T"}
  if problem == "image_shape":
    image = np.ones((1, 8, 9), np.float32)
  elif problem == "mask_shape":
    mask = np.zeros((9, 8), np.int32)
  elif problem == "empty":
    mask = np.zeros((8, 8), np.int32)
    labels = {}
  else:
    labels = {5: "T"}
  with pytest.raises(InputError, match="f:"):
    with StoreWriter(tmp_path / "s", ["a"], ["f"], [(8, 8)]) as w:
      w.write_fov(0, image, mask, labels)
      w.commit()
  assert list(tmp_path.iterdir()) == []


def test_existing_path_refused_and_open_checks(tmp_path):
  square_cells_store(tmp_path / "s")
  with pytest.raises(InputError, match="already exists"):
    StoreWriter(tmp_path / "s", ["a"], ["f"], [(8, 8)])
  with pytest.raises(InputError, match="no store.json"):
    open_store(tmp_path)
  (tmp_path / "s" / "store.json").write_text("{")
  with pytest.raises(InputError, match="not valid JSON"):
    open_store(tmp_path / "s")
