r"""Peak resident memory of whole runs, and of a store streamed through bounded read caches.

  .venv/bin/python benchmarks/bench_memory.py [--quick] [--out FILE] [--cases demo,mibi47,...]

Every case is its own process (`python -m cellrep.launch ...` in a new work
directory), and its peak resident set is the kernel's (`ru_maxrss` of that child,
read by `os.wait4`); wall seconds beside it. Runs train with host-memory reuse on
(the default) and off (``--nokeep_freed_memory``), one after the other:

  demo         configs/demo.py as `make demo` runs it (--quick: 4 steps)
  cellsighter  configs/cellsighter.py:runlocal, every analysis (--quick: 4 steps, no
               learning curve or simulations)
  mibi47       a 47-channel 1024^2 FOV: ../shared/data/mibi_fov8's 22 channels and 25
               more made from them (flipped, shifted, Poisson-resampled), ingested with
               its gated landmark labels, then a small model on that one FOV: ResNet-18
               x1/4, 3 members, 32 px input (40 px window), batch 64, 20 steps
               (--quick: its 22 channels, 4 steps); and bounded, reuse off with
               ``ensemble.strategy=map`` (one member's step temporaries at a time)
  stream       one pass of the training pipeline (`train_dataset`, 8 threads, batch 128,
               60 px crops of 14 uint16 markers) over every cell of a store 1x and 5x the
               read caches' budget (`data.fov_cache_mb` + `data.tensorstore_cache_mb` per
               array: 64 + 2 x 16 MiB): the peak must not grow with the store

Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib

SHARED = benchlib.ROOT.parent / "shared" / "data" / "mibi_fov8"
CASES = ("demo", "cellsighter", "mibi47", "stream")
REUSE = {"keep": "--keep_freed_memory", "nokeep": "--nokeep_freed_memory"}
# The stream case's read caches (MiB) and the store sizes, in multiples of their sum.
FOV_CACHE_MB, TS_CACHE_MB = 64, 16
BUDGET_MB = FOV_CACHE_MB + 2 * TS_CACHE_MB
STREAM_MULTIPLES = (1, 5)


def measured(cmd: list[str], env: dict | None = None) -> dict:
  """Runs cmd to completion: its peak RSS (GiB, the kernel's), wall seconds, exit code, tail."""
  log = tempfile.TemporaryFile(mode="w+")
  t = time.perf_counter()
  p = subprocess.Popen(cmd, cwd=benchlib.ROOT, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, **(env or {})))
  _, status, usage = os.wait4(p.pid, 0)
  wall = time.perf_counter() - t
  p.returncode = os.waitstatus_to_exitcode(status)
  log.seek(0)
  tail = log.read()[-1500:]
  if p.returncode:
    print(tail, file=sys.stderr)
  return {"peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "wall_s": round(wall, 1),
          "returncode": p.returncode, "tail": tail if p.returncode else ""}


def launch(config: str, workdir: pathlib.Path, *overrides: str, reuse: str = "keep") -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  return measured([sys.executable, "-m", "cellrep.launch", f"--config={config}",
                   f"--workdir={workdir}", "--compilation_cache=", REUSE[reuse], *overrides])


def both(config, workdir, *overrides) -> dict:
  return {reuse: launch(config, workdir, *overrides, reuse=reuse) for reuse in REUSE}


def make_fov(folder: pathlib.Path, channels: int) -> pathlib.Path:
  """mibi_fov8 with `channels` channels: its own, then more derived from them."""
  import numpy as np
  import tifffile
  fov = folder / "fov8"
  (fov / "TIFs").mkdir(parents=True)
  shutil.copy(SHARED / "segmentation.tiff", fov / "segmentation.tiff")
  names = sorted(p.name for p in (SHARED / "TIFs").glob("*.tiff"))[:channels]
  for name in names:
    shutil.copy(SHARED / "TIFs" / name, fov / "TIFs" / name)
  rng = np.random.default_rng(0)
  for i in range(channels - len(names)):
    a = tifffile.imread(SHARED / "TIFs" / names[i % len(names)])
    b = np.roll(np.flip(a, axis=i % 2), 37 * (i + 1), axis=0).astype(np.float32)
    tifffile.imwrite(fov / "TIFs" / f"Extra{i:02d}.tiff", rng.poisson(b * 0.5 + 0.1).astype(a.dtype))
  return folder


def mibi47(tmp: pathlib.Path, quick: bool) -> dict:
  channels, steps = (22, 4) if quick else (47, 20)
  folder = make_fov(tmp / "in", channels)
  ingest = launch("configs/ingest.py:mibi", tmp / "ingest", f"--config.ingest.input={folder}")
  store = tmp / "ingest" / "store"
  args = ("configs/demo.py", tmp / "run", "--config.data.source=store",
          f"--config.data.store={store}", "--config.data.val_fovs=",
          "--config.model.width=0.25", "--config.ensemble.members=3",
          "--config.data.crop_size=40", "--config.data.input_size=32",
          f"--config.train.steps={steps}", "--config.train.batch_size=64",
          "--config.train.checkpoint_every=10")
  runs = both(*args)
  # Bounded: freed memory returned and one member's step temporaries at a time.
  runs["bounded"] = launch(*args, "--config.ensemble.strategy=map", reuse="nokeep")
  return {"channels": channels, "steps": steps, "ingest": ingest, "runs": runs}


def stream_child(store: str) -> None:
  """One pass of the training pipeline over every cell of `store` (run in its own process)."""
  from cellrep.data.crops import CropSource
  from cellrep.data.pipeline import train_dataset
  from cellrep.data.sampling import EpochSampler
  from cellrep.data.store import open_store
  s = open_store(store).with_memory(cache_bytes=TS_CACHE_MB << 20,
                                    fov_cache_bytes=FOV_CACHE_MB << 20)
  source = CropSource(s, 60)
  index = (source.labels >= 0).nonzero()[0]
  batch = 128
  sampler = EpochSampler(index, len(index) // batch * batch, seed=0, fovs=source.fovs[index],
                         fov_window=1)
  crops = 0
  for b in train_dataset(source, sampler, batch, threads=8, prefetch=2):
    crops += len(b["crop"])
  print(json.dumps({"crops": crops}))


def stream(tmp: pathlib.Path, quick: bool) -> dict:
  import bench_pipeline
  size = 256 if quick else 1024
  fov_mib = (bench_pipeline.MARKERS * 2 + 4) * size * size / 2**20  # uint16 markers + int32 mask
  out = {"budget_mib": BUDGET_MB, "fov_cache_mb": FOV_CACHE_MB, "tensorstore_cache_mb": TS_CACHE_MB,
         "fov_mib": fov_mib, "stores": {}}
  for multiple in STREAM_MULTIPLES:
    fovs = max(1, round(multiple * BUDGET_MB / fov_mib))
    path = tmp / f"store_{multiple}x"
    bench_pipeline.write_store(path, fovs, size, chunk=64)
    run = measured([sys.executable, __file__, "--stream-child", str(path)])
    run.update(fovs=fovs, store_mib=round(fovs * fov_mib, 1))
    out["stores"][f"{multiple}x"] = run
    shutil.rmtree(path)
  peaks = [r["peak_rss_gib"] for r in out["stores"].values()]
  out["peak_growth_5x_over_1x"] = round(peaks[-1] / peaks[0], 3)
  return out


def main():
  p = benchlib.parser(__doc__, "memory")
  p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
  p.add_argument("--stream-child", default="", help=argparse_hidden())
  args = p.parse_args()
  if args.stream_child:
    return stream_child(args.stream_child)
  result = benchlib.header("memory", args)
  result["cases"] = {}
  quick = args.quick
  steps = ("--config.train.steps=4",) if quick else ()
  with tempfile.TemporaryDirectory(prefix="cellrep-bench-memory-") as tmp:
    tmp = pathlib.Path(tmp)
    for case in args.cases.split(","):
      print(f"case {case}", flush=True)
      if case == "demo":
        r = both("configs/demo.py", tmp / "demo", *steps)
      elif case == "cellsighter":
        r = both("configs/cellsighter.py:runlocal", tmp / "cellsighter", *steps, *(
            ("--config.learning_curve.enabled=false", "--config.simulate.enabled=false") if quick else ()))
      elif case == "mibi47":
        r = mibi47(tmp, quick)
      elif case == "stream":
        r = stream(tmp, quick)
      else:
        raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")
      result["cases"][case] = r
      print(json.dumps(r, indent=1), flush=True)
      benchlib.write(args.out, dict(result, load_average_end=benchlib.load()))


def argparse_hidden():
  import argparse
  return argparse.SUPPRESS


if __name__ == "__main__":
  main()
