"""Aggregation against pycytominer's aggregate (pandas groupby median / mean)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pycytominer import aggregate as pycytominer_aggregate

from cellrep.errors import InputError
from cellrep.profiling import aggregate, synthetic

STRATA = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]


@pytest.fixture(scope="module")
def cells():
  return synthetic.cells(sites=3, cells_per_site=4)


@pytest.mark.parametrize("operation", ["median", "mean"])
def test_matches_pycytominer(cells, operation):
  # Uneven group sizes (odd and even medians): drop a few cells.
  df = cells.drop(index=[0, 5, 6, 17]).reset_index(drop=True)
  feats = [c for c in df.columns if c.startswith("f")]
  ref = pycytominer_aggregate(df, strata=STRATA, features=feats, operation=operation)
  ours = aggregate.aggregate(df, STRATA, operation)
  pd.testing.assert_frame_equal(ours[STRATA], ref[STRATA])
  # float32 features: pandas reduces in float64, we in float32 (means) or exactly (medians).
  np.testing.assert_allclose(ours[feats].to_numpy(), ref[feats].to_numpy(), rtol=1e-6, atol=1e-6)


def test_constant_metadata_is_kept(cells):
  wells = aggregate.aggregate(cells, ["Metadata_Plate", "Metadata_Well"], "median")
  assert "Metadata_compound" in wells.columns and "Metadata_Site" not in wells.columns


def test_levels(cells):
  levels = aggregate.aggregate_levels(cells, STRATA, ["Metadata_Plate", "Metadata_Well"],
                                      ["Metadata_compound"])
  feats = [c for c in cells.columns if c.startswith("f")]
  sites = cells.groupby(STRATA)[feats].median()
  wells = sites.groupby(["Metadata_Plate", "Metadata_Well"]).mean()
  compound = cells.groupby(["Metadata_Plate", "Metadata_Well"])["Metadata_compound"].first()
  wells = wells.join(compound)
  trt = wells.groupby("Metadata_compound")[feats].mean()
  np.testing.assert_allclose(levels["treatment"][feats].to_numpy(), trt.to_numpy(), atol=1e-5)


def test_nan_columns_are_dropped_and_reported(cells):
  df = cells.copy()
  df.loc[7, "f3"] = np.nan
  out = aggregate.aggregate(df, STRATA, "median")
  assert out.attrs["dropped_features"] == ["f3"] and "f3" not in out.columns
  with pytest.raises(InputError, match="'f3'.*NaN"):
    aggregate.aggregate(df, STRATA, "median", nan="raise")


def test_bad_input(cells):
  with pytest.raises(InputError, match="Metadata_Nope.*does not exist"):
    aggregate.aggregate(cells, ["Metadata_Nope"])
  with pytest.raises(InputError, match="aggregation"):
    aggregate.aggregate(cells, STRATA, "max")
