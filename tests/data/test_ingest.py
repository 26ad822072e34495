"""Ingest: the real MIBI FOV, small synthetic tiff and CellSighter folders, every refusal."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pandas as pd
import pytest
import tifffile

from cellrep.data import ingest
from cellrep.data.store import open_store
from cellrep.errors import BadValue, InputError

H, W = 12, 16


def _mask(h=H, w=W, cells=3) -> np.ndarray:
  """Vertical stripes: cell i fills columns [(i-1)*w//cells, i*w//cells) of the top rows."""
  m = np.zeros((h, w), np.int16)
  for i in range(1, cells + 1):
    m[1:h - 1, (i - 1) * w // cells:i * w // cells - 1] = i
  return m


def _tiff_fov(fov: pathlib.Path, channels: dict, mask, suffix=".tiff", seg="segmentation.tiff"):
  (fov / "TIFs").mkdir(parents=True)
  for name, a in channels.items():
    tifffile.imwrite(fov / "TIFs" / f"{name}{suffix}", a)
  tifffile.imwrite(fov / seg, mask)
  return fov


def _channels(rng, names=("CD3", "NaK ATPase", "CD20"), h=H, w=W, dtype=np.uint16):
  return {n: rng.integers(0, 200, (h, w)).astype(dtype) for n in names}


def _assert_nothing_written(tmp_path: pathlib.Path):
  # The inputs live in tmp_path/in; neither the store nor StoreWriter's temp dir may remain.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ---------------------------------------------------------------- mibi_fov8


@pytest.fixture(scope="module")
def mibi(shared_data, tmp_path_factory):
  out = tmp_path_factory.mktemp("mibi") / "store"
  return ingest.ingest_tiff_folder(shared_data / "mibi_fov8", out)


def test_mibi_cells_channels_shape(mibi, shared_data):
  seg = tifffile.imread(shared_data / "mibi_fov8" / "segmentation.tiff")
  ids = np.unique(seg)
  ids = ids[ids != 0]
  assert len(ids) == 272
  assert len(mibi.cells) == 272
  np.testing.assert_array_equal(np.sort(mibi.cells.cell_id.to_numpy()), ids)
  assert len(mibi.meta.channels) == 22
  assert "NaK ATPase" in mibi.meta.channels
  assert list(mibi.meta.channels) == sorted(mibi.meta.channels, key=lambda s: (s.lower(), s))
  assert mibi.meta.fov_shapes == ((1024, 1024),)
  assert mibi.meta.fovs == ("mibi_fov8",)
  assert mibi.meta.dtype == "uint8"
  assert mibi.cells.label.isna().all() and mibi.meta.classes == ()


def test_mibi_pixels_round_trip(mibi, shared_data):
  image, mask = mibi.read_fov(0)
  np.testing.assert_array_equal(mask, tifffile.imread(shared_data / "mibi_fov8" / "segmentation.tiff"))
  k = mibi.meta.channels.index("NaK ATPase")
  nak = tifffile.imread(shared_data / "mibi_fov8" / "TIFs" / "NaK ATPase.tiff")
  np.testing.assert_array_equal(image[k], nak)


# ---------------------------------------------------------------- tiff folders


def test_tiff_folder_single_fov_channels_and_labels(tmp_path):
  rng = np.random.default_rng(0)
  chans = _channels(rng)
  fov = _tiff_fov(tmp_path / "in" / "fovA", chans, _mask(), suffix=".tif")
  pd.DataFrame({"cell_id": [1, 3], "label": ["T cell", None]}).to_csv(
      tmp_path / "in" / "labels.csv", index=False)
  store = ingest.ingest_tiff_folder(fov, tmp_path / "out", channels="NaK ATPase, CD3",
                                    labels=tmp_path / "in" / "labels.csv")
  assert store.meta.channels == ("NaK ATPase", "CD3")
  assert store.meta.dtype == "uint16" and store.meta.fovs == ("fovA",)
  image, mask = store.read_fov(0)
  np.testing.assert_array_equal(image, np.stack([chans["NaK ATPase"], chans["CD3"]]))
  np.testing.assert_array_equal(mask, _mask())
  assert store.cells.set_index("cell_id").label.fillna("-").to_dict() == {1: "T cell", 2: "-", 3: "-"}
  assert store.meta.classes == ("T cell",)


def test_tiff_folder_of_fovs_sizes_labels_parquet_and_template(tmp_path):
  rng = np.random.default_rng(1)
  (tmp_path / "in" / "masks").mkdir(parents=True)
  for name, (h, w), suffix in (("b", (H, W), ".tiff"), ("a", (H + 4, W - 2), ".tif")):
    _tiff_fov(tmp_path / "in" / "data" / name, _channels(rng, h=h, w=w), _mask(h, w), suffix=suffix,
              seg=f"../../masks/{name}_whole_cell.tif")
  pd.DataFrame({"fov": ["a", "b", "b"], "cell_id": [2, 1, 2], "label": ["x", "y", "7"]}).to_parquet(
      tmp_path / "in" / "labels.parquet")
  store = ingest.ingest_tiff_folder(tmp_path / "in" / "data", tmp_path / "out",
                                    segmentation="../../masks/{fov}_whole_cell.tiff",
                                    labels=tmp_path / "in" / "labels.parquet")
  assert store.meta.fovs == ("a", "b")
  assert store.meta.fov_shapes == ((H + 4, W - 2), (H, W))
  assert store.meta.channels == ("CD20", "CD3", "NaK ATPase")
  labelled = store.cells.dropna(subset=["label"])
  assert sorted(zip(labelled.fov_name, labelled.cell_id, labelled.label)) == [
      ("a", 2, "x"), ("b", 1, "y"), ("b", 2, "7")]
  assert len(store.cells) == 6


def test_labels_table_numeric_classes(tmp_path):
  # A class column of integers with gaps reads back as floats; classes stay "3", not "3.0".
  (tmp_path / "t.csv").write_text("cell_id,label\n1,3\n2,\n3,12\n")
  labels = ingest.read_labels_table(tmp_path / "t.csv", ["f"])
  assert labels == {"f": {1: "3", 2: None, 3: "12"}}


@pytest.mark.parametrize("dtype,values,stored", [
    (np.int16, (0, 300), "uint16"),
    (np.int32, (-5, 10), "float32"),
    (np.int32, (0, 70000), "float32"),
    (np.float64, (0.5, 2.5), "float32"),
    (np.uint8, (0, 255), "uint8"),
])
def test_tiff_folder_pixel_dtypes(tmp_path, dtype, values, stored):
  a = np.full((H, W), values[0], dtype)
  a[0, 0] = values[1]
  fov = _tiff_fov(tmp_path / "in", {"c1": a, "c2": a}, _mask())
  store = ingest.ingest_tiff_folder(fov, tmp_path / "out")
  assert store.meta.dtype == stored
  np.testing.assert_array_equal(store.read_fov(0)[0][0], a.astype(stored))


def test_overwrite(tmp_path):
  fov = _tiff_fov(tmp_path / "in", _channels(np.random.default_rng(2)), _mask())
  ingest.ingest_tiff_folder(fov, tmp_path / "out")
  with pytest.raises(InputError, match="already exists"):
    ingest.ingest_tiff_folder(fov, tmp_path / "out")
  store = ingest.ingest_tiff_folder(fov, tmp_path / "out", channels=["CD3"], overwrite=True)
  assert open_store(tmp_path / "out").meta.channels == ("CD3",) == store.meta.channels


def _bad_tiff(tmp_path, case):
  """A tiff folder broken in one way: (root, kwargs, file named in the error, problem)."""
  rng = np.random.default_rng(3)
  chans, mask, root, kw = _channels(rng), _mask(), tmp_path / "in", {}
  if case == "channel shapes":
    chans["NaK ATPase"] = chans["NaK ATPase"][:, :-1]
    return _tiff_fov(root, chans, mask), kw, ["NaK ATPase.tiff", "CD20.tiff", f"{(H, W - 1)}", f"{(H, W)}"]
  if case == "segmentation shape":
    return _tiff_fov(root, chans, mask[:-2]), kw, ["segmentation.tiff", f"{(H - 2, W)}", f"{(H, W)}"]
  if case == "NaN":
    chans = {k: v.astype(np.float32) for k, v in chans.items()}
    chans["CD3"][2, 3] = np.nan
    return _tiff_fov(root, chans, mask), kw, ["CD3.tiff", "NaN/Inf", "(2, 3)"]
  if case == "Inf in a later FOV":  # the first FOV is already in the writer when this fails
    _tiff_fov(root / "f1", {k: v.astype(np.float32) for k, v in chans.items()}, mask)
    chans = {k: v.astype(np.float32) for k, v in chans.items()}
    chans["CD20"][0, 0] = np.inf
    _tiff_fov(root / "f2", chans, mask)
    return root, kw, ["f2", "CD20.tiff", "NaN/Inf"]
  if case == "missing channel":
    return _tiff_fov(root, chans, mask), {"channels": "CD3,CD99"}, ["CD99.tiff", "missing channel file"]
  if case == "channels differ between FOVs":
    _tiff_fov(root / "f1", chans, mask)
    del chans["CD20"]
    _tiff_fov(root / "f2", chans, mask)
    return root, kw, ["f2", "channels differ", "CD20"]
  if case == "empty FOV":
    return _tiff_fov(root, chans, np.zeros_like(mask)), kw, ["segmentation.tiff", "no cells"]
  if case == "unreadable":
    _tiff_fov(root, chans, mask)
    (root / "TIFs" / "CD3.tiff").write_bytes(b"not a tiff at all")
    return root, kw, ["CD3.tiff", "truncated or corrupt TIFF"]
  if case == "missing segmentation":
    _tiff_fov(root, chans, mask)
    (root / "segmentation.tiff").unlink()
    return root, kw, ["segmentation.tiff", "segmentation file missing"]
  if case == "label ids absent":
    _tiff_fov(root, chans, mask)
    pd.DataFrame({"cell_id": [1, 9], "label": ["a", "b"]}).to_csv(root / "labels.csv", index=False)
    return root, {"labels": root / "labels.csv"}, ["labels.csv", "absent from the segmentation", "[9]"]
  if case == "labels columns":
    _tiff_fov(root, chans, mask)
    pd.DataFrame({"id": [1], "cell_type": ["a"]}).to_csv(root / "labels.csv", index=False)
    return root, {"labels": root / "labels.csv"}, ["labels.csv", "no column", "cell_id", "label"]
  if case == "labels unknown fov":
    _tiff_fov(root, chans, mask)
    pd.DataFrame({"fov": ["zzz"], "cell_id": [1], "label": ["a"]}).to_csv(root / "labels.csv", index=False)
    return root, {"labels": root / "labels.csv"}, ["labels.csv", "zzz"]
  if case == "no TIFs folder":
    root.mkdir()
    return root, kw, [str(root), "no TIFs/ folder"]
  raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "channel shapes", "segmentation shape", "NaN", "Inf in a later FOV", "missing channel",
    "channels differ between FOVs", "empty FOV", "unreadable", "missing segmentation",
    "label ids absent", "labels columns", "labels unknown fov", "no TIFs folder"])
def test_tiff_folder_refusals(tmp_path, case):
  root, kw, expected = _bad_tiff(tmp_path, case)
  with pytest.raises(InputError) as e:
    ingest.ingest_tiff_folder(root, tmp_path / "out", **kw)
  for text in expected:
    assert text in str(e.value), (text, str(e.value))
  _assert_nothing_written(tmp_path)


# ---------------------------------------------------------------- CellSighter folders


def _cellsighter(root: pathlib.Path, fovs: dict, channels=("CD3", "CD20", "PanCK"), image_ext=".npz",
                 cells_ext=".npz", c2l_ext=".npz", images_dir="images"):
  """fovs: name -> (image [H, W, K], mask [H, W], classes per row); CellSighter's file layout."""
  ct = root / "CellTypes"
  for d in (f"data/{images_dir}", "cells", "cells2labels"):
    (ct / d).mkdir(parents=True, exist_ok=True)
  (root / "channels.txt").write_text("\n".join(channels) + "\n")
  for name, (image, mask, classes) in fovs.items():
    for sub, a, ext in ((f"data/{images_dir}", image, image_ext), ("cells", mask, cells_ext)):
      if ext == ".npz":
        np.savez(ct / sub / f"{name}.npz", data=a)
      else:
        tifffile.imwrite(ct / sub / f"{name}{ext}", a, photometric="minisblack")
    if c2l_ext == ".npz":
      np.savez(ct / "cells2labels" / f"{name}.npz", data=np.asarray(classes))
    else:
      (ct / "cells2labels" / f"{name}.txt").write_text("\n".join(str(c) for c in classes) + "\n")
  return root


def _cs_fov(rng, h=H, w=W, k=3, classes=(-1, 0, -1, 2)):
  return rng.integers(0, 50, (h, w, k)).astype(np.uint16), _mask(h, w).astype(np.int32), list(classes)


@pytest.mark.parametrize("image_ext,cells_ext,c2l_ext,images_dir", [
    (".npz", ".npz", ".npz", "images"),
    (".tif", ".tiff", ".txt", "images"),
    (".tiff", ".tif", ".txt", "antibodies"),  # the folder CellSighter's loader reads
])
def test_cellsighter_layouts(tmp_path, image_ext, cells_ext, c2l_ext, images_dir):
  rng = np.random.default_rng(4)
  fovs = {"FOV2": _cs_fov(rng, classes=[-1, 10, -1, 2]), "FOV1": _cs_fov(rng, h=H + 2, classes=[0, -1, 2, 2])}
  root = _cellsighter(tmp_path / "in", fovs, image_ext=image_ext, cells_ext=cells_ext,
                      c2l_ext=c2l_ext, images_dir=images_dir)
  store = ingest.ingest_cellsighter(root, tmp_path / "out")
  assert store.meta.fovs == ("FOV1", "FOV2")
  assert store.meta.channels == ("CD3", "CD20", "PanCK")
  assert store.meta.classes == ("2", "10")  # numeric order; "0" labels only the background row
  cells = store.cells
  got = {(f, int(i)): (None if pd.isna(v) else v)
         for f, i, v in zip(cells.fov_name, cells.cell_id, cells.label)}
  assert got == {("FOV1", 1): None, ("FOV1", 2): "2", ("FOV1", 3): "2",
                 ("FOV2", 1): "10", ("FOV2", 2): None, ("FOV2", 3): "2"}
  image, mask = store.read_fov(1)
  np.testing.assert_array_equal(image, np.moveaxis(fovs["FOV2"][0], -1, 0))
  np.testing.assert_array_equal(mask, fovs["FOV2"][1])


def test_cellsighter_class_names_blacklist_channels_first(tmp_path):
  rng = np.random.default_rng(5)
  image, mask, _ = _cs_fov(rng)
  root = _cellsighter(tmp_path / "in", {"a": (np.moveaxis(image, -1, 0), mask, [-1, 0, 1, -1])},
                      image_ext=".tiff", c2l_ext=".txt")
  store = ingest.ingest_cellsighter(root, tmp_path / "out", class_names="B cell,T cell,Tumor",
                                    blacklist=["CD20"])
  assert store.meta.channels == ("CD3", "PanCK")
  assert store.meta.classes == ("B cell", "T cell", "Tumor")
  assert store.cells.label.fillna("-").tolist() == ["B cell", "T cell", "-"]
  np.testing.assert_array_equal(store.read_fov(0)[0], np.moveaxis(image[..., [0, 2]], -1, 0))


def test_cellsighter_one_channel_saved_2d(tmp_path):
  image, mask, classes = _cs_fov(np.random.default_rng(8), k=1)
  root = _cellsighter(tmp_path / "in", {"a": (image[..., 0], mask, classes)}, channels=["DNA"])
  store = ingest.ingest_cellsighter(root, tmp_path / "out")
  np.testing.assert_array_equal(store.read_fov(0)[0], image[None, ..., 0])


def _bad_cellsighter(tmp_path, case):
  rng = np.random.default_rng(6)
  image, mask, classes = _cs_fov(rng)
  root, kw, c2l_ext = tmp_path / "in", {}, ".npz"
  if case == "channel count":
    image = image[..., :2]
    expect = ["a.npz", "2 channels", "channels.txt"]
  elif case == "segmentation shape":
    mask = mask[:, :-3]
    expect = ["cells/a.npz", f"{(H, W - 3)}", f"{(H, W, 3)}"]
  elif case == "short cells2labels":
    classes, c2l_ext = classes[:3], ".txt"
    expect = ["cells2labels/a.txt", "3 rows", "cell id 3"]
  elif case == "label ids absent":
    classes = classes + [-1, 1]
    expect = ["cells2labels/a.npz", "absent from the segmentation", "[5]"]
  elif case == "Inf pixels":
    image = image.astype(np.float32)
    image[3, 4, 1] = -np.inf
    expect = ["images/a.npz", "NaN/Inf"]
  elif case == "class names":
    kw = {"class_names": ["only"]}
    expect = ["cells2labels/a.npz", "class id 2", "1 class names"]
  elif case == "empty FOV":
    mask = np.zeros_like(mask)
    expect = ["cells/a.npz", "no cells"]
  elif case in ("missing cells2labels", "unreadable npz", "npz keys", "non-integer labels"):
    expect = {"missing cells2labels": ["cells2labels/a.npz", "cells2labels file missing"],
              "unreadable npz": ["images/a.npz", "not an npz file"],
              "npz keys": ["cells/a.npz", "no 'data' array"],
              "non-integer labels": ["cells2labels/a.txt", "non-integer"]}[case]
  else:
    raise AssertionError(case)
  _cellsighter(root, {"a": (image, mask, classes)}, c2l_ext=c2l_ext)
  ct = root / "CellTypes"
  if case == "missing cells2labels":
    (ct / "cells2labels" / "a.npz").unlink()
  elif case == "unreadable npz":
    (ct / "data" / "images" / "a.npz").write_bytes(b"garbage")
  elif case == "npz keys":
    np.savez(ct / "cells" / "a.npz", mask=mask, other=mask)
  elif case == "non-integer labels":
    (ct / "cells2labels" / "a.npz").unlink()
    (ct / "cells2labels" / "a.txt").write_text("-1\n0.5\n1\n1\n")
  return root, kw, expect


@pytest.mark.parametrize("case", [
    "channel count", "segmentation shape", "short cells2labels", "label ids absent", "Inf pixels",
    "class names", "empty FOV", "missing cells2labels", "unreadable npz", "npz keys",
    "non-integer labels"])
def test_cellsighter_refusals(tmp_path, case):
  root, kw, expected = _bad_cellsighter(tmp_path, case)
  with pytest.raises(InputError) as e:
    ingest.ingest_cellsighter(root, tmp_path / "out", **kw)
  for text in expected:
    assert text in str(e.value), (text, str(e.value))
  _assert_nothing_written(tmp_path)


def test_ingest_from_config(tmp_path):
  root = _cellsighter(tmp_path / "in", {"a": _cs_fov(np.random.default_rng(7))})
  cfg = ml_collections.ConfigDict({"format": "cellsighter", "input": str(root),
                                   "output": str(tmp_path / "out"), "class_names": ""})
  assert ingest.ingest(cfg).meta.classes == ("0", "2")
  assert len(open_store(tmp_path / "out").cells) == 3
  cfg.format = "zarr"
  with pytest.raises(BadValue, match="format"):
    ingest.ingest(cfg)
