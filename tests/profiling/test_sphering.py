"""Sphering against pycytominer's current Spherize and the paper's λ form."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pycytominer import normalize
from pycytominer.operations.transform import Spherize

from cellrep.errors import InputError
from cellrep.profiling import sphering, synthetic

ATOL = 1e-5  # the tolerance for the float64 path (observed ~1e-12)
# float32 path: one float32 matmul of whitened data, error ~ eps32 * cond; stated relative
# to the output scale.
RTOL32 = 1e-4


def data(n, d, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
  return x.astype(np.float32).astype(np.float64)


def compare(ref, ours, method, rank):
  if method.startswith("PCA"):
    # Each principal axis is defined up to its sign (and beyond the rank, up to a basis).
    ref, ours = np.abs(ref[:, :rank]), np.abs(ours[:, :rank])
  return np.abs(ref - ours).max()


@pytest.mark.parametrize("method", sphering.METHODS)
@pytest.mark.parametrize("n, d", [(200, 20), (60, 20), (20, 20), (12, 20)],
                         ids=["n>>d", "n>d", "n=d", "n<d"])
def test_matches_pycytominer_spherize(method, n, d):
  x = data(n, d)
  ref = Spherize(method=method, epsilon=1e-6, return_numpy=True).fit(
      pd.DataFrame(x)).transform(pd.DataFrame(x))
  fitted = sphering.fit(x, method, epsilon=1e-6)
  assert compare(ref, fitted.apply(x, np.float64), method, fitted.rank) < ATOL
  assert compare(ref, fitted.apply(x), method, fitted.rank) < RTOL32 * np.abs(ref).max()


def test_matches_pycytominer_normalize_on_controls():
  meta, x = synthetic.wells(n_compounds=30, n_controls=80, dim=16, ties=False)
  df = synthetic.table(meta, x)
  feats = [c for c in df.columns if c.startswith("f")]
  ref = normalize(df, features=feats, meta_features=list(meta.columns),
                  samples="Metadata_control == True", method="spherize",
                  spherize_method="ZCA-cor", spherize_epsilon=1e-6)
  ours = sphering.sphere(df, "Metadata_control == True", "ZCA-cor", epsilon=1e-6)
  scale = np.abs(ref[feats].to_numpy()).max()
  np.testing.assert_allclose(ours[feats].to_numpy(), ref[feats].to_numpy(), rtol=0,
                             atol=RTOL32 * scale)


@pytest.mark.parametrize("method", ["ZCA", "ZCA-cor", "PCA"])
def test_controls_covariance_is_identity(method):
  x = data(300, 24, seed=1)
  fitted = sphering.fit(x, method, reg=0.0)
  y = fitted.apply(x, np.float64)
  target = np.eye(24)
  np.testing.assert_allclose(np.cov(y.T), target, atol=1e-8)
  np.testing.assert_allclose(np.cov(fitted.apply(x).T), target, atol=1e-3)


def test_rank_deficient_controls_are_white_on_their_span():
  x = data(12, 20, seed=2)
  fitted = sphering.fit(x, "ZCA", reg=0.0)
  y = fitted.apply(x, np.float64)
  xc = x - x.mean(0)
  _, s, vt = np.linalg.svd(xc, full_matrices=False)
  v = vt[:fitted.rank].T
  np.testing.assert_allclose(v.T @ np.cov(y.T) @ v, np.eye(fitted.rank), atol=1e-8)


def test_lambda_form_is_the_papers_whitening():
  x = data(100, 10, seed=3)
  lam = 0.5
  fitted = sphering.fit(x, "ZCA", reg=lam, ddof=0)
  # The Cell Painting CNN code: C = Xc'Xc / n, W = V diag(1/sqrt(s + λ)) V'.
  xc = x - x.mean(0)
  s, v = np.linalg.eigh(xc.T @ xc / len(x))
  w = v @ np.diag(1.0 / np.sqrt(s + lam)) @ v.T
  np.testing.assert_allclose(fitted.apply(x, np.float64), xc @ w, atol=1e-10)


def test_per_plate_fit_uses_each_plates_controls():
  meta, x = synthetic.wells(n_compounds=20, n_controls=64, dim=8, ties=False)
  df = synthetic.table(meta, x)
  ours = sphering.sphere(df, "Metadata_control == True", "ZCA", reg=0.1, by="Metadata_Plate")
  feats = [c for c in df.columns if c.startswith("f")]
  for plate in df["Metadata_Plate"].unique():
    rows = (df["Metadata_Plate"] == plate).to_numpy()
    ctl = rows & df["Metadata_control"].to_numpy()
    alone = sphering.fit(x[ctl], "ZCA", reg=0.1).apply(x[rows])
    np.testing.assert_allclose(ours.loc[rows, feats].to_numpy(), alone, atol=1e-5)


def test_knee_of_a_spectrum():
  # Flat tail after a steep head: the knee is where the head ends.
  spectrum = np.concatenate([np.linspace(100, 10, 5), np.linspace(1.0, 0.5, 45)])
  idx = sphering.knee_index(spectrum)
  assert 3 <= idx <= 6
  assert sphering.knee_regularization(spectrum) == pytest.approx(spectrum[idx] / 10)


def test_bad_input():
  meta, x = synthetic.wells(dim=8, ties=False)
  df = synthetic.table(meta, x)
  with pytest.raises(InputError, match="no control rows"):
    sphering.sphere(df, "Metadata_compound == 'none'")
  df.loc[3, "f2"] = np.nan
  with pytest.raises(InputError, match="'f2'.*NaN"):
    sphering.sphere(df, "Metadata_control == True")
  with pytest.raises(InputError, match="constant"):
    sphering.fit(np.ones((10, 3)) + np.arange(3), "ZCA-cor")
