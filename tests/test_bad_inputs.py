"""Bad input, table-driven, through the command line: every case exits 2 with one line
naming the file or key, no traceback, and leaves no output behind.

The cases run as `python -m cellrep.launch` processes, three at a time, once per session
(`outcomes`); each case is then its own test. Inputs are small files made here plus
`../shared/data/mibi_fov8` read in place.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from tests.conftest import REPO, SHARED_DATA
from tests.data.helpers import square_cells_store
from tests.tasks.helpers import override, tiny_config


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  args: tuple[str, ...]     # after --config=...; {root} is the fixtures' folder
  needle: str               # the error line names this (a key or a file)
  config: str = "configs/demo.py"
  absent: tuple[str, ...] = ()  # paths (under {root}) the run must not leave behind
  env: tuple[tuple[str, str], ...] = ()


I = "configs/ingest.py"
P = "configs/predict.py"
E = "configs/embed.py"
F = "configs/profile_eval.py"
CS = "configs/cellsighter.py"
CP = "configs/cellpainting_wsl.py"
TINY = ("--config.data.source=store", "--config.data.store={root}/store",
        "--config.data.crop_size=16", "--config.data.input_size=12",
        "--config.model.width=0.0625", "--config.ensemble.members=2", "--config.train.steps=2",
        "--config.train.batch_size=8")

CASES = [
    # ingest: the folder, its TIFFs, the output
    Case("ingest_input_unset", (), "config.ingest.input", I),
    Case("ingest_input_missing", ("--config.ingest.input={root}/nope",), "nope", I),
    Case("ingest_format", ("--config.ingest.input={root}/fov", "--config.ingest.format=png"),
         "config.ingest.format", I),
    Case("ingest_chunk_size", ("--config.ingest.input={root}/fov", "--config.ingest.chunk_size=0"),
         "config.ingest.chunk_size", I),
    Case("ingest_output_under_a_file", ("--config.ingest.input={root}/fov",
                                        "--config.ingest.output={root}/a_file/store"),
         "config.ingest.output", I),
    Case("ingest_output_is_a_file", ("--config.ingest.input={root}/fov",
                                     "--config.ingest.output={root}/a_file"), "a_file", I),
    Case("ingest_output_in_proc", ("--config.ingest.input={root}/fov",
                                   "--config.ingest.output=/proc/cellrep/store"),
         "config.ingest.output", I),
    Case("ingest_output_exists", ("--config.ingest.input={root}/fov",
                                  "--config.ingest.output={root}/store"), "already exists", I),
    Case("ingest_truncated_tiff", ("--config.ingest.input={root}/truncated",),
         "truncated or corrupt TIFF", I, absent=("w/store",)),
    Case("ingest_channel_shape", ("--config.ingest.input={root}/misshapen",), "CD20", I,
         absent=("w/store",)),
    Case("ingest_no_segmentation", ("--config.ingest.input={root}/noseg",), "segmentation", I,
         absent=("w/store",)),
    Case("ingest_unknown_channel", ("--config.ingest.input={root}/fov",
                                    "--config.ingest.channels=CD3,CD99"), "CD99", I),
    Case("ingest_labels_missing", ("--config.ingest.input={root}/fov",
                                   "--config.ingest.labels={root}/nope.csv"), "nope.csv", I),
    Case("ingest_labels_and_gating", ("--config.ingest.input={root}/fov",
                                      "--config.ingest.labels={root}/fov/labels.csv",
                                      "--config.gating.rules=T=CD3+"), "config.gating.rules", I),
    Case("ingest_gating_percentile", ("--config.ingest.input={root}/fov",
                                      "--config.gating.percentile=100"),
         "config.gating.percentile", I),
    Case("ingest_gating_unparsable", ("--config.ingest.input={root}/fov",
                                      "--config.gating.rules=T=>CD3"), "gating rule 'T'", I),
    # the work directory
    Case("workdir_under_a_file", ("--workdir={root}/a_file/w",), "--workdir"),
    Case("workdir_is_a_file", ("--workdir={root}/a_file",), "--workdir"),
    Case("workdir_in_proc", ("--workdir=/proc/cellrep",), "--workdir"),
    # training configuration
    Case("unknown_key", ("--config.trian.steps=3",), "trian"),
    Case("steps_negative", ("--config.train.steps=-5",), "config.train.steps"),
    Case("batch_size_zero", ("--config.train.batch_size=0",), "config.train.batch_size"),
    Case("lr_zero", ("--config.train.lr=0.0",), "config.train.lr"),
    Case("members_zero", ("--config.data.store={root}/store", "--config.ensemble.members=0"),
         "config.ensemble.members", CS),
    Case("members_negative", ("--config.ensemble.members=-1",), "config.ensemble.members"),
    Case("model_name", ("--config.model.name=resnet51",), "config.model.name"),
    Case("val_fraction", ("--config.data.val_fraction=1.5",), "config.data.val_fraction"),
    Case("crop_below_input", ("--config.data.crop_size=8",), "config.data.crop_size"),
    Case("prefetch_negative", ("--config.data.prefetch=-1",), "config.data.prefetch"),
    Case("fov_cache_negative", ("--config.data.fov_cache_mb=-1",), "config.data.fov_cache_mb"),
    Case("balance", ("--config.data.balance=oversample",), "config.data.balance"),
    Case("val_fovs_unknown", TINY + ("--config.data.val_fovs=fov9",), "fov9"),
    Case("store_unset", ("--config.data.source=store",), "config.data.store"),
    Case("store_missing", ("--config.data.source=store", "--config.data.store={root}/nope"),
         "nope"),
    Case("store_not_a_store", ("--config.data.source=store", "--config.data.store={root}/empty"),
         "store.json"),
    Case("store_bad_json", ("--config.data.source=store", "--config.data.store={root}/badjson"),
         "store.json"),
    Case("store_no_cells", ("--config.data.source=store", "--config.data.store={root}/nocells"),
         "cells.parquet"),
    Case("gating_class_without_cells", TINY + ("--config.data.gating.rules=A=a;Z=a+b",),
         "config.data.gating.rules", absent=("w/checkpoints",)),
    Case("xgboost_missing", ("--config.data.store={root}/store", "--config.train.steps=2"),
         "xgboost", CS, absent=("w/checkpoints",), env=(("PYTHONPATH", "{root}/no_xgboost"),)),
    # predict
    Case("predict_model_dir_unset", ("--config.data.store={root}/store",), "config.model_dir", P),
    Case("predict_model_dir_missing", ("--config.model_dir={root}/nope",
                                       "--config.data.store={root}/store"), "nope", P),
    Case("predict_dtype", ("--config.model_dir={root}/run", "--config.data.store={root}/store",
                           "--config.predict.dtype=fp8"), "config.predict.dtype", P),
    Case("predict_no_shared_channel", ("--config.model_dir={root}/run",
                                       "--config.data.store={root}/other_store"),
         "other_store: has 0 of the model's 3 channels", P,
         absent=("w/report", "w/predictions.parquet")),
    Case("predict_unknown_fov", ("--config.model_dir={root}/run", "--config.data.store={root}/store",
                                 "--config.data.fovs=fov9"), "config.data.fovs", P),
    # embed
    Case("embed_unknown_layer", ("--config.model_dir={root}/run", "--config.embed.layers=block9"),
         "config.embed.layers", E, absent=("w/embeddings.parquet",)),
    Case("embed_member_out_of_range", ("--config.model_dir={root}/run", "--config.embed.member=5"),
         "config.embed.member", E, absent=("w/embeddings.parquet",)),
    Case("embed_batch_zero", ("--config.model_dir={root}/run", "--config.embed.batch_size=0"),
         "config.embed.batch_size", E),
    # cellpainting: checked before the plates are written or a step is trained
    Case("cellpainting_store_unset", (), "config.data.store", CP, absent=("w/checkpoints",)),
    Case("cellpainting_store_missing", ("--config.data.store={root}/nope",), "nope", CP,
         absent=("w/checkpoints",)),
    Case("cellpainting_unknown_layer", ("--config.data.source=synthetic_plates",
                                        "--config.features.layers=block9z_activation"),
         "config.features.layers", CP, absent=("w/project", "w/checkpoints")),
    Case("cellpainting_sphering_method", ("--config.data.source=synthetic_plates",
                                          "--config.profile.sphering.method=whiten"),
         "config.profile.sphering.method", CP, absent=("w/project",)),
    Case("cellpainting_plates_too_few_wells", ("--config.data.source=synthetic_plates",
                                               "--config.data.synthetic_plates.wells=8"),
         "config.data.synthetic_plates.controls_per_plate", CP, absent=("w/project",)),
    # profiles
    Case("profiles_input_unset", (), "config.input", F),
    Case("profiles_input_missing", ("--config.input={root}/nope.parquet",), "nope.parquet", F),
    Case("profiles_input_format", ("--config.input={root}/profiles.txt",), "profiles.txt", F),
    Case("profiles_missing_column", ("--config.input={root}/profiles.parquet",
                                     "--config.columns.treatment=Metadata_drug"),
         "Metadata_drug", F, absent=("w/ap.parquet",)),
    Case("profiles_no_controls", ("--config.input={root}/profiles.parquet",
                                  "--config.controls=Metadata_compound == 'none'"),
         "no control rows match", F, absent=("w/ap.parquet",)),
    Case("profiles_sphering_method", ("--config.input={root}/profiles.parquet",
                                      "--config.sphering.method=whiten"),
         "config.sphering.method", F),
    Case("profiles_distance", ("--config.input={root}/profiles.parquet",
                               "--config.retrieval.distance=manhattan"),
         "config.retrieval.distance", F),
]


def _fov(folder: pathlib.Path, channels=("CD3", "CD20"), shape=(24, 24), segmentation=True):
  (folder / "TIFs").mkdir(parents=True)
  mask = np.zeros((24, 24), np.uint16)
  mask[2:8, 2:8], mask[12:20, 12:20] = 1, 2
  for k, name in enumerate(channels):
    tifffile.imwrite(folder / "TIFs" / f"{name}.tif", np.full(shape, k + 1, np.uint8))
  if segmentation:
    tifffile.imwrite(folder / "segmentation.tiff", mask)
  return folder


def _make_inputs(root: pathlib.Path) -> None:
  (root / "a_file").write_text("not a folder\n")
  (root / "empty").mkdir()
  _fov(root / "fov")
  (root / "fov" / "labels.csv").write_text("cell_id,label\n2,T cell\n")
  truncated = _fov(root / "truncated")
  data = (truncated / "TIFs" / "CD20.tif").read_bytes()
  (truncated / "TIFs" / "CD20.tif").write_bytes(data[:len(data) // 3])
  misshapen = _fov(root / "misshapen", channels=("CD3",))
  tifffile.imwrite(misshapen / "TIFs" / "CD20.tif", np.ones((20, 24), np.uint8))
  _fov(root / "noseg", segmentation=False)
  store = square_cells_store(root / "store", fov_shapes=((40, 40), (40, 40), (30, 40)))
  square_cells_store(root / "other_store", fov_shapes=((40, 40),), channels=("x0", "x1", "x2"))
  for name, broken in (("badjson", "store.json"), ("nocells", "cells.parquet")):
    subprocess.run(["cp", "-r", str(store.path), str(root / name)], check=True)
    if broken == "store.json":
      (root / name / broken).write_text("{not json")
    else:
      (root / name / broken).unlink()
  (root / "no_xgboost").mkdir()
  (root / "no_xgboost" / "xgboost.py").write_text("raise ImportError('xgboost is hidden here')\n")
  from cellrep.tasks import classify
  classify.run(override(tiny_config(store.path, steps=2), {"data.val_fovs": "fov2"}), root / "run")
  rng = np.random.default_rng(0)
  wells = pd.DataFrame({"Metadata_Plate": "p1", "Metadata_Well": [f"w{i}" for i in range(12)],
                        "Metadata_compound": ["ctrl"] * 4 + ["a"] * 4 + ["b"] * 4,
                        "Metadata_moa": ["none"] * 4 + ["x"] * 8,
                        "Metadata_control": [True] * 4 + [False] * 8})
  for i in range(6):
    wells[f"f{i}"] = rng.normal(size=12).astype(np.float32)
  wells.to_parquet(root / "profiles.parquet")
  (root / "profiles.txt").write_text("not a table\n")


def _run(case: Case, root: pathlib.Path) -> subprocess.CompletedProcess:
  args = [a.format(root=root) for a in case.args]
  workdir = [] if any(a.startswith("--workdir=") for a in args) else [f"--workdir={root / 'w' / case.name}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{k: v.format(root=root) for k, v in case.env})
  return subprocess.run([sys.executable, "-m", "cellrep.launch", f"--config={case.config}",
                         "--compilation_cache=", *workdir, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  if not SHARED_DATA.is_dir():
    pytest.skip("../shared/data is missing")
  root = tmp_path_factory.mktemp("bad")
  _make_inputs(root)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip([c.name for c in CASES], pool.map(lambda c: _run(c, root), CASES)))
  return root, results


def test_at_least_forty_cases():
  assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(case, outcomes):
  root, results = outcomes
  out = results[case.name]
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("cellrep: error:")]
  assert len(errors) == 1, out.stderr[-3000:]
  assert case.needle in errors[0], errors[0]
  workdir = root / "w" / case.name
  for path in case.absent:
    where = root / path.replace("w/", f"w/{case.name}/", 1)
    assert not where.exists(), f"{where} was left behind"
  if workdir.is_dir():  # nothing half-written
    assert not [p for p in workdir.rglob("*") if ".tmp" in p.name]
