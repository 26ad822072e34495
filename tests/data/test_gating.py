"""Landmark gating: exact labels on hand-made numbers, a relabelled copy, the real MIBI FOV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.data import gating, ingest
from cellrep.data.store import StoreWriter
from cellrep.errors import BadValue, InputError

RULES = {"T cell": ["CD3"], "B cell": ["CD20"], "Tumor": ["PanKeratin", "ECadherin"]}


def test_parse_rules():
  assert gating.parse_rules(" T cell=CD3; Tumor = PanKeratin+ECadherin ;") == {
      "T cell": ["CD3"], "Tumor": ["PanKeratin", "ECadherin"]}
  for bad in ("T cell", "=CD3", "T=", "T=CD3;T=CD4"):
    with pytest.raises(InputError, match="gating rule"):
      gating.parse_rules(bad)


def test_gate_exact():
  # Five cells; with percentile 60 each marker's threshold is its 3rd-4th value.
  expr = pd.DataFrame({
      "CD3":        [9, 0, 0, 8, 0],
      "CD20":       [0, 9, 0, 8, 0],
      "PanKeratin": [0, 0, 9, 0, 9],
      "ECadherin":  [0, 0, 9, 0, 0],
  }, index=[10, 11, 12, 13, 14], dtype=float)
  labels = gating.gate(expr, RULES, percentile=60)
  # 10: CD3 only -> T; 11: CD20 -> B; 12: both tumour markers -> Tumor;
  # 13: CD3 and CD20 -> ambiguous; 14: PanKeratin without ECadherin -> none.
  assert labels.index.tolist() == [10, 11, 12, 13, 14]
  assert labels.fillna("-").tolist() == ["T cell", "B cell", "Tumor", "-", "-"]
  assert labels.dtype == "string"


def test_gate_threshold_is_strict_and_nan_is_negative():
  expr = pd.DataFrame({"CD3": [1.0, 1.0, 1.0, np.nan, 2.0]})
  labels = gating.gate(expr, {"T": ["CD3"]}, percentile=50)
  assert labels.fillna("-").tolist() == ["-", "-", "-", "-", "T"]


def test_gate_refuses_unknown_markers():
  with pytest.raises(InputError, match="'Tumor'.*PanKeratin"):
    gating.gate(pd.DataFrame({"CD3": [1.0]}), {"Tumor": ["PanKeratin"]})
  with pytest.raises(InputError, match="percentile"):
    gating.gate(pd.DataFrame({"CD3": [1.0]}), {"T": ["CD3"]}, percentile=100)


@pytest.fixture()
def tiny_store(tmp_path):
  """Two FOVs, 3 + 2 cells, channels CD3 and CD20: cell k of FOV f is bright in one marker."""
  masks = [np.zeros((6, 8), np.int32), np.zeros((5, 5), np.int32)]
  masks[0][0:2, 0:3], masks[0][3:5, 0:3], masks[0][0:3, 5:8] = 1, 2, 3
  masks[1][0:2, 0:2], masks[1][3:5, 3:5] = 4, 9
  bright = {(0, 1): "CD3", (0, 2): "CD20", (0, 3): None, (1, 4): "CD3", (1, 9): "CD20"}
  images = []
  for f, mask in enumerate(masks):
    image = np.ones((2, *mask.shape), np.float32)
    for (ff, cell), marker in bright.items():
      if ff == f and marker:
        image[["CD3", "CD20"].index(marker)][mask == cell] = 50.0
    images.append(image)
  with StoreWriter(tmp_path / "raw", ["CD3", "CD20"], ["a", "b"], [m.shape for m in masks]) as w:
    for f in range(2):
      w.write_fov(f, images[f], masks[f], {1: "old"} if f == 0 else None,
                  metadata={"Metadata_Plate": f"P{f}"})
    return w.commit(), images, masks


def test_gate_and_relabel_tiny_store(tiny_store, tmp_path):
  store, images, masks = tiny_store
  rules = {"T cell": ["CD3"], "B cell": ["CD20"], "NK": ["CD3", "CD20"]}
  labels = gating.gate_store(store, rules, percentile=50)
  by_cell = dict(zip(zip(store.cells.fov_name, store.cells.cell_id), labels.fillna("-")))
  assert by_cell == {("a", 1): "T cell", ("a", 2): "B cell", ("a", 3): "-",
                     ("b", 4): "T cell", ("b", 9): "B cell"}
  # Percentile gates are ranks: the monotone arcsinh does not change who passes.
  assert labels.equals(gating.gate_store(store, rules, percentile=50, cofactor=None))
  # NK passes no cell alone (its cells are T and B cells too): refused, nothing written.
  with pytest.raises(BadValue, match=r"\['NK'\] match no cell"):
    gating.gate_and_relabel(store, rules, tmp_path / "gated", percentile=50)
  assert not (tmp_path / "gated").exists()
  del rules["NK"]
  out = gating.gate_and_relabel(store, rules, tmp_path / "gated", percentile=50)
  assert out.meta.classes == ("T cell", "B cell")  # rule order
  assert out.cells.label.fillna("-").tolist() == list(labels.fillna("-"))
  assert out.cells.Metadata_Plate.tolist() == ["P0"] * 3 + ["P1"] * 2
  for f in range(2):
    image, mask = out.read_fov(f)
    np.testing.assert_array_equal(image, images[f])
    np.testing.assert_array_equal(mask, masks[f])


def test_relabel_in_place_and_partial_labels(tiny_store):
  store, _, _ = tiny_store
  labels = pd.Series(["x", "y"], index=[0, 4], dtype="string")  # other rows: unlabelled
  out = gating.relabel_store(store, labels, store.path, overwrite=True)
  assert out.path == store.path
  assert out.cells.label.fillna("-").tolist() == ["x", "-", "-", "-", "y"]
  assert sorted(p.name for p in store.path.parent.iterdir()) == ["raw"]  # no temp dir left
  with pytest.raises(ValueError, match="rows not in"):
    gating.relabel_store(out, pd.Series(["x"], index=[99]), store.path.parent / "other")


def test_mibi_gating_gives_several_classes(shared_data, tmp_path):
  store = ingest.ingest_tiff_folder(shared_data / "mibi_fov8", tmp_path / "s")
  rules = {"T cell": ["CD3"], "B cell": ["CD20"], "Tumor": ["PanKeratin", "ECadherin"],
           "Stroma": ["SMA", "Vimentin"]}
  labels = gating.gate_store(store, rules, percentile=80, cofactor=5)
  assert labels.index.equals(store.cells.index)
  counts = labels.value_counts()
  assert (counts >= 3).sum() >= 3, counts.to_dict()
  assert labels.isna().sum() > len(labels) / 2  # landmarks are the unambiguous few, not everyone
