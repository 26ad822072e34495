"""The cellsighter task through its real config: every analysis on synthetic data, a CellSighter
folder and its config.json run as they are, and config.json import field by field."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import ConfigError, InputError
from cellrep.tasks import cellsighter, cellsighter_json
from cellrep.train.metrics import read_metrics
from tests.data.test_ingest import _cellsighter
from tests.tasks.helpers import get_config


def _get_config(arg=None):
  return get_config("cellsighter", arg)


def _shrink(c):
  c.progress = False
  c.data.threads = 2
  c.model.width = 0.0625
  c.ensemble.members = 2
  c.train.update(steps=3, batch_size=8, log_every=1, checkpoint_every=3)
  c.predict.batch_size = 64


def test_runlocal_runs_every_analysis(tmp_path):
  c = _get_config("runlocal")
  assert c.task == "cellsighter" and c.learning_curve.enabled and c.transfer.synthetic
  _shrink(c)
  c.data.synthetic.update(n_fovs=3, fov_size=96)
  c.data.val_fovs = "synth_002"
  c.saliency.cells_per_class = 2
  c.simulate.update(cells=4, repeats=1, border_distances="0,2", centre_distances="0,1")
  c.learning_curve.update(sizes="3,5", repeats=1, steps=2, members=2)  # the main run's programs
  scalars = cellsighter.run(c, tmp_path)
  for name in ("predictions.parquet", "predictions_cellsighter.csv", "predictions_xgboost.parquet",
               "analysis/models.csv", "analysis/recall_by_class.csv", "analysis/recall_coverage.csv",
               "analysis/saliency_markers.csv", "analysis/saliency_radial.csv",
               "analysis/simulations.csv", "analysis/learning_curve.csv",
               "transfer/predictions.parquet", "transfer/channel_map.csv", "model.json"):
    assert (tmp_path / name).is_file(), name
  ens = pd.read_parquet(tmp_path / "predictions.parquet")
  xgb = pd.read_parquet(tmp_path / "predictions_xgboost.parquet")
  assert ens.cell_id.tolist() == xgb.cell_id.tolist() and list(xgb.columns) == list(ens.columns)
  models = pd.read_csv(tmp_path / "analysis/models.csv").set_index("model")
  assert list(models.index) == ["ensemble of 2", "member 0", "XGBoost"]
  assert models.loc["ensemble of 2", "wrong_confident_0.9"] == scalars["eval/wrong_confident_0.9"]
  recall = pd.read_csv(tmp_path / "analysis/recall_by_class.csv").set_index("class")
  assert len(recall) == 9 and recall.loc["balanced recall", "XGBoost"] == pytest.approx(
      scalars["eval/xgb_balanced_recall"])
  sims = pd.read_csv(tmp_path / "analysis/simulations.csv")
  assert set(sims.model) == {"CNN ensemble", "XGBoost"} and set(sims.cells) == {4}
  curve = pd.read_csv(tmp_path / "analysis/learning_curve.csv")
  assert curve.cells_per_class.tolist() == [3, 5]
  assert (tmp_path / "learning_curve" / "n5_r0" / "checkpoints").is_dir()
  channel_map = pd.read_csv(tmp_path / "transfer/channel_map.csv").fillna("")
  assert channel_map.set_index("model_channel").store_channel["Ki67"] == ""
  final = read_metrics(tmp_path)[-1]
  for key in ("eval/balanced_recall", "eval/member0_wrong_confident_0.9",
              "eval/xgb_balanced_recall", "sim/spillover_frac_b_xgboost",
              "sim/partial_membrane_frac_b_cnn_ensemble", "transfer/balanced_recall"):
    assert key in final, key
  page = (tmp_path / "report" / "index.html").read_text()
  for section in ("XGBoost on expression features", "Models side by side", "Top-2 confusions",
                  "Saliency of the ensemble", "Simulations", "Learning curve", "Transfer to"):
    assert section in page, section


def _cs_folder(root, rng, json_extra=None):
  """A CellSighter experiment: 2 images of 5 x 5 square cells, marker k bright in class k."""
  fovs = {}
  for name in ("img1", "img2"):
    mask = np.zeros((40, 40), np.int32)
    classes = [-1]
    for i in range(25):
      y, x = divmod(i, 5)
      mask[y * 8 + 1:y * 8 + 7, x * 8 + 1:x * 8 + 7] = i + 1
      classes.append(int(rng.integers(0, 3)))
    image = rng.poisson(2, (40, 40, 4)).astype(np.uint16)
    for i, c in enumerate(classes[1:], 1):
      image[mask == i, c] += 20
    classes[3] = -1  # an unlabelled cell
    fovs[name] = (image, mask, classes)
  _cellsighter(root, fovs, channels=("CD3", "CD20", "PanCK", "Junk"), image_ext=".tif",
               cells_ext=".tiff", c2l_ext=".txt", images_dir="antibodies")
  config = {"crop_input_size": 16, "crop_size": 24, "root_dir": "./not/where/it/is/",
            "train_set": ["img1"], "val_set": ["img2"], "num_classes": 3, "epoch_max": 2,
            "lr": 0.002, "blacklist": ["Junk"], "channels_path": "channels.txt",
            "weight_to_eval": "", "sample_batch": True,
            "hierarchy_match": {"0": "T", "1": "B", "2": "tumour"}, "size_data": 20, "aug": True,
            **(json_extra or {})}
  (root / "config.json").write_text(json.dumps(config))
  return root / "config.json"


def test_cellsighter_folder_and_config_json_run_as_they_are(tmp_path):
  path = _cs_folder(tmp_path / "exp", np.random.default_rng(0), {"batch_size": 8})
  c = _get_config(f"from_json={path}")
  d = c.data
  assert (d.source, d.cellsighter.root) == ("cellsighter", str((tmp_path / "exp").resolve()))
  assert d.cellsighter.channels_file == str((tmp_path / "exp" / "channels.txt").resolve())
  assert (d.cellsighter.blacklist, d.cellsighter.class_names) == ("Junk", "0,1,2")
  assert (d.train_fovs, d.val_fovs, d.crop_size, d.input_size) == ("img1", "img2", 24, 16)
  assert (d.balance, d.hierarchy, d.max_per_class) == ("hierarchy", "0=T;1=B;2=tumour", 20)
  assert (c.train.epochs, c.train.steps, c.train.lr, c.train.batch_size) == (2, 0, 0.002, 8)
  assert c.augment.enabled
  c.progress = False
  c.data.threads = 2
  c.model.update(name="resnet18", width=0.0625, stem="small")
  c.ensemble.members = 2
  c.update_from_flattened_dict({"saliency.cells_per_class": 2, "simulate.enabled": False})
  scalars = cellsighter.run(c, tmp_path / "run")
  csv = pd.read_csv(tmp_path / "run" / "predictions_cellsighter.csv")
  assert set(csv.image_id) == {"img2"} and len(csv) == 25
  # CellSighter's class ids: the label column holds the cells2labels ids (-1 unlabelled).
  labels = [int(v) for v in (tmp_path / "exp/CellTypes/cells2labels/img2.txt").read_text().split()]
  assert csv.sort_values("cell_id").label.tolist() == labels[1:]
  assert set(csv.pred) <= {0, 1, 2} and scalars["eval/cells"] == 24
  model = json.loads((tmp_path / "run" / "model.json").read_text())
  assert model["channels"] == ["CD3", "CD20", "PanCK"] and model["classes"] == ["0", "1", "2"]
  # 2 epochs over the labelled cells of the training image (at most 20 per class), batch 8.
  c2l = (tmp_path / "exp/CellTypes/cells2labels/img1.txt").read_text().split()
  train = np.array([int(v) for v in c2l][1:])
  n_train = sum(min(20, int((train == k).sum())) for k in range(3))
  assert model["num_steps"] == 2 * (n_train // 8)


def test_same_image_for_training_and_validation(tmp_path):
  # CellSighter's example experiment trains and validates on the same image.
  path = _cs_folder(tmp_path / "exp", np.random.default_rng(1),
                    {"train_set": ["img1"], "val_set": ["img1"], "sample_batch": False})
  c = _get_config(f"from_json={path}")
  assert c.data.balance == "none"
  c.progress = False
  c.data.threads = 2
  c.model.update(name="resnet18", width=0.0625, stem="small")  # as above: compiled once
  c.ensemble.members = 2
  c.train.update(epochs=1, batch_size=8)
  c.update_from_flattened_dict({"saliency.enabled": False, "simulate.enabled": False})
  cellsighter.run(c, tmp_path / "run")
  assert set(pd.read_parquet(tmp_path / "run" / "predictions.parquet").fov_name) == {"img1"}


def test_bad_config_json(tmp_path):
  c = cellsighter.default_config()
  with pytest.raises(InputError, match="missing"):
    cellsighter_json.apply(c, tmp_path / "config.json")
  (tmp_path / "config.json").write_text(json.dumps({"root_dir": "x", "train_set": ["a"]}))
  with pytest.raises(InputError, match="'val_set'"):
    cellsighter_json.apply(c, tmp_path / "config.json")
  (tmp_path / "config.json").write_text(json.dumps({"root_dir": "x", "train_set": ["a"], "val_set": []}))
  with pytest.raises(InputError, match="holds no CellTypes"):
    cellsighter_json.apply(c, tmp_path / "config.json")


@pytest.mark.parametrize("key,value", [("confidence.member", 10), ("saliency.member", -2),
                                        ("baseline.balance", "sometimes"), ("saliency.method", "smooth"),
                                        ("transfer.synthetic", True)])
def test_bad_analysis_keys_fail_before_training(key, value, tmp_path):
  c = _get_config()
  c.data.store = str(tmp_path / "store")  # not read: the check comes first
  c.update_from_flattened_dict({key: value})
  with pytest.raises(ConfigError, match=key):
    cellsighter.run(c, tmp_path)
  assert not (tmp_path / "checkpoints").exists()
