"""DeepProfiler's output layout: one .npz a site, index.csv, sites met again appended."""

import numpy as np
import pandas as pd

from cellrep.data import deepprofiler


def test_sites_by_plate_well_site_and_a_site_met_again(tmp_path):
  cells = pd.DataFrame({"fov_name": ["f0"] * 5, "x": np.arange(5.0), "y": np.arange(5.0) + 10,
                        "Metadata_Plate": ["P1"] * 5, "Metadata_Well": ["A01", "A01", "B02", "B02",
                                                                         "A01"],
                        "Metadata_Site": [1, 1, 2, 2, 1]})
  features = np.arange(10, dtype=np.float32).reshape(5, 2)
  writer = deepprofiler.Writer(tmp_path)
  writer.add(cells.iloc[:3], features[:3])  # A01 A01 B02
  writer.add(cells.iloc[3:], features[3:])  # B02 A01 (A01 again)
  assert writer.close() == 2
  index = pd.read_csv(tmp_path / "index.csv", dtype=str)
  assert index.values.tolist() == [["P1", "A01", "1"], ["P1", "B02", "2"]]
  with np.load(tmp_path / "features" / "P1" / "A01_1.npz", allow_pickle=True) as a:
    np.testing.assert_array_equal(a["features"], features[[0, 1, 4]])
    np.testing.assert_array_equal(a["locations"], [[0, 10], [1, 11], [4, 14]])
    assert a["metadata"].item() == {"Plate": "P1", "Well": "A01", "Site": "1", "Model": "cellrep"}
  with np.load(tmp_path / "features" / "P1" / "B02_2.npz", allow_pickle=True) as b:
    np.testing.assert_array_equal(b["features"], features[[2, 3]])
  assert not list(tmp_path.rglob(".*"))  # no temporary left behind
