"""The profile_eval task end to end on generated tables, and its refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import ConfigError, InputError
from cellrep.launch import run_task
from cellrep.profiling import synthetic
from configs.profile_eval import get_config
from tests.tasks.helpers import override


def small_config(**overrides):
  return override(get_config(), {"retrieval.null_size": 200, "sphering.sweep": "1e-2,1",
                                 **overrides})


@pytest.fixture(scope="module")
def wells_file(tmp_path_factory):
  meta, x = synthetic.wells(n_compounds=20, n_controls=24, dim=16, ties=False, multilabel=True,
                            signal=0.6, seed=9)
  path = tmp_path_factory.mktemp("in") / "wells.parquet"
  synthetic.table(meta, x).to_parquet(path)
  return path


def test_synthetic_variant_runs(tmp_path):
  config = get_config("synthetic")
  config.retrieval.null_size = 200
  config.sphering.sweep = "1e-2"
  summary = run_task(config, tmp_path)
  assert summary["treatments"] == 60
  assert (tmp_path / "report" / "map_vs_lambda.png").exists()


def test_outputs(tmp_path, wells_file):
  summary = run_task(small_config(input=str(wells_file)), tmp_path)
  names = {p.name for p in tmp_path.iterdir()}
  assert {"ap.parquet", "map.parquet", "moa_ap.parquet", "moa_map.parquet", "enrichment.parquet",
          "strength.parquet", "lambda_sweep.parquet", "report"} <= names
  assert not [n for n in names if n.endswith(".tmp")]
  ap = pd.read_parquet(tmp_path / "ap.parquet")
  maps = pd.read_parquet(tmp_path / "map.parquet")
  assert not ap["Metadata_control"].any()
  assert len(maps) == ap["Metadata_compound"].nunique() == summary["treatments"]
  assert maps["p_value"].between(0, 1).all()
  assert len(pd.read_parquet(tmp_path / "lambda_sweep.parquet")) == 2
  html = (tmp_path / "report" / "index.html").read_text()
  assert "map_vs_lambda.png" in html and "folds of enrichment" in html


def test_cell_level_input(tmp_path):
  path = tmp_path / "cells.csv"
  synthetic.cells(n_compounds=8, n_controls=8).to_csv(path, index=False)
  summary = run_task(small_config(input=str(path), level="cell", **{"sphering.sweep": ""}),
                     tmp_path / "out")
  assert summary["wells"] == 8 * 3 + 8


def test_pycytominer_csv_gz_and_its_epsilon_sphering(tmp_path, wells_file):
  """A table pycytominer wrote (.csv.gz), sphered with its ε: the numbers of pycytominer's
  own sphering followed by cellrep's scoring."""
  from pycytominer import normalize
  from pycytominer.cyto_utils import output
  df = pd.read_parquet(wells_file)
  feats = [c for c in df.columns if not c.startswith("Metadata_")]
  meta = [c for c in df.columns if c.startswith("Metadata_")]
  gz = tmp_path / "wells.csv.gz"
  output(df, str(gz))
  ours = run_task(small_config(input=str(gz), **{"sphering.epsilon": 1e-6}), tmp_path / "a")
  assert ours["ε (pycytominer)"] == 1e-6
  sphered = normalize(df, features=feats, meta_features=meta, samples="Metadata_control == True",
                      method="spherize", spherize_method="ZCA", spherize_epsilon=1e-6)
  sphered.to_parquet(tmp_path / "sphered.parquet")
  theirs = run_task(small_config(input=str(tmp_path / "sphered.parquet"),
                                 **{"sphering.method": "none"}), tmp_path / "b")
  key = "activity mAP (mean over treatments)"
  assert ours[key] == pytest.approx(theirs[key], abs=1e-4)
  with pytest.raises(ConfigError, match="sphering.epsilon"):
    run_task(small_config(input=str(gz), **{"sphering.epsilon": 0.0}), tmp_path / "c")
  (tmp_path / "bad.csv.gz").write_bytes(b"not gzip")
  with pytest.raises(InputError, match="bad.csv.gz: cannot be read as CSV"):
    run_task(small_config(input=str(tmp_path / "bad.csv.gz")), tmp_path / "d")


def test_bad_input_is_one_clear_error(tmp_path, wells_file):
  df = pd.read_parquet(wells_file)
  with pytest.raises(InputError, match="does not exist"):
    run_task(small_config(input=str(tmp_path / "missing.parquet")), tmp_path)
  bad = df.copy()
  bad.loc[4, "f3"] = np.nan
  bad.to_parquet(tmp_path / "nan.parquet")
  with pytest.raises(InputError, match=r"nan.parquet: feature column 'f3' has 1 NaN"):
    run_task(small_config(input=str(tmp_path / "nan.parquet")), tmp_path)
  df.drop(columns=["Metadata_moa"]).to_parquet(tmp_path / "nomoa.parquet")
  with pytest.raises(InputError, match="'Metadata_moa' does not exist"):
    run_task(small_config(input=str(tmp_path / "nomoa.parquet")), tmp_path)
  df.iloc[:1].to_parquet(tmp_path / "one.parquet")
  with pytest.raises(InputError, match="at least 2 rows"):
    run_task(small_config(input=str(tmp_path / "one.parquet")), tmp_path)
  with pytest.raises(InputError, match="no control rows"):
    run_task(small_config(input=str(wells_file), controls="Metadata_compound == 'x'"), tmp_path)
  with pytest.raises(ConfigError, match="sphering.method"):
    run_task(small_config(input=str(wells_file), **{"sphering.method": "zca"}), tmp_path)
  with pytest.raises(ConfigError, match="input"):
    run_task(small_config(), tmp_path)
