"""The embed task: per-cell features of a trained run, of its random-init baseline and of a
one-channel model per marker, written as a table profile_eval reads as it is."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cellrep.data.augment import center
from cellrep.data.crops import CropSource
from cellrep.data.store import StoreWriter
from cellrep.errors import ConfigError, InputError
from cellrep.eval import probes
from cellrep.infer import embed as embed_lib
from cellrep.infer import fields
from cellrep.infer import trained as trained_lib
from cellrep.profiling import aggregate
from cellrep.tasks import embed, profile_eval
from configs.embed import get_config
from tests.data.helpers import square_cells_store
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


# ---------------------------------------------------------------- Microsnoop's modes

def _unet_config(store_path, **values):
  """A random 1-member masked U-Net (widths 4, 8) embedding each marker on 16 px inputs."""
  config = _config(**{"data.store": str(store_path), "embed.per_channel": True,
                      "embed.layers": "embedding", "data.crop_size": 20, "data.input_size": 16,
                      "embed.ratio": 2.0, "embed.cap": 12, **values})
  config.model = ml_collections.ConfigDict(dict(name="masked_unet", widths=(4, 8),
                                                conv_impl="xla", dtype="float32"))
  return config


def _same_embedder(config):
  """The embedder a run of `config` builds (the same seed draws the same parameters)."""
  trained, store, _ = embed.ensemble_and_store(config)
  return embed_lib.embedder(trained, store, ("embedding",), per_channel=True), store


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
  return square_cells_store(tmp_path_factory.mktemp("sq") / "store",
                            fov_shapes=((40, 40), (30, 40)))


def _features(table):
  return [c for c in table.columns if not c.startswith("Metadata_")]


def test_cell_region_and_full_field_modes_through_the_task(squares, tmp_path):
  store = squares
  e, _ = _same_embedder(_unet_config(store.path))
  rows, cells = fields.cell_region_embeddings(e, store, ratio=2.0, cap=12, batch_size=16)
  names = [f"{c}_embedding_{i}" for c in ("a", "b", "c") for i in range(8)]
  # cell_region: a row per cell, its cell-region embedding; row groups of the budget.
  summary = embed.run(_unet_config(store.path, **{"embed.mode": "cell_region",
                                                  "embed.memory_budget_mb": 0.002}), tmp_path / "c")
  table = pd.read_parquet(tmp_path / "c" / embed.OUTPUT)
  assert list(table.columns[:4]) == IDENTITY and _features(table) == names
  assert table.Metadata_cell_id.tolist() == store.cells.cell_id.tolist()
  np.testing.assert_allclose(table[names].to_numpy(), cells[rows], rtol=1e-5, atol=1e-6)
  assert pq.ParquetFile(tmp_path / "c" / embed.OUTPUT).metadata.num_row_groups >= 2
  assert summary["mode"].startswith("cell_region") and summary["cells"] == len(store.cells)
  # The FOV modes: a row per FOV, the FOV's embedding (the mean of its cells', tiles').
  for mode, values in (("cell_region", {"embed.fov_mean": True}), ("rescale", {}),
                       ("tile", {"embed.overlap": 0.25})):
    out = tmp_path / mode
    summary = embed.run(_unet_config(store.path, **{"embed.mode": mode, **values}), out)
    table = pd.read_parquet(out / embed.OUTPUT)
    assert list(table.columns) == ["Metadata_fov", "Metadata_fov_name"] + names  # 2 classes a FOV
    assert table.Metadata_fov_name.tolist() == ["fov0", "fov1"] and summary["fovs"] == 2
    _, want = fields.fov_embeddings(e, store, mode, ratio=2.0, cap=12,
                                    overlap=values.get("embed.overlap", 0.1), batch_size=16)
    np.testing.assert_allclose(table[names].to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert summary["mode"].startswith(mode) and (out / "report" / "index.html").is_file()
  fov = store.cells.fov.to_numpy()
  np.testing.assert_allclose(pd.read_parquet(tmp_path / "cell_region" / embed.OUTPUT)[names]
                             .to_numpy()[1], cells[fov == 1].mean(0), rtol=1e-5, atol=1e-6)


def _experiment_store(path):
  """2 plates of 20 x 20 px FOVs, 4 cells of 4 x 4 px each, random markers: 3 DMSO FOVs a plate
  and 2 FOVs of each compound, A and B (MoA m1) on P1, C (m1) and D (m2) on P2."""
  rng = np.random.default_rng(0)
  design = [("P1", "DMSO", "control", 3), ("P1", "A", "m1", 2), ("P1", "B", "m1", 2),
            ("P2", "DMSO", "control", 3), ("P2", "C", "m1", 2), ("P2", "D", "m2", 2)]
  fovs = [(p, t, m) for p, t, m, n in design for _ in range(n)]
  mask = np.zeros((20, 20), np.int32)
  for k, (y, x) in enumerate([(3, 3), (3, 12), (12, 3), (12, 12)]):
    mask[y:y + 4, x:x + 4] = k + 1
  with StoreWriter(path, ["a", "b"], [f"fov{i}" for i in range(len(fovs))],
                   [(20, 20)] * len(fovs)) as w:
    for i, (plate, treatment, moa) in enumerate(fovs):
      image = (rng.gamma(2.0, 20.0, (2, 20, 20)) * (1 + (mask > 0))).astype(np.float32)
      w.write_fov(i, image, mask, metadata={
          "Metadata_Plate": plate, "Metadata_compound": treatment, "Metadata_moa": moa,
          "Metadata_control": treatment == "DMSO", "Metadata_Site": i})
    return w.commit()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  return _experiment_store(tmp_path_factory.mktemp("x") / "store")


def test_batch_experiment_profiles_and_nsc_from_fov_rows(experiment, tmp_path):
  store = experiment
  config = _unet_config(store.path, **{"embed.mode": "rescale", "embed.batch_experiment": True,
                                       "embed.moa": "Metadata_moa"})
  summary = embed.run(config, tmp_path)
  fovs = pd.read_parquet(tmp_path / embed.OUTPUT)
  assert len(fovs) == 14 and {"Metadata_Plate", "Metadata_compound", "Metadata_moa",
                              "Metadata_control"} <= set(fovs.columns)
  names = _features(fovs)
  got = pd.read_parquet(tmp_path / embed.PROFILES)
  want = aggregate.batch_experiment_profiles(fovs, names, plate="Metadata_Plate",
                                             treatment="Metadata_compound",
                                             controls="Metadata_control == True")
  pd.testing.assert_frame_equal(got, want, rtol=1e-5, atol=1e-6)
  assert got.Metadata_compound.tolist() == ["A", "B", "C", "D", "DMSO"]
  # NSC / NSCB of the compounds (DMSO, every FOV a control, left out); batch: the plate.
  scores = json.loads((tmp_path / embed.SCORES).read_text())
  drugs = want[want.Metadata_compound != "DMSO"]
  ref = probes.nsc_nscb(drugs[names].to_numpy(), ["m1", "m1", "m1", "m2"], list("ABCD"),
                        ["P1", "P1", "P2", "P2"])
  assert scores["control_treatments"] == ["DMSO"] and scores["treatments_scored"] == 4
  for key in ("nsc", "nscb", "nsc_scored", "nscb_scored"):
    assert scores[key] == pytest.approx(ref[key]) and (key not in ("nsc", "nscb")
                                                      or summary[key] == scores[key])
  assert scores["nscb_scored"] == 4 and summary["treatments"] == 5


def test_batch_experiment_of_cell_rows_profiles_their_fov_means(experiment, tmp_path):
  store = experiment
  config = _unet_config(store.path, **{"embed.batch_experiment": True,
                                       "data.channels": "a"})
  summary = embed.run(config, tmp_path)
  cells = pd.read_parquet(tmp_path / embed.OUTPUT)
  assert len(cells) == len(store.cells) == 56 and summary["cells"] == 56
  assert not (tmp_path / embed.SCORES).exists() and "nsc" not in summary  # no embed.moa
  names = _features(cells)
  fovs = cells.groupby("Metadata_fov", as_index=False).agg(
      {**{c: "first" for c in ("Metadata_Plate", "Metadata_compound", "Metadata_control")},
       **{c: "mean" for c in names}})
  want = aggregate.batch_experiment_profiles(fovs, names, plate="Metadata_Plate",
                                             treatment="Metadata_compound",
                                             controls="Metadata_control == True")
  got = pd.read_parquet(tmp_path / embed.PROFILES)
  np.testing.assert_allclose(got[names].to_numpy(), want[names].to_numpy(), rtol=1e-4,
                             atol=1e-5)
  assert got.Metadata_compound.tolist() == want.Metadata_compound.tolist()


@pytest.mark.parametrize("values,key", [
    ({"embed.mode": "crop"}, "embed.mode"),
    ({"embed.ratio": 0.0}, "embed.ratio"),
    ({"embed.overlap": 1.0}, "embed.overlap"),
    ({"embed.overlap": -0.1}, "embed.overlap"),
    ({"embed.mode": "tile", "embed.deepprofiler": True}, "embed.deepprofiler"),
    ({"embed.batch_experiment": True, "embed.plate": "Plate"}, "embed.plate"),
    ({"embed.batch_experiment": True, "embed.treatment": "Metadata_drug"}, "embed.treatment"),
    ({"embed.batch_experiment": True, "embed.moa": "Metadata_cell_id"}, "embed.moa"),
    ({"embed.batch_experiment": True, "embed.controls": "Metadata_compound == 'none'"},
     "embed.controls"),
    ({"embed.batch_experiment": True, "embed.controls": "Metadata_compound == 'A'"},
     "embed.controls"),  # no controls on P2
    ({"embed.batch_experiment": True, "embed.moa": "Metadata_moa",
      "embed.batch": "Metadata_Site"}, "embed.batch"),  # a batch per FOV, not per treatment
])
def test_bad_mode_and_experiment_settings_name_their_key(experiment, tmp_path, values, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    embed.run(_unet_config(experiment.path, **values), tmp_path)
  assert not (tmp_path / embed.OUTPUT).exists()


def test_cell_region_refuses_a_store_of_centres_before_embedding(tmp_path):
  with StoreWriter(tmp_path / "centres", ["a"], ["fov0"], [(20, 20)]) as w:
    w.write_fov(0, np.ones((1, 20, 20), np.float32), None, centres=np.array([[5, 5], [12, 14]]))
    store = w.commit()
  with pytest.raises(InputError, match="cells without an outline"):
    embed.run(_unet_config(store.path, **{"embed.mode": "cell_region"}), tmp_path / "out")
  assert not (tmp_path / "out" / embed.OUTPUT).exists()
