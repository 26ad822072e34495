"""The predict task: a trained work directory applied to a store of another panel."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from cellrep.errors import ConfigError, InputError
from cellrep.tasks import classify, predict
from tests.data.helpers import square_cells_store
from tests.infer.test_trained import _copy
from tests.tasks.helpers import get_config
from tests.tasks.helpers import tiny_config as _tiny


def _get_config(arg=None):
  return get_config("predict", arg)


def test_predict_another_panel(tmp_path):
  store = square_cells_store(tmp_path / "store", fov_shapes=((40, 40), (30, 40)))
  config = _tiny(store.path, steps=1)  # test_classify's shapes: its compiled programs
  config.data.val_fovs = "fov1"
  classify.run(config, tmp_path / "run")
  other = _copy(store, tmp_path / "other", [("c", 2), ("a", 0), ("new", 1)])
  c = _get_config()
  c.model_dir, c.data.store, c.data.fovs = str(tmp_path / "run"), str(other.path), "fov1"
  with pytest.raises(InputError, match="2 of the model's 3 channels"):
    predict.run(c, tmp_path / "out")
  c.transfer.min_overlap = 0.5
  stats = predict.run(c, tmp_path / "out")
  preds = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
  assert set(preds.fov_name) == {"fov1"} and len(preds) == (other.cells.fov_name == "fov1").sum()
  assert stats["cells"] == len(preds)
  channel_map = pd.read_csv(tmp_path / "out" / "channel_map.csv").fillna("")
  assert channel_map.store_channel.tolist() == ["a", "", "c"]
  assert (tmp_path / "out" / "predictions_cellsighter.csv").is_file()
  page = (tmp_path / "out" / "report" / "index.html").read_text()
  assert "missing (fed as zeros)" in page and "new" in page
  c.data.fovs = "fov9"
  with pytest.raises(ConfigError, match="data.fovs"):
    predict.run(c, tmp_path / "out2")
  np.testing.assert_allclose(preds.filter(like="prob_").sum(axis=1), 1, rtol=1e-5)
