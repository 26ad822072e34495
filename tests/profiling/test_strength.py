"""Treatment strength against a direct pandas computation."""

from __future__ import annotations

import numpy as np
import pytest

from cellrep.errors import InputError
from cellrep.profiling import strength, synthetic


@pytest.fixture(scope="module")
def wells():
  meta, x = synthetic.wells(n_compounds=30, n_controls=24, dim=12, ties=False, seed=6)
  return synthetic.table(meta, x)


def test_matches_direct_computation(wells):
  out = strength.treatment_strength(wells, "Metadata_control == True", "Metadata_compound")
  feats = [c for c in wells.columns if c.startswith("f")]
  z = np.empty(len(wells))
  for _, plate in wells.groupby("Metadata_Plate"):
    ctl = plate[plate["Metadata_control"]]
    d = np.linalg.norm(plate[feats].to_numpy(np.float64) - ctl[feats].median().to_numpy(), axis=1)
    dc = d[plate["Metadata_control"].to_numpy()]
    z[plate.index] = (d - dc.mean()) / dc.std(ddof=1)
  ref = (wells.assign(z=z)[~wells["Metadata_control"]].groupby("Metadata_compound")["z"].mean())
  got = out.set_index("Metadata_compound")["strength"]
  np.testing.assert_allclose(got.loc[ref.index], ref, rtol=1e-5)
  assert (out["strength_group"] == "weakest").sum() == 6
  assert out["strength"].is_monotonic_increasing
  assert set(out["strength_group"].iloc[:6]) == {"weakest"}
  assert set(out["strength_group"].iloc[-6:]) == {"strongest"}


def test_groups():
  groups = strength.strength_groups(np.arange(10.0), 0.2)
  assert list(groups) == ["weakest"] * 2 + [""] * 2 + ["median"] * 2 + [""] * 2 + ["strongest"] * 2


def test_plate_without_controls(wells):
  df = wells[~((wells["Metadata_Plate"] == "P1") & wells["Metadata_control"])]
  with pytest.raises(InputError, match="'P1' has 0 control wells"):
    strength.treatment_strength(df, "Metadata_control == True", "Metadata_compound")
