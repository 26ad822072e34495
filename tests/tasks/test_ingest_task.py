"""The ingest job through its real entry points: `run(config, workdir)` and `python -m cellrep.launch`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from cellrep.data.store import open_store
from cellrep.errors import ConfigError, InputError
from cellrep.tasks import ingest as ingest_task
from tests.tasks.helpers import get_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def _get_config(arg=None):
  return get_config("ingest", arg)


def _launch(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "cellrep.launch", "--config=configs/ingest.py",
                         "--compilation_cache=", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=300)


@pytest.fixture()
def small_fov(tmp_path):
  fov = tmp_path / "fov1"
  (fov / "TIFs").mkdir(parents=True)
  mask = np.zeros((8, 10), np.uint16)
  mask[1:4, 1:4], mask[5:7, 5:9] = 1, 2
  for k, name in enumerate(("CD3", "CD20")):
    tifffile.imwrite(fov / "TIFs" / f"{name}.tif", np.full((8, 10), k, np.uint8))
  tifffile.imwrite(fov / "segmentation.tiff", mask)
  (fov / "labels.csv").write_text("cell_id,label\n2,T cell\n")
  return fov


def test_config_keys_are_typed_and_locked():
  config = _get_config()
  assert config.task == "ingest" and config.ingest.format == "tiff_folder"
  assert config.ingest.input is None and config.ingest.output is None
  config.ingest.input = "some/dir"
  with pytest.raises(TypeError):
    config.ingest.chunk_size = "big"
  with pytest.raises(AttributeError):
    config.ingest.inptu = "typo"
  mibi = _get_config("mibi")
  assert mibi.ingest.input.endswith("mibi_fov8") and "T cell=CD3" in mibi.gating.rules
  assert _get_config("format=cellsighter").ingest.format == "cellsighter"
  with pytest.raises(ConfigError):
    _get_config("bogus")


def test_run_writes_store_in_workdir(small_fov, tmp_path):
  config = _get_config()
  config.ingest.input = str(small_fov)
  config.ingest.labels = str(small_fov / "labels.csv")
  store = ingest_task.run(config, tmp_path / "wd")
  assert store.path == tmp_path / "wd" / "store"
  assert open_store(store.path).meta.channels == ("CD20", "CD3")
  assert store.cells.label.fillna("-").tolist() == ["-", "T cell"]
  assert "2 cells in 1 FOVs" in ingest_task.summary(store)
  with pytest.raises(InputError, match="already exists"):
    ingest_task.run(config, tmp_path / "wd")
  config.ingest.overwrite = True
  config.ingest.channels = "CD3"
  config.ingest.output = str(tmp_path / "elsewhere")
  assert ingest_task.run(config, tmp_path / "wd").meta.channels == ("CD3",)


def test_run_refuses_bad_config(small_fov, tmp_path):
  config = _get_config()
  with pytest.raises(ConfigError, match="ingest.input"):
    ingest_task.run(config, tmp_path)
  config.ingest.input = str(small_fov)
  config.ingest.format = "zarr"
  with pytest.raises(ConfigError, match="ingest.format"):
    ingest_task.run(config, tmp_path)
  config.ingest.format = "tiff_folder"
  config.ingest.labels = str(small_fov / "labels.csv")
  config.gating.rules = "T cell=CD3"
  with pytest.raises(ConfigError, match="gating.rules"):
    ingest_task.run(config, tmp_path)
  config.ingest.labels = None
  config.gating.rules = "T cell=CD4"
  with pytest.raises(InputError, match="CD4"):
    ingest_task.run(config, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fov1"]  # the ungated store is gone too


def test_launch_mibi_with_gating(shared_data, tmp_path):
  result = _launch(f"--workdir={tmp_path / 'wd'}", "--config.gating.rules="
                   "T cell=CD3;B cell=CD20;Tumor=PanKeratin;Stroma=SMA+Vimentin",
                   f"--config.ingest.input={shared_data / 'mibi_fov8'}")
  assert result.returncode == 0, result.stderr[-2000:]
  store = open_store(tmp_path / "wd" / "store")
  assert len(store.cells) == 272 and len(store.meta.channels) == 22
  assert len(store.meta.classes) >= 3
  assert "272 cells in 1 FOVs" in result.stderr
  assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["store"]


def test_launch_bad_input_is_one_line(tmp_path):
  result = _launch(f"--workdir={tmp_path / 'wd'}", f"--config.ingest.input={tmp_path / 'nope'}")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("cellrep: error:")]
  assert errors == [f"cellrep: error: {tmp_path / 'nope'}: missing (expected a folder of per-channel TIFFs)"]
  assert not (tmp_path / "wd" / "store").exists()
