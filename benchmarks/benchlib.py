"""What every cellrep benchmark shares: flags, machine description, interleaved timing, JSON, profiles.

Timing rules (the machine may be shared): the cases of one comparison run in
turn, round after round, so a burst of load hits all of them alike; each case
reports wall and process-CPU seconds per round, their medians, and the load
averages seen. Compilation is timed apart from steps.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTE = ("The CPU may be shared with other work while this runs: compare the ratios of one run "
        "(cases interleaved round by round), and read absolute numbers with the load averages.")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "grain", "tensorstore", "torch",
             "torchvision")


def parser(description: str, name: str) -> argparse.ArgumentParser:
  """Flags every benchmark takes: --quick, --profile DIR, --out FILE, --repeats N."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="a smoke run of a second or two: tiny shapes, one round")
  p.add_argument("--profile", metavar="DIR", default="",
                 help="also write a jax.profiler trace (TensorBoard) and the compiled HLO text here")
  p.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="JSON file to write")
  p.add_argument("--repeats", type=int, default=0, help="rounds of timing (0 = the default)")
  return p


_KEEP_FREED_MEMORY = False


def setup_jax(cpu_devices: int = 0) -> bool:
  """Before any other use of jax: host-memory reuse (`cellrep.hostmem`, as the CLI and the
  tests run), CPU device count and a fresh, empty compilation cache.

  The persistent cache lives in a new temporary directory so that the first compile
  of a run is a cold one and the second reads it back (both are reported). Returns
  whether host-memory reuse applies (also in `machine()`).
  """
  import tempfile

  from cellrep import hostmem
  global _KEEP_FREED_MEMORY
  _KEEP_FREED_MEMORY = hostmem.keep_freed_memory()
  import jax
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  from cellrep.runtime import enable_compilation_cache
  enable_compilation_cache(tempfile.mkdtemp(prefix="cellrep-bench-cache-"), min_compile_secs=0.0)
  return _KEEP_FREED_MEMORY


def machine() -> dict:
  """CPU, cores, memory, accelerator, package versions, XLA flags and host-memory reuse
  (`cellrep.hostmem`) of this run."""
  info = {
      "cpu": _cpu_model(),
      "cpu_isa": _cpu_isa(),
      "cores": os.cpu_count(),
      "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "keep_freed_memory": _KEEP_FREED_MEMORY,
  }
  for pkg in _PACKAGES:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      info[pkg] = importlib.metadata.version(pkg)
  if "jax" in sys.modules:
    import jax
    info["jax_backend"] = jax.default_backend()
    info["devices"] = [d.device_kind for d in jax.devices()]
  return info


def _cpu_model() -> str:
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor()


# The vector and matrix extensions that decide CPU kernels' speed (bf16 ones above all).
_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
        "amx_bf16", "amx_int8")


def _cpu_isa() -> list[str]:
  """Which of `_ISA` the CPU has (/proc/cpuinfo's flags; [] where there is none)."""
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        return [f for f in _ISA if f in flags]
  return []


def load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def median(xs) -> float:
  return float(statistics.median(xs)) if xs else float("nan")


def time_call(fn: Callable[[], object]) -> dict:
  """Runs fn() once (it must block until its result is ready): wall and process-CPU seconds."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def interleave(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
               ) -> dict[str, dict]:
  """Times every case once per round, in turn; per case: rounds of wall/CPU seconds, medians.

  `warmup` untimed rounds first: a program's first runs grow the heap that its buffers are
  then reused from (`cellrep.hostmem`), paying page faults the later runs do not."""
  for _ in range(warmup):
    for fn in cases.values():
      fn()
  out = {name: {"wall_s": [], "cpu_s": [], "load_1min": []} for name in cases}
  for _ in range(rounds):
    for name, fn in cases.items():
      t = time_call(fn)
      out[name]["wall_s"].append(t["wall_s"])
      out[name]["cpu_s"].append(t["cpu_s"])
      out[name]["load_1min"].append(round(os.getloadavg()[0], 2))
  for r in out.values():
    r["median_wall_s"] = median(r["wall_s"])
    r["median_cpu_s"] = median(r["cpu_s"])
  return out


def write(path, payload: dict) -> pathlib.Path:
  """Writes payload as JSON (temporary name, then rename) and returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
  tmp.replace(path)
  print(f"wrote {path}", flush=True)
  return path


def companion(path, tag: str) -> pathlib.Path:
  """The file beside `path` for one more part of a benchmark's run: results/x.json, "_256" ->
  results/x_256.json ("" -> path itself)."""
  path = pathlib.Path(path)
  return path.with_name(f"{path.stem}{tag}{path.suffix}")


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def header(name: str, args) -> dict:
  return {"benchmark": name, "started": datetime.datetime.now().isoformat(timespec="seconds"),
          "quick": bool(args.quick), "machine": machine(), "load_average_start": load(),
          "note": NOTE}


def profile(directory: str, name: str, run: Callable[[], object], compiled=None) -> None:
  """A jax.profiler trace of run() in DIR/name/ and, given a compiled program, its HLO text."""
  if not directory:
    return
  import jax
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  # The perfetto JSON beside the TensorBoard trace is what trace_summary.py reads.
  with jax.profiler.trace(str(out / name), create_perfetto_trace=True):
    run()
  for i, c in enumerate(compiled if isinstance(compiled, (list, tuple)) else [compiled]):
    if c is not None:
      (out / f"{name}{f'.{i}' if i else ''}.hlo.txt").write_text(c.as_text())
  print(f"profile of {name} in {out}", flush=True)


def cost_flops(compiled) -> float:
  """FLOPs of one run of a compiled program by XLA's cost analysis (per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per device
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")
