"""Microsnoop's batch-experiment profiles: ZCA-cor on each plate's controls, then the mean per
treatment, against the same computed directly in numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import BadValue
from cellrep.profiling import aggregate, sphering


def _experiment():
  """2 plates x (12 control FOVs + 2 treatments x 4 FOVs), 4 features, plate effects."""
  rng = np.random.default_rng(0)
  rows = []
  for p, shift in (("P1", 0.0), ("P2", 3.0)):
    for t, n in (("DMSO", 12), ("drugA", 4), ("drugB", 4)):
      for i in range(n):
        rows.append({"Metadata_Plate": p, "Metadata_Treatment": t, "Metadata_site": i})
  meta = pd.DataFrame(rows)
  mix = rng.normal(size=(4, 4))
  x = rng.normal(size=(len(meta), 4)) @ mix + (meta.Metadata_Plate == "P2").to_numpy()[:, None] * 3
  x += (meta.Metadata_Treatment == "drugA").to_numpy()[:, None] * np.array([1.0, 0, 0, -1])
  return pd.concat([meta, pd.DataFrame(x, columns=["f0", "f1", "f2", "f3"])], axis=1)


def _zca_cor(controls, rows, reg):
  """ZCA on the controls' correlation: the controls standardised with their population SD,
  W = V (Λ + λ)^(-1/2) Vᵀ of their covariance (n - 1), applied to `rows`."""
  mean, sd = controls.mean(0), controls.std(0)
  z = (controls - mean) / sd
  evals, v = np.linalg.eigh(z.T @ z / (len(z) - 1))
  lam = sphering.knee_regularization(evals) if reg == "knee" else reg
  assert lam > 0
  return ((rows - mean) / sd) @ (v * (evals + lam) ** -0.5) @ v.T


@pytest.mark.parametrize("reg", ["knee", 0.1])
def test_batch_experiment_profiles_are_per_plate_zca_cor_then_treatment_means(reg):
  table = _experiment()
  feats = ["f0", "f1", "f2", "f3"]
  got = aggregate.batch_experiment_profiles(table, feats, plate="Metadata_Plate",
                                         treatment="Metadata_Treatment",
                                         controls="Metadata_Treatment == 'DMSO'", reg=reg)
  x = table[feats].to_numpy(np.float64)
  sphered = np.empty_like(x)
  for p in ("P1", "P2"):
    rows = (table.Metadata_Plate == p).to_numpy()
    ctl = rows & (table.Metadata_Treatment == "DMSO").to_numpy()
    sphered[rows] = _zca_cor(x[ctl], x[rows], reg)
  want = pd.DataFrame(sphered, columns=feats).groupby(table.Metadata_Treatment).mean()
  assert got.Metadata_Treatment.tolist() == ["DMSO", "drugA", "drugB"]
  assert "Metadata_Plate" not in got.columns  # not constant within a treatment
  # Sphered and averaged in float32, values up to ~2: a few float32 ulps (3e-7 seen).
  np.testing.assert_allclose(got[feats].to_numpy(), want.to_numpy(), atol=1e-6)
  by_mask = aggregate.batch_experiment_profiles(
      table, feats, plate="Metadata_Plate", treatment="Metadata_Treatment",
      controls=(table.Metadata_Treatment == "DMSO").to_numpy(), reg=reg)
  pd.testing.assert_frame_equal(by_mask, got)


def test_batch_experiment_columns_are_checked():
  table = _experiment()
  with pytest.raises(BadValue, match="plate: column 'plate'"):
    aggregate.batch_experiment_profiles(table.rename(columns={"Metadata_Plate": "plate"}), ["f0"],
                                     plate="plate", treatment="Metadata_Treatment",
                                     controls="Metadata_Treatment == 'DMSO'")
  with pytest.raises(BadValue, match="features: metadata column"):
    aggregate.batch_experiment_profiles(table, ["Metadata_site"], plate="Metadata_Plate",
                                     treatment="Metadata_Treatment",
                                     controls="Metadata_Treatment == 'DMSO'")
