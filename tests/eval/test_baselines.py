"""The expression-matrix XGBoost baseline: features from a store and from crops agree; fitting."""

from __future__ import annotations

import numpy as np
import pytest

from cellrep.data.crops import CropSource
from cellrep.data.expression import expression_matrix
from cellrep.eval import baselines
from cellrep.errors import BadValue
from tests.data.helpers import square_cells_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return square_cells_store(tmp_path_factory.mktemp("s") / "store", fov_shapes=((40, 40), (30, 40)))


def test_features_are_arcsinh_of_mean_in_mask(store):
  features = baselines.store_features(store, cofactor=5.0)
  means = expression_matrix(store).to_numpy()
  np.testing.assert_allclose(features, np.arcsinh(means / 5.0))
  # square_cells_store: marker c of cell i holds 100 (c + 1) + i on every pixel of the cell.
  cells = store.cells
  np.testing.assert_allclose(np.sinh(features[:, 1]) * 5.0, 200 + cells.cell_id.to_numpy())
  with pytest.raises(BadValue, match="cofactor"):
    baselines.store_features(store, cofactor=0)


def test_crop_features_match_store_features(store):
  source = CropSource(store, 16)  # 6 px cells: every cell lies inside its window
  rows = np.arange(0, len(store.cells), 3)
  crops = np.stack([source[int(i)]["crop"] for i in rows])
  np.testing.assert_allclose(baselines.crop_features(crops, cofactor=2.0),
                             baselines.store_features(store, cofactor=2.0)[rows], rtol=1e-12)


def test_xgboost_learns_and_covers_absent_classes():
  rng = np.random.default_rng(0)
  # Classes 0 and 2 separable on feature 0; class 1 never seen in training.
  labels = rng.choice([0, 2], 300, p=[0.8, 0.2])
  features = np.stack([labels + rng.normal(0, 0.3, 300), rng.normal(size=300)], axis=1)
  model = baselines.fit_xgboost(features, labels, 3, balance="class")
  probs = model.predict_proba(features)
  assert probs.shape == (300, 3) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
  assert np.all(probs[:, 1] == 0)
  assert np.mean(probs.argmax(axis=1) == labels) > 0.95
  one = baselines.fit_xgboost(features[:5], np.full(5, 2), 3)
  np.testing.assert_array_equal(one.predict_proba(features[:2]), [[0, 0, 1], [0, 0, 1]])
  with pytest.raises(BadValue, match="balance"):
    baselines.fit_xgboost(features, labels, 3, balance="sometimes")


def test_class_balancing_moves_the_decision_toward_the_rare_class():
  rng = np.random.default_rng(1)
  # Overlapping classes, 9:1: balancing must call more cells the rare class.
  labels = (rng.random(2000) < 0.1).astype(int)
  features = (labels + rng.normal(0, 1.0, 2000))[:, None]
  plain = baselines.fit_xgboost(features, labels, 2, balance="none").predict_proba(features)
  balanced = baselines.fit_xgboost(features, labels, 2, balance="class").predict_proba(features)
  assert (balanced.argmax(1) == 1).sum() > 2 * (plain.argmax(1) == 1).sum()
