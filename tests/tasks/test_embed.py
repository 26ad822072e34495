"""The embed task: per-cell features of a trained run, of its random-init baseline and of a
one-channel model per marker, written as a table profile_eval reads as it is."""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cellrep.data.augment import center
from cellrep.data.crops import CropSource
from cellrep.errors import ConfigError
from cellrep.infer import trained as trained_lib
from cellrep.tasks import embed, profile_eval
from configs.embed import get_config
from tests.tasks.helpers import override, tiny_run

IDENTITY = ["Metadata_cell_id", "Metadata_fov", "Metadata_fov_name", "Metadata_label"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_run(tmp_path_factory.mktemp("e"))


def _config(**values):
  return override(get_config(), {"data.threads": 2, "embed.batch_size": 16, **values})


def test_embeds_every_cell_of_the_trained_store(run, tmp_path):
  store, workdir = run
  summary = embed.run(_config(model_dir=str(workdir), **{"embed.dtype": "float32"}), tmp_path)
  table = pd.read_parquet(tmp_path / embed.OUTPUT)
  features = [c for c in table.columns if not c.startswith("Metadata_")]
  assert list(table.columns[:4]) == IDENTITY and len(table) == len(store.cells)
  assert features == [f"pool_{i}" for i in range(32)] and summary["features"] == 32
  assert table.Metadata_cell_id.tolist() == store.cells.cell_id.tolist()
  assert set(table.Metadata_label) == {"x", "y"}
  assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "pca.png").is_file()
  # The mean over members of the model's own pooled features, cell by cell.
  trained = trained_lib.load(workdir)
  source = CropSource(store, trained.crop_size)
  x = center(jax.numpy.asarray(np.stack([source[i]["crop"] for i in range(5)])),
             trained.input_size)
  member = lambda m: trained.model.apply(jax.tree.map(lambda v: v[m], trained.variables), x,
                                         capture=("pool",))[1]["pool"]
  want = np.mean([np.asarray(member(m)) for m in range(trained.members)], axis=0)
  got = table[features].to_numpy()[:5]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # One member alone, and another layer beside pool.
  embed.run(_config(model_dir=str(workdir), **{"embed.member": 1, "embed.layers": "layer2,pool"}),
            tmp_path / "m1")
  one = pd.read_parquet(tmp_path / "m1" / embed.OUTPUT)
  assert [c for c in one.columns if c.startswith("layer2_")] == [f"layer2_{i}" for i in range(8)]
  assert not np.allclose(one[features].to_numpy(), table[features].to_numpy())


def test_random_init_is_one_override_away(run, tmp_path):
  store, workdir = run
  embed.run(_config(model_dir=str(workdir)), tmp_path / "trained")
  embed.run(_config(model_dir=str(workdir), random_init=True), tmp_path / "a")
  embed.run(_config(model_dir=str(workdir), random_init=True), tmp_path / "b")
  trained, a, b = (pd.read_parquet(tmp_path / d / embed.OUTPUT) for d in ("trained", "a", "b"))
  assert list(a.columns) == list(trained.columns)
  features = [c for c in a.columns if c.startswith("pool_")]
  pd.testing.assert_frame_equal(a, b)  # the same seed draws the same parameters
  assert not np.allclose(a[features].to_numpy(), trained[features].to_numpy(), atol=1e-3)


def test_per_channel_concatenates_each_marker_and_chunks_stay_bounded(run, tmp_path):
  store, _ = run
  config = _config(**{"data.store": str(store.path), "embed.per_channel": True,
                      "ensemble.members": 2, "data.crop_size": 16, "data.input_size": 12,
                      "embed.memory_budget_mb": 0.01})
  config.model.width = 0.0625
  embed.run(config, tmp_path)
  path = tmp_path / embed.OUTPUT
  table = pd.read_parquet(path)
  names = [c for c in table.columns if not c.startswith("Metadata_")]
  assert names == [f"{c}_pool_{i}" for c in ("a", "b", "c") for i in range(32)]
  assert len(table) == len(store.cells)
  # The same cells embedded from a one-marker store: the same block of columns.
  config.data.channels = "b"
  embed.run(config, tmp_path / "b")
  only_b = pd.read_parquet(tmp_path / "b" / embed.OUTPUT)
  cols = [f"b_pool_{i}" for i in range(32)]
  np.testing.assert_allclose(only_b[cols].to_numpy(), table[cols].to_numpy(), rtol=1e-4, atol=1e-5)
  # 0.01 MiB of features: row groups of 10485 / (96 x 4 bytes) = 27 rows, as batches allow.
  meta = pq.ParquetFile(path).metadata
  sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
  assert sum(sizes) == len(store.cells) and len(sizes) >= 2 and max(sizes) <= 27 + 16


def test_profile_eval_reads_the_embeddings_as_they_are(run, tmp_path):
  store, workdir = run
  embed.run(_config(model_dir=str(workdir)), tmp_path)
  config = profile_eval_config(str(tmp_path / embed.OUTPUT))
  summary = profile_eval.run(config, tmp_path / "profiles")
  assert summary["wells"] == 6 and summary["treatments"] == 1  # y's FOVs against x's
  assert (tmp_path / "profiles" / "map.parquet").is_file()


def profile_eval_config(path):
  from configs.profile_eval import get_config as profile_config
  c = profile_config("by_class=x")  # each FOV x class a well, class x's wells the controls
  c.input = path
  c.sphering.method = "none"
  c.retrieval.null_size = 100
  return c


@pytest.mark.parametrize("values,key", [
    ({}, "data.store"),
    ({"embed.layers": "block6a_activation"}, "embed.layers"),
    ({"embed.per_channel": True}, "embed.per_channel"),
    ({"embed.member": 5}, "embed.member"),
    ({"data.fovs": "fov9"}, "data.fovs"),
])
def test_bad_settings_name_their_key_before_any_output(run, tmp_path, values, key):
  _, workdir = run
  if key != "data.store":
    values = dict(values, model_dir=str(workdir))
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    embed.run(_config(**values), tmp_path)
  assert not (tmp_path / embed.OUTPUT).exists()


def test_deepprofiler_layout_reads_back_with_pycytominer(run, tmp_path):
  import warnings

  from pycytominer.cyto_utils import load
  from pycytominer.cyto_utils.DeepProfiler_processing import DeepProfilerData

  store, workdir = run
  embed.run(_config(model_dir=str(workdir), **{"embed.deepprofiler": True,
                                               "embed.memory_budget_mb": 0.01}), tmp_path)
  table = pd.read_parquet(tmp_path / embed.OUTPUT)
  features = [c for c in table.columns if not c.startswith("Metadata_")]
  out = tmp_path / "deepprofiler"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    data = DeepProfilerData(str(out / "index.csv"), str(out / "features"))
  data.build_filenames()
  assert len(data.filenames) == 3  # no plates in this store: one site per FOV
  for path, fov in zip(data.filenames, ["fov0", "fov1", "fov2"]):
    assert path.name == f"{fov}_1.npz"
    got = load.load_npz_features(str(path))
    rows = table[table.Metadata_fov_name == fov]
    np.testing.assert_array_equal(got[[f"cellrep_{i}" for i in range(len(features))]].to_numpy(),
                                  rows[features].to_numpy())
    assert set(got.Metadata_Well) == {fov} and set(got.Metadata_Model) == {"cellrep"}
    cells = store.cells[store.cells.fov_name == fov]
    np.testing.assert_array_equal(load.load_npz_locations(str(path)).to_numpy(),
                                  cells[["x", "y"]].to_numpy(np.float32))
