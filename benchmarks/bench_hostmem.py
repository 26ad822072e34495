r"""Host-memory reuse (`cellrep.hostmem`) on and off: the same programs in alternating processes.

  .venv/bin/python benchmarks/bench_hostmem.py [--quick] [--repeats R] [--out FILE]

The setting must be made before XLA starts its threads, so it cannot be switched
within one process: each round starts one child process with it on and one with
it off (``CELLREP_KEEP_FREED_MEMORY=1`` / ``0``), in turn. A child times, after
warm-up runs, the ResNet-50 ensemble predictor for one member at batch 128
(`bench_inference.py`'s ``auto``), the ResNet-50 one-member train step at batch 32
(`bench_ensemble.py`'s ``auto``), PyTorch's ResNet-50 at batch 128 when installed
(its allocator is glibc's malloc too), and the jitted matmul reference, and counts
the minor page faults of the timed runs. Writes results/hostmem.json: per setting,
every round's medians, and the ratio on / off of each program per round.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import benchlib

SETTINGS = {"on": "1", "off": "0"}


def child(quick: bool) -> dict:
  """Times the programs in this process (host-memory reuse as the environment says)."""
  keep_freed_memory = benchlib.setup_jax()
  import jax

  import bench_ensemble
  import bench_inference
  from bench_peak import matmul_case

  if quick:
    inf_kw = dict(members=1, batch=4, size=32, variants=["auto"], name="resnet18", width=0.0625)
    train_kw = dict(name="resnet18", members=1, batch_size=4, size=32, variants=["auto"],
                    width=0.0625)
    torch_kw = None
  else:
    inf_kw = dict(members=1, batch=128, size=60, variants=["auto"], name="resnet50")
    train_kw = dict(name="resnet50", members=1, batch_size=32, size=60, variants=["auto"])
    torch_kw = dict(batch=128, size=60, name="resnet50")
  cases = {"predict": bench_inference.jax_cases(**inf_kw)[0]["auto"][0]}
  state, batch, rng, steps, _ = bench_ensemble.build(**train_kw)
  step = steps["auto"][0]
  held = {"state": state}

  def train():
    held["state"], metrics = step(held["state"], batch, rng)
    jax.block_until_ready(metrics)

  cases["train"] = train
  tcase = bench_inference.torch_case(**torch_kw) if torch_kw else None
  if tcase:
    cases["torch"] = tcase[0]
  cases["reference_matmul"] = matmul_case(bench_inference.REFERENCE_N, "float32")[0]
  rounds = 1 if quick else 5
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  timing = benchlib.interleave(cases, rounds, warmup=1 if quick else 3)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  return {"medians_s": {k: v["median_wall_s"] for k, v in timing.items()},
          "page_faults_per_round": faults / rounds, "keep_freed_memory": keep_freed_memory}


def main():
  if "--child" in sys.argv:
    print("RESULT " + json.dumps(child("--quick" in sys.argv)), flush=True)
    return
  p = benchlib.parser(__doc__, "hostmem")
  args = p.parse_args()
  rounds = args.repeats or (1 if args.quick else 3)
  result = benchlib.header("hostmem", args)
  result["rounds"] = rounds
  runs = {name: [] for name in SETTINGS}
  for r in range(rounds):
    for name, value in SETTINGS.items():
      cmd = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
      env = dict(os.environ, CELLREP_KEEP_FREED_MEMORY=value)
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
      line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
      runs[name].append(json.loads(line[len("RESULT "):]))
      print(f"round {r + 1} {name}: " + ", ".join(
          f"{k} {v:.3f}s" for k, v in runs[name][-1]["medians_s"].items())
          + f"; {runs[name][-1]['page_faults_per_round']:.0f} page faults/round", flush=True)
  result["runs"] = runs
  programs = list(runs["on"][0]["medians_s"])
  # Speed-up of reuse (time off / time on) per round: > 1 means faster with it.
  result["speedup"] = {k: [off["medians_s"][k] / on["medians_s"][k]
                           for on, off in zip(runs["on"], runs["off"])] for k in programs}
  result["speedup_median"] = {k: benchlib.median(v) for k, v in result["speedup"].items()}
  result["load_average_end"] = benchlib.load()
  for k, v in result["speedup_median"].items():
    print(f"{k:18s} {v:.2f}x faster with host-memory reuse")
  benchlib.write(args.out, result)


if __name__ == "__main__":
  main()
