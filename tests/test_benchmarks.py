"""Every benchmark runs end to end in --quick mode and writes its JSON; report.py tables them.

Timings are not checked here (they live in benchmarks/results/); only that each
benchmark runs and records what the tables of docs/performance.md need.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "benchmarks"


def _run(script, *args, cwd=REPO):
  done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _quick(name, tmp_path, *extra):
  out = tmp_path / f"{name}.json"
  _run(f"bench_{name}.py", "--quick", "--out", str(out), *extra)
  result = json.loads(out.read_text())
  assert result["quick"] and result["machine"]["cores"] >= 1 and len(result["load_average_start"]) == 3
  return result


def test_peak_and_pipeline_quick(tmp_path):
  peak = _quick("peak", tmp_path, "--profile", str(tmp_path / "profile"))
  assert set(peak["reference"]) == {"float32", "bfloat16"}
  assert all(r["gflops"] > 0 for r in peak["reference"].values())
  assert (tmp_path / "profile" / "matmul_float32.hlo.txt").is_file()
  pipeline = _quick("pipeline", tmp_path)
  assert {c["fov_window"] for c in pipeline["configs"]} == {0, 1}
  assert {c["workers"] for c in pipeline["configs"]} == {0, 1}  # Grain worker processes start
  assert all(c["crops_per_s"] > 0 for c in pipeline["configs"])
  text = _run("report.py", "--results", str(tmp_path))
  assert "Reference FLOP rate" in text and "Crop pipeline" in text


def test_memory_quick_streams_a_store_under_its_cache_budget(tmp_path):
  memory = _quick("memory", tmp_path, "--cases", "stream")
  stream = memory["cases"]["stream"]
  one, five = stream["stores"]["1x"], stream["stores"]["5x"]
  assert one["returncode"] == five["returncode"] == 0
  assert five["store_mib"] >= 4.5 * stream["budget_mib"] and five["fovs"] > one["fovs"]
  assert one["peak_rss_gib"] > 0.1 and five["peak_rss_gib"] > 0.1
  text = _run("report.py", "--results", str(tmp_path))
  assert "Peak memory of runs" in text and "store 5x the budget" in text


@pytest.mark.slow  # compiles seven train steps and seven predictors: a few minutes
def test_ensemble_and_inference_quick_and_report(tmp_path):
  with_torch = importlib.util.find_spec("torch") is not None  # the bench extra
  # Two case groups: the first writes --out, the other the file named after it.
  ensemble = _quick("ensemble", tmp_path, "--groups", "strategies,bf16")
  assert ensemble["group"] == "strategies"
  (case,) = ensemble["cases"]
  assert set(case["variants"]) == {"auto", "loop", "loop_im2col", "map_im2col", "vmap_xla"}
  auto = case["variants"]["auto"]
  assert auto["strategy"] == "vmap" and auto["compile_s"] > 0 and auto["cached_compile_s"] > 0
  assert case["model_flops"] > 0 and 0 < auto["mfu"] and case["vs_loop"]["loop"] == 1.0
  assert case["augment"]["median_wall_s"] > 0 and case["augment"]["share_of_auto"] > 0
  bf16 = json.loads((tmp_path / "ensemble_bf16.json").read_text())
  assert bf16["group"] == "bf16" and set(bf16["cases"][0]["variants"]) == {"auto", "auto_bf16"}
  assert ("torch" in case) == ("torch_bf16" in case) == with_torch
  if with_torch:  # PyTorch's train step of the same network, in the same rounds
    assert case["torch"]["dtype"] == "float32" and case["torch_bf16"]["dtype"] == "bfloat16"
    assert case["torch"]["model"] == case["model"] and case["torch"]["samples_per_s"] > 0
    assert set(case["vs_torch"]) == set(case["variants"]) and case["vs_torch_bf16"]["auto"] > 0
    assert bf16["cases"][0]["vs_torch_bf16"]["auto_bf16"] > 0
  inference = _quick("inference", tmp_path)
  assert inference["variants"]["auto"]["member_images_per_s"] > 0
  assert inference["variants"]["auto_f32"]["dtype"] == "float32"
  assert set(inference["reference_gflops"]) == {"float32", "bfloat16"}
  if with_torch:
    assert inference["torch_bf16"]["dtype"] == "bfloat16" and inference["vs_torch_bf16"]["auto"] > 0
  # Several batch sizes: one run and one file each, the further ones named after their batch.
  batches = tmp_path / "batches"
  _run("bench_inference.py", "--quick", "--batch", "4,8", "--variants", "auto",
       "--out", str(batches / "inference.json"))
  assert [json.loads((batches / f).read_text())["batch"]
          for f in ("inference.json", "inference_8.json")] == [4, 8]
  text = _run("report.py", "--results", str(tmp_path))
  assert "Ensemble train step (" in text and "Ensemble inference" in text
  assert "Ensemble train step, bfloat16 products" in text
  assert ("autocast bfloat16" in text) == with_torch
  torch_columns = "| auto / PyTorch | auto / PyTorch bf16 | auto_bf16 / PyTorch bf16 |"
  assert (torch_columns in text) == with_torch
  assert "Ensemble inference, batch 8" in _run("report.py", "--results", str(batches))


def test_report_writes_between_markers(tmp_path):
  # The repository's results, written into a page between its markers; the rest is kept.
  page = tmp_path / "performance.md"
  page.write_text("# Performance\n\nprose\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n"
                  "\nafter\n")
  _run("report.py", "--docs", str(page))
  text = page.read_text()
  assert text.startswith("# Performance\n\nprose\n\n<!-- bench:begin -->\n")
  assert text.endswith("<!-- bench:end -->\n\nafter\n") and "\nold\n" not in text
  if (BENCH / "results" / "profiling.json").is_file():
    assert "#### Profiling kernels" in text
    assert "| case | wells | cellrep | reference | ratio | cellrep peak RSS |" in text
  if (BENCH / "results" / "efficientnet.json").is_file():
    assert "#### EfficientNet-B0 (Cell Painting CNN)" in text and "| depthwise 3x3" in text
  bare = tmp_path / "bare.md"
  bare.write_text("no markers\n")
  done = subprocess.run([sys.executable, str(BENCH / "report.py"), "--docs", str(bare)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "bench:begin" in done.stderr
  assert bare.read_text() == "no markers\n"


@pytest.mark.slow  # two child processes, each compiling a predictor and a train step: two minutes
def test_hostmem_quick_and_report(tmp_path):
  # One child process with host-memory reuse, one without (the setting precedes XLA's threads).
  result = _quick("hostmem", tmp_path)
  assert result["runs"]["on"][0]["keep_freed_memory"] is True
  assert result["runs"]["off"][0]["keep_freed_memory"] is False
  assert set(result["speedup_median"]) == {"predict", "train", "reference_matmul"}
  text = _run("report.py", "--results", str(tmp_path))
  assert "Host-memory reuse" in text
