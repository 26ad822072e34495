r"""Crops per second from a store through the Grain pipeline, next to what a train step consumes.

  .venv/bin/python benchmarks/bench_pipeline.py [--quick] [--fovs 48] [--fov-size 1024]

A store like a MIBI data set is written once per chunk size into a temporary
directory: `--fovs` FOVs of `--fov-size`^2 pixels, 14 uint16 marker channels
(Poisson counts), a mask of ~20 px cells on a jittered grid (~2,600 cells per
1024^2 FOV). Crops are [14 + 2, 60, 60] (markers, all-cells mask, centre-cell
mask) in float32, CellSighter's `crop_size` 60, read by
`cellrep.data.pipeline.train_dataset` in batches of 128 from a class-balanced
`EpochSampler` over every cell: crops/s by chunk size, Grain reader threads,
worker processes, and FOV-local order (`fov_window`, the number of FOVs whose
cells are shuffled together; 0 = all cells shuffled together).

Every configuration reads `--batches` batches from a new iterator, timed from its
creation (read-ahead would flatter a clock started at the first batch), `--repeats`
times, in turn with the others. Its reader (open store, FOVs in memory) lives on
between rounds as in a run: crops/s is the median of the rounds after the first,
which is reported apart (`first_round_crops_per_s`: a cold cache).

The train step's consumption rate (host crops per second: batch / step time, as
every member sees the same host batch) is read from
benchmarks/results/ensemble.json when it exists, so the JSON says whether
training is input-bound. Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import sys
import tempfile
import time

import benchlib

MARKERS = 14
CROP = 60
BATCH = 128


def write_store(path, fovs: int, size: int, chunk: int, seed: int = 0):
  """A store of `fovs` FOVs of size^2: Poisson uint16 markers, cells on a jittered 20 px grid."""
  import numpy as np
  from cellrep.data.store import StoreWriter
  rng = np.random.default_rng(seed)
  step = 20
  with StoreWriter(path, [f"m{i}" for i in range(MARKERS)], [f"fov{i}" for i in range(fovs)],
                   [(size, size)] * fovs, dtype="uint16", chunk_size=chunk) as w:
    for f in range(fovs):
      mask = np.zeros((size, size), np.int32)
      centres = np.stack(np.meshgrid(np.arange(step // 2, size, step),
                                     np.arange(step // 2, size, step)), -1).reshape(-1, 2)
      centres = centres + rng.integers(-3, 4, centres.shape)
      for i, (y, x) in enumerate(np.clip(centres, 7, size - 8), start=1):
        mask[y - 7:y + 7, x - 7:x + 7] = i
      image = rng.poisson(np.where(mask > 0, 8.0, 1.0), size=(MARKERS, size, size)).astype(np.uint16)
      n = int(mask.max())
      w.write_fov(f, image, mask, {i: f"c{i % 6}" for i in range(1, n + 1)})
    return w.commit()


def consumption() -> dict | None:
  """Host crops/s the train step of bench_ensemble.json consumes (every case's ``auto``)."""
  path = benchlib.RESULTS / "ensemble.json"
  if not path.is_file():
    return None
  cases = json.loads(path.read_text()).get("cases", [])
  return {f"{c['model']} x{c['members']} batch {c['batch']}":
          c["batch"] / c["variants"]["auto"]["median_wall_s"]
          for c in cases if "auto" in c.get("variants", {})}


def make_reader(store, crop: int, threads: int, workers: int, fov_window: int, batches: int):
  """A no-argument callable that reads `batches` batches of crops and returns the seconds taken.

  The source (open store handles, FOVs in memory) lives across calls, as in a run; every
  call samples new cells.
  """
  from cellrep.data.crops import CropSource
  from cellrep.data.pipeline import train_dataset
  from cellrep.data.sampling import EpochSampler, sample_weights
  source = CropSource(store, crop)
  labelled = source.labels >= 0
  index = labelled.nonzero()[0]
  weights = sample_weights(source.labels[index], "class")
  fovs = source.fovs[index] if fov_window else None
  state = {"epoch": 0}

  def run():
    # A new sampler seed every round: no round re-reads the cells the previous one did.
    state["epoch"] += 1
    sampler = EpochSampler(index, batches * BATCH, seed=state["epoch"], weights=weights,
                           fovs=fovs, fov_window=fov_window)
    t = time.perf_counter()  # from the start: read-ahead would flatter a clock started later
    it = iter(train_dataset(source, sampler, BATCH, workers=workers, threads=threads))
    for _ in range(batches):
      b = next(it)
    assert b["crop"].shape == (BATCH, MARKERS + 2, crop, crop)
    return time.perf_counter() - t

  return run


def main():
  p = benchlib.parser(__doc__, "pipeline")
  # 48 FOVs (1.6 GB decoded) are more than CropSource keeps in memory by default (1 GiB).
  p.add_argument("--fovs", type=int, default=48)
  p.add_argument("--fov-size", type=int, default=1024)
  p.add_argument("--chunks", default="64,128")
  p.add_argument("--threads", default="1,2,4")
  p.add_argument("--workers", default="0,2")
  p.add_argument("--fov-windows", default="0,2")
  p.add_argument("--batches", type=int, default=40)
  args = p.parse_args()
  # Grain reads absl flags (in this process and its workers): parse them, none given.
  from absl import flags
  flags.FLAGS(sys.argv[:1])
  if args.quick:
    args.fovs, args.fov_size, args.chunks, args.threads, args.workers = 2, 256, "64", "2", "0,1"
    args.fov_windows, args.batches = "0,1", 2
  rounds = args.repeats or (1 if args.quick else 3)
  result = benchlib.header("pipeline", args)
  result.update({"fovs": args.fovs, "fov_size": args.fov_size, "markers": MARKERS, "crop": CROP,
                 "batch": BATCH, "batches": args.batches, "rounds": rounds, "configs": []})
  ints = lambda s: [int(x) for x in s.split(",")]
  with tempfile.TemporaryDirectory(prefix="cellrep-bench-store-") as tmp:
    for chunk in ints(args.chunks):
      t = time.perf_counter()
      store = write_store(pathlib.Path(tmp) / f"chunk{chunk}", args.fovs, args.fov_size, chunk)
      print(f"store with {chunk}^2 chunks: {len(store.cells)} cells, written in "
            f"{time.perf_counter() - t:.0f} s", flush=True)
      grid = list(itertools.product(ints(args.threads), ints(args.workers), ints(args.fov_windows)))
      readers = {cfg: make_reader(store, CROP, *cfg, args.batches) for cfg in grid}
      seconds = {cfg: [] for cfg in grid}
      for _ in range(rounds):
        for cfg, run in readers.items():
          seconds[cfg].append(run())
      for (threads, workers, window), s in seconds.items():
        rate = args.batches * BATCH / benchlib.median(s[1:] or s)
        result["configs"].append({"chunk": chunk, "threads": threads, "workers": workers,
                                  "fov_window": window, "seconds": s, "crops_per_s": rate,
                                  "first_round_crops_per_s": args.batches * BATCH / s[0],
                                  "load_1min": benchlib.load()[0]})
        print(f"  chunk {chunk:3d} threads {threads} workers {workers} fov_window {window}: "
              f"{rate:8.0f} crops/s", flush=True)
  result["best"] = max(result["configs"], key=lambda c: c["crops_per_s"])
  result["train_step_consumes_crops_per_s"] = consumption()
  result["load_average_end"] = benchlib.load()
  if args.profile:
    # The pipeline is host code: a profiler trace shows Grain's and TensorStore's threads.
    with tempfile.TemporaryDirectory() as tmp:
      store = write_store(pathlib.Path(tmp) / "s", 2, 512, 64)
      benchlib.profile(args.profile, "pipeline", make_reader(store, CROP, 8, 0, 0, 5))
  benchlib.write(args.out, result)


if __name__ == "__main__":
  main()
