r"""The machine's reference FLOP rate: jitted float32 and bfloat16 matrix products.

bfloat16 operands accumulate in float32 (a float32 result), as in cellrep's models.

  .venv/bin/python benchmarks/bench_peak.py [--quick] [--profile DIR]

Square n x n products (n = 1024, 2048, 4096) under `jax.jit`, interleaved, median
of the rounds per size; the reference of a dtype is its best size. Model-FLOP
utilisation elsewhere (bench_ensemble.py) is a train step's FLOP/s divided by the
float32 reference measured in the same run; on a GPU the JSON also gives the
device's datasheet peak. Writes benchmarks/results/peak.json.
"""

from __future__ import annotations

import benchlib

# Dense datasheet peaks in TFLOP/s (no sparsity), for MFU against the hardware.
DATASHEET_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"float32": 67.0, "bfloat16": 989.0},
    "NVIDIA H100": {"float32": 67.0, "bfloat16": 989.0},
    "NVIDIA H200": {"float32": 67.0, "bfloat16": 989.0},
    "NVIDIA A100-SXM4-80GB": {"float32": 19.5, "bfloat16": 312.0},
}
DTYPES = ("float32", "bfloat16")


def matmul_case(n: int, dtype: str):
  """(callable running one jitted n x n product to completion, its FLOPs, the compiled product)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  # Accumulating in float32, the form mixed-precision models use (cellrep.ops.conv); a
  # bfloat16 result makes XLA:CPU convert the operands to float32 before the product.
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)
              ).lower(a, b).compile()
  f(a, b).block_until_ready()
  return (lambda: f(a, b).block_until_ready()), 2.0 * n**3, f


def reference_cases(dtypes, n: int = 2048) -> tuple[dict, dict]:
  """Cases ``reference_<dtype>`` timing one jitted n x n product each, to interleave with a
  benchmark's own, and {dtype: FLOPs}."""
  cases, flops = {}, {}
  for dtype in dtypes:
    cases[f"reference_{dtype}"], flops[dtype], _ = matmul_case(n, dtype)
  return cases, flops


def reference_gflops(timing: dict, flops: dict) -> tuple[dict, dict]:
  """Takes the `reference_cases` out of `timing`: ({dtype: GFLOP/s}, {dtype: their timing})."""
  times = {dtype: timing.pop(f"reference_{dtype}") for dtype in flops}
  return {dtype: flops[dtype] / t["median_wall_s"] / 1e9 for dtype, t in times.items()}, times


def measure(sizes=(1024, 2048, 4096), rounds: int = 5, dtypes=DTYPES) -> dict:
  """{dtype: {"by_size": {n: GFLOP/s median}, "gflops": best median}} of jitted products."""
  cases, flops = {}, {}
  for dtype in dtypes:
    for n in sizes:
      cases[f"{dtype}/{n}"], flops[f"{dtype}/{n}"], _ = matmul_case(n, dtype)
  timing = benchlib.interleave(cases, rounds)
  out = {}
  for dtype in dtypes:
    by_size = {n: flops[f"{dtype}/{n}"] / timing[f"{dtype}/{n}"]["median_wall_s"] / 1e9
               for n in sizes}
    out[dtype] = {"by_size": by_size, "gflops": max(by_size.values()),
                  "times": {n: timing[f"{dtype}/{n}"] for n in sizes}}
  return out


def datasheet() -> dict | None:
  import jax
  kind = jax.devices()[0].device_kind
  for name, peak in DATASHEET_TFLOPS.items():
    if kind.startswith(name):
      return {"device": kind, "tflops": peak}
  return None


def main():
  args = benchlib.parser(__doc__, "peak").parse_args()
  benchlib.setup_jax()
  sizes = (256, 512) if args.quick else (1024, 2048, 4096)
  rounds = args.repeats or (1 if args.quick else 7)
  result = benchlib.header("peak", args)
  result["reference"] = measure(sizes, rounds)
  result["datasheet"] = datasheet()
  result["load_average_end"] = benchlib.load()
  for dtype, r in result["reference"].items():
    print(f"{dtype:9s} " + "  ".join(f"n={n}: {g:6.1f}" for n, g in r["by_size"].items())
          + f"  GFLOP/s  (reference {r['gflops']:.1f})", flush=True)
  if args.profile:
    run, _, compiled = matmul_case(sizes[-1], "float32")
    benchlib.profile(args.profile, "matmul_float32", run, compiled)
  benchlib.write(args.out, result)


if __name__ == "__main__":
  main()
