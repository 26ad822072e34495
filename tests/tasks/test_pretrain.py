"""The pretrain task (Microsnoop): a pool of one-channel images from several sources -> a masked
U-Net -> per-channel embeddings probed against random init -> sweep -> report; resumable;
bad keys named before any work; its model embeds any store through the embed task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import CellrepError
from cellrep.infer import trained as trained_lib
from cellrep.tasks import embed, pretrain, pretrain_probes
from cellrep.train.metrics import read_metrics
from tests.data.helpers import square_cells_store
from tests.tasks.helpers import get_config, override


def _tiny(tmp_path, **values):
  store = tmp_path / "squares"
  if not store.exists():
    square_cells_store(store, fov_shapes=((40, 40),), channels=("a", "b"))
  config = get_config("microsnoop", "runlocal")
  return override(config, {
      "data.stores": str(store), "data.tiff_folders": "", "data.synthetic_fovs": 1,
      "data.synthetic.fov_size": 64, "data.crop_size": 20, "data.input_size": 16,
      "data.threads": 2, "model.widths": (8, 16), "model.mask_patch": 4, "train.steps": 3,
      "train.batch_size": 8, "train.log_every": 1, "train.checkpoint_every": 3,
      "predict.batch_size": 32, "probe.synthetic_fovs": 1, "probe.max_cells": 40,
      "probe.folds": 2, "probe.k": 3, "probe.cap": 16,
      "sweep.mask_ratios": "0.5", "sweep.steps": 2, "progress": False, **values})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pre")
  config = _tiny(root, **{"probe.modes": "single_cell"})
  return root, config, pretrain.run(config, root / "run")


def test_runs_end_to_end(run):
  root, _, scalars = run
  workdir = root / "run"
  for encoder in ("pretrained", "random_init"):
    for probe in ("knn", "linear"):
      value = scalars[f"probe/single_cell/{encoder}/{probe}_balanced_accuracy"]
      assert 0 <= value <= 1
  assert 0 <= scalars["sweep/ratio_0.5/linear_balanced_accuracy"] <= 1
  final = read_metrics(workdir)[-1]
  assert final["probe/single_cell/pretrained/linear_balanced_accuracy"] == pytest.approx(
      scalars["probe/single_cell/pretrained/linear_balanced_accuracy"])
  assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2, 3]
  table = pd.read_parquet(workdir / "probes.parquet")
  assert set(table.encoder) == {"pretrained", "random_init"}
  assert (table.dims == 13 * 16).all()  # 13 synthetic markers x the 16-d deepest map
  page = (workdir / "report" / "index.html").read_text()
  for png in ("loss", "reconstructions", "mask_ratio_sweep"):
    assert (workdir / "report" / f"{png}.png").stat().st_size > 1000 and f"{png}.png" in page
  assert len(read_metrics(workdir / "sweep" / "ratio_0.5")) >= 2


def test_pools_every_source_and_saves_a_one_channel_model(run):
  root, _, _ = run
  workdir = root / "run"
  pool = pretrain.open_pool(_tiny(root), workdir)
  assert set(pool.cells.Metadata_Source) == {"squares", "synthetic"}
  assert {"a", "b", "HH3"} <= set(pool.cells.Metadata_Channel)
  trained = trained_lib.load(workdir, dtype="float32")
  assert trained.input_shape == (1, 16, 16, 1) and trained.channels == ("image",)
  assert trained.normalize == "normalize99" and trained.isolate == 0  # read by embeddings


def test_its_probes_are_those_of_the_saved_model(run, tmp_path):
  """The run probes the model it hands back; reloading model.json gives the same numbers
  (every preprocessing choice, e.g. data.isolate, travels through the file)."""
  root, config, scalars = run
  workdir = root / "run"
  store = pretrain_probes.open_probe_store(config, workdir)
  table = pretrain_probes.probe_all(config, tmp_path, trained_lib.load(workdir), store)
  again = pretrain_probes.scalars(table)
  assert again == pytest.approx({k: v for k, v in scalars.items() if k in again}, abs=1e-6)


def test_resumes_without_training_again(run):
  root, config, scalars = run
  again = pretrain.run(config, root / "run")
  assert again == pytest.approx(scalars)


def test_its_model_embeds_any_store_per_channel(run, tmp_path):
  root, _, _ = run
  config = override(embed.default_config(), {
      "model_dir": str(root / "run"), "data.store": str(root / "squares"),
      "embed.per_channel": True, "embed.layers": "embedding", "embed.batch_size": 16,
      "data.threads": 2})
  embed.run(config, tmp_path)
  table = pd.read_parquet(tmp_path / embed.OUTPUT)
  names = [c for c in table.columns if not c.startswith("Metadata_")]
  assert names == [f"{c}_embedding_{i}" for c in ("a", "b") for i in range(16)]
  for c in ("a", "b"):  # each channel's block is a unit vector
    block = table[[f"{c}_embedding_{i}" for i in range(16)]].to_numpy()
    np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("values, key", [
    ({"data.stores": "", "data.synthetic_fovs": 0}, "data.stores"),
    ({"data.stores": "/nowhere/store"}, "/nowhere/store"),
    ({"data.tiff_folders": "/nowhere"}, "data.tiff_folders"),
    ({"data.input_size": 18, "data.crop_size": 20}, "data.input_size"),
    ({"model.mask_patch": 6}, "model.mask_patch"),
    ({"probe.modes": "tiles"}, "probe.modes"),
    ({"probe.ratios": "2.5,x"}, "probe.ratios"),
    ({"sweep.mask_ratios": "0.5,1.5"}, "sweep.mask_ratios"),
    ({"data.unit": "fovs"}, "data.unit"),
    ({"data.isolate": -3}, "data.isolate"),
    ({"probe.folds": 1}, "probe.folds"),
    ({"model.widths": (8, 0)}, "model.widths"),
])
def test_bad_settings_name_their_key_before_any_work(tmp_path, values, key):
  config = _tiny(tmp_path, **values)
  with pytest.raises(CellrepError, match=key):
    pretrain.validate(config)
  assert not (tmp_path / "run").exists()
