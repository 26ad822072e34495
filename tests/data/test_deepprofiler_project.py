"""A DeepProfiler project's inputs (index.csv, images, nuclei locations) ingested into a store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellrep.data import ingest
from cellrep.data.crops import CropSource
from cellrep.data.illumination import illumination_function, stretch_to_uint8
from cellrep.errors import InputError

CHANNELS = ("DNA", "RNA", "ER", "AGP", "Mito")
H, W = 96, 80


def _field(plate: int) -> np.ndarray:
  """An uneven illumination: bright in one corner, dim in the other."""
  yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
  return 0.4 + (yy + xx * (1 + plate)) / 2


def write_project(root, png_plate: int = 1):
  """2 plates x 2 wells x 2 sites; plate `png_plate`'s images are 16-bit PNG, the rest TIFF."""
  rng = np.random.default_rng(0)
  rows = []
  for p in range(2):
    for well in ("A01", "B02"):
      for site in (1, 2):
        plate = f"P{p}"
        n = 6
        xy = np.column_stack([rng.uniform(0, W - 1, n), rng.uniform(0, H - 1, n)])
        xy[0] = (0.5, H - 0.5)  # a nucleus in a corner: its crop leaves the image
        loc = root / "locations" / plate / f"{well}-{site}-Nuclei.csv"
        loc.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"Nuclei_Location_Center_X": xy[:, 0], "Nuclei_Location_Center_Y": xy[:, 1],
                      "Other": 1}).to_csv(loc, index=False)
        row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": str(site),
               "Metadata_Compound": "DMSO" if well == "A01" else "cpd1", "Split": "train"}
        for k, ch in enumerate(CHANNELS):
          signal = 1000 + 200 * k + rng.normal(0, 20, (H, W))
          for x, y in xy:
            signal[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3] += 3000
          image = np.clip(signal * _field(p), 0, 65535).astype(np.uint16)
          rel = f"{plate}/{well}_s{site}_{ch}." + ("png" if p == png_plate else "tif")
          (root / "images" / plate).mkdir(parents=True, exist_ok=True)
          if p == png_plate:
            Image.fromarray(image).save(root / "images" / rel)
          else:
            tifffile.imwrite(root / "images" / rel, image)
          row[ch] = rel
        rows.append(row)
  (root / "metadata").mkdir(parents=True, exist_ok=True)
  pd.DataFrame(rows).to_csv(root / "metadata" / "index.csv", index=False)
  return root


def _cfg(root, out, **kw):
  return {"format": "deepprofiler", "input": str(root), "output": str(out),
          "channels": ",".join(CHANNELS), "label_field": "Metadata_Compound", **kw}


def test_project_becomes_a_store_of_nuclei(tmp_path):
  root = write_project(tmp_path / "inputs")
  store = ingest.ingest(_cfg(root, tmp_path / "store"))
  assert store.meta.channels == CHANNELS and store.meta.dtype == "uint8"
  assert len(store.meta.fovs) == 8 and store.meta.fovs[0] == "P0_A01_1"
  assert store.meta.classes == ("DMSO", "cpd1")
  cells = store.cells
  assert len(cells) == 8 * 6
  first = cells[cells.fov_name == "P0_A01_1"]
  loc = pd.read_csv(root / "locations" / "P0" / "A01-1-Nuclei.csv")
  np.testing.assert_array_equal(first.x, np.floor(loc.Nuclei_Location_Center_X).astype(int))
  np.testing.assert_array_equal(first.y, np.floor(loc.Nuclei_Location_Center_Y).astype(int))
  assert set(cells.label) == {"DMSO", "cpd1"}
  assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Compound",
          "Metadata_Split"} <= set(cells.columns)
  assert (cells[cells.fov_name.str.startswith("P1_B02")].Metadata_Compound == "cpd1").all()
  # The corner nucleus's 128 px crop is zero-padded, finite, and centred on it.
  source = CropSource(store, 128)
  crop = source.read(np.array([first.index[0]]))["crop"][0]
  assert np.isfinite(crop).all() and crop.shape == (5 + 2, 128, 128)
  # Centre (y, x) = (95, 0): image rows 31..95 land on crop rows 0..64, columns 0..63 on 64..127.
  assert crop[:5, 65:, :].max() == 0 and crop[:5, :, :64].max() == 0
  assert crop[:5, 62:65, 64:67].mean() > 150  # the bright nucleus, at the centre
  assert crop[:5, :60, 80:].mean() < 60        # background


def test_illumination_correction_flattens_the_field(tmp_path):
  root = write_project(tmp_path / "inputs")
  on = ingest.ingest(_cfg(root, tmp_path / "on"))
  off = ingest.ingest(_cfg(root, tmp_path / "off", illumination=False))

  def background_trend(store):  # mean of the left vs the right third, background pixels
    img = store.images[0, 0].read().result().astype(float)
    return abs(img[:, :W // 3].mean() - img[:, -W // 3:].mean())

  assert background_trend(on) < 0.3 * background_trend(off)
  gains = illumination_function(np.outer(np.linspace(1, 3, H), np.ones(W)))
  assert gains.shape == (H, W) and gains.mean() == pytest.approx(1, abs=1e-5)
  assert gains[-1].mean() > 2 * gains[0].mean()
  x = np.arange(10000, dtype=np.float32).reshape(100, 100)
  u = stretch_to_uint8(x)
  assert u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
  assert stretch_to_uint8(np.ones((4, 4))).max() == 0


def test_bad_projects_name_the_file_and_write_nothing(tmp_path):
  root = write_project(tmp_path / "inputs")
  out = tmp_path / "store"

  def fails(match, **kw):
    with pytest.raises(InputError, match=match):
      ingest.ingest(_cfg(root, out, **kw))
    assert not out.exists()

  fails("index.csv: no column 'Nucleus'", channels="DNA,Nucleus")
  fails("index.csv: no column 'Metadata_MoA'", label_field="Metadata_MoA")
  index = pd.read_csv(root / "metadata" / "index.csv")
  (root / "images" / index.DNA[3]).unlink()
  fails(f"{index.DNA[3].split('/')[-1]}: image not found")
  write_project(root)
  loc = root / "locations" / "P1" / "B02-2-Nuclei.csv"
  pd.DataFrame({"Nuclei_Location_Center_X": [5.0, 500.0], "Nuclei_Location_Center_Y": [5.0, 6.0]}
               ).to_csv(loc, index=False)
  fails("B02-2-Nuclei.csv: 1 nuclei outside the 96x80 image, first at x=500")
  pd.DataFrame({"X": [5.0]}).to_csv(loc, index=False)
  fails("B02-2-Nuclei.csv: no column 'Nuclei_Location_Center_X'")
  loc.unlink()
  fails("B02-2-Nuclei.csv: locations file not found")


def test_command_line(tmp_path):
  import subprocess
  import sys

  from tests.conftest import REPO
  root = write_project(tmp_path / "inputs")
  base = [sys.executable, "-m", "cellrep.launch", "--config=configs/ingest.py:format=deepprofiler",
          f"--config.ingest.input={root}", "--compilation_cache="]
  bad = subprocess.run(base + [f"--workdir={tmp_path / 'w1'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "config.ingest.channels" in bad.stderr.splitlines()[-1]
  assert not (tmp_path / "w1" / "store").exists()
  ok = subprocess.run(base + [f"--workdir={tmp_path / 'w2'}", "--config.ingest.channels=DNA,RNA",
                              "--config.ingest.label_field=Metadata_Compound"],
                      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "48 cells in 8 FOVs, 2 channels" in ok.stderr
