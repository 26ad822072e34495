"""The command line: errors of input or configuration are one line on stderr, exit code 2."""

import subprocess
import sys

import pytest

from cellrep import hostmem
from tests.conftest import REPO, SHARED_DATA


def _launch(*args, tmp_path):
  return subprocess.run([sys.executable, "-m", "cellrep.launch", *args,
                         f"--workdir={tmp_path / 'w'}", "--compilation_cache="],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--config=configs/demo.py", "--config.trian.steps=3"], "trian"),
    (["--config=configs/demo.py", "--config.train.steps=abc"], "train.steps"),
    (["--config=configs/demo.py", "--config.model.name=resnet51"], "config.model.name"),
    (["--config=configs/demo.py", "--config.model.conv_impl=fft"], "config.model.conv_impl"),
    (["--config=configs/demo.py", "--config.predict.dtype=float16"], "config.predict.dtype"),
    (["--config=configs/predict.py", "--config.model_dir=m", "--config.data.store=s",
      "--config.predict.dtype=fp8"], "config.predict.dtype"),
    (["--config=configs/demo.py", "--config.data.crop_size=8"], "config.data.crop_size"),
    (["--config=configs/demo.py", "--config.data.fov_window=-1"], "config.data.fov_window"),
    (["--config=configs/cellsighter.py:members=x"], "members"),
    # Library checks, named by the config key that set the value, before any work.
    (["--config=configs/demo.py", "--config.augment.blur_ksize=2"], "config.augment.blur_ksize"),
    (["--config=configs/demo.py", "--config.data.synthetic.spillover=1.5"],
     "config.data.synthetic.spillover"),
    (["--config=configs/demo.py", "--config.model.width=-1.0"], "config.model.width"),
    (["--config=configs/cellsighter.py:runlocal", "--config.simulate.fractions=0.5,x"],
     "config.simulate.fractions"),
    (["--config=configs/cellsighter.py:runlocal", "--config.confidence.thresholds=a"],
     "config.confidence.thresholds"),
    (["--config=configs/embed.py"], "config.data.store"),
    (["--config=configs/nope.py"], "nope.py"),
])
def test_bad_config_is_one_line_and_exit_2(args, needle, tmp_path):
  out = _launch(*args, tmp_path=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("cellrep: error:")]
  assert len(errors) == 1 and needle in errors[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_bad_store_path_names_the_file(tmp_path):
  out = _launch("--config=configs/cellsighter.py", f"--config.data.store={tmp_path / 'missing'}",
                tmp_path=tmp_path)
  assert out.returncode == 2 and "missing" in out.stderr and "store.json" in out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flag,said", [("--keep_freed_memory", "kept for reuse"),
                                       ("--nokeep_freed_memory", "returned to the system")])
def test_host_memory_reuse_is_a_flag(flag, said, tmp_path):
  if said.startswith("kept") and not hostmem.on_glibc():
    pytest.skip("glibc malloc only")
  out = _launch("--config=configs/ingest.py", flag, "--config.ingest.channels=CD3,CD20",
                f"--config.ingest.input={SHARED_DATA / 'mibi_fov8'}", tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"host memory: freed buffers {said}" in out.stderr
