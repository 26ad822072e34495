"""Synthetic Cell Painting plates: a DeepProfiler project that the ingester reads as it is."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellrep.data import deepprofiler_project as dp
from cellrep.data import synthetic_cellpainting as sc
from cellrep.errors import BadValue
from tests.data import test_deepprofiler_project

# 2 plates x 24 wells (4 DMSO + 4 compounds x 5 replicates) x 2 sites of 128 px.
SMALL = sc.CellPaintingConfig(plates=2, wells=24, sites=2, image_size=128, cells_per_site=8,
                              moas=2, compounds_per_moa=2, controls_per_plate=4)
TINY = sc.CellPaintingConfig(plates=1, wells=6, sites=1, image_size=64, cells_per_site=4,
                             moas=1, compounds_per_moa=2, controls_per_plate=2)
INDEX_COLUMNS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", *sc.CHANNELS,
                 "Metadata_compound", "Metadata_moa", "Metadata_control", "Metadata_strength",
                 "Metadata_row", "Metadata_col"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
  """(root, summary, index, store) of the SMALL project, ingested once."""
  root = tmp_path_factory.mktemp("synthetic_cp") / "project"
  summary = sc.write_project(root, SMALL)
  store = dp.ingest_deepprofiler(root, root.parent / "store", channels=sc.CHANNELS,
                                 label_column="Metadata_compound")
  index = pd.read_csv(root / "metadata" / "index.csv")
  return root, summary, index, store


def _locations(root, row) -> pd.DataFrame:
  return pd.read_csv(root / "locations" / row.Metadata_Plate
                     / f"{row.Metadata_Well}-{row.Metadata_Site}-Nuclei.csv")


def test_project_is_what_the_ingester_reads(project):
  root, summary, index, store = project
  assert list(index.columns) == INDEX_COLUMNS
  assert len(index) == summary["sites"] == 2 * 24 * 2
  assert all(re.fullmatch(r"[A-P](0[1-9]|1[0-9]|2[0-4])", w) for w in index.Metadata_Well)
  assert (index.Metadata_Well.str[0].map(ord) - ord("A") + 1 == index.Metadata_row).all()
  assert (index.Metadata_Well.str[1:].astype(int) == index.Metadata_col).all()
  # The same 24 positions on both plates, edge wells among them.
  wells = index.groupby("Metadata_Plate").Metadata_Well.apply(frozenset)
  assert len(set(wells)) == 1 and len(wells.iloc[0]) == 24
  assert ((index.Metadata_row.isin([1, 16])) | (index.Metadata_col.isin([1, 24]))).any()
  first = index.iloc[0]
  site = f"{first.Metadata_Well}_s{first.Metadata_Site}"
  assert first.DNA == f"{first.Metadata_Plate}/{site}_DNA.tiff"
  image = tifffile.imread(root / "images" / first.DNA)
  assert image.dtype == np.uint16 and image.shape == (128, 128)

  assert store.meta.channels == sc.CHANNELS
  assert len(store.meta.fovs) == len(index)
  counts = [len(_locations(root, r)) for r in index.itertuples()]
  assert min(counts) >= 1
  assert sum(counts) == len(store.cells) == summary["cells"]
  per_fov = store.cells.groupby("fov_name").size()
  names = [f"{r.Metadata_Plate}_{r.Metadata_Well}_{r.Metadata_Site}" for r in index.itertuples()]
  assert per_fov.loc[names].tolist() == counts
  xy = pd.concat([_locations(root, r) for r in index.itertuples()])
  assert ((xy >= 0) & (xy < 128)).all().all()
  assert (np.minimum(xy, 128 - xy).min(axis=1) < SMALL.cell_radius).mean() > 0.2  # near borders
  assert set(store.cells.label) == {"DMSO", "cpd000", "cpd001", "cpd002", "cpd003"}


def test_controls_and_every_compound_on_every_plate(project):
  _, summary, index, _ = project
  wells = index.drop_duplicates(["Metadata_Plate", "Metadata_Well"])
  for _, plate in wells.groupby("Metadata_Plate"):
    controls = plate[plate.Metadata_control]
    assert len(controls) == 4
    assert (controls.Metadata_compound == "DMSO").all()
    assert (controls.Metadata_moa == "control").all()
    assert (controls.Metadata_strength == 0).all()
    replicates = plate[~plate.Metadata_control].Metadata_compound.value_counts()
    assert sorted(replicates.index) == sorted(summary["compounds"]) and (replicates == 5).all()
  # Strengths graded evenly over (0, 1), each MoA spanning the range.
  strengths = wells.groupby("Metadata_compound").Metadata_strength.first().drop("DMSO")
  np.testing.assert_allclose(sorted(strengths), [0, 1 / 3, 2 / 3, 1], atol=1e-6)
  moa = wells.groupby("Metadata_compound").Metadata_moa.first().drop("DMSO")
  assert moa.nunique() == 2 and (strengths.groupby(moa).max() > 0.5).all()
  # The layout differs between plates (position and treatment not confounded).
  maps = wells.pivot(index="Metadata_Well", columns="Metadata_Plate", values="Metadata_compound")
  assert (maps.iloc[:, 0] != maps.iloc[:, 1]).any()


def test_illumination_is_uneven_before_correction(project):
  root, _, index, _ = project
  controls = index[index.Metadata_control]
  ratios = []
  for _, sites in controls.groupby("Metadata_Plate"):
    # The median over sites is the lit background (cells cover a third of a site).
    mean = np.median([tifffile.imread(root / "images" / p).astype(float) for p in sites.ER], 0)
    q = 128 // 8
    centre = mean[3 * q:5 * q, 3 * q:5 * q].mean()
    corners = [mean[:q, :q], mean[:q, -q:], mean[-q:, :q], mean[-q:, -q:]]
    ratios.append(max(abs(np.log(c.mean() / centre)) for c in corners))
  assert min(ratios) > np.log(1.15), ratios


def _cell_intensities(root, index) -> pd.DataFrame:
  """Each cell's mean per channel in a disk of 1.5 nuclear radii, camera offset removed."""
  yy, xx = np.mgrid[0:128, 0:128] + 0.5
  rows = []
  for r in index.itertuples():
    planes = np.stack([tifffile.imread(root / "images" / getattr(r, ch)) for ch in sc.CHANNELS])
    for x, y in _locations(root, r).to_numpy():
      disk = (yy - y) ** 2 + (xx - x) ** 2 < (1.5 * SMALL.nucleus_radius) ** 2
      rows.append([r.Metadata_Plate, r.Metadata_compound,
                   *(planes[:, disk].mean(axis=1) - sc._CAMERA_OFFSET)])
  return pd.DataFrame(rows, columns=["plate", "compound", *sc.CHANNELS])


def test_strong_compounds_change_the_cells_more_than_weak_ones(project):
  root, summary, index, _ = project
  cells = _cell_intensities(root, index)
  logs = np.log(cells.groupby(["plate", "compound"])[list(sc.CHANNELS)].mean())
  # Within a plate (its gains cancel), then averaged over plates.
  change = (logs - logs.xs("DMSO", level="compound")).groupby(level="compound").mean()
  distance = np.linalg.norm(change.drop("DMSO"), axis=1)
  strength = [summary["compounds"][c]["strength"] for c in change.drop("DMSO").index]
  strongest, weakest = distance[np.argmax(strength)], distance[np.argmin(strength)]
  assert strongest > 2 * weakest and strongest > 0.1, dict(zip(change.index[1:], distance))


def test_same_seed_same_bytes(tmp_path):
  def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

  a, b = tmp_path / "a", tmp_path / "b"
  sc.write_project(a, TINY)
  sc.write_project(b, TINY)
  assert files(a) == files(b)
  sc.write_project(tmp_path / "c", sc.from_config({**_fields(TINY), "seed": 1}))
  assert files(a) != files(tmp_path / "c")
  assert sorted(p.name for p in (a / "metadata").iterdir()) == ["index.csv", sc.TRUTH_FILE]


def _fields(cfg):
  return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def test_png_holds_the_same_pixels_and_ingests(tmp_path):
  sc.write_project(tmp_path / "tiff", TINY)
  png = sc.from_config({**_fields(TINY), "image_format": "png", "strength_range": [0.0, 1.0]})
  sc.write_project(tmp_path / "png", png)
  index = pd.read_csv(tmp_path / "png" / "metadata" / "index.csv")
  for path in index.Mito:
    assert path.endswith(".png")
    np.testing.assert_array_equal(
        dp.read_image(tmp_path / "png" / "images" / path),
        tifffile.imread(tmp_path / "tiff" / "images" / path.replace(".png", ".tiff")))
  store = dp.ingest_deepprofiler(tmp_path / "png", tmp_path / "store", channels=sc.CHANNELS,
                                 label_column="Metadata_compound")
  assert len(store.meta.fovs) == 6


def test_own_project_is_replaced_another_kept_unless_overwritten(tmp_path):
  sc.write_project(tmp_path / "ours", TINY)
  small = sc.from_config({**_fields(TINY), "wells": 4})
  assert sc.write_project(tmp_path / "ours", small)["sites"] == 4
  assert len(list((tmp_path / "ours" / "locations").rglob("*.csv"))) == 4  # no stale files
  truth = json.loads((tmp_path / "ours" / "metadata" / sc.TRUTH_FILE).read_text())
  assert truth["config"]["wells"] == 4 and set(truth["compounds"]) == {"cpd000", "cpd001"}

  theirs = test_deepprofiler_project.write_project(tmp_path / "theirs")
  with pytest.raises(BadValue, match="already holds a project") as e:
    sc.write_project(theirs, TINY)
  assert e.value.field == "directory"
  assert (theirs / "metadata" / "index.csv").exists()
  assert sc.write_project(theirs, TINY, overwrite=True)["sites"] == 6


@pytest.mark.parametrize("field, value", [
    ("plates", 0), ("plates", 2.5), ("wells", 385), ("sites", 0), ("image_size", 16),
    ("cells_per_site", 0), ("cell_radius", 4.0), ("moas", 0), ("controls_per_plate", 0),
    ("controls_per_plate", 380), ("strength_range", (1.0, 0.5)), ("strength_range", (0.0,)),
    ("noise", -1.0), ("illumination", float("nan")), ("seed", -1), ("image_format", "jpeg"),
])
def test_bad_values_name_their_field(field, value):
  with pytest.raises(BadValue) as e:
    sc.from_config({field: value})
  assert e.value.field == field and field in str(e.value)


def test_from_config_refuses_unknown_fields():
  with pytest.raises(BadValue, match="plate: unknown field") as e:
    sc.from_config({"plate": 2})
  assert e.value.field == "plate"
  assert sc.from_config({"plates": 2, "strength_range": [0.2, 0.8]}) == sc.CellPaintingConfig(
      plates=2, strength_range=(0.2, 0.8))
