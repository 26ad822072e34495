import json

import jax
import numpy as np
import pandas as pd
import pytest

from cellrep.data import gating, ingest
from cellrep.data.store import open_store
from cellrep.errors import ConfigError, NonFiniteLossError
from cellrep.infer import trained as trained_lib
from cellrep.tasks import classify
from cellrep.train.metrics import read_metrics
from tests.data.helpers import square_cells_store
from tests.tasks.helpers import override, tiny_config
from tests.tasks.helpers import tiny_config as _tiny



@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return square_cells_store(tmp_path_factory.mktemp("s") / "store",
                            fov_shapes=((40, 40), (40, 40), (30, 40)))


def test_run_writes_every_output(store, tmp_path):
  config = _tiny(store.path)
  config.data.val_fovs = "fov2"
  config.data.fov_window = 1  # FOV-local sampling order reaches the sampler
  scalars = classify.run(config, tmp_path)
  assert (tmp_path / "checkpoints" / "4").is_dir()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  metrics = read_metrics(tmp_path)
  assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4]
  final = metrics[-1]
  assert final["step"] == 4 and 0 <= final["eval/balanced_recall"] <= 1
  assert final["eval/balanced_recall"] == scalars["eval/balanced_recall"]
  preds = pd.read_parquet(tmp_path / "predictions.parquet")
  held_out = store.cells[store.cells.fov_name == "fov2"]
  assert len(preds) == len(held_out) and set(preds.fov_name) == {"fov2"}
  assert list(preds.columns[:6]) == ["cell_id", "fov", "fov_name", "label", "pred", "confidence"]
  probs = preds[["prob_x", "prob_y"]].to_numpy()
  np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
  np.testing.assert_allclose(preds.confidence, probs.max(1), rtol=1e-6)
  csv = pd.read_csv(tmp_path / "predictions_cellsighter.csv")
  assert list(csv.columns) == ["pred", "pred_prob", "label", "cell_id", "image_id", "prob_list"]
  html = (tmp_path / "report" / "index.html").read_text()
  assert "confusion.png" in html and (tmp_path / "report" / "recall_coverage.png").exists()
  assert json.loads((tmp_path / "config.json").read_text())["ensemble"]["members"] == 2


def test_resume_continues_exactly(store, tmp_path):
  # An interrupted run (2 steps, then the same command with 4) ends where an
  # uninterrupted 4-step run does: the Grain iterator position and the per-step RNG
  # are restored with the state.
  classify.run(_tiny(store.path, steps=2), tmp_path / "a")
  classify.run(_tiny(store.path, steps=4), tmp_path / "a")
  classify.run(_tiny(store.path, steps=4), tmp_path / "b")
  a = read_metrics(tmp_path / "a")
  assert [m["step"] for m in a if "train/loss" in m] == [1, 2, 3, 4]
  pa = pd.read_parquet(tmp_path / "a" / "predictions.parquet")
  pb = pd.read_parquet(tmp_path / "b" / "predictions.parquet")
  np.testing.assert_allclose(pa.filter(like="prob_").to_numpy(), pb.filter(like="prob_").to_numpy(),
                             rtol=1e-6, atol=1e-7)


def test_bad_config_values_are_config_errors(store, tmp_path):
  config = _tiny(store.path)
  config.data.crop_size = 8
  with pytest.raises(ConfigError, match="data.crop_size"):
    classify.run(config, tmp_path)
  config = _tiny(store.path)
  config.model.name = "resnet51"
  with pytest.raises(ConfigError, match="model.name"):
    classify.run(config, tmp_path)


def test_mibi_bootstrapped_from_gated_landmarks(shared_data, tmp_path):
  # Unlabelled real data: data.gating.rules labels landmark cells, the model trains on
  # them and predicts every cell, the unlabelled ones included.
  raw = ingest.ingest_tiff_folder(shared_data / "mibi_fov8", tmp_path / "raw")
  assert len(raw.cells) == 272 and len(raw.meta.channels) == 22 and not raw.meta.classes
  config = _tiny(raw.path, steps=3)
  config.data.gating.rules = "T cell=CD3;B cell=CD20;Tumor=PanKeratin;Stroma=SMA+Vimentin"
  config.data.crop_size, config.data.input_size = 40, 32
  scalars = classify.run(config, tmp_path / "run")
  rules = gating.parse_rules(config.data.gating.rules)
  expected = gating.gate_store(raw, rules)
  store = open_store(tmp_path / "run" / "store_gated")
  assert store.meta.classes == ("T cell", "B cell", "Tumor", "Stroma")
  assert store.cells.label.fillna("-").tolist() == expected.fillna("-").tolist()
  preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
  # One FOV: it is both trained on and predicted; every cell gets a prediction.
  assert len(preds) == 272 and scalars["eval/cells"] == preds.label.notna().sum() == 65
  assert set(preds.pred) <= set(store.meta.classes)
  # A resumed run with other rules would train on other labels: refused.
  config.data.gating.rules = "T cell=CD3"
  with pytest.raises(ConfigError, match="data.gating"):
    classify.run(config, tmp_path / "run")


def test_a_diverging_run_stops_and_keeps_a_finite_checkpoint(store, tmp_path):
  # lr 1e30: the first update is finite but enormous, the next gradients are not.
  config = override(tiny_config(store.path, steps=6), {
      "data.val_fovs": "fov2", "train.lr": 1e30, "train.checkpoint_every": 1,
      "train.keep_checkpoints": 1})
  with pytest.raises(NonFiniteLossError, match="non-finite") as info:
    classify.run(config, tmp_path / "run")
  assert "last good checkpoint" in str(info.value)
  trained = trained_lib.load(tmp_path / "run")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trained.variables))
