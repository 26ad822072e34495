"""A trained run loaded back from its work directory predicts what it predicted; on a store of
another panel the channels are mapped by name."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pandas as pd
import pytest

from cellrep.data.store import StoreWriter
from cellrep.errors import InputError
from cellrep.infer import trained as trained_lib
from tests.tasks.helpers import tiny_run


def _copy(store, out, channels):
  """A copy of `store` whose channels are (name, source channel index or None for zeros)."""
  m = store.meta
  with StoreWriter(out, [n for n, _ in channels], m.fovs, m.fov_shapes, m.dtype,
                   classes=m.classes) as w:
    for fov in range(len(m.fovs)):
      image, mask = store.read_fov(fov)
      new = np.stack([image[k] if k is not None else np.zeros_like(image[0]) for _, k in channels])
      labels = {int(i): l for i, l in zip(store.cells.cell_id[store.cells.fov == fov],
                                          store.cells.label[store.cells.fov == fov])}
      w.write_fov(fov, new, mask, labels)
    return w.commit()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  store, workdir = tiny_run(tmp_path_factory.mktemp("t"), **{"data.normalize": "p99"})
  return store, workdir, pd.read_parquet(workdir / "predictions.parquet")


def _probs(table):
  return table.filter(like="prob_").to_numpy()


def test_load_predicts_what_the_run_predicted(run):
  store, workdir, predictions = run
  assert json.loads((workdir / trained_lib.MODEL_JSON).read_text())["normalize"] == "p99"
  trained = trained_lib.load(workdir)
  assert trained.classes == ("x", "y") and trained.channels == ("a", "b", "c")
  assert trained.members == 2 and trained.member(1).members == 1
  rows = np.flatnonzero(store.cells.fov_name.to_numpy() == "fov2")
  index, probs, cmap = trained_lib.predict_store(trained, store, rows, batch_size=16, threads=2)
  assert cmap.identity and index.tolist() == rows.tolist()
  np.testing.assert_allclose(probs.mean(axis=1), _probs(predictions), rtol=1e-5, atol=1e-6)


def test_another_panel_is_mapped_by_name(run, tmp_path, caplog):
  store, workdir, _ = run
  trained = trained_lib.load(workdir)
  rows = np.flatnonzero(store.cells.fov_name.to_numpy() == "fov2")
  _, ref, _ = trained_lib.predict_store(trained, store, rows, batch_size=16, threads=2)
  # Reordered, renamed in case, with an extra channel: the same predictions.
  other = _copy(store, tmp_path / "other", [("extra", 0), ("C", 2), ("a", 0), ("b", 1)])
  _, probs, cmap = trained_lib.predict_store(trained, other, rows, batch_size=16, threads=2)
  assert cmap.index == (2, 3, 1)
  np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
  # Channel "b" missing: fed as zeros, exactly as a store whose "b" is all zeros.
  zeroed = _copy(store, tmp_path / "zeroed", [("a", 0), ("b", None), ("c", 2)])
  lacking = _copy(store, tmp_path / "lacking", [("c", 2), ("a", 0)])
  _, want, _ = trained_lib.predict_store(trained, zeroed, rows, batch_size=16, threads=2)
  with caplog.at_level(logging.WARNING):
    _, got, cmap = trained_lib.predict_store(trained, lacking, rows, batch_size=16, threads=2,
                                             min_overlap=0.6)
  assert cmap.missing == ("b",) and "fed as zeros: b" in caplog.text
  # p99 divisors differ only for the zeroed channel, whose pixels are 0 either way.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(InputError, match="2 of the model's 3 channels"):
    trained_lib.predict_store(trained, lacking, rows, min_overlap=0.8)


def test_load_refuses_what_is_not_a_run(run, tmp_path):
  with pytest.raises(InputError, match="model.json"):
    trained_lib.load(tmp_path)
  _, workdir, _ = run
  (tmp_path / trained_lib.MODEL_JSON).write_text((workdir / trained_lib.MODEL_JSON).read_text())
  with pytest.raises(InputError, match="checkpoints"):
    trained_lib.load(tmp_path)
  meta = json.loads((workdir / trained_lib.MODEL_JSON).read_text())
  meta["model"]["width"] = -1
  (tmp_path / trained_lib.MODEL_JSON).write_text(json.dumps(meta))
  with pytest.raises(InputError, match="model.json: width"):
    trained_lib.load(tmp_path)


def test_load_needs_only_model_json_and_the_parameters(run, tmp_path):
  # No config.json, and no optimizer: the optimizer state is not even read back.
  import shutil
  store, workdir, predictions = run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  shutil.copy(workdir / trained_lib.MODEL_JSON, tmp_path)
  meta = json.loads((tmp_path / trained_lib.MODEL_JSON).read_text())
  assert meta["model"]["name"] == "resnet18" and meta["members"] == 2
  assert meta["objective"] == {"name": "softmax_cross_entropy", "label_smoothing": 0.0}
  assert pathlib.Path(meta["store"]) == store.path
  assert trained_lib.trained_store(tmp_path) == str(store.path)
  trained = trained_lib.load(tmp_path)
  assert set(trained.variables) == {"params", "batch_stats"}
  rows = np.flatnonzero(store.cells.fov_name.to_numpy() == "fov2")
  _, probs, _ = trained_lib.predict_store(trained, store, rows, batch_size=16, threads=2)
  np.testing.assert_allclose(probs.mean(axis=1), _probs(predictions), rtol=1e-5, atol=1e-6)


def test_runs_written_before_model_json_held_the_model_still_load(run, tmp_path):
  import shutil
  store, workdir, _ = run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  shutil.copy(workdir / "config.json", tmp_path)
  meta = json.loads((workdir / trained_lib.MODEL_JSON).read_text())
  for key in ("model", "members", "objective", "store"):
    del meta[key]
  (tmp_path / trained_lib.MODEL_JSON).write_text(json.dumps(meta))
  trained = trained_lib.load(tmp_path)
  assert trained.members == 2 and trained.spec["name"] == "resnet18"
  assert trained_lib.trained_store(tmp_path) == str(store.path)  # config.json's data.store
