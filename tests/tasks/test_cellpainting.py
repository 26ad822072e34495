"""The cellpainting task: synthetic plates -> weakly supervised EfficientNet-B0 -> features ->
profiles -> report, its splits, its weights import, its bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import ConfigError, InputError
from cellrep.infer import trained as trained_lib
from cellrep.tasks import cellpainting, cellpainting_profiles
from cellrep.train.metrics import read_metrics
from tests.tasks.helpers import get_config, override

TINY_PLATES = dict(plates=3, wells=24, sites=1, image_size=96, cells_per_site=5.0,
                   nucleus_radius=5.0, cell_radius=11.0, moas=2, compounds_per_moa=2,
                   controls_per_plate=8)


def _tiny(**values):
  config = get_config("cellpainting_wsl", "runlocal")
  return override(config, {
      **{f"data.synthetic_plates.{k}": v for k, v in TINY_PLATES.items()},
      "data.crop_size": 32, "data.input_size": 32, "data.threads": 2, "train.steps": 3,
      "train.batch_size": 8, "train.warmup_epochs": 0.0, "train.log_every": 1,
      "predict.batch_size": 32, "profile.retrieval.null_size": 200,
      "profile.sphering.sweep": "1e-2,1", "progress": False, **values})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cp")
  return workdir, cellpainting.run(_tiny(), workdir)


def test_runs_end_to_end(run):
  workdir, scalars = run
  for name in ("wsl", "wsl_unsphered", "random_init", "mean_intensity"):
    assert np.isfinite(scalars[f"profile/{name}/activity_map"]), name
    assert (workdir / "profiles" / name / "report" / "index.html").exists()
  for split in ("cells", "plates"):
    assert 0 <= scalars[f"pretext/{split}_accuracy"] <= 1
  final = read_metrics(workdir)[-1]
  assert final["profile/wsl/activity_map"] == pytest.approx(scalars["profile/wsl/activity_map"])
  page = (workdir / "report" / "index.html").read_text()
  for png in ("training", "map_vs_lambda", "map_per_moa", "sphering"):
    assert (workdir / "report" / f"{png}.png").exists() and f"{png}.png" in page


def test_features_are_block6a_of_every_cell_without_nan(run):
  workdir, _ = run
  table = pd.read_parquet(workdir / "features" / "wsl" / "embeddings.parquet")
  features = [c for c in table.columns if not c.startswith("Metadata_")]
  assert features == [f"block6a_activation_{i}" for i in range(672)]
  assert np.isfinite(table[features].to_numpy()).all()
  store = cellpainting.prepare(_tiny(), workdir).store
  assert len(table) == len(store.cells)  # cells at image borders too: zero-padded, not dropped
  means = pd.read_parquet(workdir / "features" / "mean_intensity" / "embeddings.parquet")
  assert [c for c in means.columns if not c.startswith("Metadata_")] == \
      cellpainting_profiles.mean_intensity_names(store.meta.channels)
  npz = sorted((workdir / "features" / "wsl" / "deepprofiler" / "features").rglob("*.npz"))
  assert npz and np.load(npz[0], allow_pickle=True)["features"].shape[1] == 672


def test_model_json_and_load_without_masks(run):
  workdir, _ = run
  meta = json.loads((workdir / trained_lib.MODEL_JSON).read_text())
  assert meta["masks"] is False and meta["model"]["name"] == "efficientnet_b0"
  trained = trained_lib.load(workdir, dtype="float32")
  assert trained.input_shape == (1, 32, 32, 5)


def test_splits_leave_plates_and_cells_out(tmp_path):
  plan = cellpainting.prepare(_tiny(), tmp_path)
  cells = plan.store.cells
  plates = cells.Metadata_Plate.astype(str).to_numpy()
  assert plan.val_plates == ["P03"] and plan.train_plates == ["P01", "P02"]
  assert set(plates[plan.val_plates_idx]) == {"P03"}
  assert not set(plan.train_idx) & set(plan.val_cells_idx)
  assert set(plates[plan.train_idx]) | set(plates[plan.val_cells_idx]) == {"P01", "P02"}
  wells = (pd.Series(plates) + cells.Metadata_Well.astype(str)).to_numpy()
  n_train = pd.Series(wells[plan.train_idx]).value_counts()
  n_all = pd.Series(wells[np.concatenate([plan.train_idx, plan.val_cells_idx])]).value_counts()
  share = (n_train / n_all[n_train.index]).to_numpy()
  assert (share > 0).all() and 0.45 < n_train.sum() / n_all.sum() < 0.75
  counts = np.bincount(plan.labels[plan.train_idx])
  assert plan.per_treatment == int(round(np.median(counts)))


def test_trains_on_a_strength_subset_with_the_controls(tmp_path):
  full = cellpainting.prepare(_tiny(), tmp_path / "w")
  treatments = [c for c in full.classes if c != "DMSO"]
  table = tmp_path / "strength.csv"
  groups = ["strongest"] + ["weakest"] * (len(treatments) - 1)
  pd.DataFrame({"Metadata_compound": treatments, "strength_group": groups}).to_csv(table)
  plan = cellpainting.prepare(_tiny(**{"data.train_strength": "strongest",
                                       "data.strength_table": str(table)}), tmp_path / "w")
  allowed = {full.classes.index("DMSO"), full.classes.index(treatments[0])}
  for name in ("train_idx", "val_cells_idx", "val_plates_idx"):
    ours, theirs = getattr(plan, name), getattr(full, name)
    assert set(plan.labels[ours]) == allowed, name
    assert set(ours) == {i for i in theirs if full.labels[i] in allowed}, name
  with pytest.raises(ConfigError, match="data.strength_table"):
    cellpainting.validate(_tiny(**{"data.train_strength": "weakest"}))
  with pytest.raises(InputError, match="nothing.parquet"):
    cellpainting.validate(_tiny(**{"data.train_strength": "weakest",
                                   "data.strength_table": str(tmp_path / "nothing.parquet")}))
  with pytest.raises(ConfigError, match="data.train_strength"):
    cellpainting.prepare(_tiny(**{"data.train_strength": "median",
                                  "data.strength_table": str(table)}), tmp_path / "w")


def test_bad_config_values_name_their_key(tmp_path):
  with pytest.raises(ConfigError, match="data.val_plates"):
    cellpainting.prepare(_tiny(**{"data.val_plates": "P99"}), tmp_path / "a")
  with pytest.raises(ConfigError, match="features.baselines"):
    cellpainting.validate(_tiny(**{"features.baselines": "cellprofiler"}))
  with pytest.raises(ConfigError, match="data.train_cell_fraction"):
    cellpainting.validate(_tiny(**{"data.train_cell_fraction": 1.0}))
  with pytest.raises(ConfigError, match="data.store"):
    cellpainting.validate(_tiny(**{"data.source": "store"}))


def test_starts_from_keras_weights_with_a_new_head(tmp_path):
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  pytest.importorskip("h5py")
  from cellrep import models
  reference = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 5), classes=7)
  h5 = tmp_path / "cp_cnn.h5"
  reference.save(h5)
  config = _tiny(**{"init.weights": str(h5)})
  model = models.build(dict(config.model.to_dict(), num_classes=4))
  variables = cellpainting._initial_weights(config, model, 5)
  assert "predictions" not in variables["params"]  # each member draws its own head
  stem = reference.get_layer("stem_conv").get_weights()[0]
  np.testing.assert_allclose(variables["params"]["stem_conv"]["kernel"], stem)
  with pytest.raises(InputError, match="no.h5"):
    cellpainting._initial_weights(_tiny(**{"init.weights": str(tmp_path / "no.h5")}), model, 5)


def test_reads_a_store_ingested_from_a_deepprofiler_project(run, tmp_path):
  from cellrep.data import deepprofiler_project, synthetic_cellpainting
  workdir, _ = run
  store = deepprofiler_project.ingest_deepprofiler(
      workdir / "project", tmp_path / "store", channels=synthetic_cellpainting.CHANNELS,
      label_column="Metadata_compound")
  plan = cellpainting.prepare(_tiny(**{"data.source": "store", "data.store": str(store.path)}),
                              tmp_path / "run")
  ours = cellpainting.prepare(_tiny(), workdir)
  assert len(plan.store.cells) == len(ours.store.cells)
  assert plan.store.cells.Metadata_control.dtype == bool
  np.testing.assert_array_equal(plan.train_idx, ours.train_idx)
