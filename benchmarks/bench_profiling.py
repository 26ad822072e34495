r"""cellrep's profiling kernels against copairs and pycytominer, side by side.

  .venv/bin/python benchmarks/bench_profiling.py                     # 4k, 8k, 16k wells
  .venv/bin/python benchmarks/bench_profiling.py --sizes=4000 --reference-max-wells=4000

Every (case, size, implementation) runs in its own subprocess on the same
generated wells (672 features, 10% control wells, compounds in 4 replicates,
~25 compounds per MoA), so peak memory (ru_maxrss) is that case's alone. Cases:
- sphering_all: ZCA-cor fitted on all wells and applied (pycytominer `normalize`
  with method="spherize", samples="all");
- sphering_controls: the same fitted on the control wells only;
- ap_activity: AP of each well against its replicates and the controls (copairs'
  phenotypic activity: 5.8 M pairs at 8,000 wells);
- ap_same_moa: well-level same-MoA retrieval (positives: same MoA, other compound;
  negatives: other MoAs);
- map_activity: mAP per compound with p-values (null_size 10,000) from ap_activity.
cellrep is timed after one warm-up call (compilation excluded; the first call is
reported too); references once per size unless --reference-repeats. Writes
benchmarks/results/profiling.json: machine, versions, load averages, medians, ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ("sphering_all", "sphering_controls", "ap_activity", "ap_same_moa", "map_activity")
FEATURES = 672


def make_wells(n: int, seed: int = 0):
  """(meta, feats [n, 672] float32): 10% controls, 4 replicates, 25 compounds per MoA."""
  import numpy as np
  import pandas as pd
  rng = np.random.default_rng(seed)
  n_ctl = n // 10
  n_cpd = (n - n_ctl) // 4
  n_ctl = n - 4 * n_cpd
  cpd = np.repeat(np.arange(n_cpd), 4)
  moa = cpd % max(2, n_cpd // 25)
  meta = pd.DataFrame({
      "Metadata_compound": np.concatenate([[f"c{c}" for c in cpd], ["DMSO"] * n_ctl]),
      "Metadata_moa": np.concatenate([[f"m{m}" for m in moa], ["control"] * n_ctl]),
      "Metadata_Plate": [f"P{i % 20}" for i in range(n)],
  })
  meta["Metadata_control"] = meta["Metadata_compound"] == "DMSO"
  meta["Metadata_reference_index"] = np.where(meta["Metadata_control"], np.arange(n), -1)
  basis = rng.normal(size=(64, FEATURES)).astype(np.float32) / 8  # correlated features
  moa_sig = rng.normal(size=(moa.max() + 2, 64)).astype(np.float32)
  cpd_sig = rng.normal(size=(n_cpd + 1, 64)).astype(np.float32)
  latent = rng.normal(size=(n, 64)).astype(np.float32)
  latent[:4 * n_cpd] += 0.5 * moa_sig[moa] + 0.7 * cpd_sig[cpd]
  x = latent @ basis + rng.normal(size=(n, FEATURES)).astype(np.float32) * 0.5
  return meta, x.astype(np.float32)


ACTIVITY = (["Metadata_compound", "Metadata_reference_index"], [], [],
            ["Metadata_compound", "Metadata_reference_index"])
SAME_MOA = (["Metadata_moa"], ["Metadata_compound"], [], ["Metadata_moa"])


def case_fn(case: str, impl: str, meta, x):
  """A no-argument callable running `case` with `impl` on the data."""
  import pandas as pd
  feats = [f"f{i}" for i in range(x.shape[1])]
  if case.startswith("sphering"):
    df = pd.concat([meta, pd.DataFrame(x, columns=feats)], axis=1)
    samples = "all" if case == "sphering_all" else "Metadata_control == True"
    if impl == "cellrep":
      from cellrep.profiling import sphering
      controls = [True] * len(df) if samples == "all" else samples
      return lambda: sphering.sphere(df, controls, "ZCA-cor", epsilon=1e-6)
    from pycytominer import normalize
    return lambda: normalize(df, features=feats, meta_features=list(meta.columns), samples=samples,
                             method="spherize", spherize_method="ZCA-cor", spherize_epsilon=1e-6)
  rules = ACTIVITY if case in ("ap_activity", "map_activity") else SAME_MOA
  if impl == "cellrep":
    from cellrep.profiling import retrieval, significance
    ap_fn = lambda: retrieval.average_precision(meta, x, *rules)
    if case == "map_activity":
      ap = ap_fn()
      return lambda: significance.mean_average_precision(ap, ["Metadata_compound"], 10000, 0.05,
                                                         0)
    return ap_fn
  from copairs.map import average_precision, mean_average_precision
  ap_fn = lambda: average_precision(meta, x, *rules, progress_bar=False)
  if case == "map_activity":
    ap = ap_fn()
    cache = tempfile.mkdtemp(prefix="copairs-cache-")
    return lambda: mean_average_precision(ap, ["Metadata_compound"], 10000, 0.05, 0,
                                          progress_bar=False, cache_dir=cache)
  return ap_fn


def worker(case: str, size: int, impl: str, repeats: int) -> dict:
  meta, x = make_wells(size)
  fn = case_fn(case, impl, meta, x)
  base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  times = []
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  if impl == "cellrep":  # the first call compiles; time warm calls
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
  else:
    times.append(first)
    for _ in range(repeats - 1):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  times.sort()
  return {"case": case, "wells": size, "impl": impl, "times_s": times,
          "median_s": times[len(times) // 2], "first_call_s": first,
          "peak_rss_gib": peak / 2**20, "rss_before_call_gib": base_rss / 2**20}


def run_worker(case, size, impl, repeats, timeout) -> dict:
  cmd = [sys.executable, __file__, "--worker", case, str(size), impl, str(repeats)]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {"case": case, "wells": size, "impl": impl, "error": f"timed out after {timeout} s"}
  if out.returncode:
    return {"case": case, "wells": size, "impl": impl,
            "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
  import jax, numpy, pandas  # noqa: E401
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
              if l.startswith("model name")), platform.processor())
  mem = next((int(l.split()[1]) / 2**20 for l in open("/proc/meminfo")
              if l.startswith("MemTotal")), None)
  return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem,
          "python": platform.python_version(), "jax": jax.__version__,
          "jax_backend": jax.default_backend(), "numpy": numpy.__version__,
          "pandas": pandas.__version__, "copairs": _dist_version("copairs"),
          "pycytominer": _dist_version("pycytominer")}


def _dist_version(name: str) -> str:
  from importlib.metadata import version
  return version(name)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="4000,8000,16000", help="comma-separated well counts")
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--reference-max-wells", type=int, default=8000,
                 help="run copairs/pycytominer only up to this many wells (0: never)")
  p.add_argument("--repeats", type=int, default=3, help="warm cellrep calls per case")
  p.add_argument("--reference-repeats", type=int, default=1)
  p.add_argument("--timeout", type=int, default=3600, help="seconds per reference run")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profiling.json"))
  p.add_argument("--worker", nargs=4, metavar=("CASE", "SIZE", "IMPL", "REPEATS"),
                 help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    case, size, impl, repeats = args.worker
    print(json.dumps(worker(case, int(size), impl, int(repeats))))
    return

  sizes = [int(s) for s in args.sizes.split(",")]
  cases = [c for c in args.cases.split(",") if c]
  result = {"benchmark": "profiling", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": machine(), "load_average_start": os.getloadavg(),
            "note": ("The CPU is shared with other work while this runs; contention slows "
                     "both sides, so compare ratios from one run, and read absolute times "
                     "with the load averages."),
            "data": f"wells x {FEATURES} float32 features, 10% controls, 4 replicates, "
                    "25 compounds per MoA", "runs": []}
  for size in sizes:
    for case in cases:
      ref_impl = "pycytominer" if case.startswith("sphering") else "copairs"
      impls = ["cellrep"] + ([ref_impl] if size <= args.reference_max_wells else [])
      row = {"case": case, "wells": size}
      for impl in impls:
        reps = args.repeats if impl == "cellrep" else args.reference_repeats
        r = run_worker(case, size, impl, reps, args.timeout)
        print(json.dumps(r), flush=True)
        row[impl] = r
      ref = row.get(ref_impl, {})
      if "median_s" in ref and "median_s" in row["cellrep"]:
        row["speedup"] = ref["median_s"] / row["cellrep"]["median_s"]
      result["runs"].append(row)
      _write(args.out, result)
  result["load_average_end"] = os.getloadavg()
  result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
  _write(args.out, result)
  for row in result["runs"]:
    ref = next((row[k] for k in ("copairs", "pycytominer") if k in row), {})
    nan = float("nan")
    ours = row["cellrep"]
    print(f"{row['case']:>18} {row['wells']:>6}  cellrep {ours.get('median_s', nan):8.3f} s"
          f"  ref {ref.get('median_s', nan):9.2f} s  speedup {row.get('speedup', nan):7.1f}x"
          f"  peak {ours.get('peak_rss_gib', nan):.2f} GiB")


def _write(path, result) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  os.replace(tmp, path)


if __name__ == "__main__":
  main()
