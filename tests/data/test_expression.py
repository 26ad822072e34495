"""Mean expression per cell: a hand-made store against a per-cell loop, and the real MIBI FOV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellrep.data import expression, ingest
from cellrep.data.store import StoreWriter


def _reference(image, mask, cell_ids):
  """The obvious per-cell loop: [cells, K] means."""
  return np.array([[image[k][mask == i].mean() for k in range(len(image))] for i in cell_ids])


@pytest.fixture()
def two_fov_store(tmp_path):
  rng = np.random.default_rng(0)
  fovs = []
  for h, w in ((10, 12), (7, 9)):
    mask = np.zeros((h, w), np.int32)
    mask[1:4, 1:5] = 2
    mask[5:7, 2:8] = 7
    image = rng.integers(0, 100, (3, h, w)).astype(np.uint16)
    fovs.append((image, mask))
  with StoreWriter(tmp_path / "s", ["a", "b", "c"], ["f0", "f1"], [m.shape for _, m in fovs],
                   "uint16") as w:
    for i, (image, mask) in enumerate(fovs):
      w.write_fov(i, image, mask)
    return w.commit(), fovs


def test_matches_per_cell_loop(two_fov_store):
  store, fovs = two_fov_store
  expr = expression.expression_matrix(store)
  assert list(expr.columns) == ["a", "b", "c"]
  assert expr.index.equals(store.cells.index)
  for f, (image, mask) in enumerate(fovs):
    rows = store.cells.fov == f
    np.testing.assert_allclose(expr[rows].to_numpy(),
                               _reference(image, mask, store.cells.cell_id[rows]), rtol=1e-12)


def test_subset_and_arcsinh(two_fov_store):
  store, _ = two_fov_store
  full = expression.expression_matrix(store)
  subset = store.cells.iloc[[3, 0]]
  got = expression.expression_matrix(store, subset, cofactor=5.0)
  assert list(got.index) == [3, 0]
  np.testing.assert_allclose(got.to_numpy(), np.arcsinh(full.loc[[3, 0]].to_numpy() / 5.0), rtol=1e-12)
  with pytest.raises(ValueError, match="cofactor"):
    expression.expression_matrix(store, cofactor=0.0)


def test_fov_means_empty_ids_are_nan():
  image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  mask = np.zeros((3, 4), np.int32)
  mask[0, :2] = 3
  means, area = expression.fov_means(image, mask)
  assert means.shape == (4, 2) and area.tolist() == [10, 0, 0, 2]
  assert np.isnan(means[1:3]).all()
  np.testing.assert_allclose(means[3], [0.5, 12.5])


def test_mibi_two_channels_against_pandas(shared_data, tmp_path):
  root = shared_data / "mibi_fov8"
  store = ingest.ingest_tiff_folder(root, tmp_path / "s", channels="CD3,NaK ATPase")
  expr = expression.expression_matrix(store)
  mask = tifffile.imread(root / "segmentation.tiff").ravel()
  for name in ("CD3", "NaK ATPase"):
    pixels = pd.Series(tifffile.imread(root / "TIFs" / f"{name}.tiff").ravel().astype(np.float64))
    want = pixels.groupby(mask).mean().drop(index=0)
    np.testing.assert_allclose(expr[name].to_numpy(), want.loc[store.cells.cell_id].to_numpy(), rtol=1e-12)
