"""The paper's simulations: the rewriting itself on a drawn cell, and, on a trained ensemble,
the CNN less fooled than XGBoost by a spillover patch and by partial-membrane signal."""

from __future__ import annotations

import numpy as np
import pytest

from cellrep.data.crops import CropSource
from cellrep.data.expression import expression_matrix
from cellrep.eval import baselines, simulate
from cellrep.eval.report import Report
from cellrep.errors import BadValue
from cellrep.infer import trained as trained_lib
from tests.eval.conftest import HELD_OUT

A, B = 0, 1  # marker channels of the drawn crop: A, B, another, then the two masks


def _crop(n=24, radius=5.0):
  yy, xx = np.indices((n, n))
  cell = np.hypot(yy - 11.5, xx - 11.5) <= radius
  crop = np.zeros((5, n, n), np.float32)
  crop[A][cell] = 50      # the cell's own signal, to be removed
  crop[B] = 3             # B everywhere, also outside the cell (a neighbour's)
  crop[2] = 7
  crop[3] = cell | (np.hypot(yy - 2, xx - 2) < 2)
  crop[4] = cell
  return crop, cell


def _config(**kw):
  return simulate.SimulationConfig(class_a="A", marker_a="a", class_b="B", marker_b="b", **kw)


def test_rewriting_keeps_totals_and_geometry():
  crop, cell = _crop()
  cfg = _config(repeats=200, border_distances=(-2, 0, 2, 4), fractions=(1, 0.25),
                centre_distances=(0, 1, 2))
  out = {(e, v): (c, o) for e, v, c, o in simulate.rewrite(crop[None], cfg, A, B, 400.0, 300.0)}
  assert set(e for e, _ in out) == set(simulate.EXPERIMENTS)
  control, _ = out[("control", 0.0)]
  assert control.shape == (200, 5, 24, 24)
  # A is on the membrane ring only, with the typical total; B is gone from the cell only.
  ring = simulate._Cell.of(crop, cfg.membrane_width).membrane
  assert np.all(control[:, A][:, cell & ~ring] == 0)
  assert control[:, A].sum(axis=(1, 2)).mean() == pytest.approx(400, rel=0.02)
  assert np.all(control[:, B][:, cell] == 0) and np.all(control[:, B][:, ~cell] == 3)
  np.testing.assert_array_equal(control[:, 2:], np.broadcast_to(crop[2:], control[:, 2:].shape))
  # Membrane fraction: B's total in the cell is the same at 100% and 25% of the ring.
  full, quarter = out[("membrane_fraction", 1.0)][0], out[("membrane_fraction", 0.25)][0]
  for rewritten in (full, quarter):
    assert rewritten[:, B][:, cell].sum(axis=1).mean() == pytest.approx(300, rel=0.02)
  covered = (quarter[:, B] > 0) & cell
  assert covered.sum(axis=(1, 2)).mean() < 0.3 * ring.sum()
  # Patches: the further out, the less of the patch in the cell.
  spill = [out[("spillover_patch", d)][1].mean() for d in (-2, 0, 2, 4)]
  assert spill[0] > 0.95 and spill[1] == pytest.approx(0.5, abs=0.15) and spill[3] == 0
  assert np.all(np.diff(spill) < 0)
  moving = [out[("moving_patch", t)][1].mean() for t in (0, 1, 2)]
  assert moving[0] == 1 and moving[2] == 0 and 0.2 < moving[1] < 0.8


def test_run_scores_every_setting():
  crop, cell = _crop()
  cfg = _config(repeats=3)

  def by_mean_b(crops):  # calls class 1 (B) when B's mean in the mask is above 2
    called_b = baselines.crop_features(crops, cofactor=1.0)[:, B] > np.arcsinh(2.0)
    return np.stack([~called_b, called_b], axis=1).astype(np.float32)

  table = simulate.run(crop[None], cfg, A, B, 400.0, 300.0, {"mean": by_mean_b}, 0, 1)
  assert len(table) == 1 + 5 + 4 + 7 and set(table.cells) == {3}
  assert simulate.fooled(table, "membrane_fraction", "mean") == 1.0   # same mean at any fraction
  assert table[table.experiment == "control"].frac_a.item() == 1.0


def test_bad_settings():
  with pytest.raises(BadValue, match="fractions"):
    _config(fractions=(0.5, 1.5))
  with pytest.raises(BadValue, match="marker_b"):
    simulate.check_names(_config(), ["A", "B"], ["a", "c"])
  assert simulate.SimulationConfig("A", "a", "B", "b", fractions=[0.5, 1]).fractions == (0.5, 1.0)


@pytest.fixture(scope="module")
def cd8_rewritten(synthetic_model):
  """CD8 T cells of the held-out FOV rewritten with a CD4 patch, scored by both models."""
  trained, store, _ = synthetic_model
  labels = store.label_ids()
  fovs = store.cells.fov_name.to_numpy()
  train = np.flatnonzero((fovs != HELD_OUT) & (labels >= 0))
  means = expression_matrix(store).to_numpy()
  xgb = baselines.fit_xgboost(baselines.features_from_means(means[train]), labels[train], 4)
  cfg = simulate.SimulationConfig(class_a="CD8 T", marker_a="CD8", class_b="CD4 T",
                                  marker_b="CD4", repeats=3, seed=0)
  ca, cb = trained.classes.index("CD8 T"), trained.classes.index("CD4 T")
  a, b = trained.channels.index("CD8"), trained.channels.index("CD4")
  area = store.cells.area.to_numpy()
  total_a = simulate.typical_total(means[train, a], area[train], labels[train], ca)
  total_b = simulate.typical_total(means[train, b], area[train], labels[train], cb)
  rows = np.flatnonzero((fovs == HELD_OUT) & (labels == ca))
  source = CropSource(store, trained.crop_size)
  crops = np.stack([source[int(i)]["crop"] for i in rows])
  fn, _ = trained_lib.predictor(trained, store)
  scorers = {"CNN ensemble": lambda c: trained_lib.predict_crops(trained, fn, c).mean(axis=1),
             "XGBoost": lambda c: xgb.predict_proba(baselines.crop_features(c))}
  return simulate.run(crops, cfg, a, b, total_a, total_b, scorers, ca, cb), cfg


def test_cnn_is_less_fooled_than_xgboost(cd8_rewritten, tmp_path):
  # Measured on this seed (37 held-out CD8 T cells x 3 draws), fraction called CD4 T:
  #   CD4 patch at the outline, d = -2 .. 2 px:  CNN .05 .05 .07 .08 .04, XGBoost .21 .21 .18 .02 .00
  #   CD4 on 50 / 25 / 12.5% of the membrane:    CNN 0.05 on average,    XGBoost 0.20
  # (seed 1 of the tissue: patch inside 0.05 vs 0.44, membrane 0.06 vs 0.53). Both models
  # still call the control (CD8 re-added on the membrane, no CD4) CD8 T.
  table, cfg = cd8_rewritten
  for model in ("CNN ensemble", "XGBoost"):
    assert table[(table.experiment == "control") & (table.model == model)].frac_a.item() > 0.9
  spill = table[table.experiment == "spillover_patch"].pivot(index="setting", columns="model",
                                                             values="frac_b")
  inside = spill[spill.index <= 0].mean()  # the patch reaches into the mask XGBoost averages over
  assert inside["CNN ensemble"] + 0.1 < inside["XGBoost"], spill
  cnn, xgb = (simulate.fooled(table, "spillover_patch", m) for m in ("CNN ensemble", "XGBoost"))
  assert cnn < xgb, (cnn, xgb)
  cnn, xgb = (simulate.fooled(table, "membrane_fraction", m) for m in ("CNN ensemble", "XGBoost"))
  assert cnn + 0.1 < xgb, (cnn, xgb)
  report = Report(tmp_path, "t")
  scalars = simulate.add_to_report(report, table, cfg)
  assert scalars["sim/spillover_frac_b_cnn_ensemble"] < scalars["sim/spillover_frac_b_xgboost"]
  assert "simulations.png" in report.write().read_text()
