"""One run over two processes (`launch/local.sh 2`) equals the run of one process with as
many devices: the same global batches, training metrics, predictions, embeddings and
profile scores; only process 0 writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO

# A classify run of seconds on a generated store (made by process 0, opened by process 1).
CLASSIFY = ["--config=configs/demo.py", "--config.progress=False",
            "--config.data.synthetic.n_fovs=3", "--config.data.synthetic.fov_size=96",
            "--config.data.val_fovs=synth_002", "--config.data.crop_size=20",
            "--config.data.input_size=16", "--config.data.threads=2",
            "--config.model.width=0.0625", "--config.ensemble.members=2",
            "--config.train.steps=4", "--config.train.batch_size=16",
            "--config.train.warmup_steps=1", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.predict.batch_size=24"]


def _run(processes: int, args: list[str], workdir, log_dir) -> subprocess.CompletedProcess:
  """The run with `processes` processes of 2 // processes CPU devices each (2 in all)."""
  env = dict(os.environ, PYTHON=sys.executable, CELLREP_CPU_DEVICES=str(2 // processes),
             CELLREP_LOG_DIR=str(log_dir), JAX_PLATFORMS="cpu")
  command = [str(REPO / "launch" / "local.sh"), str(processes)] if processes > 1 else [
      sys.executable, "-m", "cellrep.launch"]
  out = subprocess.run(command + args + [f"--workdir={workdir}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _train_records(workdir) -> list[dict]:
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "train/steps_per_sec"} for r in records]


def _assert_close_records(a: list[dict], b: list[dict]):
  assert [sorted(r) for r in a] == [sorted(r) for r in b]
  for ra, rb in zip(a, b):
    for k in ra:
      if isinstance(ra[k], float):
        assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (k, ra[k], rb[k])
      else:
        assert ra[k] == rb[k], k


def _assert_same_table(a, b, atol=1e-6):
  a, b = pd.read_parquet(a), pd.read_parquet(b)
  assert list(a.columns) == list(b.columns) and len(a) == len(b)
  for c in a.columns:
    if pd.api.types.is_float_dtype(a[c]):
      np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=atol, err_msg=c)
    else:
      assert a[c].astype(str).tolist() == b[c].astype(str).tolist(), c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(one-process work directories, two-process ones): classify, embed, profile_eval."""
  root = tmp_path_factory.mktemp("multiprocess")
  dirs = {}
  for p in (1, 2):
    w = {name: root / f"{name}{p}" for name in ("classify", "embed", "profiles", "wells")}
    _run(p, CLASSIFY, w["classify"], root)
    _run(p, ["--config=configs/embed.py", f"--config.model_dir={root / 'classify1'}",
             "--config.embed.batch_size=24"], w["embed"], root)
    _run(p, ["--config=configs/profile_eval.py:by_class=Stroma",
             f"--config.input={w['embed'] / 'embeddings.parquet'}",
             "--config.retrieval.null_size=200"], w["profiles"], root)
    # Generated wells ranked in many small blocks: each process ranks its share.
    _run(p, ["--config=configs/profile_eval.py:synthetic", "--config.retrieval.null_size=200",
             "--config.retrieval.memory_budget_mb=1", "--config.sphering.sweep="],
         w["wells"], root)
    dirs[p] = w
  return dirs


def test_two_processes_train_and_predict_as_one(runs):
  one, two = runs[1]["classify"], runs[2]["classify"]
  records = _train_records(one)
  assert sum("train/loss" in r for r in records) == 4 and "eval/balanced_recall" in records[-1]
  _assert_close_records(records, _train_records(two))
  _assert_same_table(one / "predictions.parquet", two / "predictions.parquet")
  assert (two / "report" / "index.html").is_file()
  # Process 1 wrote nothing of its own: no second copy, no temporary left.
  assert not [p for p in two.rglob(".*.tmp*")]


def test_two_processes_embed_and_score_as_one(runs):
  _assert_same_table(runs[1]["embed"] / "embeddings.parquet",
                     runs[2]["embed"] / "embeddings.parquet")
  _assert_same_table(runs[1]["profiles"] / "map.parquet", runs[2]["profiles"] / "map.parquet")


def test_two_processes_rank_their_shares_of_a_table_as_one(runs):
  for name in ("ap.parquet", "map.parquet", "moa_map.parquet"):
    _assert_same_table(runs[1]["wells"] / name, runs[2]["wells"] / name, atol=0)


def test_a_failing_process_stops_the_run(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, CELLREP_LOG_DIR=str(tmp_path))
  out = subprocess.run([str(REPO / "launch" / "local.sh"), "2", "--config=configs/demo.py",
                        "--config.train.steps=-5", f"--workdir={tmp_path / 'w'}"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if "cellrep: error:" in l]
  assert len(errors) == 1 and "config.train.steps" in errors[0], out.stderr[-2000:]
